//! Tests of the HTTP server and client over loopback sockets.

use mooncake_core::{Error, ErrorCode, MetadataStore, Versioned};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use mooncake_core::MemoryMetadataStore;

use super::client::*;
use super::server::*;
use super::*;

/// A server on loopback with a fresh store; the flag drives `/health`.
async fn start(cfg: HttpServerConfig) -> (SocketAddr, Arc<MemoryMetadataStore>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (store, healthy) = (
        Arc::new(MemoryMetadataStore::new()),
        Arc::new(AtomicBool::new(true)),
    );
    let flag = healthy.clone();
    let endpoints = HttpEndpoints {
        metadata: Some(store.clone()),
        metrics: Arc::new(|| "mooncake_up 1\n".to_owned()),
        health: Arc::new(move || flag.load(Ordering::Relaxed)),
    };
    serve_http_with(listener, endpoints, cfg);
    (addr, store, healthy)
}

fn client(addr: SocketAddr) -> HttpMetadataStore {
    HttpMetadataStore::new(&format!("http://{addr}/metadata")).unwrap()
}

/// Sends raw bytes and returns everything the server sends until it closes.
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_all(&mut s).await
}

/// [`raw`] without the lossy conversion, for binary answers.
async fn raw_bytes(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let read = timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    read.expect("server did not close").expect("read");
    out
}

async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    read.expect("server did not close").expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn metadata_round_trip() {
    let (addr, server_store, _) = start(HttpServerConfig::default()).await;
    let c = client(addr);
    let binary: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    let keys = [
        "mooncake/segments/node1:12345",
        "a b&c=d?e#f%g+h/é\u{1F980}",
        "x",
    ];
    for key in keys {
        assert_eq!(c.get(key).await.unwrap(), None);
        let revision = c.put(key, binary.clone()).await.unwrap();
        let got = c.get(key).await.unwrap().unwrap();
        assert_eq!((got.value == binary, got.revision), (true, revision));
        assert_eq!(
            server_store.get(key).await.unwrap().unwrap().revision,
            revision
        );
        // The server decoded the key to exactly what the client meant.
        assert_eq!(server_store.get(key).await.unwrap().unwrap().value, binary);
    }
    c.put("x", Vec::new()).await.unwrap();
    assert_eq!(c.get("x").await.unwrap().unwrap().value, b"");
    assert!(c.delete("x").await.unwrap());
    assert!(!c.delete("x").await.unwrap());
    assert_eq!(c.get("x").await.unwrap(), None);
    assert!(matches!(c.get("").await, Err(Error::InvalidArgument(_))));
}

#[tokio::test]
async fn revisions_compare_and_swap_and_listing() {
    let (addr, server_store, _) = start(HttpServerConfig::default()).await;
    let c = client(addr);
    let key = "p2p/v1/payload/a b%2Fc\u{1F980}";
    // 0: the key must not exist.
    let r1 = c
        .compare_and_swap(key, 0, Some(vec![1]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        c.compare_and_swap(key, 0, Some(vec![2])).await.unwrap(),
        None
    );
    assert_eq!(
        c.compare_and_swap(key, r1 + 7, Some(vec![2]))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        c.get(key).await.unwrap().unwrap(),
        Versioned {
            value: vec![1],
            revision: r1
        }
    );
    let r2 = c
        .compare_and_swap(key, r1, Some(vec![]))
        .await
        .unwrap()
        .unwrap();
    assert!(r2 > r1);
    assert_eq!(
        c.get(key).await.unwrap().unwrap(),
        Versioned {
            value: vec![],
            revision: r2
        }
    );
    // Conditional deletes.
    assert_eq!(c.compare_and_swap(key, r1, None).await.unwrap(), None);
    assert!(c.get(key).await.unwrap().is_some());
    assert!(c.compare_and_swap(key, r2, None).await.unwrap().unwrap() > r2);
    assert_eq!(c.get(key).await.unwrap(), None);

    // Listing: binary values, escaped keys, prefixes that are not path components.
    let mut expected = Vec::new();
    for (i, k) in ["a/1", "a/2", "a/2/x", "a b&c=d", "a\u{e9}", "b/1", "ab"]
        .iter()
        .enumerate()
    {
        let value: Vec<u8> = (0..=255u8).cycle().skip(i).take(i * 100).collect();
        let revision = c.put(k, value.clone()).await.unwrap();
        expected.push((k.to_string(), Versioned { value, revision }));
    }
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(c.list("").await.unwrap(), expected);
    assert_eq!(
        c.list("").await.unwrap(),
        server_store.list("").await.unwrap()
    );
    let under_a: Vec<_> = expected
        .iter()
        .filter(|(k, _)| k.starts_with("a/"))
        .cloned()
        .collect();
    assert_eq!(c.list("a/").await.unwrap(), under_a);
    assert_eq!(c.list("a/2/").await.unwrap().len(), 1);
    assert_eq!(c.list("zzz").await.unwrap(), vec![]);
}

#[tokio::test]
async fn listings_come_in_bounded_pages() {
    let cfg = HttpServerConfig {
        max_list_page: 1000,
        ..Default::default()
    };
    let (addr, store, _) = start(cfg).await;
    let c = client(addr);
    for i in 0..50u32 {
        store
            .put(&format!("k/{i:03}"), vec![i as u8; 100])
            .await
            .unwrap();
    }
    // One entry larger than a page still comes, alone in its page.
    store.put("k/big", vec![7; 5000]).await.unwrap();
    let got = c.list("k/").await.unwrap();
    assert_eq!(got, store.list("k/").await.unwrap());
    assert_eq!(got.len(), 51);
    // Each page is within the bound (or a single entry) and says whether more follow.
    let page = raw(
        addr,
        b"GET /metadata?prefix=k%2F HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(page.contains("X-Mooncake-More: 1\r\n"), "{page}");
    let body = page.split_once("\r\n\r\n").unwrap().1;
    assert!(body.len() <= 1000);
    assert_eq!(
        decode_entries(body.as_bytes()).unwrap().len(),
        1000 / entry_len("k/000", &[0; 100])
    );
    let last = raw_bytes(
        addr,
        b"GET /metadata?prefix=k%2F&after=k%2F049 HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    let split = last.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let (head, body) = (String::from_utf8_lossy(&last[..split]), &last[split + 4..]);
    assert!(!head.contains("X-Mooncake-More"), "{head}");
    let entries = decode_entries(body).unwrap();
    assert_eq!(
        (entries.len(), entries[0].0.as_str(), entries[0].2.len()),
        (1, "k/big", 5000)
    );
}

#[tokio::test]
async fn racing_compare_and_swaps_have_one_winner() {
    let (addr, store, _) = start(HttpServerConfig::default()).await;
    for round in 0..20u64 {
        let key = format!("race/{round}");
        let expected = match round % 2 {
            0 => 0, // create
            _ => store.put(&key, vec![0]).await.unwrap(),
        };
        // Eight clients on their own connections, released together.
        let barrier = Arc::new(tokio::sync::Barrier::new(8));
        let tasks: Vec<_> = (0..8u8)
            .map(|i| {
                let (c, barrier, key) = (client(addr), barrier.clone(), key.clone());
                tokio::spawn(async move {
                    c.get("warm-up").await.unwrap(); // connect before the race
                    barrier.wait().await;
                    let value = (i % 3 != 0).then(|| vec![i]); // some deletes too
                    (i, c.compare_and_swap(&key, expected, value).await.unwrap())
                })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            if let (i, Some(revision)) = t.await.unwrap() {
                winners.push((i, revision));
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let (i, revision) = winners[0];
        match (i % 3 != 0, store.get(&key).await.unwrap()) {
            (true, Some(v)) => assert_eq!(
                v,
                Versioned {
                    value: vec![i],
                    revision
                }
            ),
            (false, None) => {}
            (_, got) => panic!("round {round}: winner {i} but the store holds {got:?}"),
        }
    }
}

#[tokio::test]
async fn plain_requests_answer_as_upstream_with_a_revision_header_added() {
    let (addr, store, _) = start(HttpServerConfig::default()).await;
    let put = raw(
        addr,
        b"PUT /metadata?key=seg HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .await;
    let revision = store.get("seg").await.unwrap().unwrap().revision;
    assert_eq!(
        put,
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 16\r\n\
             X-Mooncake-Revision: {revision}\r\nConnection: close\r\n\r\nmetadata updated"
        )
    );
    let get = raw(
        addr,
        b"GET /metadata?key=seg HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        get,
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 2\r\n\
             X-Mooncake-Revision: {revision}\r\nConnection: close\r\n\r\nhi"
        )
    );
    let del = b"DELETE /metadata?key=seg HTTP/1.1\r\nConnection: close\r\n\r\n";
    assert_eq!(
        raw(addr, del).await,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 16\r\n\
         Connection: close\r\n\r\nmetadata deleted"
    );
    for request in [
        &del[..],
        b"GET /metadata?key=seg HTTP/1.1\r\nConnection: close\r\n\r\n",
    ] {
        assert_eq!(
            raw(addr, request).await,
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 18\r\nConnection: close\r\n\r\nmetadata not found"
        );
    }
    // A conditional write that loses: 412, nothing written.
    store.put("seg", b"v".to_vec()).await.unwrap();
    let stale = raw(addr, b"PUT /metadata?key=seg&expected_revision=0 HTTP/1.1\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx").await;
    assert!(
        stale.starts_with("HTTP/1.1 412 Precondition Failed\r\n"),
        "{stale}"
    );
    assert!(stale.ends_with("\r\n\r\nrevision mismatch"), "{stale}");
    assert_eq!(store.get("seg").await.unwrap().unwrap().value, b"v");
}

/// A store that cannot compare-and-swap or list.
#[derive(Debug, Default)]
struct PlainStore(MemoryMetadataStore);

#[async_trait::async_trait]
impl MetadataStore for PlainStore {
    async fn get(&self, key: &str) -> mooncake_core::Result<Option<Versioned>> {
        self.0.get(key).await
    }
    async fn put(&self, key: &str, value: Vec<u8>) -> mooncake_core::Result<u64> {
        self.0.put(key, value).await
    }
    async fn delete(&self, key: &str) -> mooncake_core::Result<bool> {
        self.0.delete(key).await
    }
    async fn compare_and_swap(
        &self,
        _: &str,
        _: u64,
        _: Option<Vec<u8>>,
    ) -> mooncake_core::Result<Option<u64>> {
        Err(Error::NotSupported("no CAS here".into()))
    }
    async fn list(&self, _: &str) -> mooncake_core::Result<Vec<(String, Versioned)>> {
        Err(Error::NotSupported("no listing here".into()))
    }
}

#[tokio::test]
async fn stores_without_cas_or_listing_answer_not_implemented() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let endpoints = HttpEndpoints {
        metadata: Some(Arc::new(PlainStore::default())),
        metrics: Arc::new(String::new),
        health: Arc::new(|| true),
    };
    serve_http(listener, endpoints);
    let c = client(addr);
    c.put("k", vec![1]).await.unwrap();
    let cas = c.compare_and_swap("k", 0, Some(vec![2])).await;
    assert!(matches!(cas, Err(Error::NotSupported(_))), "{cas:?}");
    assert!(matches!(c.list("").await, Err(Error::NotSupported(_))));
    assert_eq!(c.get("k").await.unwrap().unwrap().value, [1]);
}

/// An upstream-style server (no revisions, no listing): reads report revision 1, and the
/// client refuses to take an unconditional write for a successful compare-and-swap.
#[tokio::test]
async fn client_against_a_server_without_revisions() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = BufReader::new(stream);
        let answers: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nv",
            b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\nmetadata updated",
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\nmissing key",
        ];
        for answer in answers {
            let mut line = String::new();
            loop {
                line.clear();
                stream.read_line(&mut line).await.unwrap();
                if line == "\r\n" {
                    break;
                }
            }
            stream.write_all(answer).await.unwrap();
        }
    });
    let c = client(addr);
    assert_eq!(c.get("k").await.unwrap().unwrap().revision, 1);
    let cas = c.compare_and_swap("k", 0, None).await;
    assert!(matches!(cas, Err(Error::NotSupported(_))), "{cas:?}");
    assert!(matches!(c.list("").await, Err(Error::NotSupported(_))));
}

#[test]
fn listing_encoding_round_trips_and_rejects_garbage() {
    let mut body = Vec::new();
    encode_entry(&mut body, "k\u{e9}", 7, b"\0\xffv");
    encode_entry(&mut body, "", u64::MAX, b"");
    assert_eq!(
        body.len(),
        entry_len("k\u{e9}", b"\0\xffv") + entry_len("", b"")
    );
    assert_eq!(
        decode_entries(&body).unwrap(),
        vec![
            ("k\u{e9}".into(), 7, b"\0\xffv".to_vec()),
            (String::new(), u64::MAX, vec![])
        ]
    );
    for cut in 1..body.len() {
        // Every strict prefix that is not an entry boundary fails.
        if cut != entry_len("k\u{e9}", b"\0\xffv") {
            assert!(decode_entries(&body[..cut]).is_err(), "{cut}");
        }
    }
    let mut huge = u32::MAX.to_be_bytes().to_vec();
    huge.push(b'a');
    assert!(decode_entries(&huge).is_err());
    let mut bad_utf8 = 1u32.to_be_bytes().to_vec();
    bad_utf8.push(0xff);
    bad_utf8.extend_from_slice(&[0; 16]);
    assert!(decode_entries(&bad_utf8).is_err());
    let mut huge_value = 0u32.to_be_bytes().to_vec();
    huge_value.extend_from_slice(&[0; 8]);
    huge_value.extend_from_slice(&u64::MAX.to_be_bytes());
    assert!(decode_entries(&huge_value).is_err());
}

#[tokio::test]
async fn client_reconnects_after_the_server_drops_an_idle_connection() {
    let cfg = HttpServerConfig {
        request_timeout: Duration::from_millis(100),
        ..Default::default()
    };
    let (addr, _, _) = start(cfg).await;
    let c = client(addr);
    c.put("k", b"v".to_vec()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(c.get("k").await.unwrap().unwrap().value, b"v");
    assert!(c.delete("k").await.unwrap());
}

#[tokio::test]
async fn client_times_out_and_reports_unreachable_servers() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap(); // never accepts
    let cfg = HttpClientConfig {
        request_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let url = format!("http://{}/metadata", silent.local_addr().unwrap());
    let c = HttpMetadataStore::with_config(&url, cfg).unwrap();
    assert_eq!(c.get("k").await.unwrap_err().code(), ErrorCode::RPC_TIMEOUT);
    let port = silent.local_addr().unwrap().port();
    drop(silent);
    let gone = HttpMetadataStore::new(&format!("http://127.0.0.1:{port}/metadata")).unwrap();
    assert!(matches!(gone.get("k").await, Err(Error::Metadata(_))));
}

#[tokio::test]
async fn client_reads_chunked_and_close_delimited_answers() {
    // Upstream's Go server answers large values with chunked encoding.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let answers: [&[u8]; 2] = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\nuntil close",
        ];
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = BufReader::new(stream);
        for answer in answers {
            let mut line = String::new();
            while stream.read_line(&mut line).await.unwrap() > 2 {
                line.clear();
            }
            stream.write_all(answer).await.unwrap();
        }
    });
    let c = client(addr);
    assert_eq!(c.get("a").await.unwrap().unwrap().value, b"abcde");
    assert_eq!(c.get("b").await.unwrap().unwrap().value, b"until close");
}

#[test]
fn urls() {
    let c = HttpMetadataStore::new("http://[::1]:8080/metadata").unwrap();
    assert_eq!(
        (c.host.as_str(), c.port, c.path.as_str()),
        ("::1", 8080, "/metadata")
    );
    let c = HttpMetadataStore::new("HTTP://meta.example/metadata?cluster=a").unwrap();
    assert_eq!(
        (c.host.as_str(), c.port, c.authority.as_str()),
        ("meta.example", 80, "meta.example")
    );
    assert_eq!(c.path, "/metadata?cluster=a");
    for bad in [
        "https://h/metadata",
        "h:80/metadata",
        "http://",
        "http://h:x/",
        "http://h:0/",
        "http://u@h/",
        "http://[::1/",
        "http://h/a b",
        "etcd://h:2379",
    ] {
        let err = HttpMetadataStore::new(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
    }
}

#[test]
fn percent_coding() {
    let all: String = (1..0x250u32).filter_map(char::from_u32).collect();
    assert_eq!(percent_decode(&percent_encode(&all)).unwrap(), all);
    assert_eq!(percent_decode("a+b%2B%2fc").unwrap(), "a b+/c");
    for bad in ["%", "%4", "%zz", "%ff"] {
        assert!(percent_decode(bad).is_err(), "{bad}");
    }
    assert_eq!(
        query_param("x=1&key=a%20b&key=c", "key").unwrap().unwrap(),
        "a b"
    );
    assert_eq!(query_param("", "key").unwrap(), None);
}

#[tokio::test]
async fn metrics_and_health() {
    let (addr, _, healthy) = start(HttpServerConfig::default()).await;
    let metrics = raw(addr, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
    assert!(metrics.contains("Content-Type: text/plain; version=0.0.4"));
    assert!(metrics.ends_with("\r\n\r\nmooncake_up 1\n"));
    let health = b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n";
    assert!(raw(addr, health).await.ends_with("\r\n\r\nOK"));
    healthy.store(false, Ordering::Relaxed);
    assert!(raw(addr, health).await.starts_with("HTTP/1.1 503 "));
    let head = raw(addr, b"HEAD /health HTTP/1.0\r\n\r\n").await;
    assert!(
        head.contains("Content-Length: 9\r\n") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    let post = raw(addr, b"POST /health HTTP/1.0\r\n\r\n").await;
    assert!(post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD\r\n"));
}

#[tokio::test]
async fn keep_alive_pipelining_and_expect_continue() {
    let (addr, _, _) = start(HttpServerConfig::default()).await;
    let two = raw(
        addr,
        b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi\
        GET /metadata?key=k HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(two.matches("HTTP/1.1 200 OK").count(), 2, "{two}");
    assert!(two.ends_with("Connection: close\r\n\r\nhi"), "{two}");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"PUT /metadata?key=e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 25];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"xGET /metadata?key=e HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let rest = read_all(&mut s).await;
    assert!(
        rest.starts_with("HTTP/1.1 200 OK") && rest.ends_with("\r\n\r\nx"),
        "{rest}"
    );
}

#[tokio::test]
async fn hostile_requests_get_errors_and_a_closed_connection() {
    let (addr, store, _) = start(HttpServerConfig::default()).await;
    let big_header = format!(
        "GET /health HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(20 << 10)
    );
    let cases: &[(&[u8], &str)] = &[
        (b"GARBAGE\r\n\r\n", "400"),
        (b"\x00\xff\xfe GET /\r\n\r\n", "400"),
        (b"GET /health HTTP/1.1 extra\r\n\r\n", "400"),
        (b"GET /health HTTP/2.0\r\n\r\n", "505"),
        (b"GET /health HTTP/1.1\r\nno colon\r\n\r\n", "400"),
        (b"GET /health HTTP/1.1\r\n folded: x\r\n\r\n", "400"),
        (big_header.as_bytes(), "431"),
        (b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 1099511627776\r\n\r\n", "413"),
        (b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", "400"),
        (b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "400"),
        (b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", "400"),
        (b"PUT /metadata?key=k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", "411"),
        (b"PUT /metadata?key=k HTTP/1.1\r\n\r\n", "411"),
        (b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", "400"),
        (b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n", "404"),
        (b"PATCH /metadata?key=k HTTP/1.1\r\nConnection: close\r\n\r\n", "405"),
        (b"GET /metadata HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (b"GET /metadata?key=%zz HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (b"GET /metadata?key=%C3 HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (b"PUT /metadata?key=k&expected_revision=x HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", "400"),
        (b"PUT /metadata?key=k&expected_revision=-1 HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", "400"),
        (b"PUT /metadata?key=k&expected_revision=99999999999999999999999 HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", "400"),
        (b"GET /metadata?key=k&expected_revision=0 HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (b"GET /metadata?key=k&prefix=k HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (b"PUT /metadata?prefix=k HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", "400"),
        (b"DELETE /metadata?prefix= HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (b"GET /metadata?prefix=%zz HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (b"GET /metadata?prefix=a&after=%C3 HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (b"GET /metadata?key=k&after=a HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        (b"GET /metadata?after=a HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
    ];
    for (i, (request, status)) in cases.iter().enumerate() {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        if i == 13 {
            s.shutdown().await.unwrap(); // the body never comes
        }
        let answer = read_all(&mut s).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "case {i}: {answer}"
        );
    }
    assert_eq!(store.get("k").await.unwrap(), None);
    // The server still works.
    client(addr).put("k", b"v".to_vec()).await.unwrap();
}

#[tokio::test]
async fn stalled_clients_time_out_without_blocking_others() {
    let cfg = HttpServerConfig {
        request_timeout: Duration::from_millis(1000),
        ..Default::default()
    };
    let (addr, _, _) = start(cfg).await;
    let mut half_body = TcpStream::connect(addr).await.unwrap();
    half_body
        .write_all(b"PUT /metadata?key=a HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        .await
        .unwrap();
    let mut half_line = TcpStream::connect(addr).await.unwrap();
    half_line.write_all(b"GE").await.unwrap();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let c = client(addr);
    for i in 0..20u8 {
        c.put("b", vec![i]).await.unwrap();
        assert_eq!(c.get("b").await.unwrap().unwrap().value, [i]);
    }
    // Served while the stalled connections were still open.
    let mut byte = [0u8; 1];
    assert!(timeout(Duration::ZERO, half_body.read(&mut byte))
        .await
        .is_err());
    assert!(read_all(&mut half_body).await.starts_with("HTTP/1.1 408 "));
    assert!(read_all(&mut half_line).await.starts_with("HTTP/1.1 408 "));
    assert_eq!(read_all(&mut silent).await, "");
    assert_eq!(c.get("a").await.unwrap(), None);
}

/// Extra routes answer their paths, with the decoded query; the built-in paths stay the
/// server's own, and a path no one serves is still `404`.
#[tokio::test]
async fn extra_routes_serve_further_paths() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let endpoints = HttpEndpoints {
        metadata: None,
        metrics: Arc::new(|| "mooncake_up 1\n".to_owned()),
        health: Arc::new(|| true),
    };
    let extra: ExtraRoutes = Arc::new(|req: &RouteRequest<'_>| match req.path {
        "/echo" if req.is_read() => Some(match req.param("key") {
            Ok(Some(key)) => RouteResponse::new(200, "text/plain", format!("key={key}")),
            Ok(None) => RouteResponse::new(400, "text/plain", "no key"),
            Err(why) => RouteResponse::new(400, "text/plain", why),
        }),
        "/page" => Some(RouteResponse {
            more: true,
            ..RouteResponse::new(200, "text/plain", "a\n")
        }),
        // Never reached: the built-in endpoint answers first.
        "/metrics" => Some(RouteResponse::new(500, "text/plain", "shadowed")),
        _ => None,
    });
    serve_http_routes(
        listener,
        endpoints,
        Some(extra),
        HttpServerConfig::default(),
    );
    let get = |target: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes()
    };
    let echo = raw(addr, &get("/echo?key=a%2Fb%20c")).await;
    assert!(echo.starts_with("HTTP/1.1 200 OK\r\n"), "{echo}");
    assert!(echo.ends_with("\r\n\r\nkey=a/b c"), "{echo}");
    let missing = raw(addr, &get("/echo")).await;
    assert!(missing.starts_with("HTTP/1.1 400 "), "{missing}");
    assert!(missing.ends_with("no key"), "{missing}");
    let bad = raw(addr, &get("/echo?key=%zz")).await;
    assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");
    let page = raw(addr, &get("/page")).await;
    assert!(page.contains("\r\nX-Mooncake-More: 1\r\n"), "{page}");
    let head = raw(
        addr,
        b"HEAD /echo?key=k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Length: 5\r\n") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    let metrics = raw(addr, &get("/metrics")).await;
    assert!(metrics.ends_with("mooncake_up 1\n"), "{metrics}");
    let post = raw(
        addr,
        b"POST /echo?key=k HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 404 "), "{post}");
    let nothing = raw(addr, &get("/nothing")).await;
    assert!(nothing.starts_with("HTTP/1.1 404 "), "{nothing}");
}

/// Connects from `ip` (a loopback address) to `addr`.
async fn connect_from(ip: &str, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(ip.parse().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

/// A health check over `s`: the whole answer, once the server closes.
async fn health_over(mut s: TcpStream) -> String {
    // A refused connection may be reset before or while this is written.
    let _ = s
        .write_all(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let read = timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    read.expect("server did not close")
        .map(|_| String::from_utf8_lossy(&out).into_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn one_address_gets_at_most_its_share_of_connections() {
    let cfg = HttpServerConfig {
        max_per_address: 2,
        ..Default::default()
    };
    let (addr, _, _) = start(cfg).await;
    // Two idle connections from 127.0.0.1 take its places...
    let held = [
        connect_from("127.0.0.1", addr).await,
        connect_from("127.0.0.1", addr).await,
    ];
    // ...so a third from there is closed unanswered,
    let third = health_over(connect_from("127.0.0.1", addr).await).await;
    assert_eq!(third, "", "a connection past the cap was served");
    // while another address is served.
    let other = health_over(connect_from("127.0.0.2", addr).await).await;
    assert!(other.starts_with("HTTP/1.1 200"), "{other}");
    // A place given back is taken again.
    drop(held);
    let mut again = String::new();
    for _ in 0..500 {
        again = health_over(connect_from("127.0.0.1", addr).await).await;
        if !again.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
}
