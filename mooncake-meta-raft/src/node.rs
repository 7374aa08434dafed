//! [`RaftNode`]: the sans-IO core. It wraps raft-rs's `RawNode` over [`DiskStorage`], batches
//! proposals, applies committed entries to the KV map and the attached state machine, and tells
//! the driver which messages to send. It opens no socket and reads no clock: time advances only
//! through [`RaftNode::tick`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use mooncake_core::StateMachine;
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, Entry, EntryType, Message,
    MessageType, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole, Storage};
use serde::Serialize;

use crate::config::NodeConfig;
pub use crate::config::RoleEvent;
use crate::error::{Error, Result};
use crate::incarnation;
use crate::lease::{lease_duration, LeaseTracker};
use crate::state::{self, KvOp, KvState, PeerInfo, SnapshotData, TAG_COMMAND, TAG_KV};
use crate::storage::{DiskStorage, RecoveryReport};
use crate::LeaderInfo;

/// A learner is promoted only when it holds the log up to at most this many entries before the
/// leader's commit index: a voter far behind would leave the quorum waiting for it to catch up
/// (with one voter beside it, no write would commit until it had).
pub const PROMOTE_MAX_LAG: u64 = 1000;

/// Identifies a proposal made on this node, until it is applied or fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProposalId(pub u64);

/// Why a proposal failed after it was accepted by [`RaftNode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProposalError {
    /// Leadership changed while it was in flight; it may still be committed by the new leader.
    LeadershipLost,
    /// Raft refused it (leadership transfer, pending membership change, ...).
    Dropped(String),
}

impl From<ProposalError> for Error {
    fn from(e: ProposalError) -> Self {
        match e {
            ProposalError::LeadershipLost => Error::LeadershipLost,
            ProposalError::Dropped(m) => Error::ProposalDropped(m),
        }
    }
}

/// A committed entry applied on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The proposal, when it was made on this node.
    pub id: Option<ProposalId>,
    /// Log index.
    pub index: u64,
    /// The response: the state machine's bytes for a command, a postcard `KvResult` for a KV
    /// operation, a postcard `Result<(), String>` for a membership change, empty otherwise.
    pub response: Vec<u8>,
}

/// What the driver must do after [`RaftNode::advance`].
#[derive(Debug, Default)]
pub struct Output {
    /// Messages to send (after `advance` returned: everything they acknowledge is durable).
    pub messages: Vec<Message>,
    /// Committed entries applied, in log order.
    pub applied: Vec<Applied>,
    /// Proposals of this node that failed.
    pub failed: Vec<(ProposalId, ProposalError)>,
    /// Role changes.
    pub events: Vec<RoleEvent>,
}

/// Why a membership change is refused while the previous one is still being applied.
pub(crate) const CHANGE_PENDING: &str =
    "another membership change is still being applied; retry shortly";

/// A membership change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a non-voting learner; its addresses are recorded in the replicated peer directory.
    AddLearner(PeerInfo),
    /// Promote a learner (or add a node) as voter.
    Promote(u64),
    /// Remove a node (the leader too: it hands leadership to the most caught-up voter).
    Remove(u64),
}

/// The group's membership as one node has applied it, with the peer directory's addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    /// The node that answered.
    pub id: u64,
    /// Its term.
    pub term: u64,
    /// The leader it knows.
    pub leader: Option<u64>,
    /// Its commit index.
    pub commit_index: u64,
    /// Voters, by id (addresses empty when the directory lacks the node).
    pub voters: Vec<PeerInfo>,
    /// Learners, by id.
    pub learners: Vec<PeerInfo>,
    /// On the leader: the highest log index known to be replicated on each member (raft's
    /// `matched`); empty on a follower.
    pub matched: BTreeMap<u64, u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Normal,
    ConfChange,
}

#[derive(Serialize)]
struct SnapshotDataRef<'a> {
    kv: &'a KvState,
    peers: &'a BTreeMap<u64, PeerInfo>,
    machine: Vec<u8>,
}

/// The sans-IO raft node. See the module documentation.
pub struct RaftNode {
    raw: RawNode<DiskStorage>,
    machine: Box<dyn StateMachine>,
    kv: KvState,
    peers: BTreeMap<u64, PeerInfo>,
    queue: VecDeque<(ProposalId, Vec<u8>)>,
    in_flight: BTreeMap<u64, (u64, ProposalId, Kind)>,
    next_id: u64,
    applied: u64,
    last_snapshot: u64,
    /// Bytes of entries applied since the last snapshot, and that snapshot's size: a new
    /// snapshot waits until the log has grown by as much as the last one weighed, so a large
    /// state is not serialized again every `snapshot_threshold` small entries.
    log_bytes_since_snapshot: u64,
    last_snapshot_bytes: u64,
    led_term: Option<u64>,
    announced_term: Option<u64>,
    known_leader: u64,
    events: Vec<RoleEvent>,
    config: NodeConfig,
    recovery: RecoveryReport,
    /// The leader's read lease (see [`crate::lease`]).
    lease: LeaseTracker,
    /// Ticks left during which vote requests are ignored: a member that restarts with state on
    /// disk may have acknowledged a leader's lease heartbeat just before it stopped, and must
    /// not help elect another leader before that lease has run out.
    vote_quiet_ticks: usize,
    /// This data directory's incarnation (see [`crate::incarnation`]).
    incarnation: u64,
    /// Members whose incarnation record this leader has proposed in its term.
    recording: BTreeSet<u64>,
    /// Members whose last message was refused for its incarnation: nothing is sent to them (a
    /// wiped member would take the leader's commit index for its own, lost, log and fail).
    refused: BTreeSet<u64>,
    /// Proposals this node makes for its own records: their outcome is nobody's to hear.
    internal: BTreeSet<ProposalId>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.config.id)
            .field("role", &self.raw.raft.state)
            .field("term", &self.raw.raft.term)
            .field("applied", &self.applied)
            .finish()
    }
}

fn raft_config(c: &NodeConfig, applied: u64) -> raft::Config {
    raft::Config {
        id: c.id,
        election_tick: c.election_ticks,
        heartbeat_tick: c.heartbeat_ticks,
        applied,
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: c.max_size_per_msg,
        max_inflight_msgs: c.max_inflight_msgs,
        ..Default::default()
    }
}

impl RaftNode {
    /// Opens the node's storage (bootstrapping the group on first start of an initial voter),
    /// restores `machine` from the latest snapshot and prepares to replay the log after it.
    pub fn open(config: NodeConfig, mut machine: Box<dyn StateMachine>) -> Result<Self> {
        config.validate()?;
        let (mut storage, recovery) = DiskStorage::open(&config.data_dir, config.max_record_bytes)?;
        let restarted = storage.is_initialized();
        let incarnation = incarnation::load_or_create(&config.data_dir)
            .map_err(|e| Error::io(&config.data_dir, e))?;
        let mut peers: BTreeMap<u64, PeerInfo> = config
            .initial_voters
            .iter()
            .map(|p| (p.id, p.clone()))
            .collect();
        if !storage.is_initialized() && !config.join {
            let data = SnapshotDataRef {
                kv: &KvState::default(),
                peers: &peers,
                machine: machine.snapshot().map_err(Error::StateMachine)?,
            };
            let mut snap = Snapshot::default();
            snap.data = postcard::to_allocvec(&data)?.into();
            let meta = snap.mut_metadata();
            meta.index = 1;
            meta.term = 1;
            meta.mut_conf_state().voters = peers.keys().copied().collect();
            storage.apply_snapshot(snap)?;
        }
        let mut kv = KvState::default();
        let applied = storage.snapshot_ref().get_metadata().index;
        if applied > 0 {
            let data = SnapshotData::decode(&storage.snapshot_ref().data)?;
            machine
                .restore(&data.machine)
                .map_err(Error::StateMachine)?;
            kv = data.kv;
            peers = data.peers;
        }
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_config(&config, applied), storage, &logger)?;
        Ok(RaftNode {
            raw,
            machine,
            kv,
            peers,
            queue: VecDeque::new(),
            in_flight: BTreeMap::new(),
            next_id: 1,
            applied,
            last_snapshot: applied,
            log_bytes_since_snapshot: 0,
            last_snapshot_bytes: 0,
            led_term: None,
            announced_term: None,
            known_leader: 0,
            events: Vec::new(),
            vote_quiet_ticks: if restarted { config.election_ticks } else { 0 },
            config,
            recovery,
            lease: LeaseTracker::default(),
            incarnation,
            recording: BTreeSet::new(),
            refused: BTreeSet::new(),
            internal: BTreeSet::new(),
        })
    }

    /// This data directory's incarnation, sent with every message (see [`crate::incarnation`]).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The incarnation the group has recorded for member `id`, as applied here.
    pub fn known_incarnation(&self, id: u64) -> Option<u64> {
        let v = self.kv.get(&incarnation::record_key(id))?;
        Some(u64::from_le_bytes(v.value.as_slice().try_into().ok()?))
    }

    /// Whether message `m` may be stepped, judged by the incarnations it carries (which it
    /// takes out): refused (with the reason) when the group recorded another incarnation of its
    /// sender, whose data directory was therefore wiped or replaced, or when the sender knows
    /// this member by another incarnation than its own (this directory is the wiped one). A
    /// leader records the incarnation of a member it has none for. A message that says nothing
    /// (from a peer of an earlier version) is let through.
    pub fn check_incarnation(&mut self, m: &mut Message) -> std::result::Result<(), String> {
        let (claimed, mine) = incarnation::take(m);
        let from = m.from;
        if let Some(mine) = mine.filter(|&i| i != self.incarnation) {
            return Err(format!(
                "node {from} knows this member (node {}) as incarnation {mine:#018x} of its data \
                 directory, but this directory is incarnation {:#018x}: it was wiped or \
                 replaced, and the group refuses it. Remove this member (`mooncake_master admin \
                 remove {}`), then add it again as a learner and start it with --raft_join",
                self.config.id, self.incarnation, self.config.id
            ));
        }
        let Some(claimed) = claimed else {
            self.refused.remove(&from);
            return Ok(());
        };
        let verdict = self.judge_incarnation(from, claimed);
        if verdict.is_err() {
            self.refused.insert(from);
        } else {
            self.refused.remove(&from);
        }
        verdict
    }

    fn judge_incarnation(&mut self, from: u64, claimed: u64) -> std::result::Result<(), String> {
        match self.known_incarnation(from) {
            Some(known) if known != claimed => Err(format!(
                "node {from} runs incarnation {claimed:#018x} of its data directory, but the \
                 group knows it as {known:#018x}: its directory was wiped or replaced and it \
                 lost what it acknowledged, so it may not vote or count in a quorum. Remove it \
                 (`mooncake_master admin remove {from}`), then add it again as a learner and \
                 start it with --raft_join"
            )),
            Some(_) => Ok(()),
            None => {
                self.record_incarnation(from, claimed);
                Ok(())
            }
        }
    }

    /// Stamps outgoing messages with the incarnations (see [`crate::incarnation`]) and drops
    /// those to members refused for theirs; a snapshot for one is reported as not delivered.
    fn sendable(&mut self, mut messages: Vec<Message>) -> Vec<Message> {
        if !self.refused.is_empty() {
            messages.retain(|m| {
                let refused = self.refused.contains(&m.to);
                if refused && m.get_msg_type() == MessageType::MsgSnapshot {
                    self.raw.report_snapshot(m.to, SnapshotStatus::Failure);
                }
                !refused
            });
        }
        for m in &mut messages {
            let receiver = self.known_incarnation(m.to);
            incarnation::stamp(m, self.incarnation, receiver);
        }
        messages
    }

    /// On the leader: proposes the record of member `id`'s incarnation, once per term.
    fn record_incarnation(&mut self, id: u64, value: u64) {
        if !self.is_leader() || !self.recording.insert(id) {
            return;
        }
        let op = KvOp::Put {
            key: incarnation::record_key(id),
            value: value.to_le_bytes().to_vec(),
        };
        if let Ok(id) = self.propose_kv(&op) {
            self.internal.insert(id);
        }
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.config.id
    }

    /// What recovery found when the node was opened.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Current role.
    pub fn role(&self) -> StateRole {
        self.raw.raft.state
    }

    /// Whether this node is the leader.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    /// The leader this node knows of.
    pub fn leader_id(&self) -> Option<u64> {
        let l = self.raw.raft.leader_id;
        (l != 0).then_some(l)
    }

    /// The leader with its service address, when known.
    pub fn leader_info(&self) -> Option<LeaderInfo> {
        let id = self.leader_id()?;
        Some(LeaderInfo {
            id,
            service_addr: self
                .peers
                .get(&id)
                .map(|p| p.service_addr.clone())
                .unwrap_or_default(),
        })
    }

    /// Highest committed index this node knows.
    pub fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    /// Highest index applied to the KV map and the state machine.
    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    /// Last index of the local log.
    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    /// Index of the latest snapshot (the log is compacted up to it).
    pub fn snapshot_index(&self) -> u64 {
        self.last_snapshot
    }

    /// The replicated KV map as applied on this node (may lag the leader).
    pub fn kv(&self) -> &KvState {
        &self.kv
    }

    /// The replicated peer directory.
    pub fn peers(&self) -> &BTreeMap<u64, PeerInfo> {
        &self.peers
    }

    /// Voter and learner ids of the applied configuration.
    pub fn membership(&self) -> (Vec<u64>, Vec<u64>) {
        let cs = self.raw.store().conf_state();
        (cs.voters.clone(), cs.learners.clone())
    }

    /// The applied membership with addresses, and on the leader each member's replication
    /// progress.
    pub fn members(&self) -> Membership {
        let (voters, learners) = self.membership();
        let info = |id: u64| {
            self.peers.get(&id).cloned().unwrap_or(PeerInfo {
                id,
                raft_addr: String::new(),
                service_addr: String::new(),
            })
        };
        let matched = if self.is_leader() {
            self.raw
                .raft
                .prs()
                .iter()
                .map(|(&id, p)| (id, p.matched))
                .collect()
        } else {
            BTreeMap::new()
        };
        let mut voters: Vec<PeerInfo> = voters.into_iter().map(info).collect();
        let mut learners: Vec<PeerInfo> = learners.into_iter().map(info).collect();
        voters.sort_by_key(|p| p.id);
        learners.sort_by_key(|p| p.id);
        Membership {
            id: self.config.id,
            term: self.term(),
            leader: self.leader_id(),
            commit_index: self.commit_index(),
            voters,
            learners,
            matched,
        }
    }

    /// Whether a membership change removed this node (it is initialized but in no role).
    pub fn is_removed(&self) -> bool {
        let cs = self.raw.store().conf_state();
        let id = self.config.id;
        let initialized = !(cs.voters.is_empty() && cs.learners.is_empty());
        let member = cs.voters.contains(&id)
            || cs.learners.contains(&id)
            || cs.voters_outgoing.contains(&id);
        initialized && !member
    }

    /// Proposals queued or in flight.
    pub fn pending_proposals(&self) -> usize {
        self.queue.len() + self.in_flight.len()
    }

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        self.vote_quiet_ticks = self.vote_quiet_ticks.saturating_sub(1);
        self.raw.tick();
        self.observe_role();
    }

    /// Renews the leader's read lease when due: every heartbeat interval while it leads, or at
    /// once with `urgent` (a read found the lease over) unless a renewal was asked less than a
    /// tick ago. `now` is a monotonic reading and `tick` the real duration of one
    /// [`tick`](Self::tick). Nothing happens on a follower, before the leader has committed an
    /// entry of its term (raft answers no read index before that), or during a leadership
    /// transfer. See [`crate::lease`].
    pub fn maintain_lease(&mut self, now: Instant, tick: Duration, urgent: bool) {
        if !self.is_leader() || !self.raw.raft.commit_to_current_term() {
            return;
        }
        let quiet = tick * (2 * self.config.election_ticks) as u32;
        if self.raw.raft.lead_transferee.is_some() || self.lease.transferring(now, quiet) {
            return;
        }
        let gap = if urgent {
            tick
        } else {
            tick * self.config.heartbeat_ticks as u32
        };
        if self
            .lease
            .last_sent()
            .is_some_and(|t| now.saturating_duration_since(t) < gap)
        {
            return;
        }
        let ctx = self.lease.request(now);
        self.raw.read_index(ctx);
    }

    /// Until when this node may answer reads from its applied state as the group's leader:
    /// `None` when it does not lead or holds no lease. Compare with a monotonic reading taken
    /// after the state was read. See [`crate::lease`].
    pub fn read_lease_until(&self, tick: Duration) -> Option<Instant> {
        if !self.is_leader() {
            return None;
        }
        let anchor = self.lease.anchor()?;
        Some(anchor + lease_duration(self.config.election_ticks, tick))
    }

    /// Starts an election now (tests and leadership hand-over).
    pub fn campaign(&mut self) -> Result<()> {
        let result = self.raw.campaign();
        self.observe_role();
        Ok(result?)
    }

    /// Asks the leader to hand leadership to `to`.
    pub fn transfer_leader(&mut self, to: u64) {
        if self.is_leader() {
            self.lease.transfer_started();
        }
        self.raw.transfer_leader(to);
    }

    /// Feeds a message from a peer. Messages from unknown peers or stale responses are ignored;
    /// a message no honest member sends, and that raft would take at its word (a local-only
    /// type, no term, a commit index past this log, entries out of sequence or rewriting
    /// committed ones), is refused with [`Error::InvalidArgument`] and changes nothing.
    pub fn step(&mut self, msg: Message) -> Result<()> {
        if let Some(why) = self.malformed(&msg) {
            return Err(Error::InvalidArgument(format!(
                "refused a {:?} from node {}: {why}",
                msg.get_msg_type(),
                msg.from
            )));
        }
        if self.vote_quiet_ticks > 0
            && matches!(
                msg.get_msg_type(),
                MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
            )
            && msg.term > self.term()
            && msg.context.as_ref() != raft::CAMPAIGN_TRANSFER
        {
            // Just restarted: see `vote_quiet_ticks`.
            return Ok(());
        }
        let result = self.raw.step(msg);
        self.observe_role();
        match result {
            Ok(()) | Err(raft::Error::StepPeerNotFound) | Err(raft::Error::StepLocalMsg) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Why a message from a peer cannot be stepped, if it cannot.
    fn malformed(&self, m: &Message) -> Option<String> {
        use MessageType::*;
        let log = &self.raw.raft.raft_log;
        match m.get_msg_type() {
            // Raised inside a node, never sent.
            MsgHup | MsgBeat | MsgUnreachable | MsgSnapStatus | MsgCheckQuorum => {
                return Some("a node's own message".into())
            }
            // Forwarded with no term; this node neither forwards nor takes them.
            MsgPropose | MsgReadIndex => return Some("proposals go to the leader only".into()),
            _ => {}
        }
        if m.term == 0 {
            return Some("no term".into());
        }
        match m.get_msg_type() {
            MsgHeartbeat if m.commit > log.last_index() => Some(format!(
                "commit index {} past this log's last index {}",
                m.commit,
                log.last_index()
            )),
            MsgAppendResponse if !m.reject && m.index > log.last_index() => Some(format!(
                "acknowledges index {} past this log's last index {}",
                m.index,
                log.last_index()
            )),
            MsgAppend => {
                let mut prev = (m.index, m.log_term);
                for e in m.entries.iter() {
                    if prev.0.checked_add(1) != Some(e.index) || e.term < prev.1 || e.term > m.term
                    {
                        return Some(format!(
                            "entry {} of term {} after {} of term {} (message term {})",
                            e.index, e.term, prev.0, prev.1, m.term
                        ));
                    }
                    prev = (e.index, e.term);
                }
                None
            }
            _ => None,
        }
    }

    /// Tells raft whether a snapshot message reached `to` (the driver calls this once the
    /// message was written or dropped; until then the follower is not probed).
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        let status = if delivered {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.raw.report_snapshot(to, status);
    }

    /// Tells raft that `to` could not be reached.
    pub fn report_unreachable(&mut self, to: u64) {
        self.raw.report_unreachable(to);
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader {
            leader: self.leader_info(),
        }
    }

    fn enqueue(&mut self, payload: Vec<u8>) -> Result<ProposalId> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let id = ProposalId(self.next_id);
        self.next_id += 1;
        self.queue.push_back((id, payload));
        Ok(id)
    }

    fn check_size(&self, len: usize) -> Result<()> {
        if len > self.config.max_proposal_bytes {
            return Err(Error::InvalidArgument(format!(
                "proposal of {len} bytes exceeds max_proposal_bytes ({})",
                self.config.max_proposal_bytes
            )));
        }
        Ok(())
    }

    /// Queues a state-machine command; it goes to raft with the next [`advance`](Self::advance)
    /// in one batch with the other queued proposals. Fails at once on a follower.
    pub fn propose(&mut self, command: &[u8]) -> Result<ProposalId> {
        self.check_size(command.len())?;
        self.enqueue(state::encode_command(command))
    }

    /// Queues a KV operation, like [`propose`](Self::propose).
    pub fn propose_kv(&mut self, op: &KvOp) -> Result<ProposalId> {
        let payload = state::encode_kv(op);
        self.check_size(payload.len())?;
        self.enqueue(payload)
    }

    /// Proposes a membership change (not batched). Its [`Applied::response`] is a postcard
    /// `Result<(), String>`.
    ///
    /// The leader never proposes its own removal: raft-rs 0.7 cannot run a leader outside its
    /// configuration (it panics on the leader's next commit), so asked to remove itself the
    /// leader hands leadership to the most caught-up voter instead and answers
    /// [`Error::NotLeader`]; the caller retries at the new leader, which removes it as a
    /// follower.
    ///
    /// Refused at once ([`Error::InvalidArgument`]) when the change makes no sense for the
    /// applied configuration: adding a node that is already a member, promoting a node that is
    /// not a learner or that has not caught up at all yet, removing a node that is not a member
    /// or the last voter. Refused with [`Error::ProposalDropped`] while another change is still
    /// being applied.
    pub fn propose_membership(&mut self, change: &MembershipChange) -> Result<ProposalId> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        self.check_membership_change(change)?;
        if *change == MembershipChange::Remove(self.config.id) {
            self.hand_over_leadership();
            return Err(Error::NotLeader { leader: None });
        }
        let (id, ty, context) = match change {
            MembershipChange::AddLearner(p) => (
                p.id,
                ConfChangeType::AddLearnerNode,
                postcard::to_allocvec(p)?,
            ),
            MembershipChange::Promote(id) => (*id, ConfChangeType::AddNode, Vec::new()),
            MembershipChange::Remove(id) => (*id, ConfChangeType::RemoveNode, Vec::new()),
        };
        let mut cc = ConfChangeV2::default();
        let mut single = ConfChangeSingle::default();
        single.node_id = id;
        single.set_change_type(ty);
        cc.set_changes(vec![single].into());
        cc.context = context.into();
        let before = self.last_index();
        self.raw.propose_conf_change(Vec::new(), cc)?;
        if self.last_index() != before + 1 {
            return Err(Error::ProposalDropped(
                "membership change not appended".into(),
            ));
        }
        let pid = ProposalId(self.next_id);
        self.next_id += 1;
        self.in_flight
            .insert(before + 1, (self.term(), pid, Kind::ConfChange));
        Ok(pid)
    }

    fn check_membership_change(&self, change: &MembershipChange) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.raw.raft.has_pending_conf() {
            return Err(Error::ProposalDropped(CHANGE_PENDING.into()));
        }
        let (mut voters, mut learners) = self.membership();
        voters.sort_unstable();
        learners.sort_unstable();
        let describe = || format!("voters {voters:?}, learners {learners:?}");
        match change {
            MembershipChange::AddLearner(p) => {
                if p.id == 0 {
                    return bad("node id 0".into());
                }
                if voters.contains(&p.id) || learners.contains(&p.id) {
                    let role = if voters.contains(&p.id) {
                        "voter"
                    } else {
                        "learner"
                    };
                    return bad(format!("node {} is already a {role}", p.id));
                }
                if p.raft_addr.is_empty() || p.service_addr.is_empty() {
                    return bad(format!(
                        "node {} needs both a raft address and a service address",
                        p.id
                    ));
                }
                if let Some(other) = self.peers.values().find(|q| q.raft_addr == p.raft_addr) {
                    return bad(format!(
                        "raft address {} is already used by node {}",
                        p.raft_addr, other.id
                    ));
                }
            }
            MembershipChange::Promote(id) => {
                if voters.contains(id) {
                    return bad(format!("node {id} is already a voter"));
                }
                if !learners.contains(id) {
                    return bad(format!(
                        "node {id} is not a learner ({}); add it as a learner first",
                        describe()
                    ));
                }
                let matched = self.raw.raft.prs().get(*id).map_or(0, |p| p.matched);
                if matched == 0 {
                    return bad(format!(
                        "learner {id} has received nothing yet (is it running, in join mode, and \
                         reachable at its raft address?); promote it once it has caught up"
                    ));
                }
                let behind = self.raw.raft.raft_log.committed.saturating_sub(matched);
                if behind > PROMOTE_MAX_LAG {
                    return bad(format!(
                        "learner {id} is {behind} entries behind the commit index (at most \
                         {PROMOTE_MAX_LAG}); promote it once it has caught up"
                    ));
                }
            }
            MembershipChange::Remove(id) => {
                if !voters.contains(id) && !learners.contains(id) {
                    return bad(format!("node {id} is not a member ({})", describe()));
                }
                if voters == [*id] {
                    return bad(format!(
                        "node {id} is the last voter; removing it would leave no group"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Hands queued proposals to raft as one batch.
    fn flush_queue(&mut self, out: &mut Output) {
        while !self.queue.is_empty() {
            if !self.is_leader() {
                out.failed.extend(
                    self.queue
                        .drain(..)
                        .map(|(id, _)| (id, ProposalError::LeadershipLost)),
                );
                return;
            }
            let n = self.queue.len().min(self.config.max_batch);
            let batch: Vec<(ProposalId, Vec<u8>)> = self.queue.drain(..n).collect();
            let mut ids = Vec::with_capacity(n);
            let entries: Vec<Entry> = batch
                .into_iter()
                .map(|(id, data)| {
                    ids.push(id);
                    let mut e = Entry::default();
                    e.data = data.into();
                    e
                })
                .collect();
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgPropose);
            m.from = self.config.id;
            m.set_entries(entries.into());
            let before = self.last_index();
            let term = self.term();
            match self.raw.raft.step(m) {
                Ok(()) if self.last_index() == before + ids.len() as u64 => {
                    for (i, id) in ids.into_iter().enumerate() {
                        self.in_flight
                            .insert(before + 1 + i as u64, (term, id, Kind::Normal));
                    }
                }
                Ok(()) => out.failed.extend(ids.into_iter().map(|id| {
                    (
                        id,
                        ProposalError::Dropped("raft appended a partial batch".into()),
                    )
                })),
                Err(e) => {
                    let why = e.to_string();
                    out.failed.extend(
                        ids.into_iter()
                            .map(|id| (id, ProposalError::Dropped(why.clone()))),
                    );
                }
            }
        }
    }

    /// Runs one ready cycle: proposes queued commands, persists new entries and hard state
    /// (fsync), applies committed entries, takes a snapshot when due. Every returned message may
    /// be sent.
    pub fn advance(&mut self) -> Result<Output> {
        let mut early = Vec::new();
        let mut out = self.advance_with(&mut |m| early.extend(m))?;
        early.append(&mut out.messages);
        out.messages = early;
        Ok(out)
    }

    /// Like [`advance`](Self::advance), but hands messages that need no local persistence
    /// (the leader's appends) to `send_now` before the fsync, so followers write in parallel.
    pub fn advance_with(&mut self, send_now: &mut dyn FnMut(Vec<Message>)) -> Result<Output> {
        self.advance_replying(send_now, &mut |_| {})
    }

    /// [`advance_with`](Self::advance_with), also handing the entries committed by earlier
    /// rounds to `applied_now` as soon as they are applied, before this round's entries are made
    /// durable (an fsync): their results are final, and their callers need not wait for an
    /// unrelated write. Whatever `applied_now` leaves in the vector stays in the output.
    pub fn advance_replying(
        &mut self,
        send_now: &mut dyn FnMut(Vec<Message>),
        applied_now: &mut dyn FnMut(&mut Vec<Applied>),
    ) -> Result<Output> {
        let mut out = Output::default();
        self.flush_queue(&mut out);
        if self.raw.has_ready() {
            let mut rd = self.raw.ready();
            for rs in rd.take_read_states() {
                self.lease.acknowledged(&rs.request_ctx);
            }
            if !rd.messages().is_empty() {
                let messages = self.sendable(rd.take_messages());
                send_now(messages);
            }
            if !rd.snapshot().is_empty() {
                let snap = rd.snapshot().clone();
                self.install_snapshot(snap, &mut out)?;
            }
            let committed = rd.take_committed_entries();
            self.apply_entries(committed, &mut out)?;
            applied_now(&mut out.applied);
            self.raw.mut_store().persist(rd.entries(), rd.hs())?;
            out.messages.extend(rd.take_persisted_messages());
            let mut light = self.raw.advance(rd);
            if let Some(commit) = light.commit_index() {
                self.raw.mut_store().set_commit(commit)?;
            }
            out.messages.extend(light.take_messages());
            let committed = light.take_committed_entries();
            self.apply_entries(committed, &mut out)?;
            self.raw.advance_apply_to(self.applied);
        }
        self.maybe_snapshot()?;
        self.check_role(&mut out);
        out.messages = self.sendable(std::mem::take(&mut out.messages));
        if !self.internal.is_empty() {
            let internal = &mut self.internal;
            out.failed.retain(|(id, _)| !internal.remove(id));
        }
        Ok(out)
    }

    /// Records role and leader changes the moment they happen (after every step and tick), so
    /// a leadership that begins and ends between two [`advance`](Self::advance) calls is still
    /// reported.
    fn observe_role(&mut self) {
        let now = self.is_leader().then(|| self.term());
        if self.announced_term != now {
            if let Some(term) = self.announced_term {
                self.events.push(RoleEvent::SteppedDown { term });
            }
            if let Some(term) = now {
                self.events.push(RoleEvent::BecameLeader { term });
            }
            self.announced_term = now;
            self.lease.reset();
            self.recording.clear();
        }
        let leader = self.raw.raft.leader_id;
        if leader != self.known_leader {
            self.known_leader = leader;
            self.events.push(RoleEvent::LeaderChanged {
                leader: (leader != 0).then_some(leader),
            });
        }
    }

    /// Hands the recorded role changes to `out`, and fails this node's proposals once it is no
    /// longer the leader of the term they were made in.
    fn check_role(&mut self, out: &mut Output) {
        self.observe_role();
        if self.is_leader() && self.known_incarnation(self.config.id).is_none() {
            self.record_incarnation(self.config.id, self.incarnation);
        }
        out.events.append(&mut self.events);
        let now = self.is_leader().then(|| self.term());
        if self.led_term != now {
            if self.led_term.is_some() {
                out.failed.extend(
                    std::mem::take(&mut self.in_flight)
                        .into_values()
                        .map(|(_, id, _)| (id, ProposalError::LeadershipLost)),
                );
                out.failed.extend(
                    self.queue
                        .drain(..)
                        .map(|(id, _)| (id, ProposalError::LeadershipLost)),
                );
            }
            self.led_term = now;
        }
    }

    fn install_snapshot(&mut self, snap: Snapshot, out: &mut Output) -> Result<()> {
        let index = snap.get_metadata().index;
        let data = SnapshotData::decode(&snap.data)?;
        self.machine
            .restore(&data.machine)
            .map_err(Error::StateMachine)?;
        self.kv = data.kv;
        self.peers = data.peers;
        self.raw.mut_store().apply_snapshot(snap)?;
        self.applied = index;
        self.last_snapshot = index;
        self.log_bytes_since_snapshot = 0;
        while let Some((&i, _)) = self.in_flight.first_key_value() {
            if i > index {
                break;
            }
            let (_, (_, id, _)) = self.in_flight.pop_first().expect("non-empty");
            out.failed.push((id, ProposalError::LeadershipLost));
        }
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>, out: &mut Output) -> Result<()> {
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            self.log_bytes_since_snapshot += e.data.len() as u64;
            let mut mine = None;
            while let Some((&i, &(term, id, kind))) = self.in_flight.first_key_value() {
                if i > e.index {
                    break;
                }
                self.in_flight.pop_first();
                if i == e.index && term == e.term {
                    mine = Some((id, kind));
                } else {
                    out.failed.push((id, ProposalError::LeadershipLost));
                }
            }
            let response = match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if let Some((id, Kind::ConfChange)) = mine {
                        out.failed.push((
                            id,
                            ProposalError::Dropped("another membership change is pending".into()),
                        ));
                        mine = None;
                    }
                    self.apply_normal(&e.data, mine.is_some())
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data)
                        .map_err(|err| Error::Codec(err.to_string()))?;
                    let mut single = ConfChangeSingle::default();
                    single.node_id = cc.node_id;
                    single.set_change_type(cc.get_change_type());
                    let mut v2 = ConfChangeV2::default();
                    v2.set_changes(vec![single].into());
                    v2.context = cc.context;
                    self.apply_conf_change(v2)
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data)
                        .map_err(|err| Error::Codec(err.to_string()))?;
                    self.apply_conf_change(cc)
                }
            };
            self.applied = e.index;
            let id = mine
                .map(|(id, _)| id)
                .filter(|id| !self.internal.remove(id));
            out.applied.push(Applied {
                id,
                index: e.index,
                response,
            });
        }
        Ok(())
    }

    fn apply_normal(&mut self, data: &[u8], want_result: bool) -> Vec<u8> {
        match data.split_first() {
            None => Vec::new(),
            Some((&TAG_COMMAND, command)) => self.machine.apply(command),
            Some((&TAG_KV, op)) => match postcard::from_bytes::<KvOp>(op) {
                Ok(op) => {
                    let r = self.kv.apply(op, want_result);
                    postcard::to_allocvec(&r).expect("kv results always serialize")
                }
                Err(_) => Vec::new(),
            },
            Some(_) => Vec::new(),
        }
    }

    fn apply_conf_change(&mut self, cc: ConfChangeV2) -> Vec<u8> {
        let result = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => {
                let removed_leader = self.is_leader() && !cs.voters.contains(&self.config.id);
                self.raw.mut_store().set_conf_state(cs);
                if removed_leader {
                    // Proposed by an earlier leader (this one hands over before its own
                    // removal): raft-rs would panic on this leader's next commit, so it stops
                    // leading at once and the remaining voters elect a leader.
                    tracing::warn!(
                        node = self.config.id,
                        term = self.term(),
                        "the leader applied its own removal; stepping down"
                    );
                    let term = self.term();
                    self.raw.raft.become_follower(term, raft::INVALID_ID);
                }
                for change in cc.get_changes() {
                    if change.get_change_type() == ConfChangeType::RemoveNode {
                        self.peers.remove(&change.node_id);
                        // Added again, it starts a new incarnation.
                        let key = incarnation::record_key(change.node_id);
                        self.kv.apply(KvOp::Delete { key }, false);
                        self.recording.remove(&change.node_id);
                        self.refused.remove(&change.node_id);
                    }
                }
                if let Ok(p) = postcard::from_bytes::<PeerInfo>(&cc.context) {
                    self.peers.insert(p.id, p);
                }
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        postcard::to_allocvec(&result).expect("results always serialize")
    }

    /// Asks the most caught-up other voter to take over at once.
    fn hand_over_leadership(&mut self) {
        let voters = self.raw.store().conf_state().voters.clone();
        let best = voters
            .iter()
            .filter(|&&v| v != self.config.id)
            .max_by_key(|&&v| self.raw.raft.prs().get(v).map_or(0, |p| p.matched))
            .copied();
        if let Some(to) = best {
            self.lease.transfer_started();
            self.raw.transfer_leader(to);
        }
    }

    fn maybe_snapshot(&mut self) -> Result<()> {
        let wanted = self.raw.store().take_snapshot_request() && self.applied > self.last_snapshot;
        let due = self.applied >= self.last_snapshot + self.config.snapshot_threshold
            && (!self.config.snapshot_by_size
                || self.log_bytes_since_snapshot >= self.last_snapshot_bytes);
        if !wanted && !due {
            return Ok(());
        }
        let data = SnapshotDataRef {
            kv: &self.kv,
            peers: &self.peers,
            machine: self.machine.snapshot().map_err(Error::StateMachine)?,
        };
        let bytes = postcard::to_allocvec(&data)?;
        let index = self.applied;
        self.last_snapshot_bytes = bytes.len() as u64;
        self.raw.mut_store().create_snapshot(index, bytes)?;
        self.last_snapshot = index;
        self.log_bytes_since_snapshot = 0;
        Ok(())
    }

    /// First index still in the log (entries before it are only in the snapshot).
    pub fn first_index(&self) -> u64 {
        self.raw.store().first_index().unwrap_or(1)
    }
}
