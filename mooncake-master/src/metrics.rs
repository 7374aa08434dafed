//! Counters and gauges of the master, as a plain struct for the metrics endpoint to render.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::Master;

/// Monotonic counters, part of the replicated state (they change only in `apply`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// PutStart and UpsertStart requests.
    pub put_starts: u64,
    /// PutStarts refused because the key had a value.
    pub put_exists: u64,
    /// PutStarts that found no space (`NO_AVAILABLE_HANDLE`).
    pub put_no_space: u64,
    /// Writes committed (PutEnd).
    pub put_ends: u64,
    /// Writes revoked by their client.
    pub put_revokes: u64,
    /// Unfinished writes taken over by a later PutStart.
    pub puts_taken_over: u64,
    /// PutStarts repeated by the writer of a write in progress (answered with its reservation).
    #[serde(default)]
    pub put_retries: u64,
    /// Abandoned writes reclaimed by the timeout handler.
    pub puts_reclaimed: u64,
    /// Reservations granted to clients.
    #[serde(default)]
    pub reservations_granted: u64,
    /// Values committed from reservations (counted in `put_starts` and `put_ends` too).
    #[serde(default)]
    pub reserved_puts: u64,
    /// GetReplicaList requests.
    pub get_requests: u64,
    /// GetReplicaList requests that found a readable value.
    pub get_hits: u64,
    /// GetReplicaList requests that did not.
    pub get_misses: u64,
    /// ExistKey requests.
    pub exist_requests: u64,
    /// Read leases granted.
    pub leases_granted: u64,
    /// Objects removed by Remove, RemoveAll, RemoveByRegex.
    pub removes: u64,
    /// Eviction runs.
    pub eviction_runs: u64,
    /// Objects evicted.
    pub evicted_objects: u64,
    /// Soft-pinned objects evicted.
    pub evicted_soft_pinned: u64,
    /// Bytes freed by eviction.
    pub evicted_bytes: u64,
    /// Segments mounted.
    pub segments_mounted: u64,
    /// Segments unmounted or dropped with their client.
    pub segments_unmounted: u64,
    /// Clients expired for silence.
    pub clients_expired: u64,
    /// Objects removed because every replica was on lost segments.
    pub objects_lost: u64,
    /// Copy/move tasks created (user and re-replication).
    pub tasks_created: u64,
    /// Tasks that succeeded.
    pub tasks_succeeded: u64,
    /// Tasks that failed for good or were cancelled.
    pub tasks_failed: u64,
    /// Task attempts retried.
    pub task_retries: u64,
    /// Re-replication copy tasks scheduled.
    pub rereplications_scheduled: u64,
    /// Retried requests answered with their first outcome, not applied again (see
    /// [`RequestId`](crate::RequestId)).
    #[serde(default)]
    pub requests_answered_again: u64,
}

/// A snapshot of the master's gauges and counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterMetrics {
    /// Keys known (readable or being written).
    pub key_count: u64,
    /// Keys with a readable value.
    pub complete_key_count: u64,
    /// Bytes reserved over all segments.
    pub used_bytes: u64,
    /// Bytes of all mounted segments.
    pub capacity_bytes: u64,
    /// Bytes kept reserved for leases of replaced replicas.
    pub retired_bytes: u64,
    /// Bytes clients hold in reservations and have not filled yet (part of `used_bytes`).
    #[serde(default)]
    pub reserved_bytes: u64,
    /// Mounted segments.
    pub segment_count: u64,
    /// Known clients.
    pub client_count: u64,
    /// Unfinished tasks.
    pub active_tasks: u64,
    /// Objects waiting for re-replication.
    pub under_replicated_keys: u64,
    /// Counters.
    pub counters: Counters,
    /// Request outcomes remembered for retries (see [`RequestId`](crate::RequestId)).
    #[serde(default)]
    pub remembered_requests: u64,
}

impl MasterMetrics {
    /// Prometheus text exposition, with a `mooncake_master_` prefix.
    pub fn to_prometheus(&self) -> String {
        let c = &self.counters;
        let gauges = [
            ("keys", self.key_count),
            ("complete_keys", self.complete_key_count),
            ("used_bytes", self.used_bytes),
            ("capacity_bytes", self.capacity_bytes),
            ("retired_bytes", self.retired_bytes),
            ("reserved_bytes", self.reserved_bytes),
            ("segments", self.segment_count),
            ("clients", self.client_count),
            ("active_tasks", self.active_tasks),
            ("under_replicated_keys", self.under_replicated_keys),
            ("remembered_requests", self.remembered_requests),
        ];
        let counters = [
            ("put_starts", c.put_starts),
            ("put_exists", c.put_exists),
            ("put_no_space", c.put_no_space),
            ("put_ends", c.put_ends),
            ("put_revokes", c.put_revokes),
            ("puts_taken_over", c.puts_taken_over),
            ("put_retries", c.put_retries),
            ("puts_reclaimed", c.puts_reclaimed),
            ("reservations_granted", c.reservations_granted),
            ("reserved_puts", c.reserved_puts),
            ("get_requests", c.get_requests),
            ("get_hits", c.get_hits),
            ("get_misses", c.get_misses),
            ("exist_requests", c.exist_requests),
            ("leases_granted", c.leases_granted),
            ("removes", c.removes),
            ("eviction_runs", c.eviction_runs),
            ("evicted_objects", c.evicted_objects),
            ("evicted_soft_pinned", c.evicted_soft_pinned),
            ("evicted_bytes", c.evicted_bytes),
            ("segments_mounted", c.segments_mounted),
            ("segments_unmounted", c.segments_unmounted),
            ("clients_expired", c.clients_expired),
            ("objects_lost", c.objects_lost),
            ("tasks_created", c.tasks_created),
            ("tasks_succeeded", c.tasks_succeeded),
            ("tasks_failed", c.tasks_failed),
            ("task_retries", c.task_retries),
            ("rereplications_scheduled", c.rereplications_scheduled),
            ("requests_answered_again", c.requests_answered_again),
        ];
        let mut out = String::new();
        for (name, v) in gauges {
            let _ = writeln!(
                out,
                "# TYPE mooncake_master_{name} gauge\nmooncake_master_{name} {v}"
            );
        }
        for (name, v) in counters {
            let _ = writeln!(
                out,
                "# TYPE mooncake_master_{name}_total counter\nmooncake_master_{name}_total {v}"
            );
        }
        out
    }
}

impl Master {
    /// Current gauges and counters.
    pub fn metrics(&self) -> MasterMetrics {
        let (capacity_bytes, used_bytes) = self.space();
        MasterMetrics {
            key_count: self.objects.len() as u64,
            complete_key_count: self
                .objects
                .values()
                .filter(|o| !o.replicas.is_empty())
                .count() as u64,
            used_bytes,
            capacity_bytes,
            retired_bytes: self.segments.values().map(|s| s.info().retired).sum(),
            reserved_bytes: self
                .reservations
                .values()
                .flat_map(|r| r.pieces.values())
                .sum(),
            segment_count: self.segments.len() as u64,
            client_count: self.clients.len() as u64,
            active_tasks: self
                .tasks
                .values()
                .filter(|t| !t.status.is_terminal())
                .count() as u64,
            under_replicated_keys: self.under_replicated.len() as u64,
            counters: self.counters.clone(),
            remembered_requests: self.requests.size().0 as u64,
        }
    }
}
