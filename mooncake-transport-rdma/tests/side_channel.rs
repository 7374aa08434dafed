//! The side channel holds up to hostile peers: connections past its caps (in all, and from one
//! address) are closed as they are accepted while a legitimate peer is still served, and a frame
//! announced but never sent is dropped after the request timeout instead of being waited for
//! (or allocated) in full.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mooncake_core::conformance::pattern;
use mooncake_core::{EngineConfig, Location, TransferEngine, TransferRequest};
use mooncake_transport_rdma::fake::{FakeFabric, FakeNicConfig};
use mooncake_transport_rdma::side::MAGIC;
use mooncake_transport_rdma::{RdmaConfig, RdmaTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const LEN: usize = 64 << 10;

fn side_channel(e: &TransferEngine) -> SocketAddr {
    let d = e.local_descriptor();
    d.endpoint("rdma").unwrap().address.parse().unwrap()
}

async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(ip.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the side channel answers a `Describe` over `s` (a refused connection is closed).
async fn describes(s: &mut TcpStream) -> bool {
    // Preamble, then a frame of one byte: `Request::Describe`, variant 0.
    let mut msg = MAGIC.to_vec();
    msg.extend_from_slice(&[1, 0, 0, 0, 0]);
    if s.write_all(&msg).await.is_err() {
        return false;
    }
    let mut len = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut len)).await;
    matches!(read, Ok(Ok(_)))
}

/// Writes a pattern from `initiator` to `target`'s buffer `dst` and checks it landed.
async fn write_once(initiator: &TransferEngine, target: &TransferEngine, dst: u64, seed: u64) {
    let src = initiator.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    let data = pattern(seed, LEN);
    let r = initiator.memory().resolve(src, LEN as u64).unwrap();
    r.write_from(&data).unwrap();
    let seg = initiator.open_segment(target.segment_name()).await.unwrap();
    let results = initiator
        .transfer(vec![TransferRequest::write(&seg, dst, src, LEN as u64)])
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let landed = target.memory().resolve(dst, LEN as u64).unwrap().to_vec();
    assert!(landed == data, "written bytes");
}

/// A target with `config` and a buffer to write into, and an initiator.
async fn engines(config: RdmaConfig) -> (Arc<TransferEngine>, Arc<TransferEngine>, u64) {
    let fabric = FakeFabric::new();
    let start = |config: RdmaConfig| {
        let host = fabric.host_with(vec![FakeNicConfig::new("fake_0")]);
        let transport = RdmaTransport::with_provider(config, host).unwrap();
        TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![transport])
    };
    let target = start(config).await.unwrap();
    let dst = target.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    let initiator = start(RdmaConfig::default()).await.unwrap();
    (target, initiator, dst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_past_the_caps_is_refused_while_a_legitimate_peer_is_served() {
    let (target, initiator, dst) = engines(RdmaConfig {
        max_connections: 8,
        max_per_address: 4,
        ..RdmaConfig::default()
    })
    .await;
    // The legitimate peer (from 127.0.0.1) connects first.
    write_once(&initiator, &target, dst, 1).await;
    let to = side_channel(&target);
    // A flood from 127.0.0.2: its first four connections are served, the rest closed.
    let mut flood = Vec::new();
    let mut served = Vec::new();
    for _ in 0..12 {
        let mut s = connect_from("127.0.0.2", to).await;
        served.push(describes(&mut s).await);
        flood.push(s);
    }
    let mut want = vec![true; 4];
    want.extend([false; 8]);
    assert_eq!(served, want);
    // Another address still has places, and the legitimate peer is still served.
    let mut other = connect_from("127.0.0.3", to).await;
    assert!(describes(&mut other).await);
    write_once(&initiator, &target, dst, 2).await;
    // With every place taken (1 + 4 + 3 = 8), a connection from yet another address is closed.
    let mut more = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.3", to).await;
        assert!(describes(&mut s).await);
        more.push(s);
    }
    let mut past = connect_from("127.0.0.4", to).await;
    assert!(
        !describes(&mut past).await,
        "a connection past the total cap was served"
    );
    initiator.shutdown().await;
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_announced_but_not_sent_is_dropped_after_the_request_timeout() {
    let (target, initiator, dst) = engines(RdmaConfig {
        request_timeout: Duration::from_millis(500),
        ..RdmaConfig::default()
    })
    .await;
    let to = side_channel(&target);
    let mut s = connect_from("127.0.0.1", to).await;
    // A frame announcing the most bytes a frame may have, and ten of them.
    let mut msg = MAGIC.to_vec();
    msg.extend_from_slice(&(64u32 << 20).to_le_bytes());
    msg.extend_from_slice(&[0; 10]);
    s.write_all(&msg).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection was not closed: {read:?}"
    );
    // A connection that is merely idle is kept: a peer's queue pairs live as long as it.
    let mut idle = connect_from("127.0.0.1", to).await;
    assert!(describes(&mut idle).await);
    write_once(&initiator, &target, dst, 3).await;
    assert!(describes(&mut idle).await, "an idle connection was dropped");
    initiator.shutdown().await;
    target.shutdown().await;
}
