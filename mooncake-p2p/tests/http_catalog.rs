//! The P2P store with its catalog in the HTTP metadata protocol: several stores in one process,
//! each with its own `HttpMetadataStore` client of one real `serve_http` server on loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{read, write};
use mooncake_core::{Location, MemoryMetadataStore, MetadataStore};
use mooncake_meta_http::{serve_http, HttpEndpoints, HttpMetadataStore};
use mooncake_p2p::scheduler::SchedulerConfig;
use mooncake_p2p::{Buffer, Error, P2PConfig, P2PStore};
use tokio::net::TcpListener;

/// Two buffers, so that pieces straddle them.
const SIZES: [u64; 2] = [300_001, 200_000];

fn config() -> P2PConfig {
    P2PConfig {
        piece_size: Some(64 << 10),
        scheduler: SchedulerConfig {
            request_timeout: Duration::from_secs(3),
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            ..SchedulerConfig::default()
        },
        max_in_flight: 8,
        publish_interval: Duration::from_millis(5),
        refresh_interval: Duration::from_millis(20),
        pull_timeout: Duration::from_secs(20),
        ..P2PConfig::default()
    }
}

/// An HTTP metadata server on loopback over a fresh in-memory store; returns its URL.
async fn metadata_server() -> (String, Arc<MemoryMetadataStore>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metadata", listener.local_addr().unwrap());
    let store = Arc::new(MemoryMetadataStore::new());
    serve_http(
        listener,
        HttpEndpoints {
            metadata: Some(store.clone()),
            metrics: Arc::new(String::new),
            health: Arc::new(|| true),
        },
    );
    (url, store)
}

/// A store whose catalog is its own HTTP client of `url`.
async fn peer(url: &str) -> P2PStore {
    let catalog: Arc<dyn MetadataStore> = Arc::new(HttpMetadataStore::new(url).unwrap());
    P2PStore::new(catalog, "127.0.0.1", config()).await.unwrap()
}

fn buffers(store: &P2PStore) -> Vec<Buffer> {
    SIZES
        .iter()
        .map(|&len| {
            let addr = store
                .engine()
                .allocate_buffer(len as usize, Location::cpu(0));
            Buffer::new(addr.unwrap(), len)
        })
        .collect()
}

fn content(seed: u8) -> Vec<u8> {
    let total = SIZES.iter().sum::<u64>() as usize;
    (0..total)
        .map(|i| (i * 31 + i / 977) as u8 ^ seed)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_share_a_catalog_over_the_http_metadata_protocol() {
    let (url, server_store) = metadata_server().await;
    let origin = peer(&url).await;
    let bufs = buffers(&origin);
    write(&origin, &bufs, &content(1));
    origin
        .register("ckpt/step-1", &bufs, 128 << 10, "cpu:0", false)
        .await
        .unwrap();
    // Names are unique across the cluster: the CAS on the server refuses a second register.
    let other = peer(&url).await;
    let other_bufs = buffers(&other);
    let again = other
        .register("ckpt/step-1", &other_bufs, 128 << 10, "cpu:0", false)
        .await;
    assert!(matches!(again, Err(Error::AlreadyExists(_))), "{again:?}");
    write(&other, &other_bufs, &content(2));
    other
        .register("ckpt/step-2", &other_bufs, 128 << 10, "cpu:0", false)
        .await
        .unwrap();

    let receivers = [peer(&url).await, peer(&url).await, peer(&url).await];
    let listed = receivers[0].list("ckpt/").await.unwrap();
    let names: Vec<&str> = listed.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["ckpt/step-1", "ckpt/step-2"]);
    assert_eq!(listed[0].total_size, SIZES.iter().sum::<u64>());
    assert_eq!(listed[0].size_list, SIZES);
    assert!(receivers[0].list("other/").await.unwrap().is_empty());

    // Three pull at once; each verifies every piece, and we compare the bytes too.
    let pulls = receivers.iter().map(|r| async move {
        let bufs = buffers(r);
        let report = r.get_replica("ckpt/step-1", &bufs).await.unwrap();
        (bufs, report)
    });
    let results = futures::future::join_all(pulls).await;
    for (r, (bufs, report)) in receivers.iter().zip(&results) {
        assert!(read(r, bufs) == content(1), "pulled bytes differ");
        assert_eq!((report.corrupt, report.bytes), (0, SIZES.iter().sum()));
    }
    // The receivers' availability records are in the server's store.
    let have = server_store.list("p2p/v1/have/").await.unwrap();
    assert!(have.len() >= 4, "{} availability records", have.len());

    // With the origin gone, a late peer pulls from the receivers alone.
    origin.unregister("ckpt/step-1").await.unwrap();
    let late = peer(&url).await;
    let late_bufs = buffers(&late);
    let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let options = mooncake_p2p::PullOptions {
        progress: Some(progress.clone()),
        ..Default::default()
    };
    let report = late
        .get_replica_with("ckpt/step-1", &late_bufs, &options)
        .await
        .unwrap();
    assert!(read(&late, &late_bufs) == content(1));
    assert_eq!(
        progress.load(std::sync::atomic::Ordering::Relaxed),
        SIZES.iter().sum::<u64>()
    );
    assert!(!report.pieces_from.contains_key(origin.segment_name()));
    let report = late.get_replica("ckpt/step-2", &buffers(&late)).await;
    assert!(report.is_ok(), "{report:?}");
    for s in receivers.iter().chain([&late, &origin, &other]) {
        s.close().await.unwrap();
    }
}
