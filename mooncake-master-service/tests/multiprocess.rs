//! The store across processes over real TCP: the `mooncake_master` binary, storage clients in
//! their own processes, a reader here. Storage processes are killed with SIGKILL and the master
//! is restarted, as happens in production.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{eventually, spawn_master, spawn_storage, store_config};
use mooncake_core::ErrorCode;
use mooncake_store::{ReplicateConfig, Store};

/// Not a test on its own: the body of the storage processes of the tests below.
#[test]
#[ignore = "runs only as a child process of the multi-process tests"]
fn child_storage() {
    common::run_child_storage();
}

fn value(i: usize) -> Vec<u8> {
    (0..1000 + i * 517).map(|j| (i * 31 + j) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_storage_node_loses_no_object_and_replicas_are_restored() {
    let (_master, addr) = spawn_master(0, 2);
    let (_a, seg_a) = spawn_storage(&addr);
    let (mut b, seg_b) = spawn_storage(&addr);
    let reader = Store::setup(store_config(&addr, 0)).await.unwrap();

    let two = ReplicateConfig::with_replicas(2);
    for i in 0..30 {
        reader
            .put(&format!("obj{i}"), &value(i), &two)
            .await
            .unwrap();
    }
    for i in 0..30 {
        let segs: Vec<String> = reader
            .get_replica_desc(&format!("obj{i}"))
            .await
            .unwrap()
            .iter()
            .map(|d| d.memory().unwrap().segment_name.clone())
            .collect();
        assert_eq!(segs.len(), 2);
        assert!(segs.contains(&seg_a) && segs.contains(&seg_b));
    }
    assert_eq!(reader.master_metrics().await.unwrap().segment_count, 2);

    // A third node joins; then B dies without a word.
    let (_c, seg_c) = spawn_storage(&addr);
    b.0.kill().unwrap();
    b.0.wait().unwrap();

    // Every object is still readable right away (reads fall back to the surviving replica).
    for i in 0..30 {
        assert_eq!(
            reader.get(&format!("obj{i}")).await.unwrap(),
            value(i),
            "obj{i}"
        );
    }
    // After client_ttl the master unmounts B's segment ...
    eventually(
        "unmounting the dead node's segment",
        Duration::from_secs(10),
        || async { reader.master_metrics().await.unwrap().segment_count == 2 },
    )
    .await;
    // ... and re-replication brings every object back to two replicas, on A and C.
    eventually("re-replication", Duration::from_secs(15), || async {
        let mut ok = true;
        for i in 0..30 {
            let segs: Vec<String> = reader
                .get_replica_desc(&format!("obj{i}"))
                .await
                .unwrap()
                .iter()
                .map(|d| d.memory().unwrap().segment_name.clone())
                .collect();
            ok &= segs.len() == 2 && segs.contains(&seg_a) && segs.contains(&seg_c);
        }
        ok
    })
    .await;
    for i in 0..30 {
        assert_eq!(
            reader.get(&format!("obj{i}")).await.unwrap(),
            value(i),
            "obj{i} after repair"
        );
    }
    reader.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_remount_after_the_master_restarts() {
    // Find a free port, then run the master on it twice.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (master, addr) = spawn_master(port, 10);
    let (_a, seg_a) = spawn_storage(&addr);
    let client = Arc::new(Store::setup(store_config(&addr, 0)).await.unwrap());
    client
        .put("before", b"x", &ReplicateConfig::default())
        .await
        .unwrap();
    drop(master);

    // While the master is down, calls fail within the bound instead of hanging.
    let started = Instant::now();
    assert!(client.get("before").await.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));

    let (_master2, _) = spawn_master(port, 10);
    // The storage node notices (its heartbeat is unknown to the new master) and remounts.
    eventually(
        "remount after master restart",
        Duration::from_secs(10),
        || async {
            client
                .master_metrics()
                .await
                .map(|m| m.segment_count == 1)
                .unwrap_or(false)
        },
    )
    .await;
    let rc = ReplicateConfig {
        preferred_segment: seg_a.clone(),
        ..Default::default()
    };
    // For its first second a restarted master places nothing on remounted segments (writes
    // into space its predecessor reserved may still land): puts are refused, then succeed.
    let started = Instant::now();
    loop {
        match client.put("after", b"restarted", &rc).await {
            Ok(()) => break,
            Err(e) if e.code() == ErrorCode::NO_AVAILABLE_HANDLE => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "still refused: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("put after the restart: {e}"),
        }
    }
    assert_eq!(client.get("after").await.unwrap(), b"restarted");
    client.close().await.unwrap();
}
