//! Objects: the committed replica set, an in-flight write, lease and pin.

use serde::{Deserialize, Serialize};

use super::config::ReplicateConfig;
use super::lease::Pin;
use super::replica::{Replica, ReplicaStatus};
use super::types::{ClientId, LeaseDeadline, SegmentId, TaskId, Timestamp};

/// Whether a write is a put (fails on an existing key) or an upsert (replaces it).
///
/// The one spelling of the choice: the master's write state, the store client's `write_*` calls
/// (where a put of an existing key succeeds without writing, as upstream's), the dummy client's
/// wire protocol and the Python binding all take this enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WriteKind {
    /// PutStart: an existing key is left alone (`OBJECT_ALREADY_EXISTS`).
    Put,
    /// UpsertStart: new replicas replace the old ones at PutEnd.
    Upsert,
}

/// The state of an object, derived from its replicas.
///
/// ```text
///  (absent) --PutStart--> Writing --PutEnd--> Complete --UpsertStart--> Updating
///     ^                      |                   ^  |                       |
///     +------PutRevoke-------+                   |  +--Remove/Evict-> (absent)
///                                                +-------PutEnd/Revoke-------+
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ObjectState {
    /// First write in progress; nothing readable yet.
    Writing,
    /// Readable, no write in progress.
    Complete,
    /// Readable, and an upsert is writing the next value.
    Updating,
}

/// A write in progress: PROCESSING replicas owned by one client.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct PendingWrite {
    pub(crate) client: ClientId,
    pub(crate) kind: WriteKind,
    pub(crate) started_at: Timestamp,
    pub(crate) size: u64,
    pub(crate) replicas: Vec<Replica>,
    pub(crate) config: ReplicateConfig,
}

/// The master's record of one key.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Object {
    /// Size of the committed value (of the first write while it is in progress).
    pub(crate) size: u64,
    /// Committed replicas, all COMPLETE, on distinct segments.
    pub(crate) replicas: Vec<Replica>,
    /// The write in progress, if any.
    pub(crate) pending: Option<PendingWrite>,
    /// Replicas wanted (from the last committed write's config).
    pub(crate) replica_num: u32,
    /// Read lease; also the eviction age (set to the commit time at PutEnd, so objects never
    /// read are evicted in write order).
    pub(crate) lease: LeaseDeadline,
    pub(crate) pin: Pin,
    /// The unfinished copy/move task on this object, if any (at most one).
    pub(crate) task: Option<TaskId>,
    /// The client whose PutEnd committed the current value, so a retried PutEnd (its answer was
    /// lost, say in a master failover) succeeds instead of failing.
    #[serde(default)]
    pub(crate) committed_by: Option<ClientId>,
    /// The writer's checksum of the committed value (see [`ValueChecksum`](crate::ValueChecksum)),
    /// if its commit carried one. Snapshots carry it after the rest of the master (see
    /// `Master::snapshot`), so snapshots made before checksums existed still restore, their
    /// objects without one (served unverified).
    #[serde(skip)]
    pub(crate) checksum: Option<u32>,
}

impl Object {
    pub(crate) fn state(&self) -> ObjectState {
        match (self.replicas.is_empty(), self.pending.is_some()) {
            (true, _) => ObjectState::Writing,
            (false, false) => ObjectState::Complete,
            (false, true) => ObjectState::Updating,
        }
    }

    /// Whether nothing is left of the object (no committed replica, no write in progress).
    pub(crate) fn is_empty(&self) -> bool {
        self.replicas.is_empty() && self.pending.is_none()
    }

    /// Segments holding committed replicas.
    pub(crate) fn segments(&self) -> impl Iterator<Item = SegmentId> + '_ {
        self.replicas.iter().map(|r| r.segment)
    }
}

/// A read-only view of an object, for inspection (grants no lease).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// Size of the committed value in bytes.
    pub size: u64,
    /// Derived state.
    pub state: ObjectState,
    /// Status of each committed replica, then each pending one.
    pub replica_statuses: Vec<ReplicaStatus>,
    /// Replicas wanted.
    pub replica_num: u32,
    /// Current lease deadline.
    pub lease: LeaseDeadline,
    /// Pin.
    pub pin: Pin,
    /// Unfinished task, if any.
    pub task: Option<TaskId>,
    /// Kind and writer of the write in progress, if any.
    pub writing: Option<(WriteKind, ClientId)>,
}

impl From<&Object> for ObjectInfo {
    fn from(o: &Object) -> Self {
        let pending = o.pending.iter().flat_map(|p| p.replicas.iter());
        ObjectInfo {
            size: o.size,
            state: o.state(),
            replica_statuses: o.replicas.iter().chain(pending).map(|r| r.status).collect(),
            replica_num: o.replica_num,
            lease: o.lease,
            pin: o.pin,
            task: o.task,
            writing: o.pending.as_ref().map(|p| (p.kind, p.client)),
        }
    }
}
