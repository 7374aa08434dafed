//! The master service: runs the master state machine behind a [`CommandLog`], drives its timers
//! and answers store clients, in-process ([`MasterService`] implements [`MasterApi`]) or over RPC
//! ([`RemoteMaster`](mooncake_rpc::RemoteMaster)).
//!
//! Every state change is a [`Command`] stamped with the service's [`Clock`] and applied through
//! the command log, so a replicated log replicates the master unchanged. Reads and heartbeats,
//! which change only leases and liveness, are answered from the applied state by a
//! [`LeaderView`] without a log round trip; it carries what they changed into the entries whose
//! outcome depends on it (see its docs). Queries that change nothing (task status, metrics) read
//! the local state directly.
//!
//! The log also says whether this master leads ([`Leadership`]): a follower answers
//! [`MasterReply::NotLeader`], and a new leader takes over (see [`LeaderView::take_over`])
//! before it serves. The service knows nothing else of how the log is replicated: a Raft member
//! is put together by [`crate::master_cli`], and tests run groups over a simulated log.

mod admin;
mod bindings;
mod time;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use mooncake_core::{
    Clock, CommandLog, Error, ErrorCode, Leadership, MemoryMetadataStore, MetadataStore, Result,
    StateMachine, SystemClock,
};
use mooncake_master::{
    decode_response, Command, LeaderView, LogEntry, Master, MasterConfig, MasterMetrics, Response,
    Route, Ticket, Timestamp,
};

use mooncake_rpc::admin::AdminRequest;
use mooncake_rpc::rpc::{self, Caller, Handler, RefusalLog};
use mooncake_rpc::{MasterApi, MasterReply, MasterRequest, Role, TlsAcceptor};

/// The wall clock in the master's unit (milliseconds since the Unix epoch). A service reads it
/// only once, when it starts; from then on its time runs on the monotonic clock and follows the
/// log's (see the `time` module of the service), so no wall-clock step moves a deadline.
pub fn master_clock() -> Timestamp {
    Timestamp::from_millis(SystemClock.unix_millis())
}

/// The applied master and the leader's view of reads served outside the log, under one lock.
#[derive(Debug)]
struct Shared {
    master: Master,
    view: LeaderView,
    /// The time this master stamps on commands (see [`time::MasterTime`]).
    time: time::MasterTime,
}

type SharedState = Arc<Mutex<Shared>>;

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().expect("master lock")
}

/// The master as the command log's [`StateMachine`], sharing its state with the service that
/// queries it.
struct SharedMaster(SharedState);

impl StateMachine for SharedMaster {
    fn apply(&mut self, entry: &[u8]) -> Vec<u8> {
        let mut s = lock(&self.0);
        let out = StateMachine::apply(&mut s.master, entry);
        let now = s.master.now();
        s.time.applied(now);
        out
    }
    fn snapshot(&self) -> Result<Vec<u8>> {
        StateMachine::snapshot(&lock(&self.0).master)
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<()> {
        let mut s = lock(&self.0);
        StateMachine::restore(&mut s.master, snapshot)?;
        let now = s.master.now();
        s.time.applied(now);
        Ok(())
    }
}

/// Lifts a proposal's bars when its entry is done with, also when the call is cancelled.
struct Barred<'a> {
    shared: &'a Mutex<Shared>,
    ticket: Option<Ticket>,
}

impl Drop for Barred<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            lock(self.shared).view.finish(t);
        }
    }
}

/// Service settings beyond the master's own.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// How often the timeout handler runs (expiry, reclaim, eviction, task timeouts). Default
    /// 100 ms.
    pub tick: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            tick: Duration::from_millis(100),
        }
    }
}

/// A master's state before its service starts: make it, attach its
/// [`state_machine`](Self::state_machine) to a [`CommandLog`], then start the service on both
/// with [`MasterService::start`].
pub struct MasterState(SharedState);

impl MasterState {
    /// A master in its initial state (fails on an invalid `config`).
    pub fn new(config: MasterConfig) -> Result<Self> {
        Ok(MasterState(Arc::new(Mutex::new(Shared {
            master: Master::new(config)?,
            view: LeaderView::default(),
            time: time::MasterTime::default(),
        }))))
    }

    /// The master as a [`StateMachine`] for the command log; it shares its state with the
    /// service that will serve it.
    pub fn state_machine(&self) -> Box<dyn StateMachine> {
        Box::new(SharedMaster(self.0.clone()))
    }
}

/// See the module docs.
pub struct MasterService {
    shared: SharedState,
    log: Arc<dyn CommandLog>,
    /// Keys and values beside the log (segment descriptors of the HTTP metadata server).
    kv: Arc<dyn MetadataStore>,
    config: ServiceConfig,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The term this master has taken over as leader in (`u64::MAX`: none yet).
    led_term: AtomicU64,
    /// Held while taking over, so requests of a new term wait for it.
    takeover: tokio::sync::Mutex<()>,
    /// Landing reports of storage nodes, for commits that wait on them.
    landings: crate::landing::Landings,
    /// Landing reports refused for their reporter (rate-limits their log lines).
    landing_refusals: RefusalLog,
}

impl std::fmt::Debug for MasterService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterService")
            .field("log", &self.log)
            .finish()
    }
}

impl MasterService {
    /// A service whose command log is in memory (the embedded, single-master default). Starts
    /// the timer task on the current tokio runtime.
    pub fn new(config: MasterConfig, service: ServiceConfig) -> Result<Arc<Self>> {
        let state = MasterState::new(config)?;
        let store = Arc::new(MemoryMetadataStore::with_state_machine(
            state.state_machine(),
        ));
        Ok(Self::start(
            state,
            store.clone(),
            store,
            service,
            Arc::new(SystemClock),
        ))
    }

    /// A service for `state`, whose [`state_machine`](MasterState::state_machine) `log`
    /// drives, with `kv` for the metadata server's keys and `clock` for time. Only a leader (or
    /// a standalone log) serves requests and runs the timers; followers answer
    /// [`MasterReply::NotLeader`]. Starts the timer task on the current tokio runtime.
    pub fn start(
        state: MasterState,
        log: Arc<dyn CommandLog>,
        kv: Arc<dyn MetadataStore>,
        service: ServiceConfig,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        {
            let mut s = lock(&state.0);
            let state_now = s.master.now();
            s.time.start(clock.clone(), state_now);
        }
        let svc = Arc::new(MasterService {
            shared: state.0,
            log,
            kv,
            landings: crate::landing::Landings::with_clock(clock),
            landing_refusals: RefusalLog::new(),
            config: service,
            tasks: Mutex::new(Vec::new()),
            led_term: AtomicU64::new(u64::MAX),
            takeover: tokio::sync::Mutex::new(()),
        });
        svc.start_timers();
        svc
    }

    /// The command log the master's state changes go through.
    pub fn command_log(&self) -> &Arc<dyn CommandLog> {
        &self.log
    }

    /// Master time now (see [`time::MasterTime`]): this master's own while it runs alone or
    /// leads a term it has taken over, else its estimate of the group's from the log.
    fn now(&self) -> Timestamp {
        let stamping = self.stamping();
        lock(&self.shared).time.now(stamping)
    }

    /// Whether this master stamps the commands it appends: it runs alone, or leads a term it
    /// has taken over.
    fn stamping(&self) -> bool {
        match self.log.leadership() {
            Leadership::Standalone => true,
            Leadership::Leader { term } => self.led_term.load(Ordering::Acquire) == term,
            Leadership::Follower { .. } => false,
        }
    }

    /// `None` when this master may serve requests (it is the leader, or not replicated);
    /// otherwise the leader's RPC address if known.
    pub(crate) fn not_leader(&self) -> Option<Option<String>> {
        match self.log.leadership() {
            Leadership::Follower { leader_hint } => Some(leader_hint),
            Leadership::Standalone | Leadership::Leader { .. } => None,
        }
    }

    /// The metadata store behind the service (segment descriptors of the HTTP metadata server
    /// live here too).
    pub fn metadata(&self) -> Arc<dyn MetadataStore> {
        self.kv.clone()
    }

    /// Executes `command` at the current master time: a read or heartbeat is answered from the
    /// applied state when it can be, anything else goes through the command log.
    ///
    /// A read or heartbeat is answered from the state only under the log's read lease
    /// ([`CommandLog::holds_read_lease`]), checked after the state was read: a leader that was
    /// frozen, cut off or whose log stopped answers `NotLeader` instead (its clients move on).
    pub async fn apply(&self, command: Command) -> Result<(Timestamp, Response)> {
        self.take_over_if_new_leader().await?;
        let stamping = self.stamping();
        let mut lapsed = 0;
        loop {
            self.read_lease().await?;
            let (now, local) = {
                let mut s = lock(&self.shared);
                let Shared { master, view, time } = &mut *s;
                let now = time.now(stamping);
                (now, view.serve_local(master, now, &command))
            };
            match local {
                None => break,
                Some(response) if self.log.holds_read_lease() => return Ok((now, response)),
                // The lease ran out while the state was read (this process was paused, or
                // the quorum stopped answering): that answer may be stale. Ask again once
                // the lease is renewed; `read_lease` fails when this member no longer leads.
                Some(_) if lapsed < 3 => lapsed += 1,
                Some(_) => {
                    return Err(Error::with_code(
                        ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS,
                        "this master's read lease keeps running out; retry",
                    ))
                }
            }
        }
        let (now, routed) = {
            let mut s = lock(&self.shared);
            let Shared { master, view, time } = &mut *s;
            let now = time.now(stamping);
            (now, view.route(master, now, command))
        };
        let proposal = match routed {
            Route::Log(p) => p,
            // A bar was lifted since `serve_local` looked.
            Route::Local(response) if self.log.holds_read_lease() => return Ok((now, response)),
            Route::Local(_) => {
                return Err(Error::with_code(
                    ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS,
                    "this master's read lease ran out; retry",
                ))
            }
        };
        let _barred = Barred {
            shared: &self.shared,
            ticket: Some(proposal.ticket),
        };
        let now = proposal.entry.now;
        let mut response = self.append(&proposal.entry).await?;
        if let Response::Reserved(Ok(grant)) = &mut response {
            // Reports on this space are of writes before it was handed out anew.
            self.landings
                .forget(&grant.segment_name, grant.buffer_address, grant.size);
            grant.commit_on_landing = self.landings.is_local(&grant.segment_name);
        }
        Ok((now, response))
    }

    /// Returns once this member may answer reads from its state (at once, under a running
    /// lease); fails with the log's not-leader error when it may not (see
    /// [`CommandLog::acquire_read_lease`]).
    async fn read_lease(&self) -> Result<()> {
        if self.log.holds_read_lease() {
            return Ok(());
        }
        self.log.acquire_read_lease().await
    }

    async fn append(&self, entry: &LogEntry) -> Result<Response> {
        let out = self.log.apply_command(entry.encode()).await?;
        decode_response(&out)
            .map_err(|c| Error::with_code(c, "undecodable response from the command log"))
    }

    /// On the first request of a term this member leads, appends the takeover entry
    /// ([`LeaderView::take_over`]) before anything else is served.
    async fn take_over_if_new_leader(&self) -> Result<()> {
        // Every request passes here: a standalone log or a follower has nothing to take over.
        let Leadership::Leader { term } = self.log.leadership() else {
            return Ok(());
        };
        if self.led_term.load(Ordering::Acquire) == term {
            return Ok(());
        }
        let _one = self.takeover.lock().await;
        if self.led_term.load(Ordering::Acquire) == term {
            return Ok(());
        }
        let grace = self.log.takeover_grace().as_millis() as u64;
        let (now, first) = {
            let mut s = lock(&self.shared);
            let Shared { master, view, time } = &mut *s;
            // From here on this member stamps, continuing the log's time.
            time.take_over();
            let now = time.now(true);
            (now, view.take_over(master, now, grace))
        };
        // Reports that reached another leader meanwhile are missing here; older ones may be of
        // space granted anew since.
        self.landings.clear();
        let leased = self.append(&LogEntry::new(now, first)).await?;
        tracing::info!(
            term,
            leased = ?leased.into_count(),
            "took over as leader"
        );
        self.led_term.store(term, Ordering::Release);
        Ok(())
    }

    /// Runs `f` on the master's applied state at the current master time, under the state's
    /// lock (keep it short): inspection that changes nothing, for the admin endpoints.
    pub fn inspect<R>(&self, f: impl FnOnce(&Master, Timestamp) -> R) -> R {
        let now = self.now();
        let s = lock(&self.shared);
        f(&s.master, now)
    }

    /// Current metrics (read counters include the reads served outside the log).
    pub fn metrics(&self) -> MasterMetrics {
        let s = lock(&self.shared);
        let mut m = s.master.metrics();
        let c = s.view.counters();
        m.counters.get_requests += c.get_requests;
        m.counters.get_hits += c.get_hits;
        m.counters.get_misses += c.get_misses;
        m.counters.exist_requests += c.exist_requests;
        m.counters.leases_granted += c.leases_granted;
        m
    }

    fn start_timers(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let tick = self.config.tick;
        let handle = tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(svc) = weak.upgrade() else { return };
                if svc.not_leader().is_some() {
                    // Followers apply what the leader decides; only the leader acts on time.
                    continue;
                }
                // A new leader first gives clients a fresh TTL (its view of heartbeats is empty).
                if let Err(e) = svc.take_over_if_new_leader().await {
                    tracing::warn!("taking over as leader failed: {e}");
                    continue;
                }
                let due = {
                    let now = svc.now();
                    let mut s = lock(&svc.shared);
                    let Shared { master, view, .. } = &mut *s;
                    view.prune(master, now);
                    view.timeouts(master, now)
                };
                for command in due {
                    if let Err(e) = svc.apply(command).await {
                        tracing::warn!("applying a maintenance command failed: {e}");
                    }
                }
            }
        });
        self.tasks.lock().expect("service tasks").push(handle);
    }

    /// Serves the RPC protocol on `addr`; returns the bound address.
    pub async fn serve_rpc(self: &Arc<Self>, addr: SocketAddr) -> Result<SocketAddr> {
        self.serve_rpc_tls(addr, None).await
    }

    /// [`serve_rpc`](Self::serve_rpc), over mutual TLS when `tls` is given: every connection
    /// needs a certificate of the cluster CA, and each request a role its certificate grants
    /// (see [`required_roles`]); a refused request is answered `Failed` with `ILLEGAL_CLIENT`
    /// and the reason, and logged with the peer's name.
    pub async fn serve_rpc_tls(
        self: &Arc<Self>,
        addr: SocketAddr,
        tls: Option<TlsAcceptor>,
    ) -> Result<SocketAddr> {
        let listener = rpc::bind(addr).await?;
        let bound = listener.local_addr()?;
        let front = Arc::new(RpcFront {
            service: self.clone(),
            refusals: RefusalLog::new(),
            bindings: bindings::ClientBindings::default(),
        });
        let handle = rpc::serve_tls(listener, front, rpc::ServeLimits::default(), tls);
        self.tasks.lock().expect("service tasks").push(handle);
        Ok(bound)
    }

    /// Keeps a server task of this service, to be stopped by [`shutdown`](Self::shutdown).
    pub fn keep(&self, task: tokio::task::JoinHandle<()>) {
        self.tasks.lock().expect("service tasks").push(task);
    }

    /// Stops timers and servers (a replicated log keeps running: see
    /// [`shutdown_raft`](Self::shutdown_raft)).
    pub fn shutdown(&self) {
        for t in self.tasks.lock().expect("service tasks").drain(..) {
            t.abort();
        }
    }

    /// [`shutdown`](Self::shutdown), then stops the command log's own machinery (a Raft
    /// member's loop and transport; nothing for an in-memory log).
    pub async fn shutdown_raft(&self) {
        self.shutdown();
        self.log.shutdown().await;
    }

    /// Answers `request` of `caller` (`None`: a caller in this process).
    async fn handle(&self, request: MasterRequest, caller: Option<&Caller>) -> MasterReply {
        if let Some(leader) = self.not_leader() {
            return MasterReply::NotLeader { leader };
        }
        if self.shared.is_poisoned() {
            // A panic left the master's state half-changed: answering from it could hand out
            // wrong locations. Every request fails until the process is restarted. A group
            // member also leaves its group (its process then exits with the reason), and
            // answers NotLeader meanwhile, so its clients move to the leader the others elect.
            tracing::error!("the master's state was left inconsistent by an internal error");
            if let Some(group) = self.log.group() {
                group.abandon(
                    "the master's state was left inconsistent by a panic while serving".into(),
                );
                return MasterReply::NotLeader { leader: None };
            }
            return MasterReply::Failed {
                code: ErrorCode::INTERNAL_ERROR,
                message: "the master's state was left inconsistent by an internal error; \
                          restart it"
                    .into(),
            };
        }
        match request {
            MasterRequest::Apply(command) if command.is_maintenance() => {
                // Only this master's own timers issue these (expiries, eviction, lease grants
                // at a takeover): from a client they would expire others or lease forever.
                let shown: String = format!("{command:?}").chars().take(120).collect();
                tracing::warn!("refused a maintenance command from a client: {shown}");
                MasterReply::Failed {
                    code: ErrorCode::INVALID_PARAMS,
                    message: "maintenance commands are issued by the master itself, not by \
                              clients"
                        .into(),
                }
            }
            MasterRequest::Apply(command) => match self.apply(command).await {
                Ok((now, response)) => MasterReply::Applied { now, response },
                Err(e) => self.failure_reply(&e),
            },
            MasterRequest::QueryTask(id) => match self.read_lease().await {
                Ok(()) => MasterReply::Task(lock(&self.shared).master.query_task(id)),
                Err(e) => self.failure_reply(&e),
            },
            MasterRequest::Metrics => MasterReply::Metrics(self.metrics()),
            MasterRequest::Segments => match self.read_lease().await {
                Ok(()) => MasterReply::Segments(lock(&self.shared).master.segments()),
                Err(e) => self.failure_reply(&e),
            },
            MasterRequest::Admin(request) => admin::serve(self, request).await,
            MasterRequest::Landed {
                client_id,
                segment,
                ranges,
            } => self.landed(client_id, &segment, &ranges, caller),
            MasterRequest::CommitWhenLanded {
                command,
                segment,
                ranges,
                wait_ms,
            } => {
                if !matches!(
                    command.inner(),
                    Command::CommitReserved { .. } | Command::CommitReservedChecked { .. }
                ) {
                    return MasterReply::Failed {
                        code: ErrorCode::INVALID_PARAMS,
                        message: "only a CommitReserved waits for landed writes".into(),
                    };
                }
                let wait = Duration::from_millis(wait_ms);
                if !self.landings.wait_landed(&segment, &ranges, wait).await {
                    return MasterReply::Failed {
                        code: ErrorCode::TRANSFER_FAIL,
                        message: format!(
                            "{} writes on {segment} not reported landed within {:?}",
                            ranges.len(),
                            wait.min(crate::landing::MAX_WAIT)
                        ),
                    };
                }
                match self.apply(command).await {
                    Ok((now, response)) => MasterReply::Applied { now, response },
                    Err(e) => self.failure_reply(&e),
                }
            }
        }
    }

    /// A landing report by `reporter`: recorded when it may make it (it owns the segment, or
    /// every range lies in its own reservations: see [`Master::landing_reporter`]), else
    /// refused with `ILLEGAL_CLIENT` and nothing recorded. One lock of the master's state and
    /// a lookup per range; no log round trip.
    fn landed(
        &self,
        reporter: mooncake_master::ClientId,
        segment: &str,
        ranges: &[(u64, u64)],
        caller: Option<&Caller>,
    ) -> MasterReply {
        let allowed = lock(&self.shared)
            .master
            .landing_reporter(reporter, segment, ranges);
        let refusal = match allowed {
            Ok(_) => {
                self.landings.record(segment, ranges);
                return MasterReply::Noted;
            }
            Err(refusal) => refusal,
        };
        let message = format!(
            "landing report of {} ranges on {segment} by client {reporter} refused: {refusal}",
            ranges.len()
        );
        let peer =
            || caller.map_or_else(|| "a caller in this process".to_owned(), Caller::describe);
        match refusal {
            // Someone reporting what is not theirs (or a client the master does not know).
            mooncake_master::LandingRefusal::UnknownClient
            | mooncake_master::LandingRefusal::OthersReservation(_) => {
                self.landing_refusals
                    .refused("landing report", &peer(), &message);
            }
            // A late report: the segment went, or a writer's report came after its commit had
            // applied on the storage node's (its space is committed, no longer reserved).
            mooncake_master::LandingRefusal::UnknownSegment
            | mooncake_master::LandingRefusal::NotReserved => {
                tracing::debug!("{}: {message}", peer());
            }
        }
        MasterReply::Failed {
            code: ErrorCode::ILLEGAL_CLIENT,
            message,
        }
    }

    /// The reply for a request that failed: `NotLeader` when leadership moved while it was in
    /// flight (nothing was applied, so the client may retry at the leader), else `Failed` with
    /// its code.
    pub(crate) fn failure_reply(&self, e: &Error) -> MasterReply {
        if let Some(leader) = self.log.not_leader_hint(e) {
            return MasterReply::NotLeader { leader };
        }
        MasterReply::Failed {
            code: e.code(),
            message: e.to_string(),
        }
    }
}

impl Drop for MasterService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[async_trait]
impl MasterApi for MasterService {
    async fn call(&self, request: MasterRequest) -> Result<MasterReply> {
        Ok(self.handle(request, None).await)
    }

    /// Trusts its caller (a storage node in this process): `reporter` is not checked.
    fn note_landed(
        &self,
        _reporter: mooncake_master::ClientId,
        segment: &str,
        ranges: &[(u64, u64)],
    ) -> bool {
        if self.not_leader().is_some() {
            // The leader commits; the report must reach it (over RPC).
            return false;
        }
        self.landings.record_local(segment, ranges);
        true
    }
}

/// The roles a certificate needs for `request` on a master that requires TLS, and what the
/// request does (for the refusal's message):
///
/// - data commands (puts, gets, mounts, heartbeats, tasks, segment listings, landing reports):
///   `client` (storage nodes and clients) or `master` (members of the group);
/// - metrics: any role;
/// - listing the group's members: `admin`, or `master` (a member starting up asks the others
///   whether a group is already running);
/// - changing the group's membership: `admin` only.
///
/// Maintenance commands stay refused from every peer whatever its roles (see
/// [`MasterService`]'s handling of them).
pub fn required_roles(request: &MasterRequest) -> (&'static [Role], &'static str) {
    const DATA: &[Role] = &[Role::Client, Role::Master];
    match request {
        MasterRequest::Apply(_)
        | MasterRequest::QueryTask(_)
        | MasterRequest::Segments
        | MasterRequest::Landed { .. }
        | MasterRequest::CommitWhenLanded { .. } => (DATA, "use the store's data commands"),
        MasterRequest::Metrics => (
            &[Role::Client, Role::Master, Role::Admin],
            "read the master's metrics",
        ),
        MasterRequest::Admin(AdminRequest::Members) => (
            &[Role::Admin, Role::Master],
            "list the master group's members",
        ),
        MasterRequest::Admin(_) => (&[Role::Admin], "change the master group's membership"),
    }
}

/// The RPC server's view of the service. Holds it strongly: serving keeps the service alive
/// until [`MasterService::shutdown`] stops the server.
struct RpcFront {
    service: Arc<MasterService>,
    /// Requests refused for their peer's roles.
    refusals: RefusalLog,
    /// Over TLS, the certificate that acts for each client id.
    bindings: bindings::ClientBindings,
}

#[async_trait]
impl Handler<MasterRequest, MasterReply> for RpcFront {
    async fn handle(&self, request: MasterRequest) -> MasterReply {
        self.service.handle(request, None).await
    }

    async fn handle_from(&self, caller: &Caller, request: MasterRequest) -> MasterReply {
        // A plain connection (a master without TLS) is served as before; over TLS the
        // certificate must grant a role the request needs.
        if let Some(identity) = &caller.identity {
            let (roles, what) = required_roles(&request);
            let admitted = identity.require_any(roles, what).and_then(|()| {
                let now = std::time::Instant::now();
                bindings::claimed_clients(&request)
                    .into_iter()
                    .try_for_each(|client| self.bindings.admit(identity, client, now))
            });
            if let Err(e) = admitted {
                self.refusals
                    .refused("master rpc", &caller.describe(), &e.to_string());
                return MasterReply::Failed {
                    code: e.code(),
                    message: e.to_string(),
                };
            }
        }
        self.service.handle(request, Some(caller)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Panics in another thread while holding the master's state (what a bug in the state
    /// machine would do), leaving the lock poisoned.
    fn poison(svc: &MasterService) {
        let shared = svc.shared.clone();
        let panicked = std::thread::spawn(move || {
            let _held = shared.lock();
            panic!("a bug while changing the master's state");
        })
        .join();
        assert!(panicked.is_err());
    }
    use mooncake_master::{ClientId, HeartbeatStatus, ReplicateConfig, SegmentSpec};
    use std::sync::atomic::AtomicU64;

    /// A clock whose wall reading the test steps; monotonic time is tokio's (paused).
    #[derive(Debug)]
    struct SteppedClock(AtomicU64);

    impl Clock for SteppedClock {
        fn unix_millis(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
        fn monotonic(&self) -> tokio::time::Instant {
            tokio::time::Instant::now()
        }
    }

    async fn ok(svc: &MasterService, command: Command) -> Response {
        svc.apply(command).await.unwrap().1
    }

    #[cfg(feature = "raft")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_member_left_inconsistent_by_a_panic_leaves_its_group() {
        use mooncake_core::LogGroup;
        use mooncake_meta_raft::{NodeConfig, PeerInfo, RaftMetadataStore, StoreConfig};
        let dir = std::env::temp_dir().join(format!("mooncake-poisoned-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let voters = vec![PeerInfo {
            id: 1,
            raft_addr: "127.0.0.1:0".into(),
            service_addr: "127.0.0.1:1".into(),
        }];
        let state = MasterState::new(MasterConfig::default()).unwrap();
        let config = StoreConfig::new(NodeConfig::new(1, &dir, voters), "127.0.0.1:0");
        let store = Arc::new(
            RaftMetadataStore::start(config, state.state_machine())
                .await
                .unwrap(),
        );
        store
            .wait_for_leader(Duration::from_secs(10))
            .await
            .unwrap();
        let svc = MasterService::start(
            state,
            store.clone(),
            store.clone(),
            ServiceConfig::default(),
            Arc::new(SystemClock),
        );
        let exists = || MasterRequest::Apply(Command::ExistKey { key: "k".into() });
        assert!(matches!(
            svc.call(exists()).await.unwrap(),
            MasterReply::Applied { .. }
        ));
        poison(&svc);
        assert!(matches!(
            svc.call(exists()).await.unwrap(),
            MasterReply::NotLeader { leader: None }
        ));
        let reason = tokio::time::timeout(Duration::from_secs(10), LogGroup::failed(&*store))
            .await
            .expect("the member leaves its group");
        assert!(reason.contains("inconsistent"), "{reason}");
        assert!(!store.is_leader());
        svc.shutdown_raft().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_step_ends_no_read_lease_and_expires_no_client() {
        let clock = Arc::new(SteppedClock(AtomicU64::new(1_700_000_000_000)));
        let state = MasterState::new(MasterConfig::default()).unwrap();
        let store = Arc::new(MemoryMetadataStore::with_state_machine(
            state.state_machine(),
        ));
        let svc = MasterService::start(
            state,
            store.clone(),
            store,
            ServiceConfig::default(),
            clock.clone(),
        );
        let c = ClientId::from_parts(1, 1);
        let segment = SegmentSpec::new("h:1", 1 << 30, 1 << 24);
        let mount = Command::MountSegment {
            client_id: c,
            segment,
        };
        assert_eq!(ok(&svc, mount).await, Response::Unit(Ok(())));
        let put = Command::PutStart {
            client_id: c,
            key: "k".into(),
            size: 4096,
            config: ReplicateConfig::default(),
        };
        ok(&svc, put).await.into_put_start().unwrap();
        let end = Command::PutEnd {
            client_id: c,
            key: "k".into(),
        };
        assert_eq!(ok(&svc, end).await, Response::Unit(Ok(())));
        // A read leases "k" for the lease TTL (10 s).
        let get = Command::GetReplicaList { key: "k".into() };
        ok(&svc, get).await.into_replicas().unwrap();
        // The wall clock jumps an hour ahead; two seconds pass.
        clock.0.fetch_add(3_600_000, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let remove = Command::Remove {
            key: "k".into(),
            force: false,
        };
        assert_eq!(
            ok(&svc, remove).await,
            Response::Unit(Err(ErrorCode::OBJECT_HAS_LEASE)),
            "the step ended the read lease early"
        );
        // The client's TTL (10 s) has not run out either, timers having run meanwhile.
        assert_eq!(
            ok(&svc, Command::Heartbeat { client_id: c }).await,
            Response::Heartbeat(HeartbeatStatus::Ok)
        );
        // A step back changes nothing either: the lease ends on time.
        clock.0.fetch_sub(7_200_000, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(9)).await;
        let remove = Command::Remove {
            key: "k".into(),
            force: false,
        };
        assert_eq!(ok(&svc, remove).await, Response::Unit(Ok(())));
        svc.shutdown();
    }

    #[tokio::test]
    async fn a_state_left_inconsistent_by_a_panic_fails_requests_instead_of_panicking() {
        let svc = MasterService::new(MasterConfig::default(), ServiceConfig::default()).unwrap();
        assert!(matches!(
            svc.call(MasterRequest::Metrics).await.unwrap(),
            MasterReply::Metrics(_)
        ));
        poison(&svc);
        for request in [MasterRequest::Metrics, MasterRequest::Segments] {
            match svc.call(request).await.unwrap() {
                MasterReply::Failed { code, message } => {
                    assert_eq!(code, ErrorCode::INTERNAL_ERROR);
                    assert!(message.contains("restart"), "{message}");
                }
                other => panic!("answered from a poisoned state: {other:?}"),
            }
        }
        svc.shutdown();
    }
}
