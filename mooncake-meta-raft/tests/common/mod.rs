//! Shared test support: a list state machine, temporary directories and a simulated network
//! of sans-IO raft nodes driven by manual ticks.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mooncake_core::StateMachine;
use mooncake_meta_raft::raft::prelude::MessageType;
use mooncake_meta_raft::{
    Applied, Message, NodeConfig, PeerInfo, ProposalError, ProposalId, RaftMetadataStore, RaftNode,
    RoleEvent, StoreConfig,
};

/// An append-only list of commands; the response to a command is its position (u64 LE).
#[derive(Clone, Default)]
pub struct ListMachine(pub Arc<Mutex<Vec<Vec<u8>>>>);

impl StateMachine for ListMachine {
    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        let mut l = self.0.lock().unwrap();
        l.push(command.to_vec());
        (l.len() as u64 - 1).to_le_bytes().to_vec()
    }
    fn snapshot(&self) -> mooncake_core::Result<Vec<u8>> {
        Ok(postcard::to_allocvec(&*self.0.lock().unwrap())?)
    }
    fn restore(&mut self, snapshot: &[u8]) -> mooncake_core::Result<()> {
        let l: Vec<Vec<u8>> = postcard::from_bytes(snapshot)?;
        *self.0.lock().unwrap() = l;
        Ok(())
    }
}

impl ListMachine {
    pub fn items(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().clone()
    }
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "mooncake-raft-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn peer(id: u64) -> PeerInfo {
    PeerInfo {
        id,
        raft_addr: format!("sim:{id}"),
        service_addr: format!("svc:{id}"),
    }
}

/// A tiny deterministic RNG (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// In-process cluster over a simulated network.
pub struct Cluster {
    pub dir: TempDir,
    pub nodes: BTreeMap<u64, Option<RaftNode>>,
    pub machines: BTreeMap<u64, ListMachine>,
    pub voters: Vec<PeerInfo>,
    pub queue: VecDeque<Message>,
    /// Links (from, to) that drop everything.
    pub cut: BTreeSet<(u64, u64)>,
    /// Percentage of messages dropped at random.
    pub drop_percent: u64,
    pub rng: Rng,
    pub leaders_by_term: BTreeMap<u64, u64>,
    pub applied: BTreeMap<u64, Vec<Applied>>,
    pub failed: BTreeMap<u64, Vec<(ProposalId, ProposalError)>>,
    pub tweak: fn(&mut NodeConfig),
    /// Virtual monotonic time: each [`tick`](Self::tick) is [`TICK`] of it.
    pub now: Instant,
    /// Nodes paused (as by `SIGSTOP`): they neither tick nor run, and messages to them wait in
    /// `held` until [`thaw`](Self::thaw).
    pub frozen: BTreeSet<u64>,
    pub held: VecDeque<Message>,
    /// Each node's data-directory incarnation, as its messages carry it.
    pub incarnations: BTreeMap<u64, u64>,
    /// Messages refused for their sender's incarnation, with the reason.
    pub refused: Vec<(u64, u64, String)>,
}

/// The real duration of one tick of the simulated cluster.
pub const TICK: Duration = Duration::from_millis(100);

impl Cluster {
    pub fn new(n: u64) -> Self {
        Self::with_config(n, |_| {})
    }

    pub fn with_config(n: u64, tweak: fn(&mut NodeConfig)) -> Self {
        let mut c = Cluster {
            dir: TempDir::new("sim"),
            nodes: BTreeMap::new(),
            machines: BTreeMap::new(),
            voters: (1..=n).map(peer).collect(),
            queue: VecDeque::new(),
            cut: BTreeSet::new(),
            drop_percent: 0,
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            leaders_by_term: BTreeMap::new(),
            applied: BTreeMap::new(),
            failed: BTreeMap::new(),
            tweak,
            now: Instant::now(),
            frozen: BTreeSet::new(),
            held: VecDeque::new(),
            incarnations: BTreeMap::new(),
            refused: Vec::new(),
        };
        for id in 1..=n {
            c.start(id, false);
        }
        c
    }

    pub fn config(&self, id: u64, join: bool) -> NodeConfig {
        let mut cfg = NodeConfig::new(
            id,
            self.dir.path().join(format!("n{id}")),
            self.voters.clone(),
        );
        cfg.join = join;
        (self.tweak)(&mut cfg);
        cfg
    }

    /// Starts (or restarts from its data dir) node `id` with a fresh state machine.
    pub fn start(&mut self, id: u64, join: bool) {
        let m = ListMachine::default();
        let node = RaftNode::open(self.config(id, join), Box::new(m.clone())).unwrap();
        self.incarnations.insert(id, node.incarnation());
        self.machines.insert(id, m);
        self.nodes.insert(id, Some(node));
    }

    pub fn try_start(&mut self, id: u64) -> mooncake_meta_raft::Result<()> {
        let m = ListMachine::default();
        let node = RaftNode::open(self.config(id, false), Box::new(m.clone()))?;
        self.incarnations.insert(id, node.incarnation());
        self.machines.insert(id, m);
        self.nodes.insert(id, Some(node));
        Ok(())
    }

    pub fn crash(&mut self, id: u64) {
        self.nodes.insert(id, None);
        self.frozen.remove(&id);
        self.queue.retain(|m| m.to != id && m.from != id);
        self.held.retain(|m| m.to != id);
    }

    /// Pauses node `id` (as `SIGSTOP` does): it keeps its state, runs nothing, and what is sent
    /// to it waits.
    pub fn freeze(&mut self, id: u64) {
        self.frozen.insert(id);
    }

    /// Resumes a frozen node; what was sent to it meanwhile is delivered next.
    pub fn thaw(&mut self, id: u64) {
        self.frozen.remove(&id);
        let (mine, others): (VecDeque<Message>, VecDeque<Message>) =
            self.held.drain(..).partition(|m| m.to == id);
        self.held = others;
        self.queue.extend(mine);
    }

    /// Live nodes that are not frozen.
    pub fn running(&self) -> Vec<u64> {
        self.live()
            .into_iter()
            .filter(|id| !self.frozen.contains(id))
            .collect()
    }

    pub fn node(&self, id: u64) -> &RaftNode {
        self.nodes[&id].as_ref().expect("node is running")
    }

    pub fn node_mut(&mut self, id: u64) -> &mut RaftNode {
        self.nodes
            .get_mut(&id)
            .unwrap()
            .as_mut()
            .expect("node is running")
    }

    pub fn live(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    pub fn isolate(&mut self, id: u64) {
        for other in self.nodes.keys().copied().collect::<Vec<_>>() {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    pub fn partition(&mut self, a: &[u64], b: &[u64]) {
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }

    pub fn heal(&mut self) {
        self.cut.clear();
    }

    fn blocked(&mut self, m: &Message) -> bool {
        self.cut.contains(&(m.from, m.to))
            || self.nodes.get(&m.to).is_none_or(|n| n.is_none())
            || (self.drop_percent > 0 && self.rng.chance(self.drop_percent))
    }

    /// Advances every live node once and queues its messages.
    pub fn advance_all(&mut self) {
        for id in self.running() {
            let out = self.node_mut(id).advance().unwrap();
            // Every leadership is reported, even one that began and ended between advances.
            for e in &out.events {
                if let RoleEvent::BecameLeader { term } = *e {
                    let prev = *self.leaders_by_term.entry(term).or_insert(id);
                    assert_eq!(prev, id, "two leaders in term {term}: {prev} and {id}");
                }
            }
            let node = self.node(id);
            if node.is_leader() {
                let term = node.term();
                let prev = *self.leaders_by_term.entry(term).or_insert(id);
                assert_eq!(prev, id, "two leaders in term {term}: {prev} and {id}");
            }
            self.applied.entry(id).or_default().extend(out.applied);
            self.failed.entry(id).or_default().extend(out.failed);
            for m in out.messages {
                if std::env::var("SIM_TRACE").is_ok()
                    && m.get_msg_type() != MessageType::MsgHeartbeat
                    && m.get_msg_type() != MessageType::MsgHeartbeatResponse
                {
                    eprintln!(
                        "{} -> {} {:?} term {} idx {} commit {} reject {}",
                        m.from,
                        m.to,
                        m.get_msg_type(),
                        m.term,
                        m.index,
                        m.commit,
                        m.reject
                    );
                }
                self.queue.push_back(m);
            }
        }
    }

    /// Delivers queued messages (and the ones they cause) until the network is quiet.
    pub fn settle(&mut self) {
        for _ in 0..200 {
            self.advance_all();
            if self.queue.is_empty() {
                return;
            }
            while let Some(m) = self.queue.pop_front() {
                let is_snap = m.get_msg_type() == MessageType::MsgSnapshot;
                let (from, to) = (m.from, m.to);
                if self.frozen.contains(&to) {
                    self.held.push_back(m);
                    continue;
                }
                let blocked = self.blocked(&m);
                if !blocked {
                    let mut m = m;
                    match self.node_mut(to).check_incarnation(&mut m) {
                        Ok(()) => self.node_mut(to).step(m).unwrap(),
                        Err(why) => self.refused.push((from, to, why)),
                    }
                }
                if is_snap {
                    if let Some(Some(n)) = self.nodes.get_mut(&from) {
                        n.report_snapshot(to, !blocked);
                    }
                }
            }
        }
        panic!("the network did not settle");
    }

    /// One tick of virtual time: every running node ticks and renews its read lease when due,
    /// then the network settles.
    pub fn tick(&mut self) {
        self.now += TICK;
        let now = self.now;
        for id in self.running() {
            let node = self.node_mut(id);
            node.tick();
            node.maintain_lease(now, TICK, false);
        }
        self.settle();
    }

    /// Until when node `id` may answer reads as leader (`None`: no lease).
    pub fn lease_until(&self, id: u64) -> Option<Instant> {
        self.node(id).read_lease_until(TICK)
    }

    /// Whether node `id` holds a read lease at the current virtual time.
    pub fn holds_lease(&self, id: u64) -> bool {
        self.lease_until(id).is_some_and(|u| self.now < u)
    }

    pub fn ticks(&mut self, n: usize) {
        for _ in 0..n {
            self.tick();
        }
    }

    pub fn leader(&self) -> Option<u64> {
        self.live()
            .into_iter()
            .find(|&id| self.node(id).is_leader())
    }

    /// Ticks until some node of `among` leads and every live node in `among` knows it.
    pub fn wait_leader(&mut self, among: &[u64]) -> u64 {
        for _ in 0..500 {
            self.tick();
            let leaders: Vec<u64> = among
                .iter()
                .copied()
                .filter(|id| self.nodes[id].as_ref().is_some_and(|n| n.is_leader()))
                .collect();
            if let [l] = leaders[..] {
                if among.iter().all(|id| {
                    self.nodes[id]
                        .as_ref()
                        .is_none_or(|n| n.leader_id() == Some(l))
                }) {
                    return l;
                }
            }
        }
        panic!("no leader elected among {among:?}");
    }

    /// Proposes on `id`, then runs until the proposal is applied there; returns the response.
    pub fn propose_and_wait(&mut self, id: u64, data: &[u8]) -> Vec<u8> {
        let pid = self.node_mut(id).propose(data).unwrap();
        for _ in 0..50 {
            self.settle();
            if let Some(a) = self.applied[&id].iter().find(|a| a.id == Some(pid)) {
                return a.response.clone();
            }
            if self.failed[&id].iter().any(|(p, _)| *p == pid) {
                panic!("proposal failed");
            }
            self.tick();
        }
        panic!("proposal {pid:?} not applied on {id}");
    }

    /// Every pair of state machines agrees on their common prefix.
    pub fn check_prefix_agreement(&self) {
        let lists: Vec<(u64, Vec<Vec<u8>>)> = self
            .machines
            .iter()
            .filter(|(id, _)| self.nodes.get(id).is_some_and(|n| n.is_some()))
            .map(|(id, m)| (*id, m.items()))
            .collect();
        for (a, la) in &lists {
            for (b, lb) in &lists {
                let n = la.len().min(lb.len());
                assert_eq!(
                    la[..n],
                    lb[..n],
                    "nodes {a} and {b} disagree on committed entries"
                );
            }
        }
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The store config of node `id` of `voters`, with fast ticks and backoff.
pub fn config(dir: &TempDir, id: u64, voters: &[PeerInfo]) -> StoreConfig {
    let node = NodeConfig::new(id, dir.path().join(format!("n{id}")), voters.to_vec());
    let me = &voters[(id - 1) as usize];
    let mut c = StoreConfig::new(node, me.raft_addr.clone());
    c.tick_interval = Duration::from_millis(20);
    c.min_backoff = Duration::from_millis(10);
    c.max_backoff = Duration::from_millis(100);
    c
}

/// The index of the single leader among `stores`, once there is one.
pub async fn leader_of(stores: &[Option<RaftMetadataStore>]) -> usize {
    for _ in 0..500 {
        let leaders: Vec<usize> = stores
            .iter()
            .enumerate()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| s.is_leader()))
            .map(|(i, _)| i)
            .collect();
        if let [i] = leaders[..] {
            return i;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no single leader");
}
