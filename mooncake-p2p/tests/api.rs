//! The P2P store's API semantics with several instances in one process: separate transfer
//! engines over real TCP loopback, one in-memory catalog.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{read, write};
use mooncake_core::{Location, MemoryMetadataStore, MetadataStore};
use mooncake_p2p::scheduler::SchedulerConfig;
use mooncake_p2p::{
    Buffer, CancelToken, Error, P2PConfig, P2PStore, PayloadInfo, PullMode, PullOptions,
};

/// Two buffers, so that pieces straddle them, and shards that are not a multiple of pieces.
const SIZES: [u64; 2] = [700_001, 400_000];
const SHARD: u64 = 256 << 10;
const PIECE: u64 = 64 << 10;

fn config() -> P2PConfig {
    P2PConfig {
        piece_size: Some(PIECE),
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

async fn peer(meta: &Arc<MemoryMetadataStore>) -> P2PStore {
    peer_with(meta, config()).await
}

async fn peer_with(meta: &Arc<MemoryMetadataStore>, config: P2PConfig) -> P2PStore {
    let meta: Arc<dyn MetadataStore> = meta.clone();
    P2PStore::new(meta, "127.0.0.1", config).await.unwrap()
}

/// Zeroed buffers of [`SIZES`] registered with `store`'s engine.
fn buffers(store: &P2PStore) -> Vec<Buffer> {
    SIZES
        .iter()
        .map(|&len| {
            let addr = store
                .engine()
                .allocate_buffer(len as usize, Location::cpu(0))
                .unwrap();
            Buffer::new(addr, len)
        })
        .collect()
}

fn content(seed: u64) -> Vec<u8> {
    let total: u64 = SIZES.iter().sum();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..total)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An origin that registered `name` with [`content`]`(seed)`.
async fn origin(meta: &Arc<MemoryMetadataStore>, name: &str, seed: u64) -> (P2PStore, Vec<Buffer>) {
    let o = peer(meta).await;
    let bufs = buffers(&o);
    write(&o, &bufs, &content(seed));
    o.register(name, &bufs, SHARD, "cpu:0", false)
        .await
        .unwrap();
    (o, bufs)
}

/// Pulls `name` into fresh buffers of `store` and checks the bytes against `content(seed)`.
async fn pull_ok(
    store: &P2PStore,
    name: &str,
    seed: u64,
) -> (Vec<Buffer>, mooncake_p2p::PullReport) {
    let bufs = buffers(store);
    let report = store.get_replica(name, &bufs).await.unwrap();
    assert!(
        read(store, &bufs) == content(seed),
        "{name}: pulled bytes differ"
    );
    (bufs, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_pulls_verified_copies_concurrently() {
    let meta = Arc::new(MemoryMetadataStore::new());
    let (o, _) = origin(&meta, "ckpt/model", 1).await;
    let receivers = [peer(&meta).await, peer(&meta).await, peer(&meta).await];
    let pulls = receivers.iter().map(|r| pull_ok(r, "ckpt/model", 1));
    let reports = futures::future::join_all(pulls).await;
    for (_, report) in &reports {
        // 256 KiB shards of 64 KiB pieces over 1,100,001 bytes: 4 shards of 4, one of 1 piece.
        assert_eq!(report.pieces, 17);
        assert_eq!(report.pieces_from.values().sum::<usize>(), 17);
        assert_eq!(report.corrupt, 0);
    }
    // Every receiver now serves: a late one can pull with the origin gone.
    o.unregister("ckpt/model").await.unwrap();
    let late = peer(&meta).await;
    let (_, report) = pull_ok(&late, "ckpt/model", 1).await;
    assert!(!report.pieces_from.contains_key(o.segment_name()));
    for s in receivers.iter().chain([&late, &o]) {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_unique_unless_force_created_and_listed_by_prefix() {
    let meta = Arc::new(MemoryMetadataStore::new());
    let (o, bufs) = origin(&meta, "ckpt/a", 1).await;
    let other = peer(&meta).await;
    let obufs = buffers(&other);
    write(&other, &obufs, &content(2));
    let err = other.register("ckpt/a", &obufs, SHARD, "", false).await;
    assert!(matches!(err, Err(Error::AlreadyExists(_))), "{err:?}");
    o.register("ckpt/b", &bufs, 1 << 20, "", false)
        .await
        .unwrap();
    o.register("other", &bufs[..1], SHARD, "", false)
        .await
        .unwrap();
    let listed = o.list("ckpt/").await.unwrap();
    assert_eq!(
        listed,
        vec![
            PayloadInfo {
                name: "ckpt/a".into(),
                max_shard_size: SHARD,
                total_size: SIZES.iter().sum(),
                size_list: SIZES.to_vec(),
            },
            PayloadInfo {
                name: "ckpt/b".into(),
                max_shard_size: 1 << 20,
                total_size: SIZES.iter().sum(),
                size_list: SIZES.to_vec(),
            },
        ]
    );
    assert_eq!(other.list("").await.unwrap().len(), 3);
    // force_create replaces the payload: pullers get the new content, from the new origin.
    other
        .register("ckpt/a", &obufs, SHARD, "", true)
        .await
        .unwrap();
    let r = peer(&meta).await;
    let (_, report) = pull_ok(&r, "ckpt/a", 2).await;
    assert_eq!(
        report.pieces_from.keys().collect::<Vec<_>>(),
        vec![other.segment_name()]
    );
    // The replaced origin no longer owns the name.
    assert!(matches!(
        o.unregister("ckpt/a").await,
        Err(Error::NotRegisteredHere(_))
    ));
    // A location other than the buffers' registered one is refused.
    let err = o.register("x", &bufs, SHARD, "cuda:0", false).await;
    assert!(matches!(err, Err(Error::InvalidBuffers(_))), "{err:?}");
    for s in [o, other, r] {
        s.close().await.unwrap();
    }
    // close withdrew everything these instances registered or held.
    let fresh = peer(&meta).await;
    assert!(fresh.list("ckpt/").await.unwrap().is_empty());
    fresh.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_pulled_once_per_instance_until_its_replica_is_deleted() {
    let meta = Arc::new(MemoryMetadataStore::new());
    let (o, bufs) = origin(&meta, "m", 3).await;
    let a = peer(&meta).await;
    let (abufs, _) = pull_ok(&a, "m", 3).await;
    let again = a.get_replica("m", &buffers(&a)).await;
    assert!(matches!(again, Err(Error::AlreadyPulled(_))), "{again:?}");
    // The origin has it already.
    let own = o.get_replica("m", &buffers(&o)).await;
    assert!(matches!(own, Err(Error::AlreadyPulled(_))), "{own:?}");
    assert!(matches!(
        a.delete_replica("nothing").await,
        Err(Error::NoReplica(_))
    ));
    // Delete, then pull again: the deleted copy is no source (its buffers may be reused).
    a.delete_replica("m").await.unwrap();
    write(&a, &abufs, &vec![0xAA; SIZES.iter().sum::<u64>() as usize]);
    let b = peer(&meta).await;
    let (_, report) = pull_ok(&b, "m", 3).await;
    assert_eq!(
        report.pieces_from.keys().collect::<Vec<_>>(),
        vec![o.segment_name()]
    );
    pull_ok(&a, "m", 3).await;
    // Bad buffers are refused up front.
    let unregistered = [Buffer::new(0x1000, 4096)];
    let err = b.get_replica("other", &unregistered).await;
    assert!(matches!(err, Err(Error::InvalidBuffers(_))), "{err:?}");
    let c = peer(&meta).await;
    let err = c.get_replica("m", &buffers(&c)[..1]).await;
    assert!(matches!(err, Err(Error::InvalidBuffers(_))), "{err:?}");
    let err = c.get_replica("missing", &buffers(&c)).await;
    assert!(matches!(err, Err(Error::NotFound(_))), "{err:?}");
    drop(bufs);
    for s in [o, a, b, c] {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_unregisters_after_one_full_copy_and_a_third_peer_completes() {
    let meta = Arc::new(MemoryMetadataStore::new());
    let (o, _) = origin(&meta, "m", 4).await;
    let a = peer(&meta).await;
    pull_ok(&a, "m", 4).await;
    o.unregister("m").await.unwrap();
    assert_eq!(o.list("").await.unwrap().len(), 1, "a copy remains");
    let b = peer(&meta).await;
    let (_, report) = pull_ok(&b, "m", 4).await;
    assert_eq!(
        report.pieces_from.keys().collect::<Vec<_>>(),
        vec![a.segment_name()]
    );
    // The last copies go: so does the payload.
    a.delete_replica("m").await.unwrap();
    b.delete_replica("m").await.unwrap();
    assert!(o.list("").await.unwrap().is_empty());
    for s in [o, a, b] {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_piece_never_reaches_a_reader() {
    let meta = Arc::new(MemoryMetadataStore::new());
    let (o, _) = origin(&meta, "m", 5).await;
    let liar = peer(&meta).await;
    let (lbufs, _) = pull_ok(&liar, "m", 5).await;
    // The liar's bytes change after it published its pieces: every piece it serves is bad.
    write(&liar, &lbufs, &content(99));
    let b = peer(&meta).await;
    let (_, report) = pull_ok(&b, "m", 5).await;
    assert!(report.corrupt > 0, "the liar was asked: {report:?}");
    assert!(!report.pieces_from.contains_key(liar.segment_name()));
    // With the origin gone, a third peer completes from the honest copy only.
    o.unregister("m").await.unwrap();
    let c = peer(&meta).await;
    let (_, report) = pull_ok(&c, "m", 5).await;
    assert_eq!(
        report.pieces_from.keys().collect::<Vec<_>>(),
        vec![b.segment_name()]
    );
    for s in [o, liar, b, c] {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_without_a_good_source_times_out_clearly_and_can_be_retried() {
    let meta = Arc::new(MemoryMetadataStore::new());
    let (o, obufs) = origin(&meta, "m", 6).await;
    write(&o, &obufs, &content(7));
    let mut cfg = config();
    cfg.pull_timeout = Duration::from_millis(500);
    let b = peer_with(&meta, cfg).await;
    let bbufs = buffers(&b);
    let err = b.get_replica("m", &bbufs).await.unwrap_err();
    match &err {
        Error::Timeout {
            verified,
            total,
            unavailable,
            ..
        } => {
            // Pieces tried so far came back corrupt: no source is left for them.
            assert_eq!((*verified, *total), (0, 17));
            assert!(*unavailable > 0, "{err}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(err.to_string().contains("timed out"), "{err}");
    // Nothing was published, and the name may be pulled again.
    write(&o, &obufs, &content(6));
    let report = b.get_replica("m", &bbufs).await.unwrap();
    assert_eq!(report.corrupt, 0);
    assert!(read(&b, &bbufs) == content(6));
    o.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_pull_withdraws_and_can_be_retried() {
    let meta = Arc::new(MemoryMetadataStore::new());
    let (o, obufs) = origin(&meta, "m", 8).await;
    // Half the pieces are bad at the origin: the pull verifies some, then stalls.
    let mut bytes = content(8);
    let half = bytes.len() / 2;
    bytes[half..].iter_mut().for_each(|b| *b = !*b);
    write(&o, &obufs, &bytes);
    let b = peer(&meta).await;
    let bbufs = buffers(&b);
    let cancelled =
        tokio::time::timeout(Duration::from_millis(500), b.get_replica("m", &bbufs)).await;
    assert!(cancelled.is_err(), "the pull cannot finish");
    // The dropped pull withdraws its partial availability (in the background).
    let key = mooncake_p2p::catalog::have_key("m", b.segment_name());
    let mut withdrawn = false;
    for _ in 0..500 {
        if meta.get(&key).await.unwrap().is_none() {
            withdrawn = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(withdrawn, "partial availability still published");
    write(&o, &obufs, &content(8));
    let report = b.get_replica("m", &bbufs).await.unwrap();
    assert_eq!(report.pieces, 17);
    assert!(read(&b, &bbufs) == content(8));
    o.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_cancels_a_pull_from_elsewhere_and_a_call_timeout_ends_another() {
    let meta = Arc::new(MemoryMetadataStore::new());
    let (o, obufs) = origin(&meta, "m", 12).await;
    // Half the pieces are bad at the origin: pulls verify some, then stall.
    let mut bytes = content(12);
    let half = bytes.len() / 2;
    bytes[half..].iter_mut().for_each(|b| *b = !*b);
    write(&o, &obufs, &bytes);
    let b = Arc::new(peer(&meta).await);
    let bbufs = buffers(&b);
    let token = CancelToken::new();
    let pulling = {
        let (b, bbufs) = (b.clone(), bbufs.clone());
        let options = PullOptions {
            cancel: Some(token.clone()),
            ..PullOptions::default()
        };
        tokio::spawn(async move { b.get_replica_with("m", &bbufs, &options).await })
    };
    // Cancelled once it verified something.
    let key = mooncake_p2p::catalog::have_key("m", b.segment_name());
    let verified_some = || async {
        meta.get(&key).await.unwrap().is_some_and(|v| {
            let h: mooncake_p2p::catalog::HaveRecord = postcard::from_bytes(&v.value).unwrap();
            h.have.count_ones() > 0
        })
    };
    for _ in 0..500 {
        if verified_some().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(verified_some().await);
    token.cancel();
    assert!(token.is_cancelled());
    let ended = tokio::time::timeout(Duration::from_secs(5), pulling)
        .await
        .expect("the pull ends promptly")
        .unwrap();
    match ended {
        Err(Error::Cancelled {
            verified, total, ..
        }) => {
            assert!(verified > 0 && verified < total, "{verified}/{total}");
        }
        other => panic!("expected a cancellation, got {other:?}"),
    }
    // Withdrawn before the call returned: no partial copy is left to others.
    assert!(meta.get(&key).await.unwrap().is_none());
    // A per-call timeout, far below the store's: a clear timeout, withdrawn too.
    let options = PullOptions {
        timeout: Some(Duration::from_millis(300)),
        ..PullOptions::default()
    };
    let err = b.get_replica_with("m", &bbufs, &options).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(meta.get(&key).await.unwrap().is_none());
    // A token cancelled before the call: it ends at once.
    let options = PullOptions {
        cancel: Some(token),
        ..PullOptions::default()
    };
    let err = b.get_replica_with("m", &bbufs, &options).await.unwrap_err();
    assert!(matches!(err, Error::Cancelled { .. }), "{err:?}");
    // With sound bytes, the same instance pulls it.
    write(&o, &obufs, &content(12));
    b.get_replica("m", &bbufs).await.unwrap();
    assert!(read(&b, &bbufs) == content(12));
    o.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_a_pull_in_progress() {
    let meta = Arc::new(MemoryMetadataStore::new());
    let (o, obufs) = origin(&meta, "m", 9).await;
    // A source that serves only bad pieces: the pull cannot finish by itself.
    write(&o, &obufs, &content(10));
    let b = Arc::new(peer(&meta).await);
    let bbufs = buffers(&b);
    let pulling = {
        let b = b.clone();
        tokio::spawn(async move { b.get_replica("m", &bbufs).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.close().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), pulling)
        .await
        .expect("the pull ends promptly")
        .unwrap();
    assert!(matches!(ended, Err(Error::Closed)), "{ended:?}");
    assert!(matches!(b.list("").await, Err(Error::Closed)));
    o.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_mode_publishes_only_complete_copies() {
    let meta = Arc::new(MemoryMetadataStore::new());
    let (o, obufs) = origin(&meta, "m", 11).await;
    // Half the origin's pieces are bad: pulls verify the other half, then stall.
    let mut bytes = content(11);
    let half = bytes.len() / 2;
    bytes[half..].iter_mut().for_each(|b| *b = !*b);
    write(&o, &obufs, &bytes);
    let mut cfg = config();
    cfg.mode = PullMode::Upstream;
    let upstream = Arc::new(peer_with(&meta, cfg).await);
    let swarm = Arc::new(peer(&meta).await);
    let pulls: Vec<_> = [upstream.clone(), swarm.clone()]
        .into_iter()
        .map(|s| {
            let bufs = buffers(&s);
            tokio::spawn(async move { s.get_replica("m", &bufs).await })
        })
        .collect();
    // Whether `s` published any verified piece (a swarm pull announces itself at once with
    // none).
    let published = |s: &P2PStore| {
        let key = mooncake_p2p::catalog::have_key("m", s.segment_name());
        let meta = meta.clone();
        async move {
            meta.get(&key).await.unwrap().is_some_and(|v| {
                let h: mooncake_p2p::catalog::HaveRecord = postcard::from_bytes(&v.value).unwrap();
                h.have.count_ones() > 0
            })
        }
    };
    let mut swarm_published = false;
    for _ in 0..500 {
        swarm_published = published(&swarm).await;
        if swarm_published {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        swarm_published,
        "the swarm puller publishes verified pieces at once"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !published(&upstream).await,
        "upstream mode publishes nothing partial"
    );
    // End the upstream pull by dropping it.
    let mut pulls = pulls.into_iter();
    pulls.next().unwrap().abort();
    // With sound bytes again, a new upstream-mode puller takes complete copies only: the
    // origin's, not the swarm puller's published part.
    write(&o, &obufs, &content(11));
    let mut cfg = config();
    cfg.mode = PullMode::Upstream;
    let late = peer_with(&meta, cfg).await;
    let (_, report) = pull_ok(&late, "m", 11).await;
    assert_eq!(
        report.pieces_from.keys().collect::<Vec<_>>(),
        vec![o.segment_name()]
    );
    assert!(published(&late).await);
    // The swarm puller never asks the origin again for the pieces it corrupted, but the new
    // complete copy lets it finish.
    let swarm_report = pulls.next().unwrap().await.unwrap().unwrap();
    assert!(swarm_report.corrupt > 0);
    assert!(swarm_report.pieces_from.contains_key(late.segment_name()));
    for s in [&upstream, &swarm, &late, &o] {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_replaced_while_pulling_ends_the_pull() {
    let meta = Arc::new(MemoryMetadataStore::new());
    let (o, obufs) = origin(&meta, "m", 12).await;
    // Only bad pieces: the pull cannot finish by itself.
    write(&o, &obufs, &content(13));
    let b = Arc::new(peer(&meta).await);
    let pulling = {
        let b = b.clone();
        let bufs = buffers(&b);
        tokio::spawn(async move { b.get_replica("m", &bufs).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    o.register("m", &obufs, SHARD, "", true).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), pulling)
        .await
        .expect("the pull ends promptly")
        .unwrap();
    assert!(matches!(ended, Err(Error::Changed(_))), "{ended:?}");
    // The new payload (the origin's current bytes) pulls fine.
    pull_ok(&b, "m", 13).await;
    b.close().await.unwrap();
    o.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_on_caller_engines_find_peers_by_handshake() {
    use mooncake_core::{EngineConfig, TransferEngine, Transport};
    use mooncake_transport_tcp::{TcpConfig, TcpTransport};
    let meta = Arc::new(MemoryMetadataStore::new());
    let mut stores = Vec::new();
    for _ in 0..2 {
        let tcp = TcpTransport::new(TcpConfig::default()).unwrap();
        // Peers' descriptors come from the peers themselves, not from the catalog's store.
        let engine = TransferEngine::start(
            EngineConfig::new("127.0.0.1"),
            vec![tcp as Arc<dyn Transport>],
        )
        .await
        .unwrap();
        let m: Arc<dyn MetadataStore> = meta.clone();
        stores.push(P2PStore::with_engine(m, engine, config()).unwrap());
    }
    let bufs = buffers(&stores[0]);
    write(&stores[0], &bufs, &content(14));
    stores[0]
        .register("m", &bufs, SHARD, "", false)
        .await
        .unwrap();
    pull_ok(&stores[1], "m", 14).await;
    // close leaves a caller's engine running.
    let engine = stores[1].engine().clone();
    for s in &stores {
        s.close().await.unwrap();
    }
    let a = engine.allocate_buffer(4096, Location::cpu(0)).unwrap();
    let me = engine.open_segment(engine.segment_name()).await.unwrap();
    let r = engine
        .transfer(vec![mooncake_core::TransferRequest::read(&me, a, a, 16)])
        .await;
    assert!(r[0].is_ok(), "{r:?}");
    for s in &stores {
        s.engine().shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_over_quic_admits_only_its_ca() {
    use mooncake_transport_quic::certs;
    let meta = Arc::new(MemoryMetadataStore::new());
    let ca = certs::new_ca("p2p cluster").unwrap();
    let quic = |ca: &certs::CertifiedPem, name: &str| P2PConfig {
        quic: Some(
            certs::issue_node_cert(ca, name, &["127.0.0.1"])
                .unwrap()
                .identity(ca),
        ),
        ..config()
    };
    let o = peer_with(&meta, quic(&ca, "origin")).await;
    let obufs = buffers(&o);
    write(&o, &obufs, &content(31));
    o.register("q", &obufs, SHARD, "cpu:0", false)
        .await
        .unwrap();
    let a = peer_with(&meta, quic(&ca, "a")).await;
    let b = peer_with(&meta, quic(&ca, "b")).await;
    let (ra, rb) = tokio::join!(pull_ok(&a, "q", 31), pull_ok(&b, "q", 31));
    assert_eq!(ra.1.corrupt + rb.1.corrupt, 0);
    // A peer certified by another CA reads no piece from the swarm.
    let other = certs::new_ca("intruder").unwrap();
    let mut cfg = quic(&other, "intruder");
    cfg.pull_timeout = Duration::from_secs(2);
    let intruder = peer_with(&meta, cfg).await;
    let ibufs = buffers(&intruder);
    let err = intruder.get_replica("q", &ibufs).await.unwrap_err();
    match err {
        Error::Timeout { verified, .. } => assert_eq!(verified, 0),
        other => panic!("expected a timeout with nothing verified, got {other:?}"),
    }
    for s in [intruder, b, a, o] {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_over_authenticated_tcp_admits_only_its_ca() {
    use mooncake_tls::certs;
    let meta = Arc::new(MemoryMetadataStore::new());
    let ca = certs::new_ca("p2p cluster").unwrap();
    let auth = |ca: &certs::CertifiedPem, name: &str| P2PConfig {
        tcp_auth: Some(
            certs::issue_node_cert(ca, name, &["127.0.0.1"])
                .unwrap()
                .identity(ca),
        ),
        ..config()
    };
    let o = peer_with(&meta, auth(&ca, "origin")).await;
    let obufs = buffers(&o);
    write(&o, &obufs, &content(37));
    o.register("t", &obufs, SHARD, "cpu:0", false)
        .await
        .unwrap();
    let a = peer_with(&meta, auth(&ca, "a")).await;
    let b = peer_with(&meta, auth(&ca, "b")).await;
    let (ra, rb) = tokio::join!(pull_ok(&a, "t", 37), pull_ok(&b, "t", 37));
    assert_eq!(ra.1.corrupt + rb.1.corrupt, 0);
    // Peers without a certificate, or certified by another CA, read no piece.
    let other = certs::new_ca("intruder").unwrap();
    let mut foreign = auth(&other, "intruder");
    foreign.pull_timeout = Duration::from_secs(2);
    let mut plain = config();
    plain.pull_timeout = Duration::from_secs(2);
    for cfg in [foreign, plain] {
        let intruder = peer_with(&meta, cfg).await;
        let ibufs = buffers(&intruder);
        let err = intruder.get_replica("t", &ibufs).await.unwrap_err();
        match err {
            Error::Timeout { verified, .. } => assert_eq!(verified, 0),
            other => panic!("expected a timeout with nothing verified, got {other:?}"),
        }
        intruder.close().await.unwrap();
    }
    for s in [b, a, o] {
        s.close().await.unwrap();
    }
}
