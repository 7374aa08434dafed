//! The admin endpoints of a real `mooncake_master` process, queried over HTTP/1.1 on loopback
//! after a client in this process mounted a segment and put objects.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::masters::Group;
use common::{eventually, store_config, wait_line, Proc};
use mooncake_store::{ReplicateConfig, Store};

/// Starts `mooncake_master` on loopback with `extra` flags; returns it, its RPC address and its
/// metrics (admin) address.
fn spawn(extra: &[&str]) -> (Proc, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mooncake_master"))
        .args([
            "--rpc_address=127.0.0.1",
            "--rpc_port=0",
            "--metrics_port=0",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mooncake_master");
    let rest = wait_line(&mut child, "mooncake_master listening: rpc=");
    let rpc = rest.split_whitespace().next().unwrap().to_owned();
    let metrics = rest
        .split_whitespace()
        .find_map(|w| w.strip_prefix("metrics="))
        .expect("metrics address")
        .to_owned();
    (Proc(child), rpc, metrics)
}

/// One `GET` with `Connection: close`: status, headers (lower-cased names) and body.
fn get(addr: &str, target: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a complete answer");
    let status = head[9..12].parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_with_upstream_formats() {
    let (_master, rpc, http) = spawn(&[]);
    // Nothing mounted yet: an empty listing, as SGLang's readiness check sees it.
    let (status, _, body) = get(&http, "/get_all_segments");
    assert_eq!((status, body.as_str()), (200, ""));

    let store = Store::setup(store_config(&rpc, 16 << 20)).await.unwrap();
    let one = ReplicateConfig::with_replicas(1);
    let keys = ["alpha", "beta", "key with space/é"];
    for (i, key) in keys.iter().enumerate() {
        store
            .put(key, &vec![i as u8; 1000 + i], &one)
            .await
            .unwrap();
    }

    // /get_all_segments: the mounted segment's name, newline-terminated.
    let desc = store.get_replica_desc("alpha").await.unwrap();
    let mem = desc[0].memory().unwrap().clone();
    let (status, head, body) = get(&http, "/get_all_segments");
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(body, format!("{}\n", mem.segment_name));

    // /get_segments_detail: one JSON entry per mount.
    let (status, head, body) = get(&http, "/get_segments_detail");
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/json"), "{head}");
    assert!(
        body.starts_with("{\"total_segments\":1,\"segments\":[{\"segment_name\":\""),
        "{body}"
    );
    assert!(
        body.contains(&format!("\"segment_name\":\"{}\"", mem.segment_name)),
        "{body}"
    );
    assert!(
        body.contains(&format!("\"te_endpoint\":\"{}\"", mem.transport_endpoint)),
        "{body}"
    );
    assert!(body.contains("\"size_bytes\":16777216,"), "{body}");
    assert!(
        body.contains("\"allocator_capacity_bytes\":16777216,"),
        "{body}"
    );
    assert!(body.contains("\"status\":\"OK\""), "{body}");
    assert!(body.ends_with("}]}"), "{body}");

    // /query_segment: name, used and capacity.
    let (status, _, body) = get(
        &http,
        &format!("/query_segment?segment={}", mem.segment_name),
    );
    assert_eq!(status, 200, "{body}");
    let lines: Vec<&str> = body.lines().collect();
    assert_eq!(lines[0], mem.segment_name);
    let used: u64 = lines[1]
        .strip_prefix("Used(bytes): ")
        .unwrap()
        .parse()
        .unwrap();
    let capacity: u64 = lines[2]
        .strip_prefix("Capacity(bytes) : ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(used >= 3000, "three objects of 1000+ bytes: {body}");
    assert_eq!(capacity, 16 << 20);
    let (status, _, body) = get(&http, "/query_segment?segment=nowhere:1");
    assert_eq!((status, body.as_str()), (404, "SEGMENT_NOT_FOUND"));

    // /get_all_keys: every key, in order.
    let (status, head, body) = get(&http, "/get_all_keys");
    assert_eq!(status, 200);
    assert!(!head.contains("x-mooncake-more"), "{head}");
    assert_eq!(body, "alpha\nbeta\nkey with space/é\n");
    // Paging: one key a page, then the rest after it.
    let (_, head, body) = get(&http, "/get_all_keys?limit=1");
    assert_eq!(body, "alpha\n");
    assert!(head.contains("x-mooncake-more: 1"), "{head}");
    let (_, head, body) = get(&http, "/get_all_keys?after=alpha&limit=5");
    assert_eq!(body, "beta\nkey with space/é\n");
    assert!(!head.contains("x-mooncake-more"), "{head}");
    assert_eq!(get(&http, "/get_all_keys?limit=0").0, 400);

    // /query_key: one JSON buffer descriptor per in-memory replica.
    let (status, _, body) = get(&http, "/query_key?key=alpha");
    assert_eq!(status, 200);
    assert_eq!(
        body,
        format!(
            "{{\"size\":1000,\"buffer_address\":{},\"transport_endpoint\":\"{}\"}}\n",
            mem.buffer_address, mem.transport_endpoint
        )
    );
    let (status, _, body) = get(&http, "/query_key?key=key%20with%20space%2F%C3%A9");
    assert_eq!(status, 200);
    assert!(body.starts_with("{\"size\":1002,"), "{body}");
    let (status, _, body) = get(&http, "/query_key?key=missing");
    assert_eq!((status, body.as_str()), (404, "OBJECT_NOT_FOUND"));

    // /batch_query_keys: found and missing keys side by side.
    let (status, head, body) = get(&http, "/batch_query_keys?keys=alpha,missing");
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/json"), "{head}");
    assert_eq!(
        body,
        format!(
            "{{\"success\":true,\"data\":{{\"alpha\":{{\"ok\":true,\"values\":[{{\"size\":1000,\
             \"buffer_address\":{},\"transport_endpoint\":\"{}\"}}]}},\"missing\":{{\"ok\":false,\
             \"error\":\"OBJECT_NOT_FOUND\"}}}}}}",
            mem.buffer_address, mem.transport_endpoint
        )
    );
    let (status, _, body) = get(&http, "/batch_query_keys");
    assert_eq!(status, 400);
    assert!(body.contains("\"success\":false"), "{body}");

    // /metrics/summary: storage and keys of this master.
    let (status, _, body) = get(&http, "/metrics/summary");
    assert_eq!(status, 200);
    assert!(body.starts_with("Storage: "), "{body}");
    assert!(body.contains("/ 16.00 MB"), "{body}");
    assert!(body.contains("| Keys: 3 (complete: 3)"), "{body}");
    assert!(body.contains("PutStart=3/3"), "{body}");

    // The existing endpoints are still there; a write to an admin path is refused.
    let (status, _, body) = get(&http, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("mooncake_master_keys 3"), "{body}");
    assert_eq!(get(&http, "/health").2, "OK");
    let mut s = TcpStream::connect(&http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"DELETE /get_all_keys HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 405 "), "{out}");
    assert_eq!(get(&http, "/no_such_path").0, 404);

    store.close().await.unwrap();
}

/// In a master group the leader serves the state endpoints; the other members answer `503` as
/// upstream's standby masters do, naming the leader, and still serve the summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_that_do_not_lead_answer_unavailable() {
    let group = Group::new("admin-http", 3);
    eventually("a leader", Duration::from_secs(15), || async {
        group.leader().await.is_some()
    })
    .await;
    let leader = group.leader().await.unwrap();
    let metrics_of = |id: u64| {
        group
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _)| *m == id)
            .find_map(|(_, line)| {
                line.strip_prefix("mooncake_master listening: ")?
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("metrics="))
                    .map(str::to_owned)
            })
            .expect("the member's metrics address")
    };
    for (i, m) in group.members.iter().enumerate() {
        let http = metrics_of(m.id);
        let (status, head, body) = get(&http, "/get_all_segments");
        if i == leader {
            assert_eq!((status, body.as_str()), (200, ""), "leader {}", m.id);
        } else {
            // A member names the leader once it has heard from it.
            let leader_rpc = group.members[leader].rpc.clone();
            eventually("the leader's name", Duration::from_secs(5), || {
                let (http, leader_rpc) = (http.clone(), leader_rpc.clone());
                async move { get(&http, "/get_all_segments").2.contains(&leader_rpc) }
            })
            .await;
            assert_eq!(status, 503, "member {}: {body}", m.id);
            assert!(head.contains("content-type: application/json"), "{head}");
            assert!(
                body.starts_with("{\"success\":false,\"error_code\":-1011,\"error_message\":\""),
                "{body}"
            );
            assert_eq!(get(&http, "/query_key?key=k").0, 503);
        }
        let (status, _, body) = get(&http, "/metrics/summary");
        assert_eq!(status, 200);
        assert!(body.starts_with("Storage: "), "{body}");
    }
}
