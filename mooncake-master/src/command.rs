//! The commands that change the master's state, and their responses.
//!
//! Every state change is a [`Command`]: client requests (reads too, since they grant leases) and
//! the maintenance the timeout handler asks for. Commands are plain serde data so a replicated
//! log can carry them and a fuzz target can generate them.

use serde::{Deserialize, Serialize};

use super::client::HeartbeatStatus;
use super::config::ReplicateConfig;
use super::evict::EvictionReport;
use super::get::ReplicaList;
use super::put::{PutItem, PutStartResponse};
use super::request::RequestId;
use super::reserve::{ReservationGrant, ReservedPut};
use super::segment::SegmentSpec;
use super::task::{TaskAssignment, TaskOutcome};
use super::types::{ClientId, TaskId, Timestamp};
use mooncake_core::error::ErrorCode;

/// A state change of the master. Apply with [`Master::apply`](super::Master::apply).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Mount a segment for `client_id` (idempotent for the same client and geometry).
    MountSegment {
        /// Owner.
        client_id: ClientId,
        /// The segment.
        segment: SegmentSpec,
    },
    /// Mount several segments after a reconnect (each idempotent).
    RemountSegments {
        /// Owner.
        client_id: ClientId,
        /// The segments.
        segments: Vec<SegmentSpec>,
    },
    /// Unmount a segment; replicas on it are dropped.
    UnmountSegment {
        /// Owner.
        client_id: ClientId,
        /// Segment name.
        name: String,
    },
    /// A client's liveness ping.
    Heartbeat {
        /// The client.
        client_id: ClientId,
    },
    /// Unmount a silent client's segments (from the timeout handler; no-op if it spoke since).
    ExpireClient {
        /// The client.
        client_id: ClientId,
    },
    /// Reserve replicas for a new value.
    PutStart {
        /// Writer.
        client_id: ClientId,
        /// Key.
        key: String,
        /// Value size.
        size: u64,
        /// Replication options.
        config: ReplicateConfig,
    },
    /// PutStart for several keys with one config.
    BatchPutStart {
        /// Writer.
        client_id: ClientId,
        /// Keys and sizes.
        items: Vec<PutItem>,
        /// Replication options.
        config: ReplicateConfig,
    },
    /// Reserve replicas for a value replacing the current one.
    UpsertStart {
        /// Writer.
        client_id: ClientId,
        /// Key.
        key: String,
        /// Value size.
        size: u64,
        /// Replication options.
        config: ReplicateConfig,
    },
    /// UpsertStart for several keys with one config.
    BatchUpsertStart {
        /// Writer.
        client_id: ClientId,
        /// Keys and sizes.
        items: Vec<PutItem>,
        /// Replication options.
        config: ReplicateConfig,
    },
    /// Commit a write (put or upsert).
    PutEnd {
        /// Writer.
        client_id: ClientId,
        /// Key.
        key: String,
    },
    /// Commit several writes.
    BatchPutEnd {
        /// Writer.
        client_id: ClientId,
        /// Keys.
        keys: Vec<String>,
    },
    /// Abandon a write and free its replicas.
    PutRevoke {
        /// Writer.
        client_id: ClientId,
        /// Key.
        key: String,
    },
    /// Abandon several writes.
    BatchPutRevoke {
        /// Writer.
        client_id: ClientId,
        /// Keys.
        keys: Vec<String>,
    },
    /// Free an abandoned write (from the timeout handler).
    ReclaimPut {
        /// Key.
        key: String,
    },
    /// Read locations of a value; grants a lease.
    GetReplicaList {
        /// Key.
        key: String,
    },
    /// GetReplicaList for several keys.
    BatchGetReplicaList {
        /// Keys.
        keys: Vec<String>,
    },
    /// Whether a value exists; grants a lease if so.
    ExistKey {
        /// Key.
        key: String,
    },
    /// ExistKey for several keys.
    BatchExistKey {
        /// Keys.
        keys: Vec<String>,
    },
    /// Remove one object.
    Remove {
        /// Key.
        key: String,
        /// Remove even if leased or busy.
        force: bool,
    },
    /// Remove several objects.
    BatchRemove {
        /// Keys.
        keys: Vec<String>,
        /// Remove even if leased or busy.
        force: bool,
    },
    /// Remove objects whose key matches a regex (search semantics).
    RemoveByRegex {
        /// Regex (Rust `regex` syntax).
        pattern: String,
        /// Remove even if leased or busy.
        force: bool,
    },
    /// Remove every object.
    RemoveAll {
        /// Remove even if leased or busy.
        force: bool,
    },
    /// Run eviction if needed (from the timeout handler).
    Evict,
    /// One eviction run over keys the leader chose with
    /// [`Master::eviction_plan`](super::Master::eviction_plan) (what [`Command::Evict`] becomes
    /// when reads are served outside the log).
    EvictKeys {
        /// Victims, in eviction order.
        keys: Vec<String>,
        /// Bytes the run aims to free.
        target_bytes: u64,
    },
    /// Lease every readable object as if read at `read_at`: a new leader's first entry, so
    /// reads its predecessor served outside the log stay protected.
    LeaseAll {
        /// The read time granted.
        read_at: Timestamp,
    },
    /// Free retired ranges whose lease ended (from the timeout handler).
    ReleaseRetired,
    /// Copy an object to more segments.
    CreateCopyTask {
        /// Key.
        key: String,
        /// Target segment names.
        targets: Vec<String>,
    },
    /// Move one replica of an object.
    CreateMoveTask {
        /// Key.
        key: String,
        /// Segment holding the replica to move.
        source: String,
        /// Segment to move it to.
        target: String,
    },
    /// Take up to `max` pending tasks this client can execute.
    FetchTasks {
        /// Executor.
        client_id: ClientId,
        /// Most tasks to take.
        max: u32,
    },
    /// Report a fetched task's outcome.
    FinishTask {
        /// Executor.
        client_id: ClientId,
        /// Task.
        task_id: TaskId,
        /// Outcome.
        outcome: TaskOutcome,
    },
    /// Count a task held too long as failed (from the timeout handler).
    TaskTimeout {
        /// Task.
        task_id: TaskId,
    },
    /// Forget finished tasks past retention (from the timeout handler).
    PurgeTasks,
    /// Reserve a range this client fills before committing (see
    /// [`ReservationGrant`]): `size` bytes, or less but at least `min_size`.
    Reserve {
        /// The client.
        client_id: ClientId,
        /// Bytes wanted.
        size: u64,
        /// Fewest bytes that are of use.
        min_size: u64,
    },
    /// Commit values written into a reservation as single-replica objects (put semantics).
    CommitReserved {
        /// The client holding the reservation.
        client_id: ClientId,
        /// The reservation.
        reservation: u64,
        /// Where each value was written.
        items: Vec<ReservedPut>,
        /// Replication options (`replica_num` must be 1; pins apply).
        config: ReplicateConfig,
    },
    /// Free the unclaimed space of expired reservations (from the timeout handler).
    ExpireReservations,
    /// Heartbeats a leader answered outside the log, recorded in the replicated state (from the
    /// leader's timer, every half TTL or so): each client's last time, for known clients. A
    /// later leader then knows who was alive, and a client that died is not given a new TTL by
    /// every change of leader. Added last: earlier variants keep their wire tags.
    ClientsHeard {
        /// `(client, when last heard)`.
        heard: Vec<(ClientId, Timestamp)>,
    },
    /// `command` applied at most once for `id`: a repeat of `id` (a retry whose first answer
    /// was lost, say in a failover) is answered with the first response, applying nothing (see
    /// [`RequestId`]). The response is `command`'s own. A repeat of `id` with another command,
    /// and a `Once` inside a `Once` (undecodable from bytes), are refused with
    /// `Unit(Err(INVALID_PARAMS))`. Added last: earlier variants keep their wire tags.
    Once {
        /// The request's id.
        id: RequestId,
        /// Every request of `id.client` with a lower sequence number has been answered: the
        /// master forgets their outcomes (0: says nothing).
        done_below: u64,
        /// The command.
        #[serde(deserialize_with = "super::request::deserialize_inner")]
        command: Box<Command>,
    },
    /// Place again the replicas of `client_id`'s writes in progress on `keys` that lie on the
    /// segments named in `failed` (a WRITE to them failed): their ranges are freed and as many
    /// new ranges are placed on other segments (none of `failed`, none holding a replica of the
    /// write). Per key ([`Response::PutStartBatch`]): the new replicas to write, PROCESSING
    /// (none when no other segment has room: the write then commits with fewer replicas, as a
    /// PutStart that found fewer segments does); `NO_AVAILABLE_HANDLE` when the write has no
    /// replica left (it is revoked); the PutEnd errors for a key with no write of this client
    /// in progress. Added last: earlier variants keep their wire tags.
    ReplaceReplicas {
        /// The writer.
        client_id: ClientId,
        /// Keys of its writes in progress.
        keys: Vec<String>,
        /// Names of the segments whose WRITEs failed.
        failed: Vec<String>,
    },
    /// [`Command::PutEnd`] recording the value's checksum ([`ValueChecksum`](super::ValueChecksum))
    /// with the object; readers get it with the replica list and verify the bytes. Added after
    /// the others: earlier variants keep their wire tags, and logs written before it decode as
    /// they were.
    PutEndChecked {
        /// Writer.
        client_id: ClientId,
        /// Key.
        key: String,
        /// Checksum of the value.
        checksum: u32,
    },
    /// [`Command::BatchPutEnd`] with one checksum per key (see [`Command::PutEndChecked`]); a
    /// batch whose counts differ is refused item by item with `INVALID_PARAMS`.
    BatchPutEndChecked {
        /// Writer.
        client_id: ClientId,
        /// Keys.
        keys: Vec<String>,
        /// Checksum of each key's value, in order.
        checksums: Vec<u32>,
    },
    /// [`Command::CommitReserved`] with one checksum per item (see [`Command::PutEndChecked`]);
    /// a commit whose counts differ is refused item by item with `INVALID_PARAMS`.
    CommitReservedChecked {
        /// The client holding the reservation.
        client_id: ClientId,
        /// The reservation.
        reservation: u64,
        /// Where each value was written.
        items: Vec<ReservedPut>,
        /// Replication options (`replica_num` must be 1; pins apply).
        config: ReplicateConfig,
        /// Checksum of each item's value, in order.
        checksums: Vec<u32>,
    },
}

impl Command {
    /// Whether a client should name this command with a [`RequestId`] ([`Command::Once`]): it
    /// changes state such that a repeat could answer differently or change more. False for
    /// reads and heartbeats (answered again as they are), maintenance and a `Once`.
    pub fn wants_request_id(&self) -> bool {
        !self.is_maintenance()
            && !matches!(
                self,
                Command::Heartbeat { .. }
                    | Command::GetReplicaList { .. }
                    | Command::BatchGetReplicaList { .. }
                    | Command::ExistKey { .. }
                    | Command::BatchExistKey { .. }
                    | Command::Once { .. }
            )
    }

    /// The command itself, looking through a [`Command::Once`].
    pub fn inner(&self) -> &Command {
        match self {
            Command::Once { command, .. } => command,
            other => other,
        }
    }

    /// Whether the timeout handler emits this command (as opposed to a client request).
    pub fn is_maintenance(&self) -> bool {
        if let Command::Once { command, .. } = self {
            return command.is_maintenance();
        }
        matches!(
            self,
            Command::ExpireClient { .. }
                | Command::ReclaimPut { .. }
                | Command::Evict
                | Command::EvictKeys { .. }
                | Command::LeaseAll { .. }
                | Command::ReleaseRetired
                | Command::TaskTimeout { .. }
                | Command::PurgeTasks
                | Command::ExpireReservations
                | Command::ClientsHeard { .. }
        )
    }
}

/// The result of applying a [`Command`]; the variant follows the command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Mount, unmount, expire, put end/revoke, reclaim, remove, finish/timeout task.
    Unit(Result<(), ErrorCode>),
    /// Remount, batch put end/revoke, batch remove: one result per item.
    UnitBatch(Vec<Result<(), ErrorCode>>),
    /// Heartbeat.
    Heartbeat(HeartbeatStatus),
    /// PutStart, UpsertStart.
    PutStart(Result<PutStartResponse, ErrorCode>),
    /// Batch put/upsert start: one result per item.
    PutStartBatch(Vec<Result<PutStartResponse, ErrorCode>>),
    /// GetReplicaList.
    Replicas(Result<ReplicaList, ErrorCode>),
    /// BatchGetReplicaList: one result per key.
    ReplicasBatch(Vec<Result<ReplicaList, ErrorCode>>),
    /// ExistKey.
    Exists(bool),
    /// BatchExistKey: one answer per key.
    ExistsBatch(Vec<bool>),
    /// RemoveByRegex, RemoveAll, ReleaseRetired, PurgeTasks, LeaseAll: how many.
    Count(Result<u64, ErrorCode>),
    /// Evict, EvictKeys.
    Evicted(EvictionReport),
    /// CreateCopyTask, CreateMoveTask.
    TaskCreated(Result<TaskId, ErrorCode>),
    /// FetchTasks.
    Tasks(Vec<TaskAssignment>),
    /// Reserve.
    Reserved(Result<ReservationGrant, ErrorCode>),
}

impl Response {
    /// The code of a single-result response (`OK` on success); `OK` for batch and informational
    /// responses, whose items carry their own results.
    pub fn code(&self) -> ErrorCode {
        fn of<T>(r: &Result<T, ErrorCode>) -> ErrorCode {
            r.as_ref().err().copied().unwrap_or(ErrorCode::OK)
        }
        match self {
            Response::Unit(r) => of(r),
            Response::PutStart(r) => of(r),
            Response::Replicas(r) => of(r),
            Response::Count(r) => of(r),
            Response::TaskCreated(r) => of(r),
            Response::Reserved(r) => of(r),
            Response::UnitBatch(_)
            | Response::Heartbeat(_)
            | Response::PutStartBatch(_)
            | Response::ReplicasBatch(_)
            | Response::Exists(_)
            | Response::ExistsBatch(_)
            | Response::Evicted(_)
            | Response::Tasks(_) => ErrorCode::OK,
        }
    }

    /// The unit result, or `INTERNAL_ERROR` for another variant.
    pub fn into_unit(self) -> Result<(), ErrorCode> {
        match self {
            Response::Unit(r) => r,
            _ => Err(ErrorCode::INTERNAL_ERROR),
        }
    }

    /// The PutStart result, or `INTERNAL_ERROR` for another variant.
    pub fn into_put_start(self) -> Result<PutStartResponse, ErrorCode> {
        match self {
            Response::PutStart(r) => r,
            _ => Err(ErrorCode::INTERNAL_ERROR),
        }
    }

    /// The GetReplicaList result, or `INTERNAL_ERROR` for another variant.
    pub fn into_replicas(self) -> Result<ReplicaList, ErrorCode> {
        match self {
            Response::Replicas(r) => r,
            _ => Err(ErrorCode::INTERNAL_ERROR),
        }
    }

    /// The count, or `INTERNAL_ERROR` for another variant.
    pub fn into_count(self) -> Result<u64, ErrorCode> {
        match self {
            Response::Count(r) => r,
            _ => Err(ErrorCode::INTERNAL_ERROR),
        }
    }

    /// The created task's id, or `INTERNAL_ERROR` for another variant.
    pub fn into_task_id(self) -> Result<TaskId, ErrorCode> {
        match self {
            Response::TaskCreated(r) => r,
            _ => Err(ErrorCode::INTERNAL_ERROR),
        }
    }
}
