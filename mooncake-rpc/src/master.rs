//! The master's requests and replies, the [`MasterApi`] that answers them, and [`RemoteMaster`],
//! which reaches a master (or follows the leader of a master group) over RPC.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use mooncake_core::{Error, ErrorCode, Result};
use mooncake_master::{
    ClientId, Command, MasterMetrics, Response, SegmentInfo, TaskId, TaskInfo, Timestamp,
};

use crate::admin::{AdminRequest, Members};
use crate::rpc::{RpcClient, RpcClientConfig};
use mooncake_tls::TlsConnector;

/// A request to the master.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MasterRequest {
    /// Apply a state change.
    Apply(Command),
    /// Status of a copy or move task.
    QueryTask(TaskId),
    /// Gauges and counters.
    Metrics,
    /// Mounted segments.
    Segments,
    /// Change or list the members of a Raft master group (see [`crate::admin`]).
    Admin(AdminRequest),
    /// A storage node reports WRITEs that landed in its segment (the service commits waiting puts on them).
    /// Added after `Admin`: earlier variants keep their wire tags.
    ///
    /// Only the segment's owner (the storage node that mounted it) or a writer vouching for its
    /// own WRITEs into its own reservation may report: the service accepts the report when
    /// `client_id` owns the segment, or when every range lies in unclaimed space reserved by
    /// `client_id`, and otherwise answers `Failed` (`ILLEGAL_CLIENT`) and records nothing. Over
    /// TLS, `client_id` must also be one the peer's certificate acts for.
    Landed {
        /// Who reports: the storage node's client id, or the writer's.
        client_id: ClientId,
        /// The segment written.
        segment: String,
        /// `(address, length)` of each landed WRITE or piece of one.
        ranges: Vec<(u64, u64)>,
    },
    /// Apply `command` (a `CommitReserved`) once every range of `ranges` on `segment` has been
    /// reported landed, waiting up to `wait_ms`; `Failed` with `TRANSFER_FAIL` and nothing
    /// applied when they were not.
    CommitWhenLanded {
        /// The commit.
        command: Command,
        /// Segment of the written ranges.
        segment: String,
        /// `(address, length)` of every value the commit names.
        ranges: Vec<(u64, u64)>,
        /// Longest wait, in ms (the service caps it at 2 s).
        wait_ms: u64,
    },
}

/// The master's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MasterReply {
    /// The result of an applied command, with the master time it was applied at (so clients can
    /// turn lease deadlines into durations without trusting their own clock).
    Applied {
        /// Master time of the apply.
        now: Timestamp,
        /// The result.
        response: Response,
    },
    /// A task's status.
    Task(std::result::Result<TaskInfo, ErrorCode>),
    /// Metrics.
    Metrics(MasterMetrics),
    /// Segments.
    Segments(Vec<SegmentInfo>),
    /// This master is not the leader of its group; ask `leader` (its RPC address) if known.
    NotLeader {
        /// The leader's RPC address, when this master knows it.
        leader: Option<String>,
    },
    /// The request could not be served.
    Failed {
        /// Code.
        code: ErrorCode,
        /// Why.
        message: String,
    },
    /// The membership of a Raft master group, after an admin request (added last: earlier
    /// variants keep their wire tags).
    Members(Members),
    /// A landing report was recorded.
    Noted,
}

/// Something that answers master requests: the service itself in-process, or a remote one.
#[async_trait]
pub trait MasterApi: Send + Sync + std::fmt::Debug {
    /// Sends one request.
    async fn call(&self, request: MasterRequest) -> Result<MasterReply>;

    /// Identifies where answers come from: two answers read under the same session came from the
    /// same master state, applied in order (one process, one connection). It changes whenever
    /// that may not hold (a reconnect, another master of a group). An in-process master, which
    /// lives as long as its clients, keeps one session.
    fn session(&self) -> u64 {
        0
    }

    /// Delivers a landing report at once, without waiting for a task: recorded directly by a
    /// master in this process, written straight onto the connection of a remote one. False
    /// when that is not possible now; the caller then sends a [`MasterRequest::Landed`]. A
    /// storage node sends an empty report when it starts: a master in its process then knows
    /// the segment's reports cost no network hop, and advises committing on landing there.
    /// `reporter` is the storage node's client id, which a remote master checks (see
    /// [`MasterRequest::Landed`]); a master in this process trusts its caller.
    fn note_landed(&self, _reporter: ClientId, _segment: &str, _ranges: &[(u64, u64)]) -> bool {
        false
    }
}

/// A master reached over RPC: one address, or the members of a master group
/// (`h1:p1,h2:p2,h3:p3`), in which case calls follow the leader: a `NotLeader` answer names it,
/// and an unreachable master is skipped, within [`RemoteMaster::FAILOVER_WINDOW`].
///
/// In a group, one attempt at a member lasts at most [`RemoteMaster::ATTEMPT_TIMEOUT`] (about
/// the group's election timeout), not the whole call timeout: a leader that stops answering
/// without closing its connections (paused, swapped out, its disk hung) is left for the others
/// as soon as a new leader could have been elected, and for a while hints that still name it
/// are not followed, so a frozen leader costs about what a dead one does. The attempt is left
/// running meanwhile (within the call timeout), so a leader that was only slow still gets its
/// answer through. The request is sent again as it was: a command named with a request id
/// ([`Command::Once`], see [`RequestIds`](crate::RequestIds)) is then answered with its first
/// outcome if the first attempt was applied after all.
#[derive(Debug)]
pub struct RemoteMaster {
    masters: Vec<RpcClient>,
    current: std::sync::atomic::AtomicUsize,
    /// How long one attempt at a member of a group may take.
    attempt_timeout: Duration,
    /// The member that last let an attempt time out, and until when calls avoid it.
    suspect: std::sync::Mutex<Option<(usize, tokio::time::Instant)>>,
}

impl RemoteMaster {
    /// How long a call keeps looking for a leader among several masters before it fails.
    pub const FAILOVER_WINDOW: Duration = Duration::from_secs(10);

    /// Default bound on one attempt at a member of a group: the group's election timeout
    /// (10 ticks of 100 ms), within which a leader that stopped answering starts being
    /// replaced. A command waiting for landed writes ([`MasterRequest::CommitWhenLanded`]) is
    /// given its wait on top; membership changes ([`MasterRequest::Admin`]) the whole call
    /// timeout. Never more than the call timeout.
    pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

    /// A client for the master(s) at `addresses` (`host:port`, comma-separated for a group);
    /// connects lazily. An empty list gives a client whose calls fail with `RPC_FAIL`.
    pub fn new(addresses: impl Into<String>, config: RpcClientConfig) -> Self {
        Self::with_tls(addresses, config, None)
    }

    /// [`RemoteMaster::new`], connecting to every master over mutual TLS with `tls` when given
    /// (see [`crate::rpc::tls_connector`]).
    pub fn with_tls(
        addresses: impl Into<String>,
        config: RpcClientConfig,
        tls: Option<TlsConnector>,
    ) -> Self {
        let addresses = addresses.into();
        let mut masters: Vec<RpcClient> = addresses
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| RpcClient::with_tls(a, config.clone(), tls.clone()))
            .collect();
        if masters.is_empty() {
            masters.push(RpcClient::with_tls(addresses, config.clone(), tls));
        }
        RemoteMaster {
            masters,
            current: std::sync::atomic::AtomicUsize::new(0),
            attempt_timeout: Self::ATTEMPT_TIMEOUT.min(config.call_timeout),
            suspect: std::sync::Mutex::new(None),
        }
    }

    /// This client with `timeout` as the bound on one attempt at a member of a group (default
    /// [`RemoteMaster::ATTEMPT_TIMEOUT`]; set it near the group's election timeout).
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// The address calls go to first (the last known leader).
    pub fn address(&self) -> &str {
        let i = self.current.load(Ordering::Relaxed);
        self.masters[i % self.masters.len()].address()
    }

    fn index_of(&self, address: &str) -> Option<usize> {
        self.masters.iter().position(|m| m.address() == address)
    }

    /// The bound on one attempt of `request` at a member of a group.
    fn attempt_timeout(&self, request: &MasterRequest) -> Option<Duration> {
        match request {
            MasterRequest::Admin(_) => None,
            MasterRequest::CommitWhenLanded { wait_ms, .. } => {
                Some(self.attempt_timeout + Duration::from_millis(*wait_ms))
            }
            _ => Some(self.attempt_timeout),
        }
    }

    /// The member avoided now, if any.
    fn suspected(&self) -> Option<usize> {
        let mut s = self.suspect.lock().expect("suspect lock");
        match *s {
            Some((i, until)) if tokio::time::Instant::now() < until => Some(i),
            Some(_) => {
                *s = None;
                None
            }
            None => None,
        }
    }

    /// Member `i` let an attempt time out: avoid it, and its hints, for two attempt timeouts
    /// (by then a new leader has been elected, or it answers again).
    fn suspect(&self, i: usize) {
        let until = tokio::time::Instant::now() + self.attempt_timeout * 2;
        *self.suspect.lock().expect("suspect lock") = Some((i, until));
        let n = self.masters.len();
        let _ = self
            .current
            .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Member `i` answered: it is no longer avoided.
    fn answered(&self, i: usize) {
        self.current.store(i, Ordering::Relaxed);
        let mut s = self.suspect.lock().expect("suspect lock");
        if matches!(*s, Some((j, _)) if j == i) {
            *s = None;
        }
    }

    /// The member after `i`, skipping the suspected one.
    fn after(&self, i: usize) -> usize {
        let n = self.masters.len();
        let next = (i + 1) % n;
        match self.suspected() {
            Some(s) if s == next && n > 2 => (next + 1) % n,
            _ => next,
        }
    }
}

#[async_trait]
impl MasterApi for RemoteMaster {
    fn session(&self) -> u64 {
        let i = self.current.load(Ordering::Relaxed) % self.masters.len();
        self.masters[i].connection_id()
    }

    fn note_landed(&self, reporter: ClientId, segment: &str, ranges: &[(u64, u64)]) -> bool {
        let i = self.current.load(Ordering::Relaxed) % self.masters.len();
        self.masters[i].try_send_now(&MasterRequest::Landed {
            client_id: reporter,
            segment: segment.to_owned(),
            ranges: ranges.to_vec(),
        })
    }

    async fn call(&self, request: MasterRequest) -> Result<MasterReply> {
        use futures::stream::{FuturesUnordered, StreamExt};
        let n = self.masters.len();
        if n == 1 {
            return self.masters[0].call(&request).await;
        }
        let mut i = self.current.load(Ordering::Relaxed) % n;
        if self.suspected() == Some(i) {
            i = self.after(i);
        }
        let deadline = tokio::time::Instant::now() + Self::FAILOVER_WINDOW;
        let attempt = self.attempt_timeout(&request);
        // Attempts still running, with their member: an attempt that outlived its bound is
        // left running (within the call timeout) while the next goes elsewhere, so a leader
        // that was only slow still gets its answer through.
        let mut running = FuturesUnordered::new();
        let mut tried = 0;
        loop {
            let request = &request;
            let member = &self.masters[i];
            running.push(Box::pin(async move {
                (i, member.call::<_, MasterReply>(request).await)
            }));
            let bound = async {
                match attempt {
                    Some(t) => tokio::time::sleep(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(bound);
            let outcome = loop {
                tokio::select! {
                    Some((j, outcome)) = running.next() => {
                        if j == i {
                            break Some(outcome);
                        }
                        // An earlier attempt answered late: take its answer if it is one.
                        if let Ok(reply) = outcome {
                            if !matches!(reply, MasterReply::NotLeader { .. }) {
                                self.answered(j);
                                return Ok(reply);
                            }
                        }
                    }
                    () = &mut bound => break None,
                }
            };
            let next = match outcome {
                None => {
                    tracing::debug!(
                        "master {} did not answer within {:?}",
                        self.masters[i].address(),
                        attempt
                    );
                    self.suspect(i);
                    self.after(i)
                }
                Some(Ok(MasterReply::NotLeader { leader })) => {
                    let suspected = self.suspected();
                    leader
                        .as_deref()
                        .and_then(|l| self.index_of(l))
                        // A hint naming the member that stopped answering is stale until the
                        // others have elected a new leader.
                        .filter(|&l| l != i && Some(l) != suspected)
                        .unwrap_or_else(|| self.after(i))
                }
                Some(Ok(reply)) => {
                    self.answered(i);
                    return Ok(reply);
                }
                Some(Err(e))
                    if matches!(e.code(), ErrorCode::RPC_FAIL | ErrorCode::RPC_TIMEOUT)
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!("master {} unavailable: {e}", self.masters[i].address());
                    self.after(i)
                }
                Some(Err(e)) => return Err(e),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::with_code(
                    ErrorCode::RPC_FAIL,
                    format!(
                        "no leader among {n} masters within {:?}",
                        Self::FAILOVER_WINDOW
                    ),
                ));
            }
            tried += 1;
            if tried % n == 0 {
                // A whole round without a leader: an election is probably under way.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            i = next;
        }
    }
}

/// Sends `command` and returns the applied response and master time; a `Failed` reply becomes
/// an error with its code.
pub async fn apply_via(master: &dyn MasterApi, command: Command) -> Result<(Timestamp, Response)> {
    match master.call(MasterRequest::Apply(command)).await? {
        MasterReply::Applied { now, response } => Ok((now, response)),
        MasterReply::Failed { code, message } => Err(Error::with_code(code, message)),
        other => Err(Error::Protocol(format!(
            "unexpected master reply {other:?}"
        ))),
    }
}

/// Sends `request` to the group at `masters` (`h1:p1,h2:p2,...`), following the leader (also
/// from a single address, through the hint a follower answers with).
pub async fn call_admin(masters: &str, request: AdminRequest) -> Result<Members> {
    call_admin_with(masters, request, None).await
}

/// [`call_admin`] over mutual TLS with `tls` when given: a group that requires TLS answers
/// membership changes only to a certificate with the `admin` role.
pub async fn call_admin_with(
    masters: &str,
    request: AdminRequest,
    tls: Option<TlsConnector>,
) -> Result<Members> {
    let mut target = masters.to_owned();
    for _ in 0..4 {
        let remote =
            RemoteMaster::with_tls(target.as_str(), RpcClientConfig::default(), tls.clone());
        match remote.call(MasterRequest::Admin(request.clone())).await? {
            MasterReply::Members(m) => return Ok(m),
            MasterReply::Failed { code, message } => return Err(Error::with_code(code, message)),
            MasterReply::NotLeader {
                leader: Some(leader),
            } if leader != target => target = leader,
            MasterReply::NotLeader { .. } => break,
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected master reply {other:?}"
                )))
            }
        }
    }
    Err(Error::with_code(
        ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS,
        format!(
            "no leader found from {masters} (is a majority of the group running, and are \
             these addresses current members?)"
        ),
    ))
}
