//! Injected verbs failures on the fake backend: completion errors fail exactly the requests they
//! hit or are retried on another NIC pair, broken queue pairs and completion queues recover,
//! NIC preferences hold, large buffers register in chunks, and hosts without devices get a
//! clear error.

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::conformance::pattern;
use mooncake_core::{EngineConfig, Error, Location, TransferEngine, TransferRequest};
use mooncake_transport_rdma::fake::{FakeFabric, FakeNicConfig, FakeProvider, Fault};
use mooncake_transport_rdma::verbs::WcStatus;
use mooncake_transport_rdma::{NicPriorityMatrix, RdmaConfig, RdmaTransport};

const LEN: usize = 1 << 20;

struct Pair {
    fabric: Arc<FakeFabric>,
    initiator: Arc<TransferEngine>,
    target: Arc<TransferEngine>,
    initiator_nics: Arc<FakeProvider>,
    target_nics: Arc<FakeProvider>,
    local: u64,
    remote: u64,
}

fn config() -> RdmaConfig {
    RdmaConfig {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        ..RdmaConfig::default()
    }
}

async fn pair_with(
    initiator_nics: Vec<FakeNicConfig>,
    target_nics: Vec<FakeNicConfig>,
    config: RdmaConfig,
) -> Pair {
    let fabric = FakeFabric::new();
    let (i, t) = (
        fabric.host_with(initiator_nics),
        fabric.host_with(target_nics),
    );
    let start = |host: Arc<FakeProvider>| {
        let transport = RdmaTransport::with_provider(config.clone(), host).unwrap();
        TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![transport])
    };
    let target = start(t.clone()).await.unwrap();
    let initiator = start(i.clone()).await.unwrap();
    let remote = target.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    let local = initiator.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    Pair {
        fabric,
        initiator,
        target,
        initiator_nics: i,
        target_nics: t,
        local,
        remote,
    }
}

fn nics(n: usize) -> Vec<FakeNicConfig> {
    (0..n)
        .map(|i| FakeNicConfig::new(format!("fake_{i}")))
        .collect()
}

async fn pair(n: usize) -> Pair {
    pair_with(nics(n), nics(n), config()).await
}

fn fill(e: &TransferEngine, addr: u64, bytes: &[u8]) {
    let r = e.memory().resolve(addr, bytes.len() as u64).unwrap();
    r.write_from(bytes).unwrap();
}

fn read(e: &TransferEngine, addr: u64, len: usize) -> Vec<u8> {
    e.memory().resolve(addr, len as u64).unwrap().to_vec()
}

impl Pair {
    /// Writes the whole local buffer to the target and reads it back into the local buffer,
    /// checking both.
    async fn round_trip(&self, seed: u64) -> Vec<mooncake_core::Result<()>> {
        let seg = self
            .initiator
            .open_segment(self.target.segment_name())
            .await
            .unwrap();
        let data = pattern(seed, LEN);
        fill(&self.initiator, self.local, &data);
        let mut results = self
            .initiator
            .transfer(vec![TransferRequest::write(
                &seg,
                self.remote,
                self.local,
                LEN as u64,
            )])
            .await;
        if results[0].is_ok() {
            assert!(
                read(&self.target, self.remote, LEN) == data,
                "written bytes"
            );
            fill(&self.initiator, self.local, &vec![0; LEN]);
            results.extend(
                self.initiator
                    .transfer(vec![TransferRequest::read(
                        &seg,
                        self.remote,
                        self.local,
                        LEN as u64,
                    )])
                    .await,
            );
            if results[1].is_ok() {
                assert!(read(&self.initiator, self.local, LEN) == data, "read bytes");
            }
        }
        results
    }

    async fn shutdown(self) {
        self.initiator.shutdown().await;
        self.target.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_access_error_fails_exactly_its_request() {
    let p = pair(1).await;
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    // Connect the queue pair first, so the fault hits the batch's first work request.
    assert!(p.round_trip(1).await.iter().all(|r| r.is_ok()));
    let data = pattern(2, 8 * 4096);
    fill(&p.initiator, p.local, &data);
    p.initiator_nics.nic(0).inject(Fault::Completions {
        status: WcStatus::RemoteAccess,
        count: 1,
    });
    let reqs = (0..8u64)
        .map(|i| TransferRequest::write(&seg, p.remote + i * 4096, p.local + i * 4096, 4096))
        .collect();
    let r = p.initiator.transfer(reqs).await;
    assert!(
        matches!(r[0], Err(Error::RemoteRangeInvalid { .. })),
        "{:?}",
        r[0]
    );
    for (i, res) in r.iter().enumerate().skip(1) {
        res.as_ref().unwrap_or_else(|e| {
            panic!("request {i} was flushed with the broken queue pair but must be retried: {e}")
        });
        let at = i * 4096;
        assert!(read(&p.target, p.remote + at as u64, 4096) == data[at..at + 4096]);
    }
    assert_eq!(p.initiator_nics.nic(0).pending_faults(), 0);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_errors_are_retried_on_another_nic() {
    for status in [
        WcStatus::RetryExceeded,
        WcStatus::Flushed,
        WcStatus::Other(99),
    ] {
        let p = pair(2).await;
        // Both NICs fail once: the first slice on each breaks its queue pair (flushing the
        // rest posted on it), and every one of them is retried.
        p.initiator_nics
            .nic(0)
            .inject(Fault::Completions { status, count: 1 });
        p.initiator_nics
            .nic(1)
            .inject(Fault::Completions { status, count: 1 });
        let r = p.round_trip(3).await;
        assert!(r.iter().all(|r| r.is_ok()), "{status:?}: {r:?}");
        assert_eq!(
            p.initiator_nics.nic(0).pending_faults(),
            0,
            "faults were hit"
        );
        assert_eq!(
            p.initiator_nics.nic(1).pending_faults(),
            0,
            "faults were hit"
        );
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_link_moves_traffic_to_the_other_nic() {
    let p = pair(2).await;
    p.initiator_nics.nic(1).inject(Fault::LinkDown);
    for round in 0..3 {
        let r = p.round_trip(10 + round).await;
        assert!(r.iter().all(|r| r.is_ok()), "round {round}: {r:?}");
    }
    p.initiator_nics.nic(1).link_up();
    assert!(p.round_trip(20).await.iter().all(|r| r.is_ok()));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_pairs_in_the_error_state_and_cq_overruns_recover() {
    let p = pair(2).await;
    assert!(p.round_trip(30).await.iter().all(|r| r.is_ok()));
    p.initiator_nics.nic(0).inject(Fault::QpsToError);
    p.target_nics.nic(1).inject(Fault::QpsToError);
    let r = p.round_trip(31).await;
    assert!(
        r.iter().all(|r| r.is_ok()),
        "after QPs went to error: {r:?}"
    );
    p.initiator_nics.nic(0).inject(Fault::CqOverrun);
    let r = p.round_trip(32).await;
    assert!(r.iter().all(|r| r.is_ok()), "after a CQ overrun: {r:?}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_nics_all_fail_gets_a_clear_error_within_the_bound() {
    let p = pair(2).await;
    assert!(p.round_trip(40).await.iter().all(|r| r.is_ok()));
    p.target_nics.nic(0).inject(Fault::LinkDown);
    p.target_nics.nic(1).inject(Fault::LinkDown);
    let r = tokio::time::timeout(Duration::from_secs(10), p.round_trip(41))
        .await
        .expect("bounded");
    assert!(
        matches!(&r[0], Err(Error::PeerUnreachable { reason, .. }) if reason.contains("RetryExceeded")),
        "{r:?}"
    );
    p.target_nics.nic(0).link_up();
    assert!(p.round_trip(42).await.iter().all(|r| r.is_ok()), "recovers");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nic_preferences_are_respected() {
    // The initiator prefers fake_1 for cpu:0 memory and falls back to fake_0; the target
    // prefers its fake_0.
    let mut matrix = NicPriorityMatrix::new();
    matrix.set("cpu:0", vec!["fake_1".into()], vec!["fake_0".into()]);
    let initiator = RdmaConfig {
        nic_priority: matrix,
        slice_size: 4096,
        ..config()
    };
    let fabric = FakeFabric::new();
    let (i, t) = (fabric.host(2), fabric.host(2));
    let target_config = RdmaConfig {
        nic_priority: NicPriorityMatrix::parse_json(r#"{"*": [["fake_0"], []]}"#).unwrap(),
        ..config()
    };
    let target = TransferEngine::start(
        EngineConfig::new("127.0.0.1"),
        vec![RdmaTransport::with_provider(target_config, t.clone()).unwrap()],
    )
    .await
    .unwrap();
    let engine = TransferEngine::start(
        EngineConfig::new("127.0.0.1"),
        vec![RdmaTransport::with_provider(initiator, i.clone()).unwrap()],
    )
    .await
    .unwrap();
    let remote = target.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    let local = engine.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    let desc = target.local_descriptor();
    let keys = desc.buffers.iter().find(|b| b.addr == remote).unwrap();
    assert_eq!(
        keys.key("rdma").unwrap()[3],
        0b01,
        "target prefers its NIC 0"
    );
    i.nic(0).inject(Fault::Completions {
        status: WcStatus::RetryExceeded,
        count: 1,
    });
    let seg = engine.open_segment(target.segment_name()).await.unwrap();
    let r = engine
        .transfer(vec![TransferRequest::write(
            &seg, remote, local, LEN as u64,
        )])
        .await;
    r[0].as_ref().unwrap();
    assert_eq!(
        i.nic(1).posted(),
        (LEN / 4096) as u64,
        "every slice on fake_1"
    );
    assert_eq!(i.nic(0).posted(), 0, "the fallback NIC was not used");
    assert_eq!(
        t.nic(0).reached(),
        (LEN / 4096) as u64,
        "every slice to fake_0"
    );
    assert_eq!(t.nic(1).reached(), 0, "the target's other NIC was not used");
    // Fault the preferred NIC: the retry falls back to fake_0 and hits the armed fault there,
    // then succeeds on the next NIC.
    i.nic(1).inject(Fault::Completions {
        status: WcStatus::RetryExceeded,
        count: 1,
    });
    let r = engine
        .transfer(vec![TransferRequest::write(&seg, remote, local, 4096)])
        .await;
    r[0].as_ref().unwrap();
    assert_eq!(i.nic(1).pending_faults(), 0);
    assert_eq!(
        i.nic(0).pending_faults(),
        0,
        "the retry used the fallback NIC"
    );
    engine.shutdown().await;
    target.shutdown().await;
    drop(fabric);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_buffers_register_in_chunks_and_mtus_are_negotiated() {
    let small = |name: &str, mtu| FakeNicConfig {
        max_mr_size: 256 << 10,
        mtu,
        ..FakeNicConfig::new(name)
    };
    let p = pair_with(
        vec![small("a", 1024), small("b", 4096)],
        vec![small("c", 2048)],
        config(),
    )
    .await;
    // Initiator: 1 MiB in 256 KiB chunks on 2 NICs; target: on 1 NIC.
    let desc = p.target.local_descriptor();
    let keys = desc
        .buffers
        .iter()
        .find(|b| b.addr == p.remote)
        .unwrap()
        .key("rdma")
        .unwrap();
    assert_eq!(&keys[..3], &[1, 256 << 10, 1]);
    assert_eq!(keys.len(), 4 + 4);
    assert_eq!(p.fabric.registered_regions(), 4 * 2 + 4);
    // Unaligned, crossing chunk boundaries on both sides; MTUs 1024/4096 against 2048.
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    let data = pattern(50, LEN - 1000);
    fill(&p.target, p.remote + 999, &data);
    let r = p
        .initiator
        .transfer(vec![TransferRequest::read(
            &seg,
            p.remote + 999,
            p.local + 1,
            data.len() as u64,
        )])
        .await;
    r[0].as_ref().unwrap();
    assert!(read(&p.initiator, p.local + 1, data.len()) == data);
    // Unregistration deregisters every chunk on every NIC.
    p.initiator.unregister_memory_async(p.local).unwrap().await;
    assert_eq!(p.fabric.registered_regions(), 4);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_churn_during_transfers() {
    let p = Arc::new(pair(2).await);
    let baseline = p.fabric.registered_regions();
    let churn = {
        let p = p.clone();
        tokio::spawn(async move {
            for _ in 0..50 {
                let a = p
                    .target
                    .allocate_buffer(64 << 10, Location::cpu(0))
                    .unwrap();
                let b = p
                    .initiator
                    .allocate_buffer(64 << 10, Location::cpu(0))
                    .unwrap();
                tokio::task::yield_now().await;
                p.target.unregister_memory_async(a).unwrap().await;
                p.initiator.unregister_memory_async(b).unwrap().await;
            }
        })
    };
    for round in 0..10 {
        let r = p.round_trip(60 + round).await;
        assert!(r.iter().all(|r| r.is_ok()), "round {round}: {r:?}");
    }
    churn.await.unwrap();
    assert_eq!(p.fabric.registered_regions(), baseline);
    let p = Arc::try_unwrap(p).ok().expect("sole owner");
    p.shutdown().await;
}

#[test]
fn no_devices_is_a_clear_error() {
    let fabric = FakeFabric::new();
    let e = RdmaTransport::with_provider(RdmaConfig::default(), fabric.host(0)).unwrap_err();
    assert!(e.to_string().contains("no RDMA devices"), "{e}");
    let e = RdmaTransport::with_provider(
        RdmaConfig {
            devices: vec!["mlx5_9".into()],
            ..RdmaConfig::default()
        },
        fabric.host(1),
    )
    .unwrap_err();
    assert!(e.to_string().contains("mlx5_9"), "{e}");
    // The real devices: none on machines without RDMA, or no support compiled in.
    if let Err(e) = RdmaTransport::new(RdmaConfig::default()) {
        assert!(e.to_string().contains("no RDMA devices"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_request_times_out_and_its_queue_pair_is_replaced() {
    let p = pair_with(
        nics(1),
        nics(1),
        RdmaConfig {
            request_timeout: Duration::from_millis(300),
            ..config()
        },
    )
    .await;
    assert!(p.round_trip(70).await.iter().all(|r| r.is_ok()));
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    p.initiator_nics.nic(0).inject(Fault::Stall { count: 1 });
    let started = std::time::Instant::now();
    let r = p
        .initiator
        .transfer(vec![
            TransferRequest::write(&seg, p.remote, p.local, 4096).with_landing_notice(),
            TransferRequest::read(&seg, p.remote + 4096, p.local + 4096, 4096),
        ])
        .await;
    assert!(started.elapsed() < Duration::from_secs(3), "bounded");
    assert!(matches!(r[0], Err(Error::Timeout(_))), "{:?}", r[0]);
    // The other request was flushed with the torn-down queue pair: retried, or timed out too.
    assert!(
        matches!(r[1], Ok(()) | Err(Error::Timeout(_))),
        "{:?}",
        r[1]
    );
    assert_eq!(p.initiator_nics.nic(0).pending_faults(), 0);
    assert!(
        p.round_trip(71).await.iter().all(|r| r.is_ok()),
        "works afterwards"
    );
    p.shutdown().await;
}
