//! Replicas: their lifecycle ([`ReplicaStatus`]) and how clients see them ([`ReplicaDescriptor`]).

use serde::{Deserialize, Serialize};

use super::types::{ReplicaId, SegmentId};
use mooncake_core::allocator::Allocation;
use mooncake_core::error::ErrorCode;

/// Lifecycle of one replica, with upstream's numeric values.
///
/// ```text
/// UNDEFINED -> INITIALIZED -> PROCESSING -> COMPLETE -> REMOVED
///                    |             |------> FAILED ----^
///                    +-------------+------> REMOVED
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum ReplicaStatus {
    /// Not yet set up (`UNDEFINED` = 0).
    Undefined = 0,
    /// Space is reserved, not yet handed to a writer (`INITIALIZED` = 1).
    Initialized = 1,
    /// A writer (a put or a copy task) is filling it (`PROCESSING` = 2).
    Processing = 2,
    /// Holds the object's bytes; readable (`COMPLETE` = 3).
    Complete = 3,
    /// Dropped; its space is freed or about to be (`REMOVED` = 4).
    Removed = 4,
    /// The write failed (`FAILED` = 5).
    Failed = 5,
}

impl ReplicaStatus {
    /// Upstream's spelling (`COMPLETE`).
    pub fn name(self) -> &'static str {
        match self {
            ReplicaStatus::Undefined => "UNDEFINED",
            ReplicaStatus::Initialized => "INITIALIZED",
            ReplicaStatus::Processing => "PROCESSING",
            ReplicaStatus::Complete => "COMPLETE",
            ReplicaStatus::Removed => "REMOVED",
            ReplicaStatus::Failed => "FAILED",
        }
    }

    /// Whether the lifecycle allows going from `self` to `to`.
    pub fn can_transition(self, to: ReplicaStatus) -> bool {
        use ReplicaStatus::*;
        matches!(
            (self, to),
            (Undefined, Initialized)
                | (Initialized, Processing)
                | (Initialized, Removed)
                | (Processing, Complete)
                | (Processing, Failed)
                | (Processing, Removed)
                | (Complete, Removed)
                | (Failed, Removed)
        )
    }

    /// The status after moving to `to`, or `INVALID_REPLICA` for a transition the lifecycle does
    /// not have.
    pub fn transition(self, to: ReplicaStatus) -> Result<ReplicaStatus, ErrorCode> {
        if self.can_transition(to) {
            Ok(to)
        } else {
            Err(ErrorCode::INVALID_REPLICA)
        }
    }
}

/// Where the bytes of an in-memory replica are.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemoryDescriptor {
    /// The segment's name (`host:port`).
    pub segment_name: String,
    /// What the transfer engine opens to reach the segment (upstream's `transport_endpoint`; the
    /// segment name unless the mount said otherwise).
    pub transport_endpoint: String,
    /// Address of the first byte, in the owner's address space (segment base + offset).
    pub buffer_address: u64,
    /// Object size in bytes (the reserved range may be larger, rounded to the granularity).
    pub size: u64,
}

/// Where the bytes of an on-disk replica are. This master hands out memory replicas only; the
/// variant exists so the wire format has room for disk offload.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DiskDescriptor {
    /// Path of the file holding the object.
    pub file_path: String,
    /// Object size in bytes.
    pub object_size: u64,
}

/// Memory or disk location of a replica.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReplicaLocation {
    /// In a mounted segment.
    Memory(MemoryDescriptor),
    /// In a file.
    Disk(DiskDescriptor),
}

/// A replica as clients see it (upstream's `Replica::Descriptor`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplicaDescriptor {
    /// The replica's id.
    pub id: ReplicaId,
    /// Its status when the descriptor was made.
    pub status: ReplicaStatus,
    /// Where its bytes are.
    pub location: ReplicaLocation,
}

impl ReplicaDescriptor {
    /// Whether this is an in-memory replica.
    pub fn is_memory_replica(&self) -> bool {
        matches!(self.location, ReplicaLocation::Memory(_))
    }

    /// Whether this is an on-disk replica.
    pub fn is_disk_replica(&self) -> bool {
        matches!(self.location, ReplicaLocation::Disk(_))
    }

    /// The memory descriptor, if this is an in-memory replica.
    pub fn memory(&self) -> Option<&MemoryDescriptor> {
        match &self.location {
            ReplicaLocation::Memory(m) => Some(m),
            ReplicaLocation::Disk(_) => None,
        }
    }

    /// The disk descriptor, if this is an on-disk replica.
    pub fn disk(&self) -> Option<&DiskDescriptor> {
        match &self.location {
            ReplicaLocation::Disk(d) => Some(d),
            ReplicaLocation::Memory(_) => None,
        }
    }
}

/// The master's record of one replica: one contiguous range of one segment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Replica {
    pub(crate) id: ReplicaId,
    pub(crate) segment: SegmentId,
    pub(crate) alloc: Allocation,
    pub(crate) status: ReplicaStatus,
}

impl Replica {
    /// A fresh replica over `alloc`, already handed to a writer (PROCESSING).
    pub(crate) fn processing(id: ReplicaId, segment: SegmentId, alloc: Allocation) -> Replica {
        let mut r = Replica {
            id,
            segment,
            alloc,
            status: ReplicaStatus::Undefined,
        };
        r.set(ReplicaStatus::Initialized);
        r.set(ReplicaStatus::Processing);
        r
    }

    /// Moves to `to`. The master only asks for transitions the lifecycle has; anything else is a
    /// bug, caught in debug builds and ignored (status unchanged) in release builds.
    pub(crate) fn set(&mut self, to: ReplicaStatus) {
        match self.status.transition(to) {
            Ok(s) => self.status = s,
            Err(_) => debug_assert!(
                false,
                "illegal replica transition {:?} -> {to:?}",
                self.status
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicaStatus::*;

    const ALL: [ReplicaStatus; 6] = [
        Undefined,
        Initialized,
        Processing,
        Complete,
        Removed,
        Failed,
    ];

    #[test]
    fn values_match_upstream() {
        let values: Vec<u8> = ALL.iter().map(|s| *s as u8).collect();
        assert_eq!(values, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(Complete.name(), "COMPLETE");
    }

    #[test]
    fn transition_table() {
        let legal = [
            (Undefined, Initialized),
            (Initialized, Processing),
            (Initialized, Removed),
            (Processing, Complete),
            (Processing, Failed),
            (Processing, Removed),
            (Complete, Removed),
            (Failed, Removed),
        ];
        for from in ALL {
            for to in ALL {
                let expect = legal.contains(&(from, to));
                assert_eq!(from.can_transition(to), expect, "{from:?} -> {to:?}");
                match from.transition(to) {
                    Ok(s) => assert!(expect && s == to),
                    Err(e) => assert!(!expect && e == ErrorCode::INVALID_REPLICA),
                }
            }
        }
        let r = Replica::processing(
            ReplicaId(1),
            SegmentId(1),
            Allocation { offset: 0, len: 64 },
        );
        assert_eq!(r.status, Processing);
    }

    #[test]
    fn descriptor_accessors() {
        let d = ReplicaDescriptor {
            id: ReplicaId(1),
            status: Complete,
            location: ReplicaLocation::Disk(DiskDescriptor {
                file_path: "/x".into(),
                object_size: 3,
            }),
        };
        assert!(d.is_disk_replica() && !d.is_memory_replica());
        assert!(d.memory().is_none());
        assert_eq!(d.disk().unwrap().object_size, 3);
    }
}
