//! The store end to end in one process: a master service on loopback RPC, storage clients and a
//! reader with real transfer engines over TCP.

use mooncake_testkit as common;

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{AlignedBuffer, ErrorCode};
use mooncake_master::{Command, MasterConfig, ReservedPut, TaskStatus};
use mooncake_rpc::RpcClientConfig;
use mooncake_rpc::{MasterApi, MasterReply, MasterRequest, RemoteMaster};
use mooncake_store::{ReplicateConfig, Store, StoreConfig};

use common::serve_master;

fn config(master: &str, segment: u64) -> StoreConfig {
    StoreConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: master.into(),
        global_segment_size: segment,
        local_buffer_size: 64 << 20,
        rpc: RpcClientConfig {
            call_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        },
        heartbeat_interval: Duration::from_millis(100),
        ..StoreConfig::default()
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_over_rpc_with_two_storage_clients_and_a_reader() {
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let a = Store::setup(config(&addr, 32 << 20)).await.unwrap();
    let b = Store::setup(config(&addr, 32 << 20)).await.unwrap();
    let reader = Store::setup(config(&addr, 0)).await.unwrap();
    let rc = ReplicateConfig::default();

    a.put("hello", b"Hello, Mooncake Store!", &rc)
        .await
        .unwrap();
    assert_eq!(
        reader.get("hello").await.unwrap(),
        b"Hello, Mooncake Store!"
    );
    assert_eq!(b.get("hello").await.unwrap(), b"Hello, Mooncake Store!");

    // Put of an existing key succeeds without overwriting; upsert replaces.
    a.put("hello", b"something else", &rc).await.unwrap();
    assert_eq!(
        reader.get("hello").await.unwrap(),
        b"Hello, Mooncake Store!"
    );
    b.upsert("hello", b"replaced", &rc).await.unwrap();
    assert_eq!(reader.get("hello").await.unwrap(), b"replaced");

    // Two replicas land on distinct segments, and both are readable.
    let big = pattern(3, 5 << 20);
    reader
        .put("big", &big, &ReplicateConfig::with_replicas(2))
        .await
        .unwrap();
    let descs = reader.get_replica_desc("big").await.unwrap();
    assert_eq!(descs.len(), 2);
    let segs: std::collections::HashSet<_> = descs
        .iter()
        .map(|d| d.memory().unwrap().segment_name.clone())
        .collect();
    assert_eq!(segs.len(), 2);
    assert_eq!(reader.get("big").await.unwrap(), big);
    assert_eq!(reader.get_size("big").await.unwrap(), big.len() as u64);

    // Batches.
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    let values: Vec<Vec<u8>> = (0..40)
        .map(|i| pattern(i as u8 + 1, 100 + i * 37))
        .collect();
    let items: Vec<(&str, &[u8])> = keys
        .iter()
        .map(String::as_str)
        .zip(values.iter().map(Vec::as_slice))
        .collect();
    for r in a.put_batch(&items, &rc).await {
        r.unwrap();
    }
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let got = reader.get_batch(&key_refs).await;
    for (g, v) in got.iter().zip(&values) {
        assert_eq!(g.as_ref().unwrap(), v);
    }
    assert_eq!(
        reader.batch_is_exist(&["k0", "nope", "k39"]).await.unwrap(),
        vec![true, false, true]
    );

    // Misses and bad input.
    assert_eq!(
        reader.get("nope").await.unwrap_err().code(),
        ErrorCode::OBJECT_NOT_FOUND
    );
    assert_eq!(
        reader.put("", b"x", &rc).await.unwrap_err().code(),
        ErrorCode::INVALID_PARAMS
    );
    assert_eq!(
        reader.put("e", b"", &rc).await.unwrap_err().code(),
        ErrorCode::INVALID_PARAMS
    );
    assert_eq!(
        reader
            .put("z", b"x", &ReplicateConfig::with_replicas(0))
            .await
            .unwrap_err()
            .code(),
        ErrorCode::INVALID_PARAMS
    );
    let too_big = vec![0u8; (64 << 20) + 1];
    assert_eq!(
        reader.put("tb", &too_big, &rc).await.unwrap_err().code(),
        ErrorCode::INVALID_PARAMS
    );

    // Leases: a read leases the object; remove refuses without force.
    assert_eq!(
        reader.remove("hello", false).await.unwrap_err().code(),
        ErrorCode::OBJECT_HAS_LEASE
    );
    reader.remove("hello", true).await.unwrap();
    assert_eq!(
        reader.remove("hello", false).await.unwrap_err().code(),
        ErrorCode::OBJECT_NOT_FOUND
    );
    assert!(!reader.is_exist("hello").await.unwrap());

    for s in [a, b, reader] {
        s.close().await.unwrap();
        assert!(s.get("k0").await.is_err(), "calls after close fail");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_copy_calls_use_registered_buffers_only() {
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let storage = Store::setup(config(&addr, 64 << 20)).await.unwrap();
    let client = Store::setup(config(&addr, 0)).await.unwrap();
    let src = AlignedBuffer::new(8 << 20).unwrap();
    let dst = AlignedBuffer::new(8 << 20).unwrap();
    let data = pattern(9, 8 << 20);
    // SAFETY: both buffers outlive their registrations (unregistered below).
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), src.addr() as *mut u8, data.len());
        client
            .register_buffer(src.addr(), src.len() as u64)
            .unwrap();
        client
            .register_buffer(dst.addr(), dst.len() as u64)
            .unwrap();
    }
    let rc = ReplicateConfig::default();
    client
        .put_from("t", src.addr(), 8 << 20, &rc)
        .await
        .unwrap();
    assert_eq!(
        client.get_into("t", dst.addr(), 8 << 20).await.unwrap(),
        8 << 20
    );
    // SAFETY: dst is registered and no transfer is running.
    let got = unsafe { std::slice::from_raw_parts(dst.addr() as *const u8, 8 << 20) };
    assert!(got == &data[..]);

    // Buffer too small; pointer outside any registered buffer.
    assert_eq!(
        client
            .get_into("t", dst.addr(), 100)
            .await
            .unwrap_err()
            .code(),
        ErrorCode::INVALID_PARAMS
    );
    let unregistered = vec![0u8; 4096];
    let p = unregistered.as_ptr() as u64;
    assert_eq!(
        client.get_into("t", p, 1 << 30).await.unwrap_err().code(),
        ErrorCode::INVALID_PARAMS
    );
    assert_eq!(
        client.put_from("u", p, 4096, &rc).await.unwrap_err().code(),
        ErrorCode::INVALID_PARAMS
    );
    assert!(
        !client.is_exist("u").await.unwrap(),
        "a refused put leaves nothing behind"
    );

    // Multi-buffer forms: one object from three pieces, read back into two.
    let pieces = vec![
        (src.addr(), 1000),
        (src.addr() + 5000, 3000),
        (src.addr() + 100_000, 24),
    ];
    for r in client
        .batch_put_from_multi_buffers(&[("multi", pieces)], &rc)
        .await
    {
        r.unwrap();
    }
    let outs = vec![(dst.addr(), 2500), (dst.addr() + 10_000, 1524)];
    assert_eq!(
        client
            .batch_get_into_multi_buffers(&[("multi", outs)])
            .await[0]
            .as_ref()
            .unwrap(),
        &4024
    );
    // SAFETY: as above.
    let (o1, o2) = unsafe {
        (
            std::slice::from_raw_parts(dst.addr() as *const u8, 2500),
            std::slice::from_raw_parts((dst.addr() + 10_000) as *const u8, 1524),
        )
    };
    let mut expected = data[..1000].to_vec();
    expected.extend_from_slice(&data[5000..8000]);
    expected.extend_from_slice(&data[100_000..100_024]);
    assert_eq!([o1, o2].concat(), expected);

    client.unregister_buffer(src.addr()).unwrap();
    client.unregister_buffer(dst.addr()).unwrap();
    client.close().await.unwrap();
    storage.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_and_move_tasks_run_on_clients() {
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let a = Store::setup(config(&addr, 16 << 20)).await.unwrap();
    let b = Store::setup(config(&addr, 16 << 20)).await.unwrap();
    let c = Store::setup(config(&addr, 16 << 20)).await.unwrap();
    let rc = ReplicateConfig {
        preferred_segment: a.hostname().to_owned(),
        ..Default::default()
    };
    let v = pattern(5, 300_000);
    a.put("obj", &v, &rc).await.unwrap();
    let task = a
        .create_copy_task("obj", &[b.hostname().to_owned()])
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info = a.query_task(task).await.unwrap();
        if info.status == TaskStatus::Success {
            break;
        }
        assert_ne!(info.status, TaskStatus::Failed, "{info:?}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "copy task did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let segs: Vec<String> = c
        .get_replica_desc("obj")
        .await
        .unwrap()
        .iter()
        .map(|d| d.memory().unwrap().segment_name.clone())
        .collect();
    assert!(
        segs.contains(&b.hostname().to_owned()) && segs.len() == 2,
        "{segs:?}"
    );

    let mv = c
        .create_move_task("obj", a.hostname(), c.hostname())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.query_task(mv).await.unwrap().status != TaskStatus::Success {
        assert!(
            tokio::time::Instant::now() < deadline,
            "move task did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let segs: Vec<String> = c
        .get_replica_desc("obj")
        .await
        .unwrap()
        .iter()
        .map(|d| d.memory().unwrap().segment_name.clone())
        .collect();
    assert!(
        segs.contains(&c.hostname().to_owned()) && !segs.contains(&a.hostname().to_owned()),
        "{segs:?}"
    );
    assert_eq!(a.get("obj").await.unwrap(), v);
    assert_eq!(
        a.query_task(mooncake_master::TaskId(12345))
            .await
            .unwrap_err()
            .code(),
        ErrorCode::TASK_NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_master_fails_calls_within_the_bound() {
    // Nothing listens on this port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let started = std::time::Instant::now();
    let err = Store::setup(config(&addr, 1 << 20)).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::RPC_FAIL);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_are_discovered_through_the_masters_http_metadata_server() {
    use mooncake_master_service::master_cli::{start, MasterOptions};
    let options = MasterOptions {
        rpc_address: "127.0.0.1".into(),
        rpc_port: 0,
        enable_http_metadata_server: true,
        http_metadata_server_host: "127.0.0.1".into(),
        http_metadata_server_port: 0,
        metrics_port: 0,
        ..MasterOptions::default()
    };
    let (svc, listening) = start(&options).await.unwrap();
    let http = listening.http_metadata.unwrap();
    let cfg = |segment| StoreConfig {
        metadata_server: format!("http://{http}/metadata"),
        ..config(&listening.rpc.to_string(), segment)
    };
    let storage = Store::setup(cfg(16 << 20)).await.unwrap();
    let client = Store::setup(cfg(0)).await.unwrap();
    // The storage node's descriptor is published under its segment name.
    let desc = svc
        .metadata()
        .get(&mooncake_core::metadata::segment_key(storage.hostname()))
        .await
        .unwrap();
    assert!(
        desc.is_some(),
        "descriptor published to the HTTP metadata server"
    );
    let v = pattern(11, 100_000);
    client
        .put("via-http", &v, &ReplicateConfig::default())
        .await
        .unwrap();
    assert_eq!(client.get("via-http").await.unwrap(), v);
    let bad = StoreConfig {
        metadata_server: "etcd://somewhere".into(),
        ..config(&listening.rpc.to_string(), 0)
    };
    assert_eq!(
        Store::setup(bad).await.unwrap_err().code(),
        ErrorCode::INVALID_PARAMS
    );
    client.close().await.unwrap();
    storage.close().await.unwrap();
    svc.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_outlives_its_lease_reports_lease_expired() {
    let (_svc, addr) = serve_master(MasterConfig {
        default_kv_lease_ttl_ms: 1,
        ..MasterConfig::default()
    })
    .await;
    let storage = Store::setup(config(&addr, 64 << 20)).await.unwrap();
    let client = Store::setup(config(&addr, 0)).await.unwrap();
    let v = pattern(7, 32 << 20);
    client
        .put("slow", &v, &ReplicateConfig::default())
        .await
        .unwrap();
    // Moving 32 MiB takes far longer than the 1 ms lease: the bytes may have been overwritten.
    assert_eq!(
        client.get("slow").await.unwrap_err().code(),
        ErrorCode::LEASE_EXPIRED
    );
    client.close().await.unwrap();
    storage.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_with_no_space_fails_at_once_with_no_available_handle() {
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let storage = Store::setup(config(&addr, 4 << 20)).await.unwrap();
    let client = Store::setup(config(&addr, 0)).await.unwrap();
    let rc = ReplicateConfig::default();
    let v = vec![1u8; 1 << 20];
    for i in 0..3 {
        client.put(&format!("fill{i}"), &v, &rc).await.unwrap();
        // Leased objects are never evicted: keep them leased.
        client.get(&format!("fill{i}")).await.unwrap();
    }
    let started = std::time::Instant::now();
    let err = client
        .put("too-much", &vec![2u8; 2 << 20], &rc)
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::NO_AVAILABLE_HANDLE);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "fails at once, does not wait"
    );
    assert_eq!(
        client.get("fill0").await.unwrap(),
        v,
        "nothing leased was evicted"
    );
    client.close().await.unwrap();
    storage.close().await.unwrap();
}

/// A master that is not the leader: it points every caller at `leader`.
struct Follower {
    leader: String,
}

#[async_trait::async_trait]
impl mooncake_rpc::Handler<MasterRequest, MasterReply> for Follower {
    async fn handle(&self, _: MasterRequest) -> MasterReply {
        MasterReply::NotLeader {
            leader: Some(self.leader.clone()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_master_group_find_and_follow_the_leader() {
    let (_svc, leader) = serve_master(MasterConfig::default()).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let follower = mooncake_rpc::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let follower_addr = follower.local_addr().unwrap().to_string();
    let server = mooncake_rpc::serve(
        follower,
        Arc::new(Follower {
            leader: leader.clone(),
        }),
    );
    // The leader is listed last: the client skips the dead master and follows the hint.
    let group = format!("{dead},{follower_addr},{leader}");
    let storage = Store::setup(config(&group, 8 << 20)).await.unwrap();
    storage
        .put("g", b"group", &ReplicateConfig::default())
        .await
        .unwrap();
    assert_eq!(storage.get("g").await.unwrap(), b"group");
    let only_followers = format!("{dead},{follower_addr}");
    let started = std::time::Instant::now();
    let bad = Store::setup(StoreConfig {
        master_server_addr: only_followers,
        ..config(&leader, 0)
    })
    .await;
    assert!(bad.is_err(), "no reachable leader");
    assert!(started.elapsed() < Duration::from_secs(15));
    storage.close().await.unwrap();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_values_hold_staging_space_until_dropped() {
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let storage = Store::setup(config(&addr, 32 << 20)).await.unwrap();
    let reader = Store::setup(StoreConfig {
        local_buffer_size: 4 << 20,
        staging_wait: Duration::from_secs(5),
        ..config(&addr, 0)
    })
    .await
    .unwrap();
    let rc = ReplicateConfig::default();
    let keys: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    let values: Vec<Vec<u8>> = (0..6).map(|i| pattern(i + 7, 1536 << 10)).collect();
    for (k, v) in keys.iter().zip(&values) {
        storage.put(k, v, &rc).await.unwrap();
    }
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();

    // 9 MiB through a 4 MiB staging buffer: earlier waves are moved out so later ones fit, and
    // every value is whole while all are held at once. Twice: cold, then with the locations
    // remembered.
    for _ in 0..2 {
        let held = reader.get_batch_staged(&key_refs).await;
        for (got, want) in held.iter().zip(&values) {
            let got = got.as_ref().unwrap();
            assert_eq!(got.len(), want.len());
            let mut out = vec![0u8; got.len()];
            got.read_into(&mut out).unwrap();
            assert_eq!(&out, want);
        }
        drop(held);
    }

    // A held value keeps its space; others still fit beside it, and its bytes stay its own
    // while the space around it is reused.
    let first = reader.get_staged("s0").await.unwrap();
    for _ in 0..3 {
        assert_eq!(reader.get("s1").await.unwrap(), values[1]);
        assert_eq!(
            reader.get_batch(&["s2"]).await[0].as_ref().unwrap(),
            &values[2]
        );
    }
    let mut wrong = vec![0u8; first.len() - 1];
    assert_eq!(
        first.read_into(&mut wrong).unwrap_err().code(),
        ErrorCode::INVALID_PARAMS
    );
    assert_eq!(first.into_vec().unwrap(), values[0]);
    // Once dropped, a value as large as the whole buffer fits again.
    let whole = pattern(99, 4 << 20);
    storage.put("whole", &whole, &rc).await.unwrap();
    assert_eq!(reader.get("whole").await.unwrap(), whole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_go_into_reserved_space_and_commit_with_one_call() {
    let (svc, addr) = serve_master(MasterConfig::default()).await;
    let storage = Store::setup(config(&addr, 64 << 20)).await.unwrap();
    let writer = Store::setup(config(&addr, 0)).await.unwrap();
    let reader = Store::setup(config(&addr, 0)).await.unwrap();
    let rc = ReplicateConfig::default();
    let before = svc.metrics().counters;

    // Single puts, a batch, zero-copy puts: all but the first write of each reservation skip
    // PutStart.
    let values: Vec<Vec<u8>> = (0..64u8)
        .map(|i| pattern(i + 1, 4096 + i as usize))
        .collect();
    for (i, v) in values.iter().enumerate().take(32) {
        writer.put(&format!("r{i}"), v, &rc).await.unwrap();
    }
    let batch: Vec<(String, &[u8])> = (32..64)
        .map(|i| (format!("r{i}"), values[i].as_slice()))
        .collect();
    let items: Vec<(&str, &[u8])> = batch.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    for r in writer.put_batch(&items, &rc).await {
        r.unwrap();
    }
    let buf = AlignedBuffer::new(1 << 20).unwrap();
    let src = pattern(77, 1 << 20);
    // SAFETY: `buf` is owned by this test, 1 MiB long, and outlives its registration.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), buf.addr() as *mut u8, src.len());
        writer.register_buffer(buf.addr(), 1 << 20).unwrap();
    }
    writer
        .put_from("zc", buf.addr(), 1 << 20, &rc)
        .await
        .unwrap();

    let after = svc.metrics().counters;
    let stats = writer.commit_stats();
    assert_eq!(
        (stats.on_landing, stats.after_write),
        (0, 34),
        "32 single puts, one batch and one zero-copy put, each committed after its WRITEs (the \
         storage node is not in the master's process, so the master advises that)"
    );
    let reserved = after.reserved_puts - before.reserved_puts;
    let granted = after.reservations_granted - before.reservations_granted;
    assert_eq!(reserved, 65, "every put went through the reservation");
    assert_eq!(after.put_ends - before.put_ends, 65);
    assert!(
        (1..=3).contains(&granted),
        "{granted} reservations for 1.3 MiB"
    );
    for (i, v) in values.iter().enumerate() {
        assert_eq!(&reader.get(&format!("r{i}")).await.unwrap(), v, "r{i}");
    }
    assert_eq!(reader.get("zc").await.unwrap(), src);

    // A put of an existing key leaves the value alone, as through PutStart.
    writer.put("r0", &pattern(200, 5000), &rc).await.unwrap();
    assert_eq!(reader.get("r0").await.unwrap(), values[0]);
    assert_eq!(reader.get_size("r0").await.unwrap(), 4096);

    // Other replication options take the PutStart path.
    let two = ReplicateConfig::with_replicas(2);
    let b = Store::setup(config(&addr, 64 << 20)).await.unwrap();
    writer.put("two", &values[1], &two).await.unwrap();
    let desc = reader.get_replica_desc("two").await.unwrap();
    assert_eq!(desc.len(), 2);
    assert_eq!(
        svc.metrics().counters.reserved_puts - before.reserved_puts,
        65
    );

    // Unused reserved space goes back to the cluster once the reservation expires.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = svc.metrics();
    let held: u64 = values
        .iter()
        .map(|v| (v.len() as u64).next_multiple_of(64))
        .sum::<u64>()
        + (1 << 20)
        + 2 * 4160;
    assert_eq!(m.used_bytes, held, "only the objects hold space");

    // Turned off, puts go through PutStart.
    let plain = Store::setup(StoreConfig {
        reservation_bytes: 0,
        ..config(&addr, 0)
    })
    .await
    .unwrap();
    let n = svc.metrics().counters.reserved_puts;
    plain.put("plain", &values[2], &rc).await.unwrap();
    assert_eq!(svc.metrics().counters.reserved_puts, n);
    assert_eq!(reader.get("plain").await.unwrap(), values[2]);
    for s in [plain, b, reader, writer, storage] {
        s.close().await.unwrap();
    }
}

fn failed_with(reply: &MasterReply, want: ErrorCode) -> bool {
    matches!(reply, MasterReply::Failed { code, .. } if *code == want)
}

/// A storage node's master connection that loses every landing report.
#[derive(Debug)]
struct LosesLandingReports(RemoteMaster);

#[async_trait::async_trait]
impl MasterApi for LosesLandingReports {
    async fn call(&self, request: MasterRequest) -> mooncake_core::Result<MasterReply> {
        match request {
            MasterRequest::Landed { .. } => Ok(MasterReply::Noted),
            other => self.0.call(other).await,
        }
    }
    fn session(&self) -> u64 {
        self.0.session()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_wait_for_landing_reports_and_never_apply_without_them() {
    let (svc, addr) = serve_master(MasterConfig::default()).await;
    let rc = ReplicateConfig::default();

    // The master refuses to wait for anything but a reserved commit, and gives up on ranges
    // nobody reports, applying nothing.
    let reply = svc
        .call(MasterRequest::CommitWhenLanded {
            command: Command::ExistKey { key: "k".into() },
            segment: "x:1".into(),
            ranges: vec![],
            wait_ms: 10,
        })
        .await
        .unwrap();
    assert!(failed_with(&reply, ErrorCode::INVALID_PARAMS), "{reply:?}");
    let writer = Store::setup(StoreConfig {
        commit_on_landing: Some(true),
        ..config(&addr, 0)
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let reply = svc
        .call(MasterRequest::CommitWhenLanded {
            command: Command::CommitReserved {
                client_id: writer.client_id(),
                reservation: 1,
                items: vec![ReservedPut {
                    key: "never".into(),
                    offset: 0,
                    size: 64,
                }],
                config: rc.clone(),
            },
            segment: "x:1".into(),
            ranges: vec![(0x1000, 64)],
            wait_ms: 100,
        })
        .await
        .unwrap();
    assert!(failed_with(&reply, ErrorCode::TRANSFER_FAIL), "{reply:?}");
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert!(!writer.is_exist("never").await.unwrap());

    // A storage node whose reports are lost: the writer vouches for its acknowledged WRITEs
    // itself, and every put still lands and commits.
    let lossy = Arc::new(LosesLandingReports(RemoteMaster::new(
        addr.as_str(),
        config(&addr, 0).rpc,
    )));
    let storage = Store::setup_with_master(config(&addr, 64 << 20), lossy)
        .await
        .unwrap();
    let values: Vec<Vec<u8>> = (0..8u8).map(|i| pattern(i + 3, 10_000)).collect();
    for (i, v) in values.iter().enumerate() {
        writer.put(&format!("l{i}"), v, &rc).await.unwrap();
    }
    let stats = writer.commit_stats();
    assert_eq!(
        (
            stats.on_landing,
            stats.confirmed_by_client,
            stats.after_write
        ),
        (8, 8, 0)
    );
    for (i, v) in values.iter().enumerate() {
        assert_eq!(&storage.get(&format!("l{i}")).await.unwrap(), v);
    }

    // Turned off, the commit follows the WRITE's acknowledgement.
    let after_write = Store::setup(StoreConfig {
        commit_on_landing: Some(false),
        ..config(&addr, 0)
    })
    .await
    .unwrap();
    after_write.put("aw", &values[0], &rc).await.unwrap();
    assert_eq!(after_write.commit_stats().after_write, 1);
    assert_eq!(after_write.commit_stats().on_landing, 0);
    assert_eq!(storage.get("aw").await.unwrap(), values[0]);
    storage.close().await.unwrap();

    // Left to the master's advice: with the storage node in the master's process, commits go
    // with the WRITEs, and the report is a function call.
    // Its segment is shared memory whatever the environment says (the one-sided case below).
    let embedded = Store::setup_embedded(
        StoreConfig {
            same_host_shm: true,
            ..config(&addr, 64 << 20)
        },
        svc.clone(),
    )
    .await
    .unwrap();
    let advised = Store::setup(StoreConfig {
        same_host_shm: false,
        ..config(&addr, 0)
    })
    .await
    .unwrap();
    for (i, v) in values.iter().enumerate() {
        advised.put(&format!("e{i}"), v, &rc).await.unwrap();
    }
    let stats = advised.commit_stats();
    assert_eq!((stats.on_landing, stats.after_write), (8, 0));
    for (i, v) in values.iter().enumerate() {
        assert_eq!(&embedded.get(&format!("e{i}")).await.unwrap(), v);
    }
    // Unless the WRITE is one-sided (shared memory): its completion says the bytes landed, so
    // the commit follows it and no report is made.
    let one_sided = Store::setup(StoreConfig {
        same_host_shm: true,
        ..config(&addr, 0)
    })
    .await
    .unwrap();
    for (i, v) in values.iter().enumerate() {
        one_sided.put(&format!("s{i}"), v, &rc).await.unwrap();
    }
    let stats = one_sided.commit_stats();
    assert_eq!((stats.on_landing, stats.after_write), (0, 8));
    for (i, v) in values.iter().enumerate() {
        assert_eq!(&embedded.get(&format!("s{i}")).await.unwrap(), v);
    }
    for s in [one_sided, advised, after_write, writer, embedded] {
        s.close().await.unwrap();
    }
}

/// Landing reports over the RPC are taken only from who may make them: the segment's owner
/// (its storage node), or a writer about its own reservation. Anyone else's report is refused
/// and records nothing, so a commit waiting on it does not apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn landing_reports_count_only_from_the_segment_owner_or_the_reserving_writer() {
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let rc = ReplicateConfig::default();
    // A storage node whose own reports are lost, so the only reports are the test's.
    let lossy = Arc::new(LosesLandingReports(RemoteMaster::new(
        addr.as_str(),
        config(&addr, 0).rpc,
    )));
    let storage = Store::setup_with_master(config(&addr, 64 << 20), lossy)
        .await
        .unwrap();
    let writer = Store::setup(config(&addr, 0)).await.unwrap();
    let third = Store::setup(config(&addr, 0)).await.unwrap();
    let rpc = Arc::new(RemoteMaster::new(addr.as_str(), config(&addr, 0).rpc));
    let reserved = match rpc
        .call(MasterRequest::Apply(Command::Reserve {
            client_id: writer.client_id(),
            size: 1 << 20,
            min_size: 0,
        }))
        .await
        .unwrap()
    {
        MasterReply::Applied {
            response: mooncake_master::Response::Reserved(Ok(grant)),
            ..
        } => grant,
        other => panic!("no reservation: {other:?}"),
    };
    let segment = reserved.segment_name.clone();
    let base = reserved.buffer_address;
    let range = move |i: u64| (base + i * 4096, 4096u64);
    // Commits the value at piece `i` of the reservation once it is reported landed.
    let commit = |i: u64, wait_ms: u64| {
        let (rpc, writer, segment, rc) =
            (rpc.clone(), writer.client_id(), segment.clone(), rc.clone());
        let id = reserved.id;
        tokio::spawn(async move {
            rpc.call(MasterRequest::CommitWhenLanded {
                command: Command::CommitReserved {
                    client_id: writer,
                    reservation: id,
                    items: vec![ReservedPut {
                        key: format!("v{i}"),
                        offset: i * 4096,
                        size: 4096,
                    }],
                    config: rc,
                },
                segment,
                ranges: vec![range(i)],
                wait_ms,
            })
            .await
            .unwrap()
        })
    };
    let report = |client_id, ranges: Vec<(u64, u64)>| {
        let (rpc, segment) = (rpc.clone(), segment.clone());
        async move {
            rpc.call(MasterRequest::Landed {
                client_id,
                segment,
                ranges,
            })
            .await
            .unwrap()
        }
    };
    let applied = |reply: &MasterReply| {
        matches!(reply, MasterReply::Applied {
            response: mooncake_master::Response::UnitBatch(rs),
            ..
        } if rs == &[Ok(())])
    };

    // A third client reporting the writer's reserved range, and a client id the master does
    // not know: both refused, and the waiting commit gives up, applying nothing.
    let started = std::time::Instant::now();
    let waiting = commit(0, 300);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for reporter in [third.client_id(), mooncake_master::ClientId(0xbad)] {
        let reply = report(reporter, vec![range(0)]).await;
        assert!(failed_with(&reply, ErrorCode::ILLEGAL_CLIENT), "{reply:?}");
        let MasterReply::Failed { message, .. } = &reply else {
            unreachable!()
        };
        assert!(message.contains("refused"), "{message}");
    }
    let reply = waiting.await.unwrap();
    assert!(failed_with(&reply, ErrorCode::TRANSFER_FAIL), "{reply:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(!third.is_exist("v0").await.unwrap());

    // The writer vouching for its own reserved range: recorded, and the commit applies.
    let waiting = commit(1, 1000);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reply = report(writer.client_id(), vec![range(1)]).await;
    assert!(matches!(reply, MasterReply::Noted), "{reply:?}");
    let reply = waiting.await.unwrap();
    assert!(applied(&reply), "{reply:?}");
    assert!(third.is_exist("v1").await.unwrap());
    // Once committed, that space is no longer the writer's reservation.
    let reply = report(writer.client_id(), vec![range(1)]).await;
    assert!(failed_with(&reply, ErrorCode::ILLEGAL_CLIENT), "{reply:?}");

    // The storage node owning the segment: recorded, and the commit applies.
    let waiting = commit(2, 1000);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reply = report(storage.client_id(), vec![range(2)]).await;
    assert!(matches!(reply, MasterReply::Noted), "{reply:?}");
    let reply = waiting.await.unwrap();
    assert!(applied(&reply), "{reply:?}");
    assert!(third.is_exist("v2").await.unwrap());
    for s in [third, writer, storage] {
        s.close().await.unwrap();
    }
}

/// In the normal case a storage node's own reports (over the RPC, in its client id) are what
/// commits reserved puts on landing: with the writer's vouching lost, every put still commits on
/// landing, none after its WRITE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_storage_nodes_landing_reports_commit_reserved_puts() {
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let rc = ReplicateConfig::default();
    let storage = Store::setup(config(&addr, 64 << 20)).await.unwrap();
    let mute = Arc::new(LosesLandingReports(RemoteMaster::new(
        addr.as_str(),
        config(&addr, 0).rpc,
    )));
    let writer = Store::setup_with_master(
        StoreConfig {
            commit_on_landing: Some(true),
            ..config(&addr, 0)
        },
        mute,
    )
    .await
    .unwrap();
    let values: Vec<Vec<u8>> = (0..8u8).map(|i| pattern(i + 9, 10_000)).collect();
    for (i, v) in values.iter().enumerate() {
        writer.put(&format!("n{i}"), v, &rc).await.unwrap();
    }
    let stats = writer.commit_stats();
    assert_eq!(
        (stats.on_landing, stats.after_write),
        (8, 0),
        "committed on the storage node's reports ({} vouched for by the writer, and lost)",
        stats.confirmed_by_client
    );
    for (i, v) in values.iter().enumerate() {
        assert_eq!(&storage.get(&format!("n{i}")).await.unwrap(), v);
    }
    for s in [writer, storage] {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_that_waits_past_its_reservation_goes_through_put_start() {
    let (svc, addr) = serve_master(MasterConfig::default()).await;
    let storage = Store::setup(config(&addr, 64 << 20)).await.unwrap();
    let writer = Arc::new(
        Store::setup(StoreConfig {
            local_buffer_size: 4 << 20,
            ..config(&addr, 0)
        })
        .await
        .unwrap(),
    );
    let rc = ReplicateConfig::default();
    let big = pattern(3, 3 << 20);
    writer.put("big", &big, &rc).await.unwrap();
    let before = svc.metrics().counters;
    // The writer's own staging buffer is held by a value read into it, so the next put carves
    // its space at once but waits for staging longer than the reservation may be written.
    let held = writer.get_staged("big").await.unwrap();
    let late = pattern(5, 2 << 20);
    let put = tokio::spawn({
        let (writer, late, rc) = (writer.clone(), late.clone(), rc.clone());
        async move { writer.put("late", &late, &rc).await }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!put.is_finished(), "the put waits for staging space");
    drop(held);
    put.await.unwrap().unwrap();
    let after = svc.metrics().counters;
    assert_eq!(
        after.reservations_granted,
        before.reservations_granted + 1,
        "space was carved for the put"
    );
    assert_eq!(
        after.reserved_puts, before.reserved_puts,
        "not written into the reservation"
    );
    assert_eq!(after.put_ends, before.put_ends + 1);
    assert_eq!(storage.get("late").await.unwrap(), late);
    writer.close().await.unwrap();
    storage.close().await.unwrap();
}

/// Address of the store's segment: its registered buffer of `len` bytes.
fn segment_addr(s: &Store, len: u64) -> u64 {
    s.engine()
        .memory()
        .descriptors()
        .into_iter()
        .find(|d| d.len == len)
        .expect("the segment is a registered buffer")
        .addr
}

/// Pages of `[addr, addr + len)` resident in memory, by mincore(2).
fn resident_pages(addr: u64, len: u64) -> usize {
    let page = 4096usize;
    let pages = (len as usize).div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: the range is a live mapping of this process (a registered buffer); `vec` has one
    // byte per page of it.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|b| **b & 1 == 1).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefaulted_segment_is_in_memory_from_the_start() {
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let segment = 40 << 20;
    let segment_buffer = |s: &Store| (segment_addr(s, segment), segment);
    let lazy = Store::setup(config(&addr, segment)).await.unwrap();
    let (a, n) = segment_buffer(&lazy);
    assert!(
        resident_pages(a, n) < 16,
        "a fresh segment is not in memory yet"
    );
    let eager = Store::setup(StoreConfig {
        prefault_segment: true,
        ..config(&addr, segment)
    })
    .await
    .unwrap();
    let (a, n) = segment_buffer(&eager);
    assert_eq!(resident_pages(a, n), (n / 4096) as usize);
    let rc = ReplicateConfig {
        preferred_segment: eager.hostname().to_owned(),
        ..ReplicateConfig::default()
    };
    lazy.put("p", &pattern(4, 100_000), &rc).await.unwrap();
    assert_eq!(lazy.get("p").await.unwrap(), pattern(4, 100_000));
    eager.close().await.unwrap();
    lazy.close().await.unwrap();
}

/// A put whose WRITE fails while its commit waits for the landing report returns the failure at
/// once (it does not wait out the master's wait for a report that cannot come), and nothing is
/// committed then or later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_does_not_wait_for_its_landing_commit() {
    a_failed_write_commits_nothing(false).await;
}

/// The same through shared memory, where the writer maps the segment: a buffer unregistered by
/// its owner refuses the write (the commit then goes after it, and is not sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_shared_memory_write_commits_nothing() {
    a_failed_write_commits_nothing(true).await;
}

async fn a_failed_write_commits_nothing(same_host_shm: bool) {
    let segment = 64u64 << 20;
    let (svc, addr) = serve_master(MasterConfig::default()).await;
    let storage = Store::setup_embedded(
        StoreConfig {
            same_host_shm,
            ..config(&addr, segment)
        },
        svc.clone(),
    )
    .await
    .unwrap();
    let writer = Store::setup(StoreConfig {
        same_host_shm,
        ..config(&addr, 0)
    })
    .await
    .unwrap();
    let rc = ReplicateConfig::default();
    writer.put("a", &pattern(1, 8192), &rc).await.unwrap();
    let stats = writer.commit_stats();
    // Advised (same process as the master) unless the WRITE is one-sided.
    assert_eq!(
        (stats.on_landing, stats.after_write),
        if same_host_shm { (0, 1) } else { (1, 0) }
    );
    // The storage node loses its segment's memory (the master still has it mounted).
    storage
        .engine()
        .unregister_memory(segment_addr(&storage, segment))
        .unwrap();
    let started = std::time::Instant::now();
    let r = writer.put("b", &pattern(2, 8192), &rc).await;
    let took = started.elapsed();
    assert_eq!(r.unwrap_err().code(), ErrorCode::TRANSFER_FAIL);
    assert!(
        took < Duration::from_millis(900),
        "the failed put waited {took:?} for its commit"
    );
    assert!(!writer.is_exist("b").await.unwrap());
    // The commit left waiting at the master gives up and applies nothing.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(!writer.is_exist("b").await.unwrap());
    assert_eq!(writer.commit_stats(), stats);
    for s in [writer, storage] {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_other_tasks_go_on_while_a_copy_task_stalls() {
    use mooncake_master::{ClientId, SegmentSpec};
    // Clients expire after 1.5 s of silence.
    let (svc, addr) = serve_master(MasterConfig {
        client_ttl_ms: 1_500,
        ..MasterConfig::default()
    })
    .await;
    let a = Store::setup(config(&addr, 16 << 20)).await.unwrap();
    let rc = ReplicateConfig {
        preferred_segment: a.hostname().to_owned(),
        ..Default::default()
    };
    a.put("obj", &pattern(3, 4096), &rc).await.unwrap();
    // A segment whose node accepts connections and never answers: a copy to it stalls for the
    // transfer's whole timeout (tens of seconds).
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_name = hole.local_addr().unwrap().to_string();
    let fake = ClientId(0xdead);
    let apply = |command| {
        let svc = svc.clone();
        async move { svc.call(MasterRequest::Apply(command)).await.unwrap() }
    };
    apply(Command::MountSegment {
        client_id: fake,
        segment: SegmentSpec::new(hole_name.clone(), 0x10_0000, 16 << 20),
    })
    .await;
    a.create_copy_task("obj", std::slice::from_ref(&hole_name))
        .await
        .unwrap();
    // Another copy, to a node that answers, assigned to the same storage node while the first
    // hangs: it does not wait behind it (tasks used to run one after another).
    let b = Store::setup(config(&addr, 16 << 20)).await.unwrap();
    a.put("obj2", &pattern(4, 4096), &rc).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = a
        .create_copy_task("obj2", &[b.hostname().to_owned()])
        .await
        .unwrap();
    let asked = std::time::Instant::now();
    loop {
        let status = a.query_task(second).await.unwrap().status;
        if status == TaskStatus::Success {
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "a copy waited behind a hung one ({status:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // For 4 s (well past the TTL, while the copy hangs) the storage node stays alive.
    let mounted = |name: String| {
        let svc = svc.clone();
        async move {
            match svc.call(MasterRequest::Segments).await.unwrap() {
                MasterReply::Segments(s) => s.iter().any(|s| s.name == name),
                other => panic!("{other:?}"),
            }
        }
    };
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The black hole's owner keeps itself alive by hand.
        apply(Command::Heartbeat { client_id: fake }).await;
        assert!(
            mounted(a.hostname().to_owned()).await,
            "a healthy storage node was expired while its copy task hung"
        );
    }
    assert_eq!(a.get("obj").await.unwrap(), pattern(3, 4096));
    let on: Vec<String> = (a.get_replica_desc("obj2").await.unwrap().iter())
        .map(|d| d.memory().unwrap().segment_name.clone())
        .collect();
    assert!(on.contains(&b.hostname().to_owned()), "{on:?}");
    drop(hole);
    b.close().await.unwrap();
    a.close().await.unwrap();
}

/// One of two storage nodes stops answering transfers (its transfer engine is shut down, as
/// when its process died) while the master still has its segment mounted. Writes that the
/// master places on it fail their WRITE there and are placed again on the other node: puts,
/// upserts and batches succeed at once and read back right; with two replicas wanted and one
/// node left, a value commits with the one replica it could get, as upstream's PutStart does
/// when fewer segments have room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_whose_storage_node_died_are_placed_again() {
    writes_whose_storage_node_died_are_placed_again_over(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_whose_shared_memory_storage_node_died_are_placed_again() {
    writes_whose_storage_node_died_are_placed_again_over(true).await;
}

async fn writes_whose_storage_node_died_are_placed_again_over(same_host_shm: bool) {
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let tcp = |segment| StoreConfig {
        same_host_shm,
        ..config(&addr, segment)
    };
    let a = Store::setup(tcp(32 << 20)).await.unwrap();
    let b = Store::setup(tcp(32 << 20)).await.unwrap();
    let writer = Store::setup(tcp(0)).await.unwrap();
    let one = ReplicateConfig::default();
    let two = ReplicateConfig::with_replicas(2);
    // Connections to both nodes are pooled.
    for i in 0..8 {
        writer
            .put(&format!("warm{i}"), &pattern(9, 4096), &two)
            .await
            .unwrap();
    }
    b.engine().shutdown().await;
    let started = std::time::Instant::now();
    let mut written = Vec::new();
    for i in 0..24u8 {
        let key = format!("k{i}");
        let value = pattern(i + 1, 1000 + 517 * usize::from(i));
        let r = match i % 4 {
            0 => writer.put(&key, &value, &one).await,
            1 => writer.put(&key, &value, &two).await,
            2 => writer.upsert(&format!("warm{}", i / 4), &value, &two).await,
            _ => writer
                .put_batch(
                    &[(key.as_str(), value.as_slice()), ("b-other", &value[..10])],
                    &one,
                )
                .await
                .into_iter()
                .collect(),
        };
        r.unwrap_or_else(|e| panic!("write {i} failed after {:?}: {e}", started.elapsed()));
        written.push((
            if i % 4 == 2 {
                format!("warm{}", i / 4)
            } else {
                key
            },
            value,
        ));
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "24 writes took {took:?}");
    for (key, value) in &written {
        assert!(
            &writer.get(key).await.unwrap() == value,
            "{key} read back wrong"
        );
        for d in writer.get_replica_desc(key).await.unwrap() {
            assert_eq!(d.memory().unwrap().segment_name, a.hostname(), "{key}");
        }
    }
    b.close().await.ok();
    writer.close().await.unwrap();
    a.close().await.unwrap();
}
