//! A master group whose members talk over mutual TLS, on loopback: it elects, replicates and
//! admits a joining member (snapshot included); and the connections it must not believe are
//! refused: a member's certificate claiming another member's id, certificates without the
//! master role, of another CA or of no member, and plain TCP.

mod common;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{config, free_port, leader_of, ListMachine, TempDir};
use mooncake_core::MetadataStore;
use mooncake_meta_raft::network::{frame_message, RAFT_ALPN, TLS_HANDSHAKE_TIMEOUT};
use mooncake_meta_raft::raft::prelude::{Message, MessageType};
use mooncake_meta_raft::{Error, NodeConfig, PeerInfo, RaftMetadataStore, StoreConfig};
use mooncake_tls::certs::{self, CertifiedPem};
use mooncake_tls::{Role, TlsConnector, TlsIdentity};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the members logged (all tests of this file share it: assertions look for lines only
/// one test causes).
fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("mooncake_meta_raft=info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        logs
    })
}

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(buf)?;
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Whether some line holds every one of `words`.
    fn has_line(&self, words: &[&str]) -> bool {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().any(|l| words.iter().all(|w| l.contains(w)))
    }
}

fn cert(ca: &CertifiedPem, name: &str, roles: &[Role]) -> TlsIdentity {
    certs::issue_role_cert(ca, name, &["127.0.0.1"], roles)
        .unwrap()
        .identity(ca)
}

/// Member `id`'s certificate, as the rule wants it.
fn member_cert(ca: &CertifiedPem, id: u64) -> TlsIdentity {
    cert(ca, &format!("master-{id}"), &[Role::Master])
}

fn book(n: u64) -> Vec<PeerInfo> {
    (1..=n)
        .map(|id| PeerInfo {
            id,
            raft_addr: format!("127.0.0.1:{}", free_port()),
            service_addr: format!("127.0.0.1:{}", 50_000 + id),
        })
        .collect()
}

fn tls_config(dir: &TempDir, ca: &CertifiedPem, id: u64, voters: &[PeerInfo]) -> StoreConfig {
    let mut c = config(dir, id, voters);
    c.node.tls = Some(member_cert(ca, id));
    // Snapshots (and log compaction) every few entries: a member that joins after some
    // writes is caught up by a snapshot of them.
    c.node.snapshot_threshold = 8;
    c
}

/// Three members with TLS, a leader elected and one write committed.
async fn tls_group(
    dir: &TempDir,
    ca: &CertifiedPem,
    machines: &[ListMachine],
) -> (Vec<PeerInfo>, Vec<Option<RaftMetadataStore>>, usize) {
    let voters = book(3);
    let mut stores = Vec::new();
    for id in 1..=3u64 {
        let m = machines[(id - 1) as usize].clone();
        let store = RaftMetadataStore::start(tls_config(dir, ca, id, &voters), Box::new(m))
            .await
            .unwrap();
        stores.push(Some(store));
    }
    let l = leader_of(&stores).await;
    stores[l]
        .as_ref()
        .unwrap()
        .put("k", b"v".to_vec())
        .await
        .unwrap();
    // Every member has heard of the leader (so its term is settled).
    for s in stores.iter().flatten() {
        for _ in 0..250 {
            if s.leader().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (voters, stores, l)
}

async fn wait_len(m: &ListMachine, n: usize) {
    for _ in 0..1000 {
        if m.items().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("machine stuck at {} items, wanted {n}", m.items().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_group_elects_replicates_and_admits_a_joining_member() {
    tokio::time::timeout(Duration::from_secs(60), tls_join_scenario())
        .await
        .expect("TLS group test timed out");
}

/// What the join scenario asks of the group's leader.
enum Op {
    Command(Vec<u8>),
    AddLearner(PeerInfo),
    Promote(u64),
}

/// Runs `op` on the current leader, following leadership changes (fast ticks and multi-MiB
/// snapshots on a loaded machine may cost the leader its term) and waiting for a learner to
/// catch up before its promotion, within a bound.
async fn on_leader(stores: &[Option<RaftMetadataStore>], op: Op) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let leader = stores[leader_of(stores).await].as_ref().unwrap();
        let result = match &op {
            Op::Command(c) => leader.propose(c.clone()).await.map(drop),
            Op::AddLearner(p) => leader.add_learner(p.clone()).await,
            Op::Promote(id) => leader.promote(*id).await,
        };
        match result {
            Ok(()) => return,
            // A learner added by a leader that lost its term before answering.
            Err(e) if matches!(op, Op::AddLearner(_)) && e.to_string().contains("already") => {
                return
            }
            Err(e) if std::time::Instant::now() < deadline => {
                if !matches!(e, Error::NotLeader { .. } | Error::LeadershipLost)
                    && !matches!(op, Op::Promote(_))
                {
                    panic!("{e}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

async fn tls_join_scenario() {
    logs();
    let dir = TempDir::new("tls-group");
    let ca = certs::new_ca("raft test CA").unwrap();
    let machines: Vec<ListMachine> = (0..4).map(|_| ListMachine::default()).collect();
    let (voters, mut stores, _) = tls_group(&dir, &ca, &machines[..3]).await;
    // Commands large enough that the snapshot the joiner is sent (the log before it is
    // compacted away) spans many TLS records: about 2.5 MiB.
    for i in 0..40u8 {
        on_leader(&stores, Op::Command(vec![i; 64 << 10])).await;
    }
    for m in &machines[..3] {
        wait_len(m, 40).await;
        assert!(m.items().contains(&vec![39u8; 64 << 10]));
    }

    // A fourth member, in join mode with its own certificate, is added, caught up (by
    // snapshot) and promoted over TLS.
    let mut all = voters.clone();
    all.push(PeerInfo {
        id: 4,
        raft_addr: format!("127.0.0.1:{}", free_port()),
        service_addr: "127.0.0.1:50004".into(),
    });
    let mut join = tls_config(&dir, &ca, 4, &all);
    join.node.join = true;
    let joiner = RaftMetadataStore::start(join, Box::new(machines[3].clone()))
        .await
        .unwrap();
    on_leader(&stores, Op::AddLearner(all[3].clone())).await;
    wait_len(&machines[3], 40).await;
    assert_eq!(machines[3].items()[..40], machines[0].items()[..40]);
    on_leader(&stores, Op::Promote(4)).await;
    on_leader(&stores, Op::Command(b"after".to_vec())).await;
    wait_len(&machines[3], 41).await;
    assert!(machines[3].items().contains(&b"after".to_vec()));
    assert_eq!(joiner.get("k").await.unwrap().unwrap().value, b"v");
    stores.push(Some(joiner));
    for s in stores.into_iter().flatten() {
        s.shutdown().await;
    }
}

/// A leader's heartbeat at a far higher term: stepped, it makes the receiver take that term.
fn heartbeat(from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

/// A TLS connection to `addr` presenting `identity`, speaking the raft protocol.
async fn tls_to(addr: &str, identity: &TlsIdentity) -> impl AsyncRead + AsyncWrite + Unpin {
    let connector = TlsConnector::new(identity, RAFT_ALPN).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector.connect(tcp, "127.0.0.1").await.unwrap().0
}

/// Writes `m` framed as members frame it; the peer may have closed the connection already.
async fn send<S: AsyncWrite + Unpin>(s: &mut S, m: &Message) {
    let _ = s.write_all(&frame_message(m).unwrap()).await;
    let _ = s.flush().await;
}

/// Whether the peer closes the connection (after a TLS alert, perhaps) within its handshake
/// deadline (a plain peer's bytes may look like the start of a TLS record the member waits to
/// complete) and a margin.
async fn closed_by_peer<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut buf = [0u8; 256];
    let limit = TLS_HANDSHAKE_TIMEOUT + Duration::from_secs(3);
    let until_closed = async { while let Ok(1..) = s.read(&mut buf).await {} };
    tokio::time::timeout(limit, until_closed).await.is_ok()
}

async fn term_reaches(store: &RaftMetadataStore, term: u64) -> bool {
    for _ in 0..100 {
        if store.status().term >= term {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_certificate_cannot_speak_for_another_member() {
    let logs = logs();
    let dir = TempDir::new("tls-claim");
    let ca = certs::new_ca("raft test CA").unwrap();
    let machines: Vec<ListMachine> = (0..3).map(|_| ListMachine::default()).collect();
    let (voters, stores, _) = tls_group(&dir, &ca, &machines).await;
    let target = stores[0].as_ref().unwrap();
    let term = target.status().term;
    // Member 2's valid certificate, from member 2's address (127.0.0.1), claiming to be 3.
    let mut conn = tls_to(&voters[0].raft_addr, &member_cert(&ca, 2)).await;
    for _ in 0..5 {
        send(&mut conn, &heartbeat(3, 1, term + 100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = target.status().term;
    assert!(
        now < term + 100,
        "a message claiming node 3 moved the term to {now}"
    );
    assert!(
        logs.has_line(&["dropped raft messages", "\"master-2\"", "node 3"]),
        "no log line names the certificate and the claimed id"
    );
    // The same connection speaking as its own member is believed: the drops above were the
    // certificate check, not a malformed message or a dead connection.
    send(&mut conn, &heartbeat(2, 1, term + 100)).await;
    assert!(
        term_reaches(target, term + 100).await,
        "term {}",
        target.status().term
    );
    for s in stores.into_iter().flatten() {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_other_cas_non_members_and_plain_peers_are_refused() {
    let logs = logs();
    let dir = TempDir::new("tls-refused");
    let ca = certs::new_ca("raft test CA").unwrap();
    let foreign = certs::new_ca("intruder CA").unwrap();
    let machines: Vec<ListMachine> = (0..3).map(|_| ListMachine::default()).collect();
    let (voters, stores, _) = tls_group(&dir, &ca, &machines).await;
    let target = stores[0].as_ref().unwrap();
    let addr = voters[0].raft_addr.as_str();
    let term = target.status().term;
    let intruders = [
        // Member 2's name, but only the client role.
        ("client role", cert(&ca, "master-2", &[Role::Client])),
        // Member 2's name and role, signed by another CA (trusting ours, to reach the server).
        (
            "foreign CA",
            TlsIdentity {
                ca_pem: ca.cert_pem.clone(),
                ..member_cert(&foreign, 2)
            },
        ),
        // Member 2's certificate, expired.
        ("expired", {
            let now = std::time::SystemTime::now();
            let day = Duration::from_secs(24 * 3600);
            certs::issue_cert(
                &ca,
                "master-2",
                &["127.0.0.1"],
                &[Role::Master],
                now - 2 * day,
                now - day,
            )
            .unwrap()
            .identity(&ca)
        }),
        // The master role, but no member's name.
        ("non-member", member_cert(&ca, 9)),
        ("unnamed", cert(&ca, "ops", &[Role::Master, Role::Admin])),
    ];
    for (what, identity) in &intruders {
        let mut conn = tls_to(addr, identity).await;
        send(&mut conn, &heartbeat(2, 1, term + 100)).await;
        assert!(
            closed_by_peer(&mut conn).await,
            "{what}: the connection stayed open"
        );
    }
    // Plain TCP: the frame a member would send, from a member's address.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    send(&mut plain, &heartbeat(2, 1, term + 100)).await;
    assert!(
        closed_by_peer(&mut plain).await,
        "plain: the connection stayed open"
    );
    let now = target.status().term;
    assert!(now < term + 100, "a refused peer moved the term to {now}");
    for words in [
        &[
            "refused a raft connection",
            "\"master-2\"",
            "lacks the master role",
        ][..],
        &[
            "refused a raft connection",
            "TLS handshake",
            "UnknownIssuer",
        ],
        &[
            "refused a raft connection",
            "TLS handshake",
            "certificate expired",
        ],
        &["refused a raft connection", "\"master-9\"", "not a member"],
        &["refused a raft connection", "\"ops\"", "names no member"],
    ] {
        assert!(logs.has_line(words), "no log line with {words:?}");
    }
    // The group still works.
    let l = leader_of(&stores).await;
    stores[l]
        .as_ref()
        .unwrap()
        .put("k2", b"v2".to_vec())
        .await
        .unwrap();
    for s in stores.into_iter().flatten() {
        s.shutdown().await;
    }
}

#[test]
fn a_member_needs_its_own_master_certificate() {
    let ca = certs::new_ca("raft test CA").unwrap();
    let voters = vec![PeerInfo {
        id: 1,
        raft_addr: "127.0.0.1:1".into(),
        service_addr: String::new(),
    }];
    let mut c = NodeConfig::new(1, "/nonexistent", voters);
    c.tls = Some(member_cert(&ca, 1));
    c.validate().unwrap();
    for wrong in [
        member_cert(&ca, 2),
        cert(&ca, "master-1", &[Role::Client]),
        cert(&ca, "master-01", &[Role::Master]),
    ] {
        c.tls = Some(wrong);
        match c.validate() {
            Err(Error::Config(why)) => assert!(
                why.contains("the common name \"master-1\" (mooncake_certs issue master-1"),
                "{why}"
            ),
            other => panic!("accepted a wrong certificate: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_at_a_members_address_is_sent_nothing() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let logs = logs();
    let dir = TempDir::new("tls-impostor");
    let ca = certs::new_ca("raft test CA").unwrap();
    let voters = book(3);
    // Member 3's address is held by a process with member 2's valid certificate: it completes
    // handshakes, and counts the bytes members send it.
    let listener = tokio::net::TcpListener::bind(&voters[2].raft_addr)
        .await
        .unwrap();
    let acceptor = mooncake_tls::TlsAcceptor::new(&member_cert(&ca, 2), RAFT_ALPN).unwrap();
    let (dialled, received) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let impostor = {
        let (dialled, received) = (dialled.clone(), received.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, dialled, received) =
                    (acceptor.clone(), dialled.clone(), received.clone());
                tokio::spawn(async move {
                    let Ok((mut tls, _)) = acceptor.accept(tcp).await else {
                        return;
                    };
                    dialled.fetch_add(1, Ordering::Relaxed);
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = tls.read(&mut buf).await {
                        received.fetch_add(n, Ordering::Relaxed);
                    }
                });
            }
        })
    };
    let mut stores = Vec::new();
    for id in 1..=2u64 {
        let m = ListMachine::default();
        let store = RaftMetadataStore::start(tls_config(&dir, &ca, id, &voters), Box::new(m))
            .await
            .unwrap();
        stores.push(Some(store));
    }
    // Two of three elect and commit; both try member 3 all along.
    let l = leader_of(&stores).await;
    stores[l]
        .as_ref()
        .unwrap()
        .put("k", b"v".to_vec())
        .await
        .unwrap();
    for _ in 0..250 {
        if dialled.load(Ordering::Relaxed) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        dialled.load(Ordering::Relaxed) >= 2,
        "no member dialled node 3"
    );
    assert_eq!(
        received.load(Ordering::Relaxed),
        0,
        "the impostor was sent raft data"
    );
    assert!(
        logs.has_line(&[
            "not sending to raft peer 3",
            "\"master-2\"",
            "not member 3's"
        ]),
        "no log line names the impostor's certificate"
    );
    impostor.abort();
    for s in stores.into_iter().flatten() {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_certificate_revoked_while_connected_is_cut_off() {
    let logs = logs();
    let dir = TempDir::new("tls-crl");
    let ca = certs::new_ca("raft test CA").unwrap();
    let crl = dir.0.join("crl.pem");
    std::fs::write(&crl, certs::revocation_list(&ca, &[], 1).unwrap()).unwrap();
    // Member 1 of a group of three, alone: enough to see which messages it believes.
    let voters = book(3);
    let mut c = tls_config(&dir, &ca, 1, &voters);
    c.node.tls = Some(member_cert(&ca, 1).with_crl_file(&crl).unwrap());
    let store = RaftMetadataStore::start(c, Box::new(ListMachine::default()))
        .await
        .unwrap();
    // A second certificate named master-2 (as a stolen or superseded one would be), connected
    // and speaking as member 2: believed (member 1 moves to its term).
    let stolen = member_cert(&ca, 2);
    let mut conn = tls_to(&voters[0].raft_addr, &stolen).await;
    let term = store.status().term + 5;
    send(&mut conn, &heartbeat(2, 1, term)).await;
    assert!(
        term_reaches(&store, term).await,
        "member 2's message was not believed"
    );
    // The CA revokes it: the open connection is closed at its next message, once the member
    // has looked at the list again (at most every half second).
    let revoked = certs::RevokedEntry {
        serial: certs::serial_of(&stolen.cert_pem).unwrap(),
        revoked_at: std::time::SystemTime::now(),
    };
    let tmp = dir.0.join("crl.pem.tmp");
    std::fs::write(&tmp, certs::revocation_list(&ca, &[revoked], 2).unwrap()).unwrap();
    std::fs::rename(&tmp, &crl).unwrap();
    let mut closed = false;
    for _ in 0..100 {
        send(&mut conn, &heartbeat(2, 1, term)).await;
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(100), conn.read(&mut buf)).await
        {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "a revoked certificate's raft connection stayed open"
    );
    assert!(
        logs.has_line(&["closing a raft connection", "master-2 was revoked"]),
        "no log line names the revoked certificate"
    );
    store.shutdown().await;
}
