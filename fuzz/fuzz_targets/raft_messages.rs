//! Fuzzes a 3-member raft group (the sans-IO `RaftNode`s, each with its own on-disk log in a
//! scratch directory, preferably on tmpfs) with arbitrary protobuf messages injected from any
//! `from` id over a connection from any of four addresses, between deterministic steps of the
//! group itself: ticks, proposals, elections and leadership transfers, message delivery, lost
//! messages. Every message, injected or the group's own, passes the members' `SenderCheck` as
//! the raft loop's does.
//!
//! Input: a sequence of ops, each an op byte and its arguments (see `run`). Elections happen
//! only when asked (election timeouts are never reached), so a run is deterministic.
//!
//! Checks after each op: no panic; a message the sender check admits is for its receiver, from
//! another member, over a connection from that member's own address (`127.0.0.<id>`), so
//! messages from non-members or from elsewhere are dropped; and unless a message was admitted
//! as from a member (a member misbehaving, which raft does not defend against): at most one
//! leader per term, every member applies the same committed commands in the same order and
//! never takes one back, and every member keeps running.
#![no_main]

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use mooncake_core::StateMachine;
use mooncake_meta_raft::raft::prelude::MessageType;
use mooncake_meta_raft::{Message, NodeConfig, PeerInfo, RaftNode, RoleEvent, SenderCheck};
use protobuf::Message as _;

/// An append-only list of the commands applied.
#[derive(Clone, Default)]
struct ListMachine(Arc<Mutex<Vec<Vec<u8>>>>);

impl StateMachine for ListMachine {
    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        let mut l = self.0.lock().expect("list");
        l.push(command.to_vec());
        (l.len() as u64).to_le_bytes().to_vec()
    }
    fn snapshot(&self) -> mooncake_core::Result<Vec<u8>> {
        Ok(postcard::to_stdvec(&*self.0.lock().expect("list"))?)
    }
    fn restore(&mut self, snapshot: &[u8]) -> mooncake_core::Result<()> {
        *self.0.lock().expect("list") = postcard::from_bytes(snapshot)?;
        Ok(())
    }
}

impl ListMachine {
    fn items(&self) -> Vec<Vec<u8>> {
        self.0.lock().expect("list").clone()
    }
}

const MEMBERS: u64 = 3;
/// Ticks a member may take in one run: below the election timeout, so no election starts on
/// its own (raft randomises that timeout) and a run replays exactly.
const MAX_TICKS: u32 = 900;

fn ip_of(id: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, id as u8))
}

fn scratch() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!(
        "mooncake-fuzz-raft-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

struct Member {
    node: RaftNode,
    senders: SenderCheck,
    machine: ListMachine,
    /// The commands this member had applied after the last op.
    seen: Vec<Vec<u8>>,
    ticks: u32,
}

struct Group {
    dir: PathBuf,
    members: BTreeMap<u64, Member>,
    queue: VecDeque<Message>,
    leaders_by_term: BTreeMap<u64, u64>,
    /// A message was admitted as from a member: raft's guarantees assume honest members.
    byzantine: bool,
}

impl Drop for Group {
    fn drop(&mut self) {
        self.members.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Group {
    fn new() -> Group {
        let dir = scratch();
        let voters: Vec<PeerInfo> = (1..=MEMBERS)
            .map(|id| PeerInfo {
                id,
                raft_addr: format!("127.0.0.{id}:7000"),
                service_addr: format!("127.0.0.{id}:50051"),
            })
            .collect();
        let mut members = BTreeMap::new();
        for id in 1..=MEMBERS {
            let mut c = NodeConfig::new(id, dir.join(format!("n{id}")), voters.clone());
            c.election_ticks = 1000;
            c.heartbeat_ticks = 1;
            c.snapshot_threshold = 4;
            c.snapshot_by_size = false;
            c.max_proposal_bytes = 64 << 10;
            c.max_record_bytes = 1 << 20;
            c.max_size_per_msg = 4 << 10;
            c.max_inflight_msgs = 8;
            let machine = ListMachine::default();
            let node = RaftNode::open(c, Box::new(machine.clone())).expect("open a member");
            members.insert(
                id,
                Member {
                    node,
                    senders: SenderCheck::new(&voters),
                    machine,
                    seen: Vec::new(),
                    ticks: 0,
                },
            );
        }
        Group {
            dir,
            members,
            queue: VecDeque::new(),
            leaders_by_term: BTreeMap::new(),
            byzantine: false,
        }
    }

    /// Hands `m` to member `to` as if it came over a connection from `source`.
    fn deliver(&mut self, to: u64, m: Message, source: IpAddr, injected: bool) {
        let Some(member) = self.members.get_mut(&to) else {
            return;
        };
        let admitted = member.senders.admit(&member.node, &m, source).is_ok();
        if admitted {
            assert!(
                m.to == to && m.from != to && (1..=MEMBERS).contains(&m.from),
                "admitted a message from {} to {} at member {to}",
                m.from,
                m.to
            );
            assert_eq!(
                source,
                ip_of(m.from),
                "admitted a message from the wrong address"
            );
            if injected {
                self.byzantine = true;
            }
            let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            let from = m.from;
            let _ = member.node.step(m);
            if is_snapshot && !injected {
                if let Some(sender) = self.members.get_mut(&from) {
                    sender.node.report_snapshot(to, true);
                }
            }
        }
    }

    /// Advances every member, queues its messages and checks the invariants.
    fn advance(&mut self) {
        let ids: Vec<u64> = self.members.keys().copied().collect();
        for id in ids {
            let member = self.members.get_mut(&id).expect("member");
            let out = match member.node.advance() {
                Ok(out) => out,
                Err(e) => {
                    // The raft loop stops on this error and the process exits with it.
                    assert!(self.byzantine, "member {id} stopped: {e}");
                    self.members.remove(&id);
                    continue;
                }
            };
            for e in &out.events {
                if let RoleEvent::BecameLeader { term } = *e {
                    self.note_leader(term, id);
                }
            }
            let member = &self.members[&id];
            if member.node.is_leader() {
                self.note_leader(member.node.term(), id);
            }
            self.queue.extend(out.messages);
        }
        if self.byzantine {
            return;
        }
        // Committed commands: each member's list only grows, and all agree on common prefixes.
        for member in self.members.values_mut() {
            let now = member.machine.items();
            assert!(
                now.starts_with(&member.seen),
                "member {} took back or changed a committed command",
                member.node.id()
            );
            member.seen = now;
        }
        let lists: Vec<&Vec<Vec<u8>>> = self.members.values().map(|m| &m.seen).collect();
        for a in &lists {
            for b in &lists {
                let n = a.len().min(b.len());
                assert_eq!(a[..n], b[..n], "members disagree on committed commands");
            }
        }
    }

    fn note_leader(&mut self, term: u64, id: u64) {
        let prev = *self.leaders_by_term.entry(term).or_insert(id);
        assert!(
            prev == id || self.byzantine,
            "two leaders in term {term}: {prev} and {id}"
        );
    }

    /// Delivers what is queued now (not what that causes).
    fn deliver_queued(&mut self, limit: usize) {
        let batch: Vec<Message> = self.queue.drain(..self.queue.len().min(limit)).collect();
        for m in batch {
            let (to, from) = (m.to, m.from);
            self.deliver(to, m, ip_of(from), false);
        }
    }

    fn tick(&mut self, id: u64) {
        if let Some(m) = self.members.get_mut(&id) {
            if m.ticks < MAX_TICKS {
                m.ticks += 1;
                m.node.tick();
            }
        }
    }

    fn leader(&self) -> Option<u64> {
        self.members
            .values()
            .find(|m| m.node.is_leader())
            .map(|m| m.node.id())
    }
}

fn run(data: &[u8]) {
    let mut g = Group::new();
    // A leader to start from: member 1, elected and with one command committed.
    let _ = g.members.get_mut(&1).expect("member 1").node.campaign();
    for _ in 0..8 {
        g.advance();
        g.deliver_queued(usize::MAX);
    }
    if let Some(m) = g.members.get_mut(&1) {
        let _ = m.node.propose(b"first");
    }
    for _ in 0..8 {
        g.advance();
        g.deliver_queued(usize::MAX);
    }
    let member = |b: u8| u64::from(b) % MEMBERS + 1;
    let mut rest = data;
    let mut take = |n: usize| -> Option<&[u8]> {
        if rest.len() < n {
            return None;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    };
    while let Some(&[op]) = take(1) {
        match op % 8 {
            // Inject: [to][from][source][len u16][protobuf message].
            0 => {
                let Some(&[to_sel, from_sel, src_sel, l0, l1]) = take(5) else {
                    break;
                };
                let len = usize::from(u16::from_le_bytes([l0, l1]));
                let Some(body) = take(len) else { break };
                let Ok(mut m) = Message::parse_from_bytes(body) else {
                    continue;
                };
                let to = member(to_sel);
                if to_sel & 0x80 == 0 {
                    m.to = to;
                }
                if from_sel & 0x80 == 0 {
                    // 1..=3 are members, 0, 4 and 5 are not.
                    m.from = u64::from(from_sel % 6);
                }
                let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, src_sel % 4 + 1));
                g.deliver(to, m, source, true);
            }
            1 => {
                let Some(&[x]) = take(1) else { break };
                g.tick(member(x));
            }
            2 => {
                for id in 1..=MEMBERS {
                    g.tick(id);
                }
                for _ in 0..4 {
                    g.advance();
                    g.deliver_queued(usize::MAX);
                }
            }
            3 => {
                let Some(&[x, len]) = take(2) else { break };
                let Some(command) = take(usize::from(len)) else {
                    break;
                };
                if let Some(m) = g.members.get_mut(&member(x)) {
                    let _ = m.node.propose(command);
                }
            }
            4 => {
                let Some(&[x]) = take(1) else { break };
                if let Some(m) = g.members.get_mut(&member(x)) {
                    let _ = m.node.campaign();
                }
            }
            5 => {
                let Some(&[n]) = take(1) else { break };
                g.deliver_queued(usize::from(n) + 1);
            }
            6 => {
                let Some(&[x]) = take(1) else { break };
                let lost = member(x);
                g.queue.retain(|m| m.to != lost);
            }
            _ => {
                let Some(&[x]) = take(1) else { break };
                if let Some(l) = g.leader() {
                    g.members
                        .get_mut(&l)
                        .expect("leader")
                        .node
                        .transfer_leader(member(x));
                }
            }
        }
        g.advance();
        // The queue stays bounded: what a run does not deliver soon is lost.
        if g.queue.len() > 4096 {
            g.queue.drain(..2048);
        }
    }
}

fuzz_target!(|data: &[u8]| run(data));
