//! Raft messages that must not move a group: from outside it, from a member's id over another
//! address, for another node, and a snapshot a member cannot install (which stops that member
//! with the reason, while the group carries on).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{config, free_port, leader_of, ListMachine, TempDir};
use mooncake_core::{LogGroup, MetadataStore};
use mooncake_meta_raft::network::frame_message;
use mooncake_meta_raft::raft::prelude::{ConfState, Message, MessageType, Snapshot};
use mooncake_meta_raft::{PeerInfo, RaftMetadataStore};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

/// Three members on loopback, a leader elected; returns them, the leader's index and a
/// follower's.
async fn group(dir: &TempDir) -> (Vec<PeerInfo>, Vec<Option<RaftMetadataStore>>, usize, usize) {
    let voters: Vec<PeerInfo> = (1..=3)
        .map(|id| PeerInfo {
            id,
            raft_addr: format!("127.0.0.1:{}", free_port()),
            service_addr: format!("127.0.0.1:{}", 50_000 + id),
        })
        .collect();
    let mut stores = Vec::new();
    for id in 1..=3u64 {
        let m = ListMachine::default();
        let store = RaftMetadataStore::start(config(dir, id, &voters), Box::new(m))
            .await
            .unwrap();
        stores.push(Some(store));
    }
    let l = leader_of(&stores).await;
    let leader = stores[l].as_ref().unwrap();
    leader.put("k", b"v".to_vec()).await.unwrap();
    let f = (0..3).find(|&i| i != l).unwrap();
    // The follower has heard of the leader (so its term is settled).
    for _ in 0..200 {
        if stores[f].as_ref().unwrap().leader().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (voters, stores, l, f)
}

/// Sends `m`, framed as peers frame it, to `to` over a connection from `from_ip`.
async fn send_from(from_ip: &str, to: &str, m: &Message) {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from_ip.parse().unwrap(), 0))
        .unwrap();
    let mut stream = socket.connect(to.parse().unwrap()).await.unwrap();
    stream.write_all(&frame_message(m).unwrap()).await.unwrap();
    stream.flush().await.unwrap();
    // Give the member time to read and step (or refuse) it.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// A leader's heartbeat at a far higher term: stepped, it makes the receiver take that term
/// (and that sender as its leader).
fn heartbeat(from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_outside_the_group_are_refused() {
    let dir = TempDir::new("hostile-msgs");
    let (voters, stores, l, f) = group(&dir).await;
    let follower = stores[f].as_ref().unwrap();
    let (me, to) = (voters[f].id, voters[f].raft_addr.as_str());
    let leader_id = voters[l].id;
    let term = follower.status().term;
    // From an id that is not a member.
    send_from("127.0.0.1", to, &heartbeat(99, me, term + 100)).await;
    // From a member's id, over a connection from an address that member does not have.
    send_from("127.0.0.2", to, &heartbeat(leader_id, me, term + 100)).await;
    // Addressed to another node.
    let other = voters[3 - l - f].id;
    send_from("127.0.0.1", to, &heartbeat(leader_id, other, term + 100)).await;
    // (An election of the group's own, on a loaded machine, may move the term by a little.)
    let now = follower.status().term;
    assert!(
        now < term + 100,
        "a refused message moved the term to {now}"
    );
    // The same message from the member's own address is stepped: the refusals above were the
    // checks, not a malformed message.
    send_from("127.0.0.1", to, &heartbeat(leader_id, me, term + 100)).await;
    let mut adopted = follower.status().term;
    for _ in 0..100 {
        if adopted >= term + 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        adopted = follower.status().term;
    }
    assert!(adopted >= term + 100, "term {adopted}");
    for s in stores.into_iter().flatten() {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_leader_no_longer_claims_to_lead() {
    use mooncake_core::{CommandLog, Leadership};
    let dir = TempDir::new("stopped-leader");
    let (_voters, mut stores, l, _f) = group(&dir).await;
    let leader = stores[l].take().unwrap();
    assert!(matches!(leader.leadership(), Leadership::Leader { .. }));
    leader.shutdown().await;
    assert!(!leader.is_leader());
    assert_eq!(
        leader.leadership(),
        Leadership::Follower { leader_hint: None }
    );
    for s in stores.into_iter().flatten() {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_cannot_be_installed_stops_the_member_and_the_group_carries_on() {
    let dir = TempDir::new("hostile-snap");
    let (voters, stores, l, f) = group(&dir).await;
    let follower = stores[f].as_ref().unwrap();
    let term = follower.status().term;
    // A snapshot "from the leader" at a later term and index whose data is garbage.
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = 1_000;
    snap.mut_metadata().term = term;
    let conf = ConfState {
        voters: voters.iter().map(|p| p.id).collect(),
        ..ConfState::default()
    };
    snap.mut_metadata().set_conf_state(conf);
    snap.data = b"not a snapshot".to_vec().into();
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgSnapshot);
    m.from = voters[l].id;
    m.to = voters[f].id;
    m.term = term;
    m.set_snapshot(snap);
    send_from("127.0.0.1", &voters[f].raft_addr, &m).await;
    let reason = tokio::time::timeout(Duration::from_secs(5), follower.failed())
        .await
        .expect("the member reports its failure");
    assert!(reason.contains("snapshot"), "{reason}");
    assert!(!follower.status().running);
    // It leads nothing and names no leader: a service on it answers "not the leader".
    assert!(!follower.is_leader() && follower.leader().is_none());
    // The other two carry on.
    let leader = stores[l].as_ref().unwrap();
    leader.put("after", b"still".to_vec()).await.unwrap();
    assert_eq!(
        leader.get("after").await.unwrap().unwrap().value,
        b"still".to_vec()
    );
    for s in stores.into_iter().flatten() {
        s.shutdown().await;
    }
}

/// A list machine that panics on the command `boom` (a state machine's bug).
struct Panicky(ListMachine);

impl mooncake_core::StateMachine for Panicky {
    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        assert!(command != b"boom", "the state machine hit its bug");
        self.0.apply(command)
    }
    fn snapshot(&self) -> mooncake_core::Result<Vec<u8>> {
        self.0.snapshot()
    }
    fn restore(&mut self, snapshot: &[u8]) -> mooncake_core::Result<()> {
        self.0.restore(snapshot)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_raft_loop_is_a_fatal_error_not_a_frozen_leader() {
    use mooncake_core::{CommandLog, Leadership};
    let dir = TempDir::new("panicky");
    let voters = vec![PeerInfo {
        id: 1,
        raft_addr: format!("127.0.0.1:{}", free_port()),
        service_addr: "127.0.0.1:50001".into(),
    }];
    let store = RaftMetadataStore::start(
        config(&dir, 1, &voters),
        Box::new(Panicky(ListMachine::default())),
    )
    .await
    .unwrap();
    let stores = vec![Some(store)];
    leader_of(&stores).await;
    let store = stores.into_iter().next().flatten().unwrap();
    assert!(store.apply_command(b"fine".to_vec()).await.is_ok());
    // The panic fails the call in flight and stops the loop with the reason.
    assert!(store.apply_command(b"boom".to_vec()).await.is_err());
    let reason = tokio::time::timeout(Duration::from_secs(5), store.failed())
        .await
        .expect("the failure is reported");
    assert!(reason.contains("panicked"), "{reason}");
    assert!(!store.is_leader());
    assert_eq!(
        store.leadership(),
        Leadership::Follower { leader_hint: None }
    );
    assert!(store.apply_command(b"after".to_vec()).await.is_err());
    store.shutdown().await;
}

/// A list machine whose apply of `hang` blocks until released (a Raft loop stuck in a write
/// that never returns, say).
struct Stuck {
    list: ListMachine,
    gate: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl mooncake_core::StateMachine for Stuck {
    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        if command == b"hang" {
            let (open, cv) = &*self.gate;
            let mut open = open.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
        }
        self.list.apply(command)
    }
    fn snapshot(&self) -> mooncake_core::Result<Vec<u8>> {
        self.list.snapshot()
    }
    fn restore(&mut self, snapshot: &[u8]) -> mooncake_core::Result<()> {
        self.list.restore(snapshot)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_loop_is_stuck_loses_its_read_lease_and_answers_not_leader() {
    use mooncake_core::{CommandLog, Leadership};
    let dir = TempDir::new("stuck");
    let voters = vec![PeerInfo {
        id: 1,
        raft_addr: format!("127.0.0.1:{}", free_port()),
        service_addr: "127.0.0.1:50001".into(),
    }];
    let gate = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    let machine = Stuck {
        list: ListMachine::default(),
        gate: gate.clone(),
    };
    let store = RaftMetadataStore::start(config(&dir, 1, &voters), Box::new(machine))
        .await
        .unwrap();
    let stores = vec![Some(store)];
    leader_of(&stores).await;
    let store = stores.into_iter().next().flatten().unwrap();
    store.apply_command(b"fine".to_vec()).await.unwrap();
    store.read_lease().await.unwrap();
    assert!(store.holds_read_lease());
    // The loop blocks inside an apply: it still claims to lead, but renews nothing.
    let store = std::sync::Arc::new(store);
    let hung = {
        let store = store.clone();
        tokio::spawn(async move { store.apply_command(b"hang".to_vec()).await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.holds_read_lease() {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never ran out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(store.leadership(), Leadership::Leader { .. }));
    let e = store.acquire_read_lease().await.unwrap_err();
    assert_eq!(store.not_leader_hint(&e), Some(None), "{e}");
    // Released, it serves again.
    {
        let (open, cv) = &*gate;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }
    hung.await.unwrap().unwrap();
    store.read_lease().await.unwrap();
    store.shutdown().await;
}
