//! Eviction.
//!
//! Runs (as [`Command::Evict`](super::Command::Evict), emitted by the timeout handler) when used
//! space passes `eviction_high_watermark_ratio` of capacity or a PutStart found no space. One run
//! frees about `eviction_ratio` of total capacity (more if needed to get back under the
//! watermark), removing whole objects, oldest lease first (an object never read counts from its
//! commit time). Never evicted: objects under a read lease, hard-pinned objects, objects with a
//! write in progress or an unfinished copy/move task. Soft-pinned objects are evicted only after
//! every other evictable object has been, and never with `allow_evict_soft_pinned_objects` off.

use serde::{Deserialize, Serialize};

use super::lease::Pin;
use super::types::{LeaseDeadline, Timestamp};
use super::Master;
use mooncake_core::allocator::Allocator;

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
        let (keys, target_bytes) = self.eviction_plan(now, |_| None);
        self.evict_keys(now, &keys, target_bytes)
    }

    /// The objects an eviction run at `now` removes, in order, and the bytes it aims to free;
    /// nothing when no eviction is needed. `last_read(key)` is a read of `key` this master has
    /// not applied yet (a leader serving reads without the log knows of such reads): it leases
    /// the object and refreshes its soft pin as an applied read would.
    pub fn eviction_plan(
        &self,
        now: Timestamp,
        last_read: impl Fn(&str) -> Option<Timestamp>,
    ) -> (Vec<String>, u64) {
        if !(self.eviction_requested || self.above_watermark()) {
            return (Vec::new(), 0);
        }
        let (cap, used) = self.space();
        let by_ratio = (cap as f64 * self.config.eviction_ratio).ceil() as u64;
        let watermark = (cap as f64 * self.config.eviction_high_watermark_ratio) as u64;
        let target_bytes = by_ratio.max(used.saturating_sub(watermark));
        let ttl = self.config.default_kv_lease_ttl_ms;

        let mut plain: Vec<(LeaseDeadline, &String, u64)> = Vec::new();
        let mut soft: Vec<(LeaseDeadline, &String, u64)> = Vec::new();
        for (key, obj) in &self.objects {
            if obj.replicas.is_empty()
                || obj.pending.is_some()
                || obj.task.is_some()
                || obj.pin.is_hard()
            {
                continue;
            }
            let read = last_read(key);
            let mut lease = obj.lease;
            let mut pin = obj.pin;
            if let Some(at) = read {
                lease = lease.max(LeaseDeadline(at.plus(ttl)));
                if let Pin::Soft { until, ttl_ms } = &mut pin {
                    *until = (*until).max(at.plus(*ttl_ms));
                }
            }
            if lease.is_active(now) {
                continue;
            }
            let bytes = obj.replicas.iter().map(|r| r.alloc.len).sum();
            if pin.is_soft_at(now) {
                soft.push((lease, key, bytes));
            } else {
                plain.push((lease, key, bytes));
            }
        }
        plain.sort_unstable();
        soft.sort_unstable();
        if !self.config.allow_evict_soft_pinned_objects {
            soft.clear();
        }
        let mut victims = Vec::new();
        let mut bytes = 0;
        for list in [plain, soft] {
            for (_, key, b) in list {
                if bytes >= target_bytes {
                    break;
                }
                bytes += b;
                victims.push(key.clone());
            }
        }
        (victims, target_bytes)
    }

    /// One eviction run removing `keys` (chosen by [`eviction_plan`](Self::eviction_plan)); a
    /// key that is no longer evictable when this applies (read, rewritten, pinned, removed
    /// meanwhile) is skipped.
    pub(crate) fn evict_keys(
        &mut self,
        now: Timestamp,
        keys: &[String],
        target_bytes: u64,
    ) -> EvictionReport {
        self.eviction_requested = false;
        self.last_eviction = Some(now);
        let mut report = EvictionReport {
            target_bytes,
            ..EvictionReport::default()
        };
        if keys.is_empty() && target_bytes == 0 {
            return report;
        }
        for key in keys {
            let Some(obj) = self.objects.get(key) else {
                continue;
            };
            if obj.replicas.is_empty()
                || obj.pending.is_some()
                || obj.task.is_some()
                || obj.is_leased(now)
                || obj.pin.is_hard()
                || (!self.config.allow_evict_soft_pinned_objects && obj.pin.is_soft_at(now))
            {
                continue;
            }
            report.bytes += obj.replicas.iter().map(|r| r.alloc.len).sum::<u64>();
            report.objects += 1;
            report.soft_pinned += u64::from(obj.pin.is_soft_at(now));
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
