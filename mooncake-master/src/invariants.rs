//! Internal consistency checks, for tests, property tests and fuzz targets.

use std::collections::{BTreeMap, BTreeSet};

use super::replica::ReplicaStatus;
use super::types::SegmentId;
use super::Master;
use mooncake_core::allocator::Allocator;

impl Master {
    /// Checks the master's invariants and describes the first violation:
    ///
    /// - within each segment, reserved ranges (replicas, in-flight writes, task destinations,
    ///   retired ranges, unclaimed reserved pieces) lie inside the segment and never overlap, and the allocator's used bytes
    ///   and live count equal their sum and number (exact capacity accounting);
    /// - committed replicas are COMPLETE and on distinct segments; a write in progress has at
    ///   least one PROCESSING replica, on distinct segments; no object is empty;
    /// - each unfinished task belongs to its object (and vice versa), its destinations are
    ///   PROCESSING, distinct, and not on segments holding a committed replica; finished tasks
    ///   hold nothing;
    /// - segment names, segment owners and the client table agree;
    /// - the index of writes in progress matches the objects, and the index of reserved pieces
    ///   the reservations;
    /// - the remembered request outcomes are within their bounds and their index matches them.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.requests.check()?;
        if self.writes != self.writes_from_objects() {
            return Err(format!(
                "the index of writes in progress {:?} disagrees with the objects {:?}",
                self.writes,
                self.writes_from_objects()
            ));
        }
        if self.reserved_pieces != self.reserved_pieces_from_reservations() {
            return Err(format!(
                "the index of reserved pieces {:?} disagrees with the reservations {:?}",
                self.reserved_pieces, self.reservations
            ));
        }
        let mut ranges: BTreeMap<SegmentId, Vec<(u64, u64, String)>> = BTreeMap::new();
        let mut add = |seg: SegmentId, off: u64, len: u64, what: String| {
            ranges.entry(seg).or_default().push((off, len, what));
        };
        for (key, obj) in &self.objects {
            if obj.is_empty() {
                return Err(format!("object {key:?} has no replicas and no write"));
            }
            let mut segs = BTreeSet::new();
            for r in &obj.replicas {
                if r.status != ReplicaStatus::Complete {
                    return Err(format!("committed replica of {key:?} is {:?}", r.status));
                }
                if !segs.insert(r.segment) {
                    return Err(format!(
                        "{key:?} has two committed replicas on {}",
                        r.segment
                    ));
                }
                add(
                    r.segment,
                    r.alloc.offset,
                    r.alloc.len,
                    format!("{key}/committed"),
                );
            }
            if let Some(p) = &obj.pending {
                if p.replicas.is_empty() {
                    return Err(format!("write of {key:?} has no replicas"));
                }
                let mut psegs = BTreeSet::new();
                for r in &p.replicas {
                    if r.status != ReplicaStatus::Processing {
                        return Err(format!("pending replica of {key:?} is {:?}", r.status));
                    }
                    if !psegs.insert(r.segment) {
                        return Err(format!("{key:?} writes two replicas on {}", r.segment));
                    }
                    add(
                        r.segment,
                        r.alloc.offset,
                        r.alloc.len,
                        format!("{key}/pending"),
                    );
                }
            }
            if let Some(t) = obj.task {
                match self.tasks.get(&t) {
                    Some(task) if !task.status.is_terminal() && &task.key == key => {}
                    _ => return Err(format!("{key:?} points at task {t} that is not its own")),
                }
            }
        }
        for task in self.tasks.values() {
            if task.status.is_terminal() {
                if !task.dests.is_empty() || task.assigned.is_some() {
                    return Err(format!("finished task {} still holds resources", task.id));
                }
                continue;
            }
            let Some(obj) = self.objects.get(&task.key) else {
                return Err(format!("task {} outlived object {:?}", task.id, task.key));
            };
            if obj.replicas.is_empty() {
                return Err(format!(
                    "task {} has no source replica of {:?}",
                    task.id, task.key
                ));
            }
            if obj.task != Some(task.id) {
                return Err(format!(
                    "task {} is not attached to {:?}",
                    task.id, task.key
                ));
            }
            if task.dests.is_empty() {
                return Err(format!("unfinished task {} has no destinations", task.id));
            }
            let held: BTreeSet<SegmentId> = obj.segments().collect();
            let mut dsegs = BTreeSet::new();
            for r in &task.dests {
                if r.status != ReplicaStatus::Processing
                    || held.contains(&r.segment)
                    || !dsegs.insert(r.segment)
                {
                    return Err(format!("task {} has a bad destination {r:?}", task.id));
                }
                add(
                    r.segment,
                    r.alloc.offset,
                    r.alloc.len,
                    format!("task {}", task.id),
                );
            }
            if (task.status == super::TaskStatus::Processing) != task.assigned.is_some() {
                return Err(format!(
                    "task {} assignment does not match its status",
                    task.id
                ));
            }
        }
        for seg in self.segments.values() {
            for r in &seg.retired {
                add(seg.id, r.alloc.offset, r.alloc.len, "retired".into());
            }
        }
        for (id, r) in &self.reservations {
            if !self.clients.contains_key(&r.client) {
                return Err(format!("reservation {id} outlived client {}", r.client));
            }
            for (&off, &len) in &r.pieces {
                add(r.segment, off, len, format!("reservation {id}"));
            }
        }
        for (seg_id, list) in &mut ranges {
            let Some(seg) = self.segments.get(seg_id) else {
                return Err(format!("ranges on unmounted segment {seg_id}: {list:?}"));
            };
            list.sort();
            let cap = seg.allocator.capacity();
            for w in list.windows(2) {
                if w[0].0 + w[0].1 > w[1].0 {
                    return Err(format!("on {}: {:?} overlaps {:?}", seg.name, w[0], w[1]));
                }
            }
            if let Some(last) = list.last() {
                if last.0 + last.1 > cap {
                    return Err(format!("on {}: {last:?} is past capacity {cap}", seg.name));
                }
            }
        }
        for seg in self.segments.values() {
            let list = ranges.get(&seg.id).map(Vec::as_slice).unwrap_or(&[]);
            let sum: u64 = list.iter().map(|r| r.1).sum();
            if sum != seg.allocator.used() || list.len() != seg.allocator.live_count() {
                return Err(format!(
                    "on {}: allocator has {} bytes in {} ranges, the master accounts {} in {}",
                    seg.name,
                    seg.allocator.used(),
                    seg.allocator.live_count(),
                    sum,
                    list.len()
                ));
            }
            if self.segment_names.get(&seg.name) != Some(&seg.id) {
                return Err(format!("segment {} is not in the name table", seg.name));
            }
            if !self
                .clients
                .get(&seg.client)
                .is_some_and(|c| c.segments.contains(&seg.id))
            {
                return Err(format!("segment {} is not listed by its client", seg.name));
            }
        }
        if self.segment_names.len() != self.segments.len() {
            return Err("segment name table has stale entries".into());
        }
        for (client, c) in &self.clients {
            for s in &c.segments {
                if self.segments.get(s).map(|s| s.client) != Some(*client) {
                    return Err(format!("client {client} lists {s} it does not own"));
                }
            }
        }
        Ok(())
    }
}
