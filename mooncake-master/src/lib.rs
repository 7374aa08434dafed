//! The Mooncake Store master as a sans-IO state machine.
//!
//! The master keeps metadata only: mounted segments and their allocators, objects and where
//! their replicas are, read leases, pins, copy/move tasks and client liveness. It never touches
//! object bytes, owns no sockets, reads no clock and draws no entropy: time is an argument and
//! randomness comes from a generator seeded by [`MasterConfig::rng_seed`] whose state is part of
//! the master's state. So [`Master::apply`] is deterministic in (state, `now`, command), which is
//! what a replicated log needs; the RPC server, a Raft apply loop and the tests all drive the same
//! object.
//!
//! Driving it:
//! - every state change is a [`Command`], applied with [`Master::apply`];
//! - [`Master::handle_timeout`] looks at the clock and returns the maintenance commands that are
//!   due (expire silent clients, reclaim abandoned puts, evict, free retired ranges, time out
//!   tasks); the driver applies them (through the log, when replicated), and
//!   [`Master::next_timeout`] says when to call it again;
//! - behind a replicated command log, [`LogEntry`] (command + time) is the log's unit and the
//!   master implements [`StateMachine`](mooncake_core::metadata::StateMachine);
//! - reads and heartbeats can be answered outside the log by whoever appends to it, with a
//!   [`LeaderView`] recording what they changed and carrying it into the entries that depend on
//!   it;
//! - queries that change nothing ([`Master::query_task`], [`Master::metrics`],
//!   [`Master::segments`], [`Master::object`]) are plain methods.
//!
//! Choices where upstream is silent or where this master does better, behind the same API:
//! - replicas go to distinct hosts whenever enough hosts have room (upstream: distinct segments);
//! - replicas lost with a segment are re-replicated by copy tasks
//!   ([`MasterConfig::enable_rereplication`]);
//! - ranges dropped while a read lease covers them (upsert, move, forced removal) stay reserved
//!   until the lease ends, so a reader never sees its bytes overwritten mid-transfer;
//! - PutEnd/PutRevoke must come from the writing client, so a writer that was taken over cannot
//!   commit someone else's half-written replicas.
//!
//! [`Master::handle_timeout`] and [`Master::next_timeout`] scan clients and tasks and find
//! abandoned writes through an index by start time (they do not visit every object); call them
//! on a timer (every 100 ms to 1 s), not per request.
//!
//! Its whole state, per-segment [`RangeAllocator`]s included, serializes (the log's snapshots).
//! It does not do disk replicas (the descriptor has room for them) or the RPC layer.
//!
//! ```
//! use mooncake_master::*;
//! let mut m = Master::new(MasterConfig::default()).unwrap();
//! let client = ClientId(1);
//! let t0 = Timestamp::from_millis(0);
//! m.apply(t0, Command::MountSegment {
//!     client_id: client,
//!     segment: SegmentSpec::new("10.0.0.1:7000", 0x1000_0000, 1 << 20),
//! }).into_unit().unwrap();
//! let put = m.apply(t0, Command::PutStart {
//!     client_id: client, key: "k".into(), size: 4096, config: ReplicateConfig::default(),
//! }).into_put_start().unwrap();
//! assert_eq!(put.replicas[0].status, ReplicaStatus::Processing);
//! // ... the client writes the bytes through the transfer engine ...
//! m.apply(t0, Command::PutEnd { client_id: client, key: "k".into() }).into_unit().unwrap();
//! let got = m.apply(t0, Command::GetReplicaList { key: "k".into() }).into_replicas().unwrap();
//! assert_eq!(got.replicas[0].memory().unwrap().buffer_address, put.replicas[0].memory().unwrap().buffer_address);
//! assert_eq!(got.lease.0, Timestamp::from_millis(10_000));
//! ```

#![deny(unsafe_code)]

mod checksum;
mod client;
mod command;
mod config;
mod evict;
mod get;
mod invariants;
mod leader;
mod lease;
mod log;
mod metrics;
mod object;
mod placement;
mod put;
mod remove;
mod replica;
mod request;
mod reserve;
mod segment;
mod task;
mod types;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

pub use checksum::ValueChecksum;
pub use client::HeartbeatStatus;
pub use command::{Command, Response};
pub use config::{AllocationStrategy, MasterConfig, ReplicateConfig, SoftPinAction};
pub use evict::EvictionReport;
pub use get::ReplicaList;
pub use leader::{LeaderView, Proposal, Route, Ticket};
pub use lease::Pin;
pub use log::{decode_response, LogEntry};
pub use metrics::{Counters, MasterMetrics};
pub use object::{ObjectInfo, ObjectState, WriteKind};
pub use put::{PutItem, PutStartResponse};
pub use replica::{
    DiskDescriptor, MemoryDescriptor, ReplicaDescriptor, ReplicaLocation, ReplicaStatus,
};
pub use request::{RequestId, REQUESTS_PER_CLIENT, REQUEST_MEMORY_MS, REQUEST_MEMORY_WEIGHT};
pub use reserve::{
    LandingRefusal, LandingReporter, ReservationGrant, ReservedPut, MAX_RESERVATIONS_PER_CLIENT,
    MAX_UNCLAIMED_GRANTS_PER_CLIENT, RESERVATION_SHARE_DIVISOR,
};
pub use segment::{SegmentDetail, SegmentInfo, SegmentSpec};
pub use task::{TaskAssignment, TaskInfo, TaskOrigin, TaskOutcome, TaskStatus, TaskType};
pub use types::{
    host_of, ClientId, LeaseDeadline, ParseIdError, ReplicaId, SegmentId, SplitMix64, TaskId,
    Timestamp,
};

use mooncake_core::error::{ErrorCode, Result};
#[cfg(doc)]
use mooncake_core::RangeAllocator;
use object::Object;

/// The master's state. See the [module docs](self).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Master {
    config: MasterConfig,
    rng: SplitMix64,
    /// Latest time seen; `apply` never lets time go backwards.
    now: Timestamp,
    /// Time of the first command this state applied: when a master that lost its state (a
    /// restart without a replicated log) began again.
    #[serde(default)]
    born: Option<Timestamp>,
    segments: BTreeMap<SegmentId, segment::Segment>,
    segment_names: BTreeMap<String, SegmentId>,
    clients: BTreeMap<ClientId, client::ClientEntry>,
    objects: BTreeMap<String, Object>,
    tasks: BTreeMap<TaskId, task::Task>,
    /// Keys that lost replicas and may need re-replication.
    under_replicated: BTreeSet<String>,
    /// Writes in progress as `(started at, key)`, so the timeout handler finds abandoned ones
    /// without scanning every object. Derived from `objects` (rebuilt on restore).
    #[serde(skip)]
    writes: BTreeSet<(Timestamp, String)>,
    /// Client-held reservations by id (see [`reserve`](self::reserve)).
    #[serde(default)]
    reservations: BTreeMap<u64, reserve::Reservation>,
    /// The unclaimed pieces of `reservations` by `(segment, offset)`, each with its
    /// reservation's id, so the reservation an address lies in is found without scanning them
    /// (see [`Master::landing_reporter`]). Derived from `reservations` (rebuilt on restore).
    #[serde(skip)]
    reserved_pieces: BTreeMap<(SegmentId, u64), u64>,
    #[serde(default)]
    next_reservation_id: u64,
    next_segment_id: u64,
    next_replica_id: u64,
    next_task_seq: u64,
    /// A PutStart found no space since the last eviction run.
    eviction_requested: bool,
    last_eviction: Option<Timestamp>,
    counters: Counters,
    /// Outcomes of requests named with an id, for their retries (see [`request`](self::request)).
    /// Snapshots carry it after the rest of the master (see `Master::snapshot`), so snapshots
    /// made before it existed still restore.
    #[serde(skip)]
    requests: request::Remembered,
}

impl Master {
    /// A master with no segments, after checking `config`.
    pub fn new(config: MasterConfig) -> Result<Self> {
        config.validate()?;
        Ok(Master {
            rng: SplitMix64::new(config.rng_seed),
            config,
            now: Timestamp::ZERO,
            born: None,
            segments: BTreeMap::new(),
            segment_names: BTreeMap::new(),
            clients: BTreeMap::new(),
            objects: BTreeMap::new(),
            tasks: BTreeMap::new(),
            under_replicated: BTreeSet::new(),
            writes: BTreeSet::new(),
            reservations: BTreeMap::new(),
            reserved_pieces: BTreeMap::new(),
            next_reservation_id: 1,
            next_segment_id: 1,
            next_replica_id: 1,
            next_task_seq: 0,
            eviction_requested: false,
            last_eviction: None,
            counters: Counters::default(),
            requests: request::Remembered::default(),
        })
    }

    /// PutStart for each item; a key repeated within the batch is refused as an existing key
    /// (`OBJECT_ALREADY_EXISTS` for a put, `OBJECT_REPLICA_BUSY` for an upsert), so one batch never
    /// writes two values into one reservation.
    fn batch_put_start(
        &mut self,
        now: Timestamp,
        client: ClientId,
        items: &[PutItem],
        config: &ReplicateConfig,
        kind: WriteKind,
    ) -> Vec<Result<PutStartResponse, ErrorCode>> {
        let mut seen = BTreeSet::new();
        items
            .iter()
            .map(|i| {
                if !seen.insert(i.key.as_str()) {
                    return Err(match kind {
                        WriteKind::Put => ErrorCode::OBJECT_ALREADY_EXISTS,
                        WriteKind::Upsert => ErrorCode::OBJECT_REPLICA_BUSY,
                    });
                }
                self.put_start(now, client, &i.key, i.size, config, kind)
            })
            .collect()
    }

    /// The configuration.
    pub fn config(&self) -> &MasterConfig {
        &self.config
    }

    /// The latest time `apply` has seen.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Applies one command at time `now` and returns its result. Deterministic in (state, `now`,
    /// command). A `now` earlier than one already seen is treated as the latest time seen, so
    /// time never goes backwards inside the state.
    pub fn apply(&mut self, now: Timestamp, command: Command) -> Response {
        let now = now.max(self.now);
        self.now = now;
        self.born.get_or_insert(now);
        match command {
            Command::MountSegment { client_id, segment } => {
                Response::Unit(self.mount_segment(now, client_id, segment, false))
            }
            Command::RemountSegments {
                client_id,
                segments,
            } => Response::UnitBatch(self.remount_segments(now, client_id, segments)),
            Command::Reserve {
                client_id,
                size,
                min_size,
            } => Response::Reserved(self.reserve(now, client_id, size, min_size)),
            Command::CommitReserved {
                client_id,
                reservation,
                items,
                config,
            } => Response::UnitBatch(self.commit_reserved(
                now,
                client_id,
                reservation,
                &items,
                &config,
                None,
            )),
            Command::CommitReservedChecked {
                client_id,
                reservation,
                items,
                config,
                checksums,
            } => Response::UnitBatch(self.commit_reserved(
                now,
                client_id,
                reservation,
                &items,
                &config,
                Some(&checksums),
            )),
            Command::ExpireReservations => Response::Count(Ok(self.expire_reservations(now))),
            Command::ClientsHeard { heard } => {
                for (client, at) in heard {
                    if let Some(c) = self.clients.get_mut(&client) {
                        // Never later than the entry's own time: a record cannot vouch for
                        // the future.
                        c.last_seen = c.last_seen.max(at.min(now));
                    }
                }
                Response::Unit(Ok(()))
            }
            Command::UnmountSegment { client_id, name } => {
                Response::Unit(self.unmount_segment(now, client_id, &name))
            }
            Command::Heartbeat { client_id } => Response::Heartbeat(self.heartbeat(now, client_id)),
            Command::ExpireClient { client_id } => {
                Response::Unit(self.expire_client(now, client_id))
            }
            Command::PutStart {
                client_id,
                key,
                size,
                config,
            } => Response::PutStart(self.put_start(
                now,
                client_id,
                &key,
                size,
                &config,
                WriteKind::Put,
            )),
            Command::UpsertStart {
                client_id,
                key,
                size,
                config,
            } => Response::PutStart(self.put_start(
                now,
                client_id,
                &key,
                size,
                &config,
                WriteKind::Upsert,
            )),
            Command::BatchPutStart {
                client_id,
                items,
                config,
            } => Response::PutStartBatch(self.batch_put_start(
                now,
                client_id,
                &items,
                &config,
                WriteKind::Put,
            )),
            Command::BatchUpsertStart {
                client_id,
                items,
                config,
            } => Response::PutStartBatch(self.batch_put_start(
                now,
                client_id,
                &items,
                &config,
                WriteKind::Upsert,
            )),
            Command::PutEnd { client_id, key } => {
                Response::Unit(self.put_end(now, client_id, &key, None))
            }
            Command::PutEndChecked {
                client_id,
                key,
                checksum,
            } => Response::Unit(self.put_end(now, client_id, &key, Some(checksum))),
            Command::BatchPutEnd { client_id, keys } => Response::UnitBatch(
                keys.iter()
                    .map(|k| self.put_end(now, client_id, k, None))
                    .collect(),
            ),
            Command::BatchPutEndChecked {
                client_id,
                keys,
                checksums,
            } => Response::UnitBatch(if keys.len() == checksums.len() {
                keys.iter()
                    .zip(checksums)
                    .map(|(k, c)| self.put_end(now, client_id, k, Some(c)))
                    .collect()
            } else {
                vec![Err(ErrorCode::INVALID_PARAMS); keys.len()]
            }),
            Command::PutRevoke { client_id, key } => {
                Response::Unit(self.put_revoke(now, client_id, &key))
            }
            Command::BatchPutRevoke { client_id, keys } => Response::UnitBatch(
                keys.iter()
                    .map(|k| self.put_revoke(now, client_id, k))
                    .collect(),
            ),
            Command::ReclaimPut { key } => Response::Unit(self.reclaim_put(now, &key)),
            Command::ReplaceReplicas {
                client_id,
                keys,
                failed,
            } => {
                let failed = (failed.iter())
                    .filter_map(|name| self.segment_names.get(name).copied())
                    .collect();
                Response::PutStartBatch(
                    keys.iter()
                        .map(|k| self.replace_replicas(now, client_id, k, &failed))
                        .collect(),
                )
            }
            Command::GetReplicaList { key } => Response::Replicas(self.get_replica_list(now, &key)),
            Command::BatchGetReplicaList { keys } => Response::ReplicasBatch(
                keys.iter().map(|k| self.get_replica_list(now, k)).collect(),
            ),
            Command::ExistKey { key } => Response::Exists(self.exist_key(now, &key)),
            Command::BatchExistKey { keys } => {
                Response::ExistsBatch(keys.iter().map(|k| self.exist_key(now, k)).collect())
            }
            Command::Remove { key, force } => Response::Unit(self.remove(now, &key, force)),
            Command::BatchRemove { keys, force } => {
                Response::UnitBatch(keys.iter().map(|k| self.remove(now, k, force)).collect())
            }
            Command::RemoveByRegex { pattern, force } => {
                Response::Count(self.remove_by_regex(now, &pattern, force))
            }
            Command::RemoveAll { force } => Response::Count(Ok(self.remove_all(now, force))),
            Command::Evict => Response::Evicted(self.evict(now)),
            Command::EvictKeys { keys, target_bytes } => {
                Response::Evicted(self.evict_keys(now, &keys, target_bytes))
            }
            Command::LeaseAll { read_at } => Response::Count(Ok(self.lease_all(read_at))),
            Command::ReleaseRetired => Response::Count(Ok(self.release_retired(now))),
            Command::CreateCopyTask { key, targets } => {
                Response::TaskCreated(self.create_copy_task(now, &key, targets))
            }
            Command::CreateMoveTask {
                key,
                source,
                target,
            } => Response::TaskCreated(self.create_move_task(now, &key, source, target)),
            Command::FetchTasks { client_id, max } => {
                Response::Tasks(self.fetch_tasks(now, client_id, max))
            }
            Command::FinishTask {
                client_id,
                task_id,
                outcome,
            } => Response::Unit(self.finish_task(now, client_id, task_id, outcome)),
            Command::TaskTimeout { task_id } => Response::Unit(self.task_timeout(now, task_id)),
            Command::PurgeTasks => Response::Count(Ok(self.purge_tasks(now))),
            Command::Once {
                id,
                done_below,
                command,
            } => self.apply_once(now, id, done_below, *command),
        }
    }

    /// Applies `command` unless `id` was applied before, in which case the first response is
    /// the answer (as far as what it hands out is still held: see
    /// [`request`](self::request)).
    fn apply_once(
        &mut self,
        now: Timestamp,
        id: RequestId,
        done_below: u64,
        command: Command,
    ) -> Response {
        if matches!(command, Command::Once { .. }) {
            return Response::Unit(Err(ErrorCode::INVALID_PARAMS));
        }
        self.requests.forget_done(now, id.client, done_below);
        let fingerprint = request::fingerprint(&command);
        if let Some((first_command, first)) = self.requests.get(id) {
            if first_command != fingerprint {
                // The id was used for another command: a client's mistake, never applied.
                return Response::Unit(Err(ErrorCode::INVALID_PARAMS));
            }
            if let Some(again) = self.replayable(now, &command, first) {
                self.counters.requests_answered_again += 1;
                return again;
            }
        }
        let response = self.apply(now, command);
        self.requests
            .remember(now, id, fingerprint, response.clone());
        response
    }

    /// How many request outcomes are remembered for retries, and their weight (see
    /// [`RequestId`]).
    pub fn remembered_requests(&self) -> (usize, u64) {
        self.requests.size()
    }

    /// The maintenance commands due at `now`, in the order they should be applied: client
    /// expiry, abandoned-put reclaim, retired-range release, reservation expiry, task timeouts
    /// and purge, eviction.
    /// Changes nothing; each command re-checks its condition when applied, so applying a stale
    /// one is harmless.
    pub fn handle_timeout(&self, now: Timestamp) -> Vec<Command> {
        let mut out = Vec::new();
        for (&client_id, c) in &self.clients {
            if c.last_seen.plus(self.config.client_ttl_ms) <= now {
                out.push(Command::ExpireClient { client_id });
            }
        }
        for (_, key) in self.reclaim_deadlines().take_while(|(t, _)| *t <= now) {
            out.push(Command::ReclaimPut { key: key.clone() });
        }
        if self.next_retired_release().is_some_and(|t| t <= now) {
            out.push(Command::ReleaseRetired);
        }
        if self.next_reservation_expiry().is_some_and(|t| t <= now) {
            out.push(Command::ExpireReservations);
        }
        let mut purge = false;
        for t in self.tasks.values() {
            if t.status == TaskStatus::Processing
                && t.updated_at.plus(self.config.task_timeout_ms) <= now
            {
                out.push(Command::TaskTimeout { task_id: t.id });
            }
            purge |=
                t.status.is_terminal() && t.updated_at.plus(self.config.task_retention_ms) <= now;
        }
        if purge {
            out.push(Command::PurgeTasks);
        }
        if self.next_eviction().is_some_and(|t| t <= now) {
            out.push(Command::Evict);
        }
        out
    }

    /// The earliest time [`handle_timeout`](Self::handle_timeout) will have something to do, if
    /// any.
    pub fn next_timeout(&self) -> Option<Timestamp> {
        let clients = self
            .clients
            .values()
            .map(|c| c.last_seen.plus(self.config.client_ttl_ms));
        let puts = self.reclaim_deadlines().map(|(t, _)| t).next();
        let tasks = self.tasks.values().filter_map(|t| match t.status {
            TaskStatus::Processing => Some(t.updated_at.plus(self.config.task_timeout_ms)),
            TaskStatus::Failed | TaskStatus::Success => {
                Some(t.updated_at.plus(self.config.task_retention_ms))
            }
            TaskStatus::Pending => None,
        });
        clients
            .chain(puts)
            .chain(tasks)
            .chain(self.next_retired_release())
            .chain(self.next_reservation_expiry())
            .chain(self.next_eviction())
            .min()
    }

    /// A task's state, as `query_task` reports it; `TASK_NOT_FOUND` for an unknown id.
    pub fn query_task(&self, id: TaskId) -> std::result::Result<TaskInfo, ErrorCode> {
        self.task_info(id)
    }

    /// The mounted segments, by id.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.segments.values().map(segment::Segment::info).collect()
    }

    /// An object's state, without granting a lease.
    pub fn object(&self, key: &str) -> Option<ObjectInfo> {
        self.objects.get(key).map(ObjectInfo::from)
    }

    /// Keys of all objects, in order.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.objects.keys().map(String::as_str)
    }

    /// Keys of all objects after `after` (all without it), in order: a page of a listing,
    /// found without walking the keys before it.
    pub fn keys_after<'a>(&'a self, after: Option<&str>) -> impl Iterator<Item = &'a str> + 'a {
        use std::ops::Bound;
        let start = match after {
            Some(a) => Bound::Excluded(a.to_owned()),
            None => Bound::Unbounded,
        };
        self.objects
            .range::<String, _>((start, Bound::Unbounded))
            .map(|(k, _)| k.as_str())
    }

    /// Known clients and when each was last heard from.
    pub fn clients(&self) -> Vec<(ClientId, Timestamp)> {
        self.clients
            .iter()
            .map(|(id, c)| (*id, c.last_seen))
            .collect()
    }
}
