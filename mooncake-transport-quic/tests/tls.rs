//! Mutual TLS: peers without a valid certificate of the cluster CA are refused on either side,
//! fail with an error and move no bytes; verified identities reach the authorizer.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mooncake_core::{
    conformance::pattern, EngineConfig, Location, TransferEngine, TransferRequest,
};
use mooncake_transport_quic::certs::{self, CertifiedPem};
use mooncake_transport_quic::{
    frame, PeerAuthorizer, PeerIdentity, QuicConfig, QuicTransport, TlsIdentity,
};

const LEN: usize = 1 << 20;

/// A target engine with `identity`, a registered buffer filled with a known pattern, and an
/// initiator engine with `initiator`; both on loopback.
struct Setup {
    target: Arc<TransferEngine>,
    initiator: Arc<TransferEngine>,
    remote: u64,
    local: u64,
}

async fn setup(target: QuicConfig, initiator: QuicConfig) -> Setup {
    common::init_logging();
    let start = |c: QuicConfig| async move {
        TransferEngine::start(
            EngineConfig::new("127.0.0.1"),
            vec![QuicTransport::new(c).expect("valid config")],
        )
        .await
        .expect("engine starts")
    };
    let target = start(target).await;
    let initiator = start(initiator).await;
    let remote = target.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    let local = initiator.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    fill(&target, remote, &pattern(1, LEN));
    fill(&initiator, local, &pattern(2, LEN));
    Setup {
        target,
        initiator,
        remote,
        local,
    }
}

fn fill(e: &TransferEngine, addr: u64, bytes: &[u8]) {
    e.memory()
        .resolve(addr, bytes.len() as u64)
        .unwrap()
        .write_from(bytes)
        .unwrap();
}

fn bytes(e: &TransferEngine, addr: u64) -> Vec<u8> {
    e.memory().resolve(addr, LEN as u64).unwrap().to_vec()
}

impl Setup {
    /// The handshake, a WRITE and a READ all fail within the bound, and neither side's memory
    /// changed.
    async fn assert_refused(self) {
        let bound = Duration::from_secs(10);
        let name = self.target.segment_name().to_owned();
        let r = tokio::time::timeout(bound, self.initiator.open_segment(&name))
            .await
            .expect("the handshake fails in bounded time");
        assert!(r.is_err(), "the handshake must be refused");
        // The descriptor as metadata discovery would have given it: the transfer itself must
        // be refused too.
        let seg = Arc::new(self.target.local_descriptor());
        let results = tokio::time::timeout(
            bound,
            self.initiator.transfer(vec![
                TransferRequest::write(&seg, self.remote, self.local, LEN as u64),
                TransferRequest::read(&seg, self.remote, self.local, LEN as u64),
                TransferRequest::read(&seg, self.remote, self.local, 64),
            ]),
        )
        .await
        .expect("the transfer fails in bounded time");
        for r in &results {
            assert!(
                r.is_err(),
                "a refused peer's request must fail: {results:?}"
            );
        }
        assert!(
            bytes(&self.target, self.remote) == pattern(1, LEN),
            "no byte reached the target"
        );
        assert!(
            bytes(&self.initiator, self.local) == pattern(2, LEN),
            "no byte reached the initiator"
        );
        self.initiator.shutdown().await;
        self.target.shutdown().await;
    }
}

fn other_ca() -> CertifiedPem {
    certs::new_ca("some other CA").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_ca_peers_transfer() {
    let s = setup(
        common::config(common::identity("target")),
        common::config(common::identity("initiator")),
    )
    .await;
    let seg = s
        .initiator
        .open_segment(s.target.segment_name())
        .await
        .expect("handshake between nodes of one CA");
    let r = s
        .initiator
        .transfer(vec![TransferRequest::read(
            &seg, s.remote, s.local, LEN as u64,
        )])
        .await;
    r[0].as_ref().expect("read");
    assert!(bytes(&s.initiator, s.local) == pattern(1, LEN));
    s.initiator.shutdown().await;
    s.target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_refused() {
    let foreign = other_ca();
    // Trusts the cluster CA (so it would accept the target) but holds a foreign certificate.
    let identity = TlsIdentity {
        ca_pem: common::ca().cert_pem.clone(),
        ..certs::issue_node_cert(&foreign, "intruder", &["127.0.0.1"])
            .unwrap()
            .identity(&foreign)
    };
    setup(
        common::config(common::identity("target")),
        common::config(identity),
    )
    .await
    .assert_refused()
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_client_certificate_is_refused() {
    let day = Duration::from_secs(24 * 3600);
    let now = SystemTime::now();
    let expired = certs::issue_node_cert_valid(
        common::ca(),
        "old",
        &["127.0.0.1"],
        now - 30 * day,
        now - day,
    )
    .unwrap()
    .identity(common::ca());
    setup(
        common::config(common::identity("target")),
        common::config(expired),
    )
    .await
    .assert_refused()
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_from_another_ca_is_refused_by_the_client() {
    let foreign = other_ca();
    // The target trusts the cluster CA (it would accept the initiator) but presents a foreign
    // certificate.
    let identity = TlsIdentity {
        ca_pem: common::ca().cert_pem.clone(),
        ..certs::issue_node_cert(&foreign, "impostor", &["127.0.0.1"])
            .unwrap()
            .identity(&foreign)
    };
    setup(
        common::config(identity),
        common::config(common::identity("initiator")),
    )
    .await
    .assert_refused()
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_certificate_must_name_the_dialled_address() {
    let elsewhere = certs::issue_node_cert(common::ca(), "target", &["127.0.0.2", "other.host"])
        .unwrap()
        .identity(common::ca());
    setup(
        common::config(elsewhere),
        common::config(common::identity("initiator")),
    )
    .await
    .assert_refused()
    .await;
}

/// A client that presents no certificate at all (the transport cannot be configured so; a raw
/// QUIC client can) gets no answer: its request fails and moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_refused() {
    let s = setup(
        common::config(common::identity("target")),
        common::config(common::identity("initiator")),
    )
    .await;
    let address: std::net::SocketAddr = s
        .target
        .local_descriptor()
        .endpoint("quic")
        .unwrap()
        .address
        .parse()
        .unwrap();
    let endpoint = common::raw_client(common::ca(), None);
    let attempt = async {
        let conn = endpoint.connect(address, "127.0.0.1")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let header = frame::encode_request(&frame::Request {
            op: frame::Op::Write,
            addr: s.remote,
            len: 4096,
            notify: false,
        });
        send.write_all(&header).await?;
        send.write_all(&[0xAA; 4096]).await?;
        send.finish()?;
        let mut h = [0u8; frame::RESPONSE_LEN];
        recv.read_exact(&mut h).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(h)
    };
    let r = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .expect("bounded");
    assert!(r.is_err(), "a client without a certificate got an answer");
    assert!(
        bytes(&s.target, s.remote) == pattern(1, LEN),
        "no byte reached the target"
    );
    endpoint.close(0u32.into(), b"");
    // The target still serves authenticated peers.
    let seg = s
        .initiator
        .open_segment(s.target.segment_name())
        .await
        .unwrap();
    let r = s
        .initiator
        .transfer(vec![TransferRequest::read(&seg, s.remote, s.local, 64)])
        .await;
    r[0].as_ref()
        .expect("an authenticated peer is still served");
    s.initiator.shutdown().await;
    s.target.shutdown().await;
}

/// Remembers every identity it is asked about; refuses common names starting with `deny`.
#[derive(Debug, Default)]
struct Recorder {
    seen: Mutex<Vec<PeerIdentity>>,
}

impl PeerAuthorizer for Recorder {
    fn authorize(&self, peer: &PeerIdentity, _remote: std::net::SocketAddr) -> bool {
        self.seen.lock().unwrap().push(peer.clone());
        !peer
            .common_name
            .as_deref()
            .is_some_and(|cn| cn.starts_with("deny"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorizer_sees_the_verified_identity_and_can_refuse() {
    let recorder = Arc::new(Recorder::default());
    let target = QuicConfig {
        authorizer: Some(recorder.clone()),
        ..common::config(common::identity("target"))
    };
    let named = certs::issue_node_cert(common::ca(), "node-7", &["127.0.0.1", "node-7.example"])
        .unwrap()
        .identity(common::ca());
    let s = setup(target.clone(), common::config(named)).await;
    let seg = s
        .initiator
        .open_segment(s.target.segment_name())
        .await
        .expect("an authorized peer is served");
    let r = s
        .initiator
        .transfer(vec![TransferRequest::read(&seg, s.remote, s.local, 64)])
        .await;
    r[0].as_ref().unwrap();
    {
        let seen = recorder.seen.lock().unwrap();
        let peer = seen.first().expect("the authorizer was asked");
        assert_eq!(peer.common_name.as_deref(), Some("node-7"));
        assert_eq!(peer.dns_names, vec!["node-7.example".to_owned()]);
        assert_eq!(
            peer.ip_addresses,
            vec![std::net::IpAddr::from([127, 0, 0, 1])]
        );
        assert!(!peer.certificate_der.is_empty());
    }
    s.initiator.shutdown().await;
    s.target.shutdown().await;

    let denied = certs::issue_node_cert(common::ca(), "deny-me", &["127.0.0.1"])
        .unwrap()
        .identity(common::ca());
    setup(target, common::config(denied))
        .await
        .assert_refused()
        .await;
}

#[test]
fn identities_are_checked_when_the_transport_is_made() {
    let good = common::identity("node");
    for broken in [
        TlsIdentity {
            ca_pem: String::new(),
            ..good.clone()
        },
        TlsIdentity {
            cert_pem: "not a certificate".into(),
            ..good.clone()
        },
        TlsIdentity {
            key_pem: common::identity("other").key_pem,
            ..good.clone()
        },
    ] {
        assert!(QuicTransport::new(QuicConfig::new(broken)).is_err());
    }
    assert!(QuicTransport::new(QuicConfig::new(good)).is_ok());
}

/// One READ of 64 bytes at `addr` on a new stream of `conn`: the payload, or why it failed.
async fn read_64(conn: &quinn::Connection, addr: u64) -> Result<Vec<u8>, String> {
    let request = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let header = frame::encode_request(&frame::Request {
            op: frame::Op::Read,
            addr,
            len: 64,
            notify: false,
        });
        send.write_all(&header).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let mut h = [0u8; frame::RESPONSE_LEN];
        recv.read_exact(&mut h).await.map_err(|e| e.to_string())?;
        let resp = frame::decode_response(&h).map_err(|e| e.to_string())?;
        if resp.status != 0 {
            return Err(format!("status {}", resp.status));
        }
        let mut body = vec![0u8; resp.len as usize];
        recv.read_exact(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        Ok(body)
    };
    tokio::time::timeout(Duration::from_secs(5), request)
        .await
        .map_err(|_| "no answer within 5 s".to_owned())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_while_connected_is_cut_off_at_its_next_request() {
    let dir = std::env::temp_dir().join(format!("mc-quic-crl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let crl = dir.join("crl.pem");
    certs::write_revocation_list(common::ca(), &crl, &[], 1).unwrap();
    let target = common::config(common::identity("target").with_crl_file(&crl).unwrap());
    let s = setup(target, common::config(common::identity("initiator"))).await;
    let address: std::net::SocketAddr = s
        .target
        .local_descriptor()
        .endpoint("quic")
        .unwrap()
        .address
        .parse()
        .unwrap();
    let node = common::identity("node-a");
    let endpoint = common::raw_client(common::ca(), Some(&node));
    let connect = || async {
        let conn = endpoint
            .connect(address, "127.0.0.1")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        // In TLS 1.3 the client's handshake completes before the target checked the client's
        // certificate: only an answer shows that it was admitted.
        read_64(&conn, s.remote).await?;
        Ok::<_, String>(conn)
    };

    // A connection established (and served) before the revocation.
    let kept = connect().await.expect("served before the revocation");
    assert_eq!(
        read_64(&kept, s.remote).await.unwrap(),
        pattern(1, LEN)[..64]
    );

    // The CA revokes node-a: the same connection's next request fails (once the target looked
    // at the list again, at most every half second) and the target closes the connection.
    certs::write_revocation_list(common::ca(), &crl, &[&node.cert_pem], 2).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Ok(body) = read_64(&kept, s.remote).await {
        assert_eq!(body, pattern(1, LEN)[..64]);
        assert!(
            std::time::Instant::now() < deadline,
            "a revoked certificate's open connection is still served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let closed = tokio::time::timeout(Duration::from_secs(5), kept.closed())
        .await
        .expect("the target closes the connection");
    match &closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(mooncake_transport_quic::REVOKED)
            );
            assert_eq!(&c.reason[..], b"certificate revoked");
        }
        other => panic!("closed otherwise: {other:?}"),
    }

    // A fresh connection of the revoked certificate is refused at the handshake.
    let fresh = connect().await;
    assert!(fresh.is_err(), "a revoked certificate was served again");
    endpoint.close(0u32.into(), b"");

    // An engine holding it is refused too; everyone else is still served.
    let revoked = TransferEngine::start(
        EngineConfig::new("127.0.0.1"),
        vec![QuicTransport::new(common::config(node)).unwrap()],
    )
    .await
    .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        revoked.open_segment(s.target.segment_name()),
    )
    .await
    .expect("bounded");
    assert!(r.is_err(), "a revoked certificate opened the segment");
    revoked.shutdown().await;
    let seg = s
        .initiator
        .open_segment(s.target.segment_name())
        .await
        .unwrap();
    let r = s
        .initiator
        .transfer(vec![TransferRequest::read(&seg, s.remote, s.local, 64)])
        .await;
    r[0].as_ref().expect("other peers are still served");
    s.initiator.shutdown().await;
    s.target.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
