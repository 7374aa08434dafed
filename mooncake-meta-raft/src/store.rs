//! [`RaftMetadataStore`]: the driver. A dedicated thread owns the [`RaftNode`] and runs the
//! ready loop (ticks from its own timer, inputs from a channel, fsync inline); tokio tasks run the
//! TCP transport; callers talk to the loop through the channel and get answers on oneshots.
//!
//! Reads: [`MetadataStore::get`] is served from this node's applied state without a log round
//! trip, so on a follower (or a deposed leader that has not noticed yet) it may miss the latest
//! writes; it never shows uncommitted data. For reads that must not be stale, the leader holds a
//! read lease ([`RaftMetadataStore::holds_read_lease`], [`crate::lease`]): while it holds one,
//! no other member leads, so its applied state has every acknowledged write. `list`, `put`, `delete`, `compare_and_swap` and
//! [`CommandLog::apply_command`] go through the log and are linearizable. The store is also the
//! group's [`CommandLog`] (leadership from the node's status) and [`LogGroup`] (membership
//! changes).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mooncake_core::{
    CommandLog, GroupMember, GroupMembers, Leadership, LogGroup, MetadataStore, StateMachine,
    Versioned,
};
use raft::StateRole;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::admit::SenderCheck;
use crate::config::{RoleObserver, StoreConfig};
use crate::error::{Error, Result};
use crate::network::{self, Inbox, NetConfig, NetEvent, NetTls, Transport};
use crate::node::{Applied, Membership, MembershipChange, ProposalId, RaftNode, RoleEvent};
use crate::state::{KvOp, KvResult, PeerInfo};
use crate::LeaderInfo;

/// What a node reports about itself; watch it with [`RaftMetadataStore::subscribe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftStatus {
    /// This node's id.
    pub id: u64,
    /// Its role.
    pub role: StateRole,
    /// Its term.
    pub term: u64,
    /// The leader it knows.
    pub leader: Option<LeaderInfo>,
    /// The group removed this node (it applied a configuration without it).
    pub removed: bool,
    /// `false` once the loop stopped (shutdown or a fatal error).
    pub running: bool,
    /// Why the loop stopped, when it stopped on a fatal error (a snapshot it cannot install, a
    /// log it cannot write): this member can no longer take part, and its process should end
    /// so that a supervisor restarts it from its data directory.
    pub fatal: Option<String>,
}

type Reply = oneshot::Sender<Result<Vec<u8>>>;

enum Input {
    Net(NetEvent),
    Command(Vec<u8>, Reply),
    Kv(KvOp, Reply),
    Membership(MembershipChange, Reply),
    Get(String, oneshot::Sender<Option<Versioned>>),
    Members(oneshot::Sender<Membership>),
    TransferLeader(u64),
    /// A read found the lease over: renew it now, and answer once it holds (or this node
    /// does not lead).
    RenewLease(oneshot::Sender<Result<()>>),
    /// Stop on a fatal error found outside the loop, with the reason.
    Abandon(String),
    Shutdown,
}

/// The leader's read lease as the loop last published it, read by callers without a channel
/// round trip: the lease's end in nanoseconds after `base` (0: no lease). The loop updates it
/// after every input it steps, before it sends any message that input caused, so a leader
/// that steps down (grants a vote, hears of a higher term) has ended its lease before anyone
/// hears from it again.
#[derive(Debug)]
struct LeaseCell {
    base: Instant,
    until: AtomicU64,
}

impl LeaseCell {
    fn new() -> Self {
        LeaseCell {
            base: Instant::now(),
            until: AtomicU64::new(0),
        }
    }

    fn set(&self, until: Option<Instant>) {
        let nanos = until.map_or(0, |u| {
            (u.saturating_duration_since(self.base).as_nanos() as u64).max(1)
        });
        self.until.store(nanos, Ordering::SeqCst);
    }

    fn holds(&self, now: Instant) -> bool {
        let until = self.until.load(Ordering::SeqCst);
        until != 0 && (now.saturating_duration_since(self.base).as_nanos() as u64) < until
    }
}

/// A [`MetadataStore`] replicated by a raft group. See the module documentation.
pub struct RaftMetadataStore {
    id: u64,
    election_timeout: Duration,
    inputs: mpsc::Sender<Input>,
    status: watch::Receiver<RaftStatus>,
    shutdown: watch::Sender<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    local_addr: SocketAddr,
    lease: Arc<LeaseCell>,
}

impl std::fmt::Debug for RaftMetadataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftMetadataStore")
            .field("id", &self.id)
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl RaftMetadataStore {
    /// Opens the node's data directory (recovering or bootstrapping), binds the raft listener,
    /// and starts the ready loop and the transport. Must be called inside a tokio runtime.
    pub async fn start(config: StoreConfig, machine: Box<dyn StateMachine>) -> Result<Self> {
        config.validate()?;
        let tls = match &config.node.tls {
            Some(identity) => Some(NetTls::new(identity).map_err(Error::Config)?),
            None => None,
        };
        let listener = TcpListener::bind(&config.raft_addr)
            .await
            .map_err(|e| Error::io(config.raft_addr.clone(), e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| Error::io(config.raft_addr.clone(), e))?;
        let node_config = config.node.clone();
        let node = tokio::task::spawn_blocking(move || RaftNode::open(node_config, machine))
            .await
            .map_err(|e| Error::Config(format!("open task failed: {e}")))??;
        let id = node.id();
        let lease = Arc::new(LeaseCell::new());
        let (inputs, rx) = mpsc::channel();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (status_tx, status) = watch::channel(RaftStatus {
            id,
            role: node.role(),
            term: node.term(),
            leader: node.leader_info(),
            removed: node.is_removed(),
            running: true,
            fatal: None,
        });
        let net = NetConfig {
            max_frame: config.node.max_record_bytes,
            peer_queue: config.peer_queue,
            inbound_queue: config.inbound_queue,
            min_backoff: config.min_backoff,
            max_backoff: config.max_backoff,
            tls,
        };
        let inbox = Inbox {
            tx: inputs.clone(),
            queued: Arc::new(AtomicUsize::new(0)),
            wrap: Input::Net,
        };
        let net_members = net.tls.as_ref().map(|t| t.members.clone());
        tokio::spawn(network::listen(
            listener,
            net.clone(),
            inbox.clone(),
            shutdown_rx.clone(),
        ));
        let transport = Transport::new(
            tokio::runtime::Handle::current(),
            net,
            inbox.clone(),
            shutdown_rx,
        );
        let senders = SenderCheck::new(&config.node.initial_voters);
        let mut driver = Driver {
            node,
            transport,
            rx,
            queued: inbox.queued,
            status: status_tx.clone(),
            pending: HashMap::new(),
            gets: Vec::new(),
            senders,
            tick: config.tick_interval,
            on_role: config.on_role.clone(),
            warned: HashMap::new(),
            members: net_members,
            published_peers: None,
            lease: lease.clone(),
            lease_waiters: Vec::new(),
            abandoned: None,
        };
        let panic_lease = lease.clone();
        driver.publish_members();
        let thread = std::thread::Builder::new()
            .name(format!("raft-{id}"))
            .spawn(move || {
                // A panic in the loop (a state machine's bug, say) must not leave a status that
                // still says "leader": report it as the fatal error it is.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.run()));
                if let Err(panic) = run {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    tracing::error!(node = id, "raft loop panicked: {what}");
                    panic_lease.set(None);
                    status_tx.send_modify(|s| {
                        s.running = false;
                        s.role = StateRole::Follower;
                        s.leader = None;
                        s.fatal = Some(format!("the raft loop panicked: {what}"));
                    });
                }
            })
            .map_err(|e| Error::io("raft thread", e))?;
        Ok(RaftMetadataStore {
            id,
            election_timeout: config.tick_interval * config.node.election_ticks as u32,
            inputs,
            status,
            shutdown,
            thread: Mutex::new(Some(thread)),
            local_addr,
            lease,
        })
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The address the raft listener is bound to.
    pub fn raft_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The leader this node knows, with its service address.
    pub fn leader(&self) -> Option<LeaderInfo> {
        self.status.borrow().leader.clone()
    }

    /// Whether this node is the leader.
    pub fn is_leader(&self) -> bool {
        self.status.borrow().role == StateRole::Leader
    }

    /// The term this node leads, if it is the leader (no copy of the status).
    pub fn leading_term(&self) -> Option<u64> {
        let s = self.status.borrow();
        (s.role == StateRole::Leader).then_some(s.term)
    }

    /// Whether this node leads under a read lease now (see [`crate::lease`]): it may answer
    /// reads from its applied state without a log round trip.
    pub fn holds_read_lease(&self) -> bool {
        self.lease.holds(Instant::now())
    }

    /// Waits until this node holds a read lease, asking its group for an acknowledgement when
    /// it does not; fails with [`Error::NotLeader`] when it does not lead or has not been
    /// acknowledged within an election timeout (a leader cut off from its quorum, or one whose
    /// loop is stuck), and with [`Error::Shutdown`] once the loop stopped.
    pub async fn read_lease(&self) -> Result<()> {
        if self.holds_read_lease() {
            return Ok(());
        }
        if !self.status.borrow().running {
            return Err(Error::Shutdown);
        }
        let (tx, rx) = oneshot::channel();
        self.inputs
            .send(Input::RenewLease(tx))
            .map_err(|_| Error::Shutdown)?;
        match tokio::time::timeout(self.election_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::NotLeader { leader: None }),
        }
    }

    /// The current status.
    pub fn status(&self) -> RaftStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every role, term or leader change.
    pub fn subscribe(&self) -> watch::Receiver<RaftStatus> {
        self.status.clone()
    }

    /// Waits until some leader is known, or `timeout` passes.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<LeaderInfo> {
        let mut rx = self.status.clone();
        let wait = async {
            rx.wait_for(|s| s.leader.is_some() || !s.running)
                .await
                .map(|s| s.leader.clone())
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(leader)) => leader.ok_or(Error::Shutdown),
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::NotLeader { leader: None }),
        }
    }

    fn not_leader(&self) -> Option<Error> {
        let s = self.status.borrow();
        if !s.running {
            return Some(Error::Shutdown);
        }
        (s.role != StateRole::Leader).then(|| Error::NotLeader {
            leader: s.leader.clone(),
        })
    }

    async fn call(&self, make: impl FnOnce(Reply) -> Input) -> Result<Vec<u8>> {
        if let Some(e) = self.not_leader() {
            return Err(e);
        }
        let (tx, rx) = oneshot::channel();
        self.inputs.send(make(tx)).map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)?
    }

    /// Proposes a state-machine command and returns its response once it is committed and
    /// applied on this node. Fails fast with [`Error::NotLeader`] on a follower.
    pub async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>> {
        self.call(|r| Input::Command(command, r)).await
    }

    /// Runs a KV operation through the log.
    pub async fn kv(&self, op: KvOp) -> Result<KvResult> {
        let bytes = self.call(|r| Input::Kv(op, r)).await?;
        Ok(postcard::from_bytes(&bytes)?)
    }

    /// Proposes `change`. The group takes one change at a time: one asked for while the
    /// previous is still being applied (a remove right after a promote) waits for it, up to a
    /// few election timeouts, instead of failing.
    async fn membership(&self, change: MembershipChange) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.election_timeout * 3;
        let bytes = loop {
            match self.call(|r| Input::Membership(change.clone(), r)).await {
                Err(Error::ProposalDropped(m))
                    if m == crate::node::CHANGE_PENDING
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(self.election_timeout / 10).await;
                }
                other => break other?,
            }
        };
        let result: std::result::Result<(), String> = postcard::from_bytes(&bytes)?;
        result.map_err(Error::InvalidArgument)
    }

    /// Adds a non-voting learner; it catches up by snapshot. Start it with `join = true`.
    pub async fn add_learner(&self, peer: PeerInfo) -> Result<()> {
        self.membership(MembershipChange::AddLearner(peer)).await
    }

    /// Promotes a learner to voter.
    pub async fn promote(&self, id: u64) -> Result<()> {
        self.membership(MembershipChange::Promote(id)).await
    }

    /// Removes a node. Asked to remove itself, the leader hands leadership to the most
    /// caught-up voter instead, waits (a few election timeouts at most) until the new leader is
    /// known, and answers [`Error::NotLeader`] naming it: retry there, where the old leader is
    /// removed as a follower.
    pub async fn remove_node(&self, id: u64) -> Result<()> {
        let result = self.membership(MembershipChange::Remove(id)).await;
        if id != self.id || !matches!(result, Err(Error::NotLeader { leader: None })) {
            return result;
        }
        let mut status = self.status.clone();
        let handed_over = async move {
            status
                .wait_for(|s| !s.running || (s.role != StateRole::Leader && s.leader.is_some()))
                .await
                .map(|s| s.clone())
        };
        match tokio::time::timeout(self.election_timeout * 3, handed_over).await {
            Ok(Ok(s)) if s.running => Err(Error::NotLeader { leader: s.leader }),
            Ok(_) => Err(Error::Shutdown),
            Err(_) => Err(Error::ProposalDropped(format!(
                "node {id} leads and could not hand leadership over within {:?}; retry",
                self.election_timeout * 3
            ))),
        }
    }

    /// The membership this node has applied, with addresses; on the leader also each member's
    /// replication progress. Served by any member, without a log round trip.
    pub async fn members(&self) -> Result<Membership> {
        let (tx, rx) = oneshot::channel();
        self.inputs
            .send(Input::Members(tx))
            .map_err(|_| Error::Shutdown)?;
        rx.await.map_err(|_| Error::Shutdown)
    }

    /// Asks the leader to hand leadership to `to` (no effect on a follower).
    pub fn transfer_leader(&self, to: u64) {
        let _ = self.inputs.send(Input::TransferLeader(to));
    }

    /// Stops the loop and the transport and waits for the loop thread. Idempotent.
    pub async fn shutdown(&self) {
        let _ = self.inputs.send(Input::Shutdown);
        let _ = self.shutdown.send(true);
        let handle = self.thread.lock().expect("thread lock").take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}

impl Drop for RaftMetadataStore {
    fn drop(&mut self) {
        let _ = self.inputs.send(Input::Shutdown);
        let _ = self.shutdown.send(true);
    }
}

#[async_trait]
impl MetadataStore for RaftMetadataStore {
    /// Served from this node's applied state (see the module docs for staleness).
    async fn get(&self, key: &str) -> mooncake_core::Result<Option<Versioned>> {
        let (tx, rx) = oneshot::channel();
        self.inputs
            .send(Input::Get(key.to_owned(), tx))
            .map_err(|_| Error::Shutdown)?;
        Ok(rx.await.map_err(|_| Error::Shutdown)?)
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> mooncake_core::Result<u64> {
        let key = key.to_owned();
        match self.kv(KvOp::Put { key, value }).await? {
            KvResult::Put(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn delete(&self, key: &str) -> mooncake_core::Result<bool> {
        let key = key.to_owned();
        match self.kv(KvOp::Delete { key }).await? {
            KvResult::Delete(b) => Ok(b),
            other => Err(unexpected(other)),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Option<Vec<u8>>,
    ) -> mooncake_core::Result<Option<u64>> {
        let key = key.to_owned();
        let op = KvOp::Cas {
            key,
            expected,
            value,
        };
        match self.kv(op).await? {
            KvResult::Cas(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn list(&self, prefix: &str) -> mooncake_core::Result<Vec<(String, Versioned)>> {
        let prefix = prefix.to_owned();
        match self.kv(KvOp::List { prefix }).await? {
            KvResult::List(items) => Ok(items
                .into_iter()
                .map(|(k, value, revision)| (k, Versioned { value, revision }))
                .collect()),
            other => Err(unexpected(other)),
        }
    }
}

/// The group's command log: only the leader appends; a follower's error names the leader.
#[async_trait]
impl CommandLog for RaftMetadataStore {
    async fn apply_command(&self, command: Vec<u8>) -> mooncake_core::Result<Vec<u8>> {
        Ok(self.propose(command).await?)
    }

    fn leadership(&self) -> Leadership {
        let s = self.status.borrow();
        if s.role == StateRole::Leader {
            Leadership::Leader { term: s.term }
        } else {
            Leadership::Follower {
                leader_hint: s
                    .leader
                    .as_ref()
                    .map(|l| l.service_addr.clone())
                    .filter(|a| !a.is_empty()),
            }
        }
    }

    fn not_leader_hint(&self, error: &mooncake_core::Error) -> Option<Option<String>> {
        crate::leader_hint(error)
    }

    fn holds_read_lease(&self) -> bool {
        RaftMetadataStore::holds_read_lease(self)
    }

    /// A stopped loop is answered as not leading, so clients move to the leader.
    async fn acquire_read_lease(&self) -> mooncake_core::Result<()> {
        match self.read_lease().await {
            Err(Error::Shutdown) => Err(Error::NotLeader { leader: None }.into()),
            other => Ok(other?),
        }
    }

    /// A deposed leader stops serving reads when its read lease ends, before its successor is
    /// elected (see [`crate::lease`]); the grace is a generous margin on top (four election
    /// timeouts).
    fn takeover_grace(&self) -> Duration {
        self.election_timeout * 4
    }

    fn group(&self) -> Option<&dyn LogGroup> {
        Some(self)
    }

    async fn shutdown(&self) {
        RaftMetadataStore::shutdown(self).await
    }
}

/// Membership changes of the group, through its log.
#[async_trait]
impl LogGroup for RaftMetadataStore {
    async fn members(&self) -> mooncake_core::Result<GroupMembers> {
        let m = RaftMetadataStore::members(self).await?;
        let member = |p: &PeerInfo, voter| GroupMember {
            id: p.id,
            voter,
            log_addr: p.raft_addr.clone(),
            service_addr: p.service_addr.clone(),
            matched: m.matched.get(&p.id).copied(),
        };
        let mut members: Vec<GroupMember> = m.voters.iter().map(|p| member(p, true)).collect();
        members.extend(m.learners.iter().map(|p| member(p, false)));
        Ok(GroupMembers {
            answered_by: m.id,
            leader: m.leader,
            term: m.term,
            commit_index: m.commit_index,
            members,
        })
    }

    async fn add_learner(
        &self,
        id: u64,
        log_addr: String,
        service_addr: String,
    ) -> mooncake_core::Result<()> {
        Ok(RaftMetadataStore::add_learner(
            self,
            PeerInfo {
                id,
                raft_addr: log_addr,
                service_addr,
            },
        )
        .await?)
    }

    async fn promote(&self, id: u64) -> mooncake_core::Result<()> {
        Ok(RaftMetadataStore::promote(self, id).await?)
    }

    async fn remove(&self, id: u64) -> mooncake_core::Result<()> {
        Ok(self.remove_node(id).await?)
    }

    async fn removed(&self) {
        let mut status = self.subscribe();
        if status.wait_for(|s| s.removed).await.is_err() {
            // The loop is gone without a removal: never resolves, like for a member.
            std::future::pending::<()>().await
        }
    }

    fn abandon(&self, reason: String) {
        let _ = self.inputs.send(Input::Abandon(reason));
    }

    async fn failed(&self) -> String {
        let mut status = self.subscribe();
        let reason = match status.wait_for(|s| s.fatal.is_some()).await {
            Ok(s) => s.fatal.clone(),
            Err(_) => None,
        };
        match reason {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }
}

fn unexpected(r: KvResult) -> mooncake_core::Error {
    mooncake_core::Error::Metadata(format!("unexpected kv result {r:?}"))
}

/// The loop thread's state.
struct Driver {
    node: RaftNode,
    transport: Transport<Input>,
    rx: mpsc::Receiver<Input>,
    queued: Arc<AtomicUsize>,
    status: watch::Sender<RaftStatus>,
    pending: HashMap<ProposalId, Reply>,
    gets: Vec<(String, oneshot::Sender<Option<Versioned>>)>,
    /// Which inbound messages may be stepped.
    senders: SenderCheck,
    tick: Duration,
    on_role: Option<RoleObserver>,
    /// When a refusal from a source address was last logged.
    warned: HashMap<IpAddr, Instant>,
    /// With TLS: the member ids the transport admits certificates of (the peer directory and
    /// the address book).
    members: Option<Arc<RwLock<BTreeSet<u64>>>>,
    /// The peer directory's ids when `members` was last written.
    published_peers: Option<Vec<u64>>,
    /// The read lease, as callers see it.
    lease: Arc<LeaseCell>,
    /// Callers waiting for a read lease.
    lease_waiters: Vec<oneshot::Sender<Result<()>>>,
    /// Why the loop must stop, when it was told to abandon the group.
    abandoned: Option<String>,
}

impl Driver {
    /// Tells the transport (with TLS) which nodes' certificates to admit, when the peer
    /// directory changed.
    fn publish_members(&mut self) {
        let Some(members) = &self.members else {
            return;
        };
        let peers = self.node.peers();
        if self
            .published_peers
            .as_ref()
            .is_some_and(|p| p.iter().eq(peers.keys()))
        {
            return;
        }
        let ids: Vec<u64> = peers.keys().copied().collect();
        let all: BTreeSet<u64> = ids
            .iter()
            .copied()
            .chain(self.senders.address_book_ids())
            .collect();
        *members.write().unwrap_or_else(|p| p.into_inner()) = all;
        self.published_peers = Some(ids);
    }

    /// Publishes the read lease to callers, and answers those waiting for one once it holds or
    /// this node no longer leads.
    fn publish_lease(&mut self) {
        let until = self.node.read_lease_until(self.tick);
        self.lease.set(until);
        if self.lease_waiters.is_empty() {
            return;
        }
        let now = Instant::now();
        let answer = if until.is_some_and(|u| now < u) {
            Ok(())
        } else if !self.node.is_leader() {
            Err(self.node.leader_info())
        } else {
            return;
        };
        for reply in self.lease_waiters.drain(..) {
            let _ = reply.send(answer.clone().map_err(|leader| Error::NotLeader { leader }));
        }
    }

    /// Logs a refused message (once per source address every 10 s).
    fn refused(&mut self, source: SocketAddr, why: &str) {
        let now = Instant::now();
        let last = self.warned.insert(source.ip(), now);
        if last.is_none_or(|t| now - t >= Duration::from_secs(10)) {
            tracing::warn!(node = self.node.id(), %source, "refused a raft message: {why}");
        }
        if self.warned.len() > 1024 {
            self.warned
                .retain(|_, t| now.saturating_duration_since(*t) < Duration::from_secs(10));
        }
    }

    fn run(mut self) {
        let mut next_tick = Instant::now() + self.tick;
        let result = loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            let first = match self.rx.recv_timeout(wait) {
                Ok(input) => Some(input),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break Ok(()),
            };
            let mut stop = false;
            let mut budget = 65_536;
            let mut next = first;
            while let Some(input) = next {
                if self.handle(input) {
                    stop = true;
                    break;
                }
                budget -= 1;
                next = if budget > 0 {
                    self.rx.try_recv().ok()
                } else {
                    None
                };
            }
            if stop {
                break match self.abandoned.take() {
                    Some(reason) => Err(Error::StateMachine(mooncake_core::Error::Io(reason))),
                    None => Ok(()),
                };
            }
            let now = Instant::now();
            if now >= next_tick {
                self.node.tick();
                next_tick = (next_tick + self.tick).max(now);
            }
            self.node.maintain_lease(now, self.tick, false);
            if let Err(e) = self.ready() {
                break Err(e);
            }
        };
        self.lease.set(None);
        if let Err(e) = &result {
            tracing::error!(node = self.node.id(), error = %e, "raft loop stopped on a fatal error");
        }
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(Error::Shutdown));
        }
        for reply in self.lease_waiters.drain(..) {
            let _ = reply.send(Err(Error::Shutdown));
        }
        // A stopped member leads nothing: whoever asks (the master service deciding whether it
        // may answer from its state) is told so, instead of seeing the role it last had.
        self.status.send_modify(|s| {
            s.running = false;
            s.role = StateRole::Follower;
            s.leader = None;
            s.fatal = result.err().map(|e| e.to_string());
        });
    }

    /// Handles one input; returns `true` to stop.
    fn handle(&mut self, input: Input) -> bool {
        let proposed = match input {
            Input::Net(NetEvent::Message(mut m, source)) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                let admitted = self
                    .senders
                    .admit(&self.node, &m, source.ip())
                    .and_then(|()| self.node.check_incarnation(&mut m));
                if let Err(why) = admitted {
                    self.refused(source, &why);
                    return false;
                }
                if let Err(e) = self.node.step(*m) {
                    tracing::debug!(error = %e, "raft step failed");
                }
                // Before anything this step caused is sent (see `LeaseCell`).
                self.publish_lease();
                return false;
            }
            Input::Net(NetEvent::SnapshotStatus { to, delivered }) => {
                self.node.report_snapshot(to, delivered);
                return false;
            }
            Input::Net(NetEvent::Unreachable(to)) => {
                self.node.report_unreachable(to);
                return false;
            }
            Input::Get(key, reply) => {
                self.gets.push((key, reply));
                return false;
            }
            Input::Members(reply) => {
                let _ = reply.send(self.node.members());
                return false;
            }
            Input::TransferLeader(to) => {
                self.node.transfer_leader(to);
                self.publish_lease();
                return false;
            }
            Input::RenewLease(reply) => {
                if self.node.is_leader() {
                    self.node.maintain_lease(Instant::now(), self.tick, true);
                    self.lease_waiters.push(reply);
                } else {
                    let _ = reply.send(Err(Error::NotLeader {
                        leader: self.node.leader_info(),
                    }));
                }
                return false;
            }
            Input::Shutdown => return true,
            Input::Abandon(reason) => {
                self.abandoned = Some(reason);
                return true;
            }
            Input::Command(c, reply) => (self.node.propose(&c), reply),
            Input::Kv(op, reply) => (self.node.propose_kv(&op), reply),
            Input::Membership(change, reply) => (self.node.propose_membership(&change), reply),
        };
        match proposed {
            (Ok(id), reply) => {
                self.pending.insert(id, reply);
            }
            (Err(e), reply) => {
                let _ = reply.send(Err(e));
            }
        }
        false
    }

    fn ready(&mut self) -> Result<()> {
        let Driver {
            node,
            transport,
            senders,
            pending,
            ..
        } = self;
        let out = {
            let peers = node.peers().clone();
            let addr_of = |id: u64| {
                peers
                    .get(&id)
                    .map(|p| p.raft_addr.clone())
                    .or_else(|| senders.booked(id))
            };
            let mut out = node
                .advance_replying(&mut |msgs| transport.send(msgs, &addr_of), &mut |applied| {
                    reply_applied(pending, applied.drain(..))
                })?;
            transport.send(std::mem::take(&mut out.messages), &addr_of);
            out
        };
        self.publish_members();
        self.publish_lease();
        reply_applied(&mut self.pending, out.applied.into_iter());
        for (id, e) in out.failed {
            if let Some(reply) = self.pending.remove(&id) {
                let _ = reply.send(Err(e.into()));
            }
        }
        for (key, reply) in self.gets.drain(..) {
            let _ = reply.send(self.node.kv().get(&key));
        }
        if let Some(observer) = &self.on_role {
            for e in &out.events {
                (observer.0)(self.node.id(), e);
            }
        }
        let changed = out.events.iter().any(|e| {
            matches!(
                e,
                RoleEvent::BecameLeader { .. }
                    | RoleEvent::SteppedDown { .. }
                    | RoleEvent::LeaderChanged { .. }
            )
        });
        let term = self.node.term();
        let (published_term, was_removed) = {
            let s = self.status.borrow();
            (s.term, s.removed)
        };
        let removed = was_removed || self.node.is_removed();
        if changed || published_term != term || removed != was_removed {
            let status = RaftStatus {
                id: self.node.id(),
                role: self.node.role(),
                term,
                leader: self.node.leader_info(),
                removed,
                running: true,
                fatal: None,
            };
            self.status.send_if_modified(|s| {
                let modified = *s != status;
                *s = status;
                modified
            });
        }
        Ok(())
    }
}

/// Answers the callers of applied proposals of this node.
fn reply_applied(pending: &mut HashMap<ProposalId, Reply>, applied: impl Iterator<Item = Applied>) {
    for a in applied {
        if let Some(reply) = a.id.and_then(|id| pending.remove(&id)) {
            let _ = reply.send(Ok(a.response));
        }
    }
}
