//! A peer whose RDMA path dies moves to TCP: with both transports installed, once the peer's
//! slices failed on every NIC pair, the RDMA transport declines it for the cooldown and the
//! engine's TCP transport carries its requests; after the cooldown RDMA is used again.

use std::time::Duration;

use mooncake_core::conformance::pattern;
use mooncake_core::{EngineConfig, Error, Location, TransferEngine, TransferRequest};
use mooncake_transport_rdma::fake::{FakeFabric, Fault};
use mooncake_transport_rdma::{RdmaConfig, RdmaTransport};
use mooncake_transport_tcp::{TcpConfig, TcpTransport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_rdma_path_fails_over_to_tcp_and_back() {
    const LEN: usize = 1 << 20;
    let fabric = FakeFabric::new();
    let (i, t) = (fabric.host(2), fabric.host(2));
    let config = RdmaConfig {
        request_timeout: Duration::from_secs(5),
        failover_cooldown: Duration::from_millis(300),
        ..RdmaConfig::default()
    };
    let start = |host| {
        let rdma = RdmaTransport::with_provider(config.clone(), host).unwrap();
        let tcp = TcpTransport::new(TcpConfig::default()).unwrap();
        TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![rdma, tcp])
    };
    let target = start(t.clone()).await.unwrap();
    let initiator = start(i.clone()).await.unwrap();
    let remote = target.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    let local = initiator.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    let seg = initiator.open_segment(target.segment_name()).await.unwrap();
    let carrier = || {
        initiator
            .carrier(&seg, remote, LEN as u64)
            .map(|t| t.protocol())
    };
    let write = |seed| {
        let data = pattern(seed, LEN);
        initiator
            .memory()
            .resolve(local, LEN as u64)
            .unwrap()
            .write_from(&data)
            .unwrap();
        let req = TransferRequest::write(&seg, remote, local, LEN as u64);
        let initiator = initiator.clone();
        let target = target.clone();
        async move {
            let r = initiator.transfer(vec![req]).await.remove(0);
            if r.is_ok() {
                let got = target
                    .memory()
                    .resolve(remote, LEN as u64)
                    .unwrap()
                    .to_vec();
                assert!(got == data, "bytes of a completed write");
            }
            r
        }
    };
    assert_eq!(carrier(), Some("rdma"));
    write(1).await.unwrap();
    let posted = i.nic(0).posted() + i.nic(1).posted();
    assert!(posted > 0);

    t.nic(0).inject(Fault::LinkDown);
    t.nic(1).inject(Fault::LinkDown);
    let r = write(2).await;
    assert!(matches!(r, Err(Error::PeerUnreachable { .. })), "{r:?}");
    assert_eq!(carrier(), Some("tcp"), "the peer is declined by rdma");
    let before = i.nic(0).posted() + i.nic(1).posted();
    write(3).await.expect("carried by tcp");
    assert_eq!(
        i.nic(0).posted() + i.nic(1).posted(),
        before,
        "nothing went over rdma"
    );

    t.nic(0).link_up();
    t.nic(1).link_up();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(carrier(), Some("rdma"), "rdma again after the cooldown");
    write(4).await.expect("carried by rdma");
    assert!(i.nic(0).posted() + i.nic(1).posted() > before);
    initiator.shutdown().await;
    target.shutdown().await;
}
