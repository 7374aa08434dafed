//! Read leases and pins.
//!
//! A lease is a deadline: until it passes, the object is not evicted, not removed without
//! `force`, and replicas it replaces (upsert, move) are kept until the deadline before their
//! space is reused. Reads (GetReplicaList, ExistKey and their batch forms) grant leases; puts
//! never do. A soft pin lasts its TTL from the last lease grant; a hard pin lasts forever.

use serde::{Deserialize, Serialize};

use super::object::Object;
use super::types::{LeaseDeadline, Timestamp};
use super::Master;

/// Eviction protection of an object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Pin {
    /// Evictable.
    #[default]
    None,
    /// Evicted only when nothing unpinned is left to evict, until `until` passes; `ttl_ms` is
    /// added to each lease grant's time to extend it.
    Soft {
        /// End of the pin.
        until: Timestamp,
        /// Lifetime granted on each read.
        ttl_ms: u64,
    },
    /// Never evicted.
    Hard,
}

impl Pin {
    /// Whether a soft pin is in force at `now`.
    pub fn is_soft_at(self, now: Timestamp) -> bool {
        matches!(self, Pin::Soft { until, .. } if until > now)
    }

    /// Whether this is a hard pin.
    pub fn is_hard(self) -> bool {
        matches!(self, Pin::Hard)
    }
}

impl Object {
    /// Whether a read lease protects the object at `now`.
    pub(crate) fn is_leased(&self, now: Timestamp) -> bool {
        self.lease.is_active(now)
    }

    /// Extends the lease to at least `now + ttl_ms` and refreshes a soft pin.
    pub(crate) fn grant_lease(&mut self, now: Timestamp, ttl_ms: u64) -> LeaseDeadline {
        let deadline = LeaseDeadline(now.plus(ttl_ms));
        if deadline > self.lease {
            self.lease = deadline;
        }
        if let Pin::Soft { until, ttl_ms } = &mut self.pin {
            *until = (*until).max(now.plus(*ttl_ms));
        }
        self.lease
    }
}

impl Master {
    /// Grants a read lease on `key` if it is readable; returns the deadline.
    pub(crate) fn lease_object(&mut self, now: Timestamp, key: &str) -> Option<LeaseDeadline> {
        let ttl = self.config.default_kv_lease_ttl_ms;
        let obj = self.objects.get_mut(key)?;
        if obj.replicas.is_empty() {
            return None;
        }
        self.counters.leases_granted += 1;
        Some(obj.grant_lease(now, ttl))
    }

    /// Applies reads a leader served outside the log (`(key, read time)`), as if each had been
    /// a lease-granting read at its time: lease deadlines and soft pins catch up. Unknown or
    /// unreadable keys are skipped.
    pub(crate) fn record_reads(&mut self, reads: &[(String, Timestamp)]) {
        let ttl = self.config.default_kv_lease_ttl_ms;
        for (key, at) in reads {
            if let Some(obj) = self.objects.get_mut(key) {
                if !obj.replicas.is_empty() {
                    obj.grant_lease(*at, ttl);
                }
            }
        }
    }

    /// Leases every readable object as if read at `read_at` (a new leader's first entry, so
    /// reads the previous leader served outside the log stay protected); returns how many.
    pub(crate) fn lease_all(&mut self, read_at: Timestamp) -> u64 {
        let ttl = self.config.default_kv_lease_ttl_ms;
        let mut n = 0;
        for obj in self.objects.values_mut() {
            if !obj.replicas.is_empty() {
                obj.grant_lease(read_at, ttl);
                n += 1;
            }
        }
        n
    }
}
