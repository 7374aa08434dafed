//! Segments: mount, remount, unmount, and what losing a segment does to objects and tasks.
//!
//! Each mounted segment has its own [`RangeAllocator`]; a replica's address is the segment's base
//! plus the allocation's offset. Space whose replica was dropped while a read lease still covered
//! it is *retired*: it stays reserved until the lease deadline, then
//! [`Command::ReleaseRetired`](super::Command::ReleaseRetired) frees it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::replica::{
    MemoryDescriptor, Replica, ReplicaDescriptor, ReplicaLocation, ReplicaStatus,
};
use super::task::TaskStatus;
use super::types::{host_of, ClientId, LeaseDeadline, SegmentId, Timestamp};
use super::Master;
use mooncake_core::allocator::{Allocation, Allocator, RangeAllocator};
use mooncake_core::error::ErrorCode;

/// What a client mounts: a range of its registered memory, named `host:port`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SegmentSpec {
    /// Unique name, `host:port`; the host part is used to spread replicas over machines.
    pub name: String,
    /// Address of the first byte in the owner's address space.
    pub base: u64,
    /// Length in bytes (rounded down to the allocation granularity).
    pub size: u64,
    /// Endpoint the transfer engine opens; empty means the segment name.
    pub transport_endpoint: String,
}

impl SegmentSpec {
    /// A spec whose endpoint is its name.
    pub fn new(name: impl Into<String>, base: u64, size: u64) -> Self {
        SegmentSpec {
            name: name.into(),
            base,
            size,
            transport_endpoint: String::new(),
        }
    }
}

/// A read-only view of a mounted segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    /// The master's id for this mount.
    pub id: SegmentId,
    /// Name, `host:port`.
    pub name: String,
    /// Base address.
    pub base: u64,
    /// Usable capacity in bytes.
    pub capacity: u64,
    /// Bytes reserved (replicas, in-flight writes and retired ranges).
    pub used: u64,
    /// Bytes of retired ranges waiting for a lease to end.
    pub retired: u64,
}

/// A mounted segment with its owner and endpoint, for inspection (`/get_segments_detail`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentDetail {
    /// Capacity, usage and identity, as [`Master::segments`] reports them.
    pub info: SegmentInfo,
    /// The client that mounted it.
    pub client: ClientId,
    /// What the transfer engine opens to reach it.
    pub endpoint: String,
    /// Bytes mounted (the allocator's capacity may be smaller, after alignment).
    pub size: u64,
}

/// A range kept reserved until a lease ends.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Retired {
    pub(crate) alloc: Allocation,
    pub(crate) free_at: Timestamp,
}

/// A mounted segment.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Segment {
    pub(crate) id: SegmentId,
    pub(crate) name: String,
    pub(crate) host: String,
    pub(crate) endpoint: String,
    pub(crate) client: ClientId,
    pub(crate) base: u64,
    pub(crate) size: u64,
    pub(crate) allocator: RangeAllocator,
    pub(crate) retired: Vec<Retired>,
    /// Allocations on this segment wait until then: it was remounted soon after this master
    /// state began (after a restart), and writes into reservations a previous master granted
    /// may still land (see
    /// [`MasterConfig::reservation_ttl_ms`](super::MasterConfig::reservation_ttl_ms)).
    #[serde(default)]
    pub(crate) no_alloc_before: Timestamp,
}

impl Segment {
    pub(crate) fn info(&self) -> SegmentInfo {
        SegmentInfo {
            id: self.id,
            name: self.name.clone(),
            base: self.base,
            capacity: self.allocator.capacity(),
            used: self.allocator.used(),
            retired: self.retired.iter().map(|r| r.alloc.len).sum(),
        }
    }

    /// The descriptor of a replica on this segment holding `size` bytes.
    pub(crate) fn descriptor(&self, r: &Replica, size: u64) -> ReplicaDescriptor {
        ReplicaDescriptor {
            id: r.id,
            status: r.status,
            location: ReplicaLocation::Memory(MemoryDescriptor {
                segment_name: self.name.clone(),
                transport_endpoint: self.endpoint.clone(),
                buffer_address: self.base + r.alloc.offset,
                size,
            }),
        }
    }
}

/// Drops `r`: marks it REMOVED and frees its range, or retires the range until `lease` ends if
/// the lease is still active (a reader may be copying from it). A replica whose segment is gone
/// needs nothing freed.
pub(crate) fn release(
    segments: &mut BTreeMap<SegmentId, Segment>,
    r: &mut Replica,
    lease: LeaseDeadline,
    now: Timestamp,
) {
    if r.status != ReplicaStatus::Removed {
        r.set(ReplicaStatus::Removed);
    }
    let Some(seg) = segments.get_mut(&r.segment) else {
        return;
    };
    if lease.is_active(now) {
        seg.retired.push(Retired {
            alloc: r.alloc,
            free_at: lease.0,
        });
    } else {
        let freed = seg.allocator.free(r.alloc);
        debug_assert!(
            freed.is_ok(),
            "freeing {:?} on {}: {freed:?}",
            r.alloc,
            seg.name
        );
    }
}

impl Master {
    /// The mounted segments with their owners and endpoints, by id.
    pub fn segment_details(&self) -> Vec<SegmentDetail> {
        self.segments
            .values()
            .map(|s| SegmentDetail {
                info: s.info(),
                client: s.client,
                endpoint: s.endpoint.clone(),
                size: s.size,
            })
            .collect()
    }

    /// Descriptors of `replicas` holding `size` bytes each.
    pub(crate) fn descriptors(&self, replicas: &[Replica], size: u64) -> Vec<ReplicaDescriptor> {
        replicas
            .iter()
            .filter_map(|r| self.segments.get(&r.segment).map(|s| s.descriptor(r, size)))
            .collect()
    }

    /// Mounts `spec` for `client`; `remount` when the client had it mounted before the master
    /// lost track of it.
    pub(crate) fn mount_segment(
        &mut self,
        now: Timestamp,
        client: ClientId,
        spec: SegmentSpec,
        remount: bool,
    ) -> Result<(), ErrorCode> {
        if spec.name.is_empty() || spec.size == 0 || spec.base.checked_add(spec.size).is_none() {
            return Err(ErrorCode::INVALID_PARAMS);
        }
        if let Some(id) = self.segment_names.get(&spec.name) {
            let seg = &self.segments[id];
            let same = seg.client == client && seg.base == spec.base && seg.size == spec.size;
            if !same {
                return Err(ErrorCode::SEGMENT_ALREADY_EXISTS);
            }
            // A remount after a reconnect: nothing changes but the client's liveness.
            self.touch_client(now, client);
            return Ok(());
        }
        // Another mount of the same memory under another name would have the master hand out
        // its bytes twice (and let one node's objects land in another's segment).
        let endpoint_of = |s: &SegmentSpec| -> String {
            if s.transport_endpoint.is_empty() {
                s.name.clone()
            } else {
                s.transport_endpoint.clone()
            }
        };
        let new_endpoint = endpoint_of(&spec);
        let end = spec.base + spec.size;
        if let Some(other) = self
            .segments
            .values()
            .find(|s| s.endpoint == new_endpoint && s.base < end && spec.base < s.base + s.size)
        {
            tracing::warn!(
                segment = %spec.name,
                %client,
                endpoint = %new_endpoint,
                overlaps = %other.name,
                "refused a mount overlapping a mounted segment"
            );
            return Err(ErrorCode::INVALID_PARAMS);
        }
        let allocator = RangeAllocator::new(spec.size, self.config.allocation_granularity)
            .map_err(|_| ErrorCode::INVALID_PARAMS)?;
        if allocator.capacity() == 0 {
            return Err(ErrorCode::INVALID_PARAMS);
        }
        let id = SegmentId(self.next_segment_id);
        self.next_segment_id += 1;
        let endpoint = new_endpoint;
        tracing::debug!(segment = %spec.name, %client, size = spec.size, "segment mounted");
        self.segment_names.insert(spec.name.clone(), id);
        self.segments.insert(
            id,
            Segment {
                id,
                host: host_of(&spec.name).to_owned(),
                name: spec.name,
                endpoint,
                client,
                base: spec.base,
                size: spec.size,
                allocator,
                retired: Vec::new(),
                // Reservations granted by a master that ran before this state began were usable
                // until at most ttl after it began; their writes have landed 2 ttl after.
                no_alloc_before: if remount {
                    self.born
                        .unwrap_or(now)
                        .plus(2 * self.config.reservation_ttl_ms)
                } else {
                    Timestamp::ZERO
                },
            },
        );
        self.touch_client(now, client);
        self.clients
            .get_mut(&client)
            .expect("touched above")
            .segments
            .insert(id);
        self.counters.segments_mounted += 1;
        // New space may let under-replicated objects get their replicas back.
        self.retry_rereplication(now);
        Ok(())
    }

    /// Mounts `specs` again after the master lost track of `client`; with no segments, it only
    /// registers the client (one that holds no segment but reserves space).
    pub(crate) fn remount_segments(
        &mut self,
        now: Timestamp,
        client: ClientId,
        specs: Vec<SegmentSpec>,
    ) -> Vec<Result<(), ErrorCode>> {
        self.touch_client(now, client);
        specs
            .into_iter()
            .map(|s| self.mount_segment(now, client, s, true))
            .collect()
    }

    pub(crate) fn unmount_segment(
        &mut self,
        now: Timestamp,
        client: ClientId,
        name: &str,
    ) -> Result<(), ErrorCode> {
        let id = *self
            .segment_names
            .get(name)
            .ok_or(ErrorCode::SEGMENT_NOT_FOUND)?;
        if self.segments[&id].client != client {
            return Err(ErrorCode::ILLEGAL_CLIENT);
        }
        self.touch_client(now, client);
        self.drop_segment(now, id);
        Ok(())
    }

    /// Removes a segment and everything on it: committed and pending replicas, task
    /// destinations, retired ranges. Objects left with nothing are removed; objects left with
    /// fewer committed replicas than wanted are queued for re-replication.
    pub(crate) fn drop_segment(&mut self, now: Timestamp, id: SegmentId) {
        let Some(seg) = self.segments.remove(&id) else {
            return;
        };
        self.segment_names.remove(&seg.name);
        if let Some(c) = self.clients.get_mut(&seg.client) {
            c.segments.remove(&id);
        }
        // Its allocator is gone with it: nothing to free.
        self.reservations.retain(|_, r| r.segment != id);
        self.reserved_pieces.retain(|&(s, _), _| s != id);
        self.counters.segments_unmounted += 1;
        tracing::debug!(segment = %seg.name, client = %seg.client, "segment dropped");

        let mut emptied = Vec::new();
        let mut degraded = BTreeSet::new();
        let mut sourceless = Vec::new();
        for (key, obj) in self.objects.iter_mut() {
            let before = obj.replicas.len();
            obj.replicas.retain(|r| r.segment != id);
            let lost_committed = obj.replicas.len() != before;
            if let Some(p) = &mut obj.pending {
                p.replicas.retain(|r| r.segment != id);
                if p.replicas.is_empty() {
                    self.writes.remove(&(p.started_at, key.clone()));
                    obj.pending = None;
                }
            }
            if obj.is_empty() {
                emptied.push(key.clone());
            } else if lost_committed && !obj.replicas.is_empty() {
                degraded.insert(key.clone());
            } else if let (true, Some(t)) = (obj.replicas.is_empty(), obj.task) {
                // Only a write in progress is left: a copy has nothing to copy from.
                sourceless.push(t);
            }
        }
        for key in emptied {
            self.counters.objects_lost += 1;
            self.remove_object(now, &key);
        }
        for t in sourceless {
            self.end_task(now, t, TaskStatus::Failed, ErrorCode::REPLICA_IS_GONE);
        }
        self.tasks_on_segment_lost(now, id, &seg.name);
        for key in degraded {
            self.under_replicated.insert(key);
        }
        self.retry_rereplication(now);
    }

    /// Frees retired ranges whose lease has ended; returns how many.
    pub(crate) fn release_retired(&mut self, now: Timestamp) -> u64 {
        let mut n = 0;
        for seg in self.segments.values_mut() {
            let (due, keep): (Vec<_>, Vec<_>) =
                seg.retired.drain(..).partition(|r| r.free_at <= now);
            seg.retired = keep;
            for r in due {
                let freed = seg.allocator.free(r.alloc);
                debug_assert!(freed.is_ok());
                n += 1;
            }
        }
        n
    }

    /// The earliest time a retired range becomes free.
    pub(crate) fn next_retired_release(&self) -> Option<Timestamp> {
        self.segments
            .values()
            .flat_map(|s| s.retired.iter().map(|r| r.free_at))
            .min()
    }
}
