//! Authenticated plain TCP over real loopback sockets: who a target that requires certificates
//! admits, what the refused are told, what the target logs, and that a refused peer reads and
//! changes nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mooncake_core::{
    EngineConfig, Error, ErrorCode, Location, SegmentDesc, TransferEngine, TransferRequest,
};
use mooncake_transport_tcp::certs::{self, CertifiedPem};
use mooncake_transport_tcp::frame::{self, Op, Request};
use mooncake_transport_tcp::{Role, TcpConfig, TcpTransport, TlsIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FILL: u8 = 0x5A;
const LEN: usize = 1 << 16;

fn ca(name: &str) -> CertifiedPem {
    certs::new_ca(name).unwrap()
}

fn identity(ca: &CertifiedPem, name: &str, roles: &[Role]) -> TlsIdentity {
    certs::issue_role_cert(ca, name, &["127.0.0.1"], roles)
        .unwrap()
        .identity(ca)
}

fn config(auth: Option<TlsIdentity>) -> TcpConfig {
    TcpConfig {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        auth,
        ..TcpConfig::default()
    }
}

async fn engine(config: TcpConfig) -> Arc<TransferEngine> {
    TransferEngine::start(
        EngineConfig::new("127.0.0.1"),
        vec![TcpTransport::new(config).unwrap()],
    )
    .await
    .unwrap()
}

/// A target engine with one buffer of `LEN` bytes filled with `FILL`; returns it, the buffer's
/// address and the TCP endpoint's address.
async fn target(config: TcpConfig) -> (Arc<TransferEngine>, u64, String) {
    let e = engine(config).await;
    let buf = e.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    e.memory()
        .resolve(buf, LEN as u64)
        .unwrap()
        .write_from(&[FILL; LEN])
        .unwrap();
    let addr = e
        .local_descriptor()
        .endpoint("tcp")
        .unwrap()
        .address
        .clone();
    (e, buf, addr)
}

fn untouched(e: &TransferEngine, buf: u64) -> bool {
    e.memory().resolve(buf, LEN as u64).unwrap().to_vec() == vec![FILL; LEN]
}

fn request(op: Op, id: u32, addr: u64, len: u64) -> Vec<u8> {
    let mut b = Vec::new();
    frame::encode_request(
        &Request {
            op,
            id,
            addr,
            len,
            notify: false,
            deadline_ms: None,
        },
        &mut b,
    );
    b
}

/// Everything the server sends until it closes the connection (bounded in time).
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    match read {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(Err(e)) => panic!("reading from the target: {e}"),
        Err(_) => panic!("the target did not close the connection"),
    }
    got
}

/// Log lines written while the guard lives, on this thread (tests using it run on a
/// current-thread runtime, so the target's tasks log here too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn an_unauthenticated_peer_reads_nothing_changes_nothing_and_is_logged() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let ca = ca("cluster CA");
    let (target, buf, addr) = target(config(Some(identity(&ca, "target", &[Role::Client])))).await;

    // The plain protocol, straight away: DESCRIBE, READ, WRITE.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut burst = frame::encode_preamble().to_vec();
    burst.extend(request(Op::Describe, 0, 0, 0));
    burst.extend(request(Op::Read, 1, buf, 4096));
    burst.extend(request(Op::Write, 2, buf, 4096));
    burst.extend([0xEE; 4096]);
    s.write_all(&burst).await.unwrap();
    let got = read_until_closed(&mut s).await;
    assert_eq!(
        got,
        frame::encode_refusal(),
        "the refusal and nothing else: no descriptor, no data"
    );
    let refusal = frame::decode_response(&got).unwrap().unwrap();
    assert_eq!(refusal.status, ErrorCode::ILLEGAL_CLIENT.code());
    assert!(untouched(&target, buf), "a refused WRITE landed");
    let first = logs.text();
    assert!(
        first.contains("refusing a transfer connection from 127.0.0.1:")
            && first.contains("without a certificate"),
        "{first}"
    );

    // Another protocol altogether, within the same second: refused, and not logged again.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let got = read_until_closed(&mut s).await;
    // At most a TLS alert record (content type 21): never a response of the plain protocol.
    assert!(got.is_empty() || got[0] == 0x15, "{got:?}");
    assert_eq!(
        logs.text(),
        first,
        "refusals are logged at most once a second"
    );

    // A second later the next refusal is logged, with the count of those skipped.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&frame::encode_preamble()).await.unwrap();
    s.write_all(&request(Op::Describe, 0, 0, 0)).await.unwrap();
    assert_eq!(read_until_closed(&mut s).await, frame::encode_refusal());
    let text = logs.text();
    assert!(
        text[first.len()..].contains("1 more refusals not logged"),
        "{text}"
    );
    assert!(untouched(&target, buf));

    // A member of the cluster is served meanwhile.
    let member = engine(config(Some(identity(&ca, "member", &[Role::Client])))).await;
    let local = member.allocate_buffer(4096, Location::cpu(0)).unwrap();
    let seg = member.open_segment(target.segment_name()).await.unwrap();
    let r = member
        .transfer(vec![TransferRequest::read(&seg, buf, local, 4096)])
        .await;
    r[0].as_ref().unwrap();
    assert_eq!(
        member.memory().resolve(local, 4096).unwrap().to_vec(),
        vec![FILL; 4096]
    );
    member.shutdown().await;
    target.shutdown().await;
}

/// Opens the target's segment from `initiator` (expecting a refusal), then tries a WRITE and a
/// READ with the target's descriptor as if it had leaked (from the metadata service, say);
/// returns the refusal's message.
async fn refused(initiator: &Arc<TransferEngine>, target: &TransferEngine, buf: u64) -> String {
    let e = initiator
        .open_segment(target.segment_name())
        .await
        .expect_err("the segment must not open");
    let Error::PermissionDenied(message) = &e else {
        panic!("expected PermissionDenied, got {e:?}");
    };
    let leaked: Arc<SegmentDesc> = Arc::new(target.local_descriptor());
    let local = initiator.allocate_buffer(4096, Location::cpu(0)).unwrap();
    initiator
        .memory()
        .resolve(local, 4096)
        .unwrap()
        .write_from(&[0xEE; 4096])
        .unwrap();
    let results = initiator
        .transfer(vec![
            TransferRequest::write(&leaked, buf, local, 4096),
            TransferRequest::read(&leaked, buf, local, 4096),
        ])
        .await;
    for r in results {
        assert!(matches!(r, Err(Error::PermissionDenied(_))), "{r:?}");
    }
    assert!(untouched(target, buf), "a refused WRITE landed");
    assert_eq!(
        initiator.memory().resolve(local, 4096).unwrap().to_vec(),
        vec![0xEE; 4096],
        "a refused READ delivered data"
    );
    message.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_ca_an_expired_certificate_and_a_missing_role_are_refused() {
    let ca = ca("cluster CA");
    let (target, buf, addr) = target(config(Some(identity(&ca, "target", &[Role::Client])))).await;
    let foreign_ca = self::ca("intruder CA");
    // Trusts our CA (so it would accept the target), holds a certificate of another.
    let foreign = TlsIdentity {
        ca_pem: ca.cert_pem.clone(),
        ..identity(&foreign_ca, "intruder", &[Role::Client, Role::Master])
    };
    let now = SystemTime::now();
    let expired = certs::issue_cert(
        &ca,
        "expired",
        &["127.0.0.1"],
        &[Role::Client],
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )
    .unwrap()
    .identity(&ca);
    let admin_only = identity(&ca, "operator", &[Role::Admin]);
    for (who, id) in [("foreign", foreign), ("expired", expired)] {
        let initiator = engine(config(Some(id))).await;
        let m = refused(&initiator, &target, buf).await;
        assert!(
            m.contains(&format!(
                "transfer target {addr} could not be authenticated"
            )),
            "{who}: {m}"
        );
        initiator.shutdown().await;
    }
    let initiator = engine(config(Some(admin_only))).await;
    let m = refused(&initiator, &target, buf).await;
    assert!(
        m.contains(&format!(
            "transfer target {addr} refused this node's certificate (operator, roles: admin)"
        )),
        "{m}"
    );
    initiator.shutdown().await;

    // The initiator checks the target too: a target whose certificate has no admitted role is
    // refused before anything is sent to it.
    let (admin_target, admin_buf, admin_addr) =
        self::target(config(Some(identity(&ca, "rogue", &[Role::Admin])))).await;
    let initiator = engine(config(Some(identity(&ca, "member", &[Role::Client])))).await;
    let m = refused(&initiator, &admin_target, admin_buf).await;
    assert!(
        m.contains(&format!(
            "transfer target {admin_addr} presented a certificate (rogue, roles: admin)"
        )),
        "{m}"
    );
    initiator.shutdown().await;
    admin_target.shutdown().await;
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_initiator_is_told_the_target_requires_a_certificate() {
    let ca = ca("cluster CA");
    let (target, buf, addr) = target(config(Some(identity(&ca, "target", &[Role::Client])))).await;
    let plain = engine(config(None)).await;
    let m = refused(&plain, &target, buf).await;
    assert!(
        m.contains(&format!(
            "transfer target {addr} requires a certificate of its cluster CA"
        )),
        "{m}"
    );
    plain.shutdown().await;
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authenticated_initiator_is_told_the_target_does_not_authenticate() {
    let ca = ca("cluster CA");
    let (target, buf, addr) = target(config(None)).await;
    let member = engine(config(Some(identity(&ca, "member", &[Role::Client])))).await;
    let m = refused(&member, &target, buf).await;
    assert!(
        m.contains(&format!(
            "transfer target {addr} could not be authenticated"
        )) && m.contains("the target does not authenticate transfer connections"),
        "{m}"
    );
    member.shutdown().await;
    // The plain target still serves plain peers.
    let plain = engine(config(None)).await;
    let seg = plain.open_segment(target.segment_name()).await.unwrap();
    let local = plain.allocate_buffer(4096, Location::cpu(0)).unwrap();
    let r = plain
        .transfer(vec![TransferRequest::read(&seg, buf, local, 4096)])
        .await;
    r[0].as_ref().unwrap();
    plain.shutdown().await;
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_handshakes_time_out_and_count_against_the_connection_caps() {
    let ca = ca("cluster CA");
    let (target, buf, addr) = target(TcpConfig {
        connect_timeout: Duration::from_millis(300),
        max_connections_per_address: 3,
        auth: Some(identity(&ca, "target", &[Role::Client])),
        ..TcpConfig::default()
    })
    .await;
    // Three connections that never start their handshake hold every place of this address.
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A fourth is closed at once, unread.
    let started = Instant::now();
    let mut surplus = TcpStream::connect(&addr).await.unwrap();
    assert!(read_until_closed(&mut surplus).await.is_empty());
    assert!(started.elapsed() < Duration::from_millis(250));
    // The silent ones are closed when the connect timeout runs out.
    for s in &mut silent {
        assert!(read_until_closed(s).await.is_empty());
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    // Their places came back: a member connects (two lanes) and is served.
    let member = engine(TcpConfig {
        lanes: 2,
        ..config(Some(identity(&ca, "member", &[Role::Client])))
    })
    .await;
    let seg = member.open_segment(target.segment_name()).await.unwrap();
    let local = member.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    let r = member
        .transfer(vec![TransferRequest::read(&seg, buf, local, LEN as u64)])
        .await;
    r[0].as_ref().unwrap();
    member.shutdown().await;
    target.shutdown().await;
}

#[test]
fn an_authorizer_without_an_identity_or_an_unreadable_identity_is_rejected_at_construction() {
    let e = TcpTransport::new(TcpConfig {
        authorizer: Some(Arc::new(mooncake_transport_tcp::RoleAuthorizer(vec![
            Role::Admin,
        ]))),
        ..TcpConfig::default()
    })
    .unwrap_err();
    assert!(
        e.to_string().contains("an authorizer needs an identity"),
        "{e}"
    );
    let ca = ca("cluster CA");
    let mut broken = identity(&ca, "node", &[Role::Client]);
    broken.key_pem = "not a key".into();
    let e = TcpTransport::new(config(Some(broken))).unwrap_err();
    assert!(e.to_string().contains("private key"), "{e}");
}

/// A fresh directory for one test's files, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mc-tcp-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One READ of 4096 bytes at `addr` on an authenticated raw connection: its response (with the
/// payload checked when it is served), or `None` when the target closed the connection.
async fn read_once(s: &mut TcpStream, id: u32, addr: u64) -> Option<frame::Response> {
    s.write_all(&request(Op::Read, id, addr, 4096)).await.ok()?;
    let mut h = [0u8; frame::RESPONSE_LEN];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut h)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return None,
        Err(_) => panic!("the target neither answered nor closed"),
    }
    let resp = frame::decode_response(&h).unwrap().unwrap();
    if resp.status == ErrorCode::OK.code() {
        assert_eq!(resp.id, id);
        let mut payload = vec![0u8; resp.len as usize];
        s.read_exact(&mut payload).await.unwrap();
        assert_eq!(payload, vec![FILL; 4096]);
    }
    Some(resp)
}

#[tokio::test]
async fn a_certificate_revoked_while_connected_is_cut_off_at_its_next_request() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let ca = ca("cluster CA");
    let dir = TempDir::new("crl");
    let crl = dir.0.join("crl.pem");
    certs::write_revocation_list(&ca, &crl, &[], 1).unwrap();
    let target_identity = identity(&ca, "target", &[Role::Client])
        .with_crl_file(&crl)
        .unwrap();
    let (target, buf, addr) = target(config(Some(target_identity))).await;
    let node = identity(&ca, "node-a", &[Role::Client]);
    let connector = mooncake_tls::TlsConnector::new(&node, mooncake_transport_tcp::ALPN).unwrap();
    let connect = || async {
        let tcp = TcpStream::connect(&addr).await.unwrap();
        let (mut s, _) = connector.connect_plain(tcp, "127.0.0.1").await?;
        s.write_all(&frame::encode_preamble()).await.unwrap();
        Ok::<_, Error>(s)
    };

    // A connection established before the revocation is served.
    let mut kept = connect().await.unwrap();
    let served = read_once(&mut kept, 0, buf).await.expect("served");
    assert_eq!(served.status, ErrorCode::OK.code());

    // The CA revokes node-a: the same connection's next request is refused (once the target
    // looked at the list again, at most every half second) and the connection closed.
    certs::write_revocation_list(&ca, &crl, &[&node.cert_pem], 2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut id = 1;
    let refusal = loop {
        let resp = read_once(&mut kept, id, buf)
            .await
            .expect("the target closed the connection without its refusal");
        if resp.status != ErrorCode::OK.code() {
            break resp;
        }
        assert!(
            Instant::now() < deadline,
            "a revoked certificate's open connection is still served"
        );
        id += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(frame::is_refusal(&refusal), "{refusal:?}");
    assert!(
        read_until_closed(&mut kept).await.is_empty(),
        "nothing follows the refusal"
    );
    let text = logs.text();
    assert!(
        text.lines().any(
            |l| l.contains("closing a transfer connection from 127.0.0.1:")
                && l.contains("node-a was revoked")
        ),
        "no log line names the revoked certificate: {text}"
    );

    // A fresh connection of the revoked certificate is refused at authentication.
    let e = connect()
        .await
        .expect_err("a revoked certificate authenticated");
    assert!(matches!(e, Error::PermissionDenied(_)), "{e:?}");
    // And an engine holding it cannot open the target's segment.
    let revoked = engine(config(Some(node))).await;
    let e = revoked
        .open_segment(target.segment_name())
        .await
        .expect_err("the segment must not open");
    assert!(matches!(e, Error::PermissionDenied(_)), "{e:?}");
    revoked.shutdown().await;

    // Other members are still served.
    let member = engine(config(Some(identity(&ca, "node-b", &[Role::Client])))).await;
    let local = member.allocate_buffer(4096, Location::cpu(0)).unwrap();
    let seg = member.open_segment(target.segment_name()).await.unwrap();
    let r = member
        .transfer(vec![TransferRequest::read(&seg, buf, local, 4096)])
        .await;
    r[0].as_ref().unwrap();
    member.shutdown().await;
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_whose_certificate_is_revoked_fails_its_transfers_on_pooled_connections() {
    let ca = ca("cluster CA");
    let dir = TempDir::new("crl-engine");
    let crl = dir.0.join("crl.pem");
    certs::write_revocation_list(&ca, &crl, &[], 1).unwrap();
    let target_identity = identity(&ca, "target", &[Role::Client])
        .with_crl_file(&crl)
        .unwrap();
    let (target, buf, _) = target(config(Some(target_identity))).await;
    let node = identity(&ca, "node-a", &[Role::Client]);
    let initiator = engine(config(Some(node.clone()))).await;
    let local = initiator.allocate_buffer(4096, Location::cpu(0)).unwrap();
    let seg = initiator.open_segment(target.segment_name()).await.unwrap();
    let read = || initiator.transfer(vec![TransferRequest::read(&seg, buf, local, 4096)]);
    read().await[0]
        .as_ref()
        .expect("served before the revocation");
    certs::write_revocation_list(&ca, &crl, &[&node.cert_pem], 2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let e = loop {
        match read().await.remove(0) {
            Ok(()) => {
                assert!(
                    Instant::now() < deadline,
                    "a revoked certificate's pooled connections are still served"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => break e,
        }
    };
    let Error::PermissionDenied(m) = &e else {
        panic!("expected PermissionDenied, got {e:?}");
    };
    assert!(m.contains("node-a"), "{m}");
    // Reconnecting does not help: every further transfer is refused.
    for _ in 0..3 {
        let r = read().await.remove(0);
        assert!(matches!(r, Err(Error::PermissionDenied(_))), "{r:?}");
    }
    initiator.shutdown().await;
    target.shutdown().await;
}
