//! Eviction.
//!
//! Runs (as [`Command::Evict`](super::Command::Evict), emitted by the timeout handler) when used
//! space passes `eviction_high_watermark_ratio` of capacity or a PutStart found no space. One run
//! frees about `eviction_ratio` of total capacity (more if needed to get back under the
//! watermark), removing whole objects, oldest lease first (an object never read counts from its
//! commit time). Never evicted: objects under a read lease, hard-pinned objects, objects with a
//! write in progress or an unfinished copy/move task. Soft-pinned objects are evicted only after
//! every other evictable object has been.

use serde::{Deserialize, Serialize};

use super::types::{LeaseDeadline, Timestamp};
use super::Master;
use crate::allocator::Allocator;

/// What one eviction run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictionReport {
    /// Bytes the run aimed to free (0 when no eviction was needed).
    pub target_bytes: u64,
    /// Objects evicted.
    pub objects: u64,
    /// Of those, soft-pinned ones.
    pub soft_pinned: u64,
    /// Bytes freed.
    pub bytes: u64,
}

impl Master {
    /// Total (capacity, used) bytes over mounted segments.
    pub(crate) fn space(&self) -> (u64, u64) {
        self.segments.values().fold((0, 0), |(c, u), s| {
            (c + s.allocator.capacity(), u + s.allocator.used())
        })
    }

    /// Whether used space is above the high watermark.
    pub(crate) fn above_watermark(&self) -> bool {
        let (cap, used) = self.space();
        cap > 0 && used as f64 > cap as f64 * self.config.eviction_high_watermark_ratio
    }

    pub(crate) fn evict(&mut self, now: Timestamp) -> EvictionReport {
        let needed = self.eviction_requested || self.above_watermark();
        self.eviction_requested = false;
        self.last_eviction = Some(now);
        let mut report = EvictionReport::default();
        if !needed {
            return report;
        }
        let (cap, used) = self.space();
        let by_ratio = (cap as f64 * self.config.eviction_ratio).ceil() as u64;
        let watermark = (cap as f64 * self.config.eviction_high_watermark_ratio) as u64;
        report.target_bytes = by_ratio.max(used.saturating_sub(watermark));

        let mut plain: Vec<(LeaseDeadline, &String, u64)> = Vec::new();
        let mut soft: Vec<(LeaseDeadline, &String, u64)> = Vec::new();
        for (key, obj) in &self.objects {
            if obj.replicas.is_empty()
                || obj.pending.is_some()
                || obj.task.is_some()
                || obj.is_leased(now)
                || obj.pin.is_hard()
            {
                continue;
            }
            let bytes = obj.replicas.iter().map(|r| r.alloc.len).sum();
            if obj.pin.is_soft_at(now) {
                soft.push((obj.lease, key, bytes));
            } else {
                plain.push((obj.lease, key, bytes));
            }
        }
        plain.sort_unstable();
        soft.sort_unstable();
        let mut victims = Vec::new();
        for (pinned, list) in [(false, plain), (true, soft)] {
            for (_, key, bytes) in list {
                if report.bytes >= report.target_bytes {
                    break;
                }
                report.bytes += bytes;
                report.objects += 1;
                report.soft_pinned += u64::from(pinned);
                victims.push(key.clone());
            }
        }
        for key in &victims {
            self.remove_object(now, key);
        }
        self.counters.eviction_runs += 1;
        self.counters.evicted_objects += report.objects;
        self.counters.evicted_soft_pinned += report.soft_pinned;
        self.counters.evicted_bytes += report.bytes;
        if report.objects > 0 {
            tracing::debug!(objects = report.objects, bytes = report.bytes, "evicted");
        }
        report
    }

    /// When the next eviction run may happen, if one is needed.
    pub(crate) fn next_eviction(&self) -> Option<Timestamp> {
        if !(self.eviction_requested || self.above_watermark()) {
            return None;
        }
        Some(self.last_eviction.map_or(Timestamp::ZERO, |t| {
            t.plus(self.config.eviction_interval_ms)
        }))
    }
}
