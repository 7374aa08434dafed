//! [`LeaderView`]: serving reads and heartbeats without the command log.

use std::collections::HashMap;

use super::client::HeartbeatStatus;
use super::command::{Command, Response};
use super::log::LogEntry;
use super::metrics::Counters;
use super::types::{ClientId, Timestamp};
use super::Master;

/// Serving reads and heartbeats without the command log.
///
/// Reads (GetReplicaList, ExistKey and their batch forms) and heartbeats change only lease
/// deadlines and liveness times, yet they are most of a master's traffic. Behind a replicated
/// log each would cost a consensus round and an fsync. A [`LeaderView`] lets the process that
/// appends to the log (the Raft leader, or the only master) answer them from its applied state
/// and remember what they changed, volatile and beside the replicated [`Master`]:
///
/// - **reads** are answered from the applied state; the view records `key -> read time`. The
///   replicated state learns of a read only when a command whose outcome depends on that key's
///   lease is appended: [`LeaderView::route`] copies the key's read into the [`LogEntry`], and
///   every replica applies it before the command, so all replicas decide alike (a non-forced
///   remove of a leased key is refused everywhere, a forced one keeps the ranges until the
///   lease ends everywhere);
/// - while such a command is between `route` and its apply, its keys are **barred**: reads of
///   them go through the log, ordered after it. Commands that touch keys they do not name
///   (`RemoveAll`, `RemoveByRegex`) bar every key. [`Command::Evict`] becomes
///   [`Command::EvictKeys`] with victims chosen knowing the recorded reads;
/// - **heartbeats** of known clients are answered at once; the view keeps each client's last
///   time, and [`LeaderView::timeouts`] proposes `ExpireClient` only when both the replicated
///   and the recorded time are past the TTL. Each client's heard time reaches the log in a
///   [`Command::ClientsHeard`] batch once the replicated one is a quarter TTL old, so the
///   replicated state knows who is alive to within about a quarter TTL;
/// - a **new leader** knows nothing of its predecessor's reads and of its heartbeats since the
///   last batch. [`LeaderView::take_over`] gives every client until the later of its replicated
///   deadline and half a TTL from the takeover (time to find the new leader), but never more
///   than a quarter TTL past its replicated deadline (what the old leader may have heard and
///   not reported), so the grace does not start again at each change of leader; and returns a
///   [`Command::LeaseAll`] to append before anything else, leasing every object until
///   `now + extra + lease TTL`. A deposed leader serves reads only until its read lease ends,
///   which is before its successor is elected; `extra` is a margin on top (for the successor's
///   time, which follows the log's and may lag its predecessor's by the replication delay). A
///   client that died is expired at most a quarter TTL (plus a timer tick) after its TTL ran
///   out, however often the leader changes.
///
/// Whoever drives the view answers from it only while no other leader can exist: behind a
/// replicated log, only under the log's read lease (`CommandLog::holds_read_lease` of
/// `mooncake-core`), checked after [`LeaderView::serve_local`] read the state. A deposed or
/// frozen leader whose lease has run out answers nothing from here.
///
/// ```
/// use mooncake_master::*;
/// let mut m = Master::new(MasterConfig::default()).unwrap();
/// let mut view = LeaderView::default();
/// let c = ClientId(1);
/// let t = Timestamp::from_millis(1);
/// m.apply(t, Command::MountSegment { client_id: c, segment: SegmentSpec::new("h:1", 0, 1 << 20) });
/// // A heartbeat is answered without the log.
/// let Route::Local(r) = view.route(&m, t, Command::Heartbeat { client_id: c }) else { panic!() };
/// assert_eq!(r, Response::Heartbeat(HeartbeatStatus::Ok));
/// // A remove must go through the log.
/// let Route::Log(p) = view.route(&m, t, Command::Remove { key: "k".into(), force: false }) else { panic!() };
/// let r = m.apply(p.entry.now, p.entry.command.clone());
/// view.finish(p.ticket);
/// assert_eq!(r, Response::Unit(Err(mooncake_core::ErrorCode::OBJECT_NOT_FOUND)));
/// ```
#[derive(Debug, Default)]
pub struct LeaderView {
    /// Last read served per key, not yet known to the replicated state.
    reads: HashMap<String, Timestamp>,
    /// Last heartbeat per client, served here.
    heard: HashMap<ClientId, Timestamp>,
    /// The heard times last proposed in a [`Command::ClientsHeard`], per client.
    reported: HashMap<ClientId, Timestamp>,
    /// When this view began leading (see [`LeaderView::take_over`]).
    took_over_at: Option<Timestamp>,
    /// Keys of commands between `route` and `finish`, with how many.
    barred: HashMap<String, u32>,
    /// Commands in flight that bar every key.
    barred_all: u32,
    /// Read counters of the reads served here.
    counters: Counters,
}

/// Where a command goes.
#[derive(Debug)]
pub enum Route {
    /// Answered from the applied state.
    Local(Response),
    /// Append this to the log; then hand the ticket back to [`LeaderView::finish`].
    Log(Proposal),
}

/// A command on its way through the log.
#[derive(Debug)]
pub struct Proposal {
    /// What to append.
    pub entry: LogEntry,
    /// Keys barred until [`LeaderView::finish`].
    pub ticket: Ticket,
}

/// The keys a proposal bars; give it back to [`LeaderView::finish`] once the entry is applied or
/// has failed.
#[derive(Debug, Default)]
#[must_use = "a ticket bars its keys until it is finished"]
pub struct Ticket {
    keys: Vec<String>,
    all: bool,
}

/// Which keys a command's outcome depends on the leases of.
enum Touch {
    None,
    Keys(Vec<String>),
    All,
}

impl LeaderView {
    /// Routes `command` arriving at `now`: reads and heartbeats are answered from `master`
    /// unless a command in flight bars their keys; everything else becomes a log entry.
    pub fn route(&mut self, master: &Master, now: Timestamp, command: Command) -> Route {
        if let Some(r) = self.serve(master, now, &command) {
            return Route::Local(r);
        }
        let command = match command {
            Command::Evict => {
                let (keys, target_bytes) =
                    master.eviction_plan(now, |k| self.reads.get(k).copied());
                Command::EvictKeys { keys, target_bytes }
            }
            other => other,
        };
        let ttl = master.config().default_kv_lease_ttl_ms;
        let live = |t: &Timestamp| t.plus(ttl) > now;
        let mut reads = Vec::new();
        let ticket = match touched(master, &command) {
            Touch::None => Ticket::default(),
            Touch::Keys(keys) => {
                for k in &keys {
                    if let Some(t) = self.reads.get(k).filter(|t| live(t)) {
                        reads.push((k.clone(), *t));
                    }
                    *self.barred.entry(k.clone()).or_default() += 1;
                }
                Ticket { keys, all: false }
            }
            Touch::All => {
                reads.extend(
                    self.reads
                        .iter()
                        .filter(|(_, t)| live(t))
                        .map(|(k, t)| (k.clone(), *t)),
                );
                reads.sort_unstable();
                self.barred_all += 1;
                Ticket {
                    keys: Vec::new(),
                    all: true,
                }
            }
        };
        Route::Log(Proposal {
            entry: LogEntry {
                now,
                reads,
                command,
            },
            ticket,
        })
    }

    /// Answers `command` from `master` at `now` when it is a read or heartbeat whose keys no
    /// command in flight bars, as [`route`](Self::route) would; `None` when it must go through
    /// the log. Unlike `route` it leaves `command` to the caller, who can still send it to the
    /// log or ask again (a read answered while the caller's lease lapsed is thrown away).
    pub fn serve_local(
        &mut self,
        master: &Master,
        now: Timestamp,
        command: &Command,
    ) -> Option<Response> {
        self.serve(master, now, command)
    }

    /// Lifts the bars of a proposal whose entry was applied (or will never be).
    pub fn finish(&mut self, ticket: Ticket) {
        for k in ticket.keys {
            if let Some(n) = self.barred.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.barred.remove(&k);
                }
            }
        }
        if ticket.all {
            self.barred_all -= 1;
        }
    }

    /// The maintenance commands due at `now` ([`Master::handle_timeout`]), without expiring a
    /// client heard from here within its TTL.
    pub fn timeouts(&mut self, master: &Master, now: Timestamp) -> Vec<Command> {
        let ttl = master.config().client_ttl_ms;
        let grace_over = self.took_over_at.is_none_or(|t| t.plus(ttl / 2) <= now);
        let mut due = master.handle_timeout(now);
        due.retain(|c| match c {
            Command::ExpireClient { client_id } => {
                // The takeover's grace ends, for each client, no later than a quarter TTL past
                // its replicated deadline: the grace is for heartbeats the old leader heard
                // and had not reported yet (at most a quarter TTL of them), not a fresh TTL
                // for every client at every change of leader.
                let past_grace = grace_over
                    || master
                        .client_deadline(*client_id)
                        .is_none_or(|d| d.plus(ttl / 4) <= now);
                past_grace && self.heard.get(client_id).is_none_or(|t| t.plus(ttl) <= now)
            }
            _ => true,
        });
        // Heartbeats the replicated state should learn of: a client heard here since it last
        // did, whose replicated time is a quarter TTL old.
        let mut heard: Vec<(ClientId, Timestamp)> = (self.heard.iter())
            .filter(|(c, t)| {
                let replicated = master
                    .client_deadline(**c)
                    .map(|d| Timestamp(d.0.saturating_sub(ttl)));
                replicated.is_some_and(|r| **t > r && r.plus(ttl / 4) <= now)
                    && self.reported.get(*c).is_none_or(|r| **t > *r)
            })
            .map(|(c, t)| (*c, *t))
            .collect();
        if !heard.is_empty() {
            heard.sort_unstable();
            self.reported.extend(heard.iter().copied());
            due.push(Command::ClientsHeard { heard });
        }
        due
    }

    /// Forgets reads whose lease has ended and clients the master no longer knows.
    pub fn prune(&mut self, master: &Master, now: Timestamp) {
        let ttl = master.config().default_kv_lease_ttl_ms;
        self.reads.retain(|_, t| t.plus(ttl) > now);
        self.heard
            .retain(|c, _| master.client_deadline(*c).is_some());
        self.reported
            .retain(|c, _| master.client_deadline(*c).is_some());
    }

    /// Starts leading at `now` over `master` (the state applied so far): forgets what an
    /// earlier term recorded, gives every known client until the later of its replicated
    /// deadline and half a TTL from now, and returns the command to append first, which leases
    /// every object until `now + extra_ms` plus the lease TTL.
    pub fn take_over(&mut self, _master: &Master, now: Timestamp, extra_ms: u64) -> Command {
        self.reads.clear();
        self.heard.clear();
        self.reported.clear();
        self.took_over_at = Some(now);
        Command::LeaseAll {
            read_at: now.plus(extra_ms),
        }
    }

    /// Counters of the reads served here (get requests, hits, misses, exist requests, leases);
    /// add them to the master's own.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Reads recorded and not yet expired or applied, and clients heard from: sizes of the
    /// view, for metrics and tests.
    pub fn sizes(&self) -> (usize, usize) {
        (self.reads.len(), self.heard.len())
    }

    fn is_barred(&self, key: &str) -> bool {
        self.barred_all > 0 || self.barred.contains_key(key)
    }

    /// Answers a read or heartbeat from the applied state, or `None` when it must go through
    /// the log.
    fn serve(&mut self, master: &Master, now: Timestamp, command: &Command) -> Option<Response> {
        Some(match command {
            Command::Heartbeat { client_id } => {
                if master.client_deadline(*client_id).is_none() {
                    Response::Heartbeat(HeartbeatStatus::NeedRemount)
                } else {
                    self.heard.insert(*client_id, now);
                    Response::Heartbeat(HeartbeatStatus::Ok)
                }
            }
            Command::GetReplicaList { key } => {
                if self.is_barred(key) {
                    return None;
                }
                Response::Replicas(self.get(master, now, key))
            }
            Command::BatchGetReplicaList { keys } => {
                if keys.iter().any(|k| self.is_barred(k)) {
                    return None;
                }
                Response::ReplicasBatch(keys.iter().map(|k| self.get(master, now, k)).collect())
            }
            Command::ExistKey { key } => {
                if self.is_barred(key) {
                    return None;
                }
                Response::Exists(self.exists(master, now, key))
            }
            Command::BatchExistKey { keys } => {
                if keys.iter().any(|k| self.is_barred(k)) {
                    return None;
                }
                Response::ExistsBatch(keys.iter().map(|k| self.exists(master, now, k)).collect())
            }
            _ => return None,
        })
    }

    fn record(&mut self, now: Timestamp, key: &str) {
        self.counters.leases_granted += 1;
        match self.reads.get_mut(key) {
            Some(t) => *t = (*t).max(now),
            None => {
                self.reads.insert(key.to_owned(), now);
            }
        }
    }

    fn get(
        &mut self,
        master: &Master,
        now: Timestamp,
        key: &str,
    ) -> Result<super::ReplicaList, mooncake_core::ErrorCode> {
        self.counters.get_requests += 1;
        let r = master.replica_list_at(now, key);
        if r.is_ok() {
            self.counters.get_hits += 1;
            self.record(now, key);
        } else {
            self.counters.get_misses += 1;
        }
        r
    }

    fn exists(&mut self, master: &Master, now: Timestamp, key: &str) -> bool {
        self.counters.exist_requests += 1;
        let readable = master.is_readable(key);
        if readable {
            self.record(now, key);
        }
        readable
    }
}

/// The keys whose leases `command`'s outcome depends on: commands that may free or retire a
/// readable value's ranges, or refuse because of a lease.
fn touched(master: &Master, command: &Command) -> Touch {
    let key = |k: &String| Touch::Keys(vec![k.clone()]);
    match command {
        Command::Remove { key: k, .. }
        | Command::UpsertStart { key: k, .. }
        | Command::CreateCopyTask { key: k, .. }
        | Command::CreateMoveTask { key: k, .. } => key(k),
        Command::BatchRemove { keys, .. } | Command::EvictKeys { keys, .. } => {
            Touch::Keys(keys.clone())
        }
        Command::BatchUpsertStart { items, .. } => {
            Touch::Keys(items.iter().map(|i| i.key.clone()).collect())
        }
        // Committing a write replaces (and retires) a readable value, if there is one when it
        // is applied. Whether there is cannot be told from the applied state: entries still in
        // the log ahead of it (the first value's PutEnd) may commit one, which reads served
        // meanwhile would lease without the PutEnd carrying them. So its keys are always barred.
        Command::PutEnd { key: k, .. } | Command::PutEndChecked { key: k, .. } => key(k),
        Command::BatchPutEnd { keys, .. } | Command::BatchPutEndChecked { keys, .. } => {
            Touch::Keys(keys.clone())
        }
        // A finished move frees its source replica.
        Command::FinishTask { task_id, .. } | Command::TaskTimeout { task_id } => {
            match master.tasks.get(task_id) {
                Some(t) => Touch::Keys(vec![t.key.clone()]),
                None => Touch::None,
            }
        }
        Command::RemoveAll { .. } | Command::RemoveByRegex { .. } | Command::Evict => Touch::All,
        // A repeat is answered from memory, but the first arrival is applied: bar as for it.
        Command::Once { command, .. } => touched(master, command),
        _ => Touch::None,
    }
}
