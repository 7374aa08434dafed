//! A store dropped without `close` releases what it holds: its transfer engine's listeners,
//! pooled connections and their tasks do not outlive it. (Alone in its test binary: it counts
//! this process's open file descriptors.)

use mooncake_testkit as common;

use std::time::Duration;

use mooncake_master::MasterConfig;
use mooncake_store::{ReplicateConfig, Store};

use common::{eventually, serve_master, store_config};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stores_leave_no_descriptor_behind() {
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let storage = Store::setup(store_config(&addr, 16 << 20)).await.unwrap();
    let value = vec![7u8; 64 << 10];
    // Every put goes to the storage node: a dropped client's own segment stays mounted until
    // the master expires it, and a write placed there would fail.
    let rc = ReplicateConfig {
        preferred_segment: storage.hostname().to_owned(),
        ..ReplicateConfig::default()
    };
    // One store through its whole life first, so lazily made process-wide things exist.
    let warm = Store::setup(store_config(&addr, 0)).await.unwrap();
    warm.put("warm", &value, &rc).await.unwrap();
    warm.get("warm").await.unwrap();
    warm.close().await.unwrap();
    drop(warm);
    let before = open_fds();

    for i in 0..10 {
        // Clients with and without a segment of their own, each talking to the master and to
        // the storage node, dropped without `close`.
        let segment = if i % 2 == 0 { 0 } else { 4 << 20 };
        let client = Store::setup(store_config(&addr, segment)).await.unwrap();
        let key = format!("k{i}");
        client.put(&key, &value, &rc).await.unwrap();
        assert_eq!(client.get(&key).await.unwrap(), value);
        drop(client);
    }
    // Ten stores leaked nine or more descriptors each; the bound leaves room for a connection
    // or two of the master and the storage node still closing.
    eventually("descriptors released", Duration::from_secs(10), || async {
        open_fds() <= before + 4
    })
    .await;
    storage.close().await.unwrap();
}
