//! The master's configuration and the per-put [`ReplicateConfig`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use mooncake_core::error::{Error, Result};

/// How PutStart chooses segments for replicas (`--allocation_strategy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AllocationStrategy {
    /// Uniformly random among segments with room (`random`, upstream's default).
    #[default]
    Random,
    /// Segments with the largest free fraction first (`free_ratio_first`).
    FreeRatioFirst,
    /// The requesting client's own segments first, then random (`local_first`).
    LocalFirst,
}

impl AllocationStrategy {
    /// The flag value, as upstream spells it.
    pub fn name(self) -> &'static str {
        match self {
            AllocationStrategy::Random => "random",
            AllocationStrategy::FreeRatioFirst => "free_ratio_first",
            AllocationStrategy::LocalFirst => "local_first",
        }
    }
}

impl fmt::Display for AllocationStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AllocationStrategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "random" => Ok(AllocationStrategy::Random),
            "free_ratio_first" => Ok(AllocationStrategy::FreeRatioFirst),
            "local_first" => Ok(AllocationStrategy::LocalFirst),
            other => Err(Error::InvalidArgument(format!(
                "unknown allocation strategy {other:?} (expected random, free_ratio_first or local_first)"
            ))),
        }
    }
}

/// Configuration of the master state machine. Every field is part of the replicated state's
/// definition: all replicas of a replicated master must use the same values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MasterConfig {
    /// Read lease granted by GetReplicaList and ExistKey, in ms. Default 10 000, upstream's
    /// `--default_kv_lease_ttl`.
    pub default_kv_lease_ttl_ms: u64,
    /// Soft-pin lifetime when the put does not name one, in ms. Default 30 min, upstream's
    /// `--default_kv_soft_pin_ttl`. Refreshed by every lease grant.
    pub default_kv_soft_pin_ttl_ms: u64,
    /// Silence after which a client's segments are unmounted, in ms. Default 10 000, upstream's
    /// `--client_ttl` (10 s).
    pub client_ttl_ms: u64,
    /// Used fraction of total capacity above which eviction runs. Default 0.90, upstream's
    /// `--eviction_high_watermark_ratio`.
    pub eviction_high_watermark_ratio: f64,
    /// Fraction of total capacity one eviction run tries to free. Default 0.05, upstream's
    /// `--eviction_ratio`.
    pub eviction_ratio: f64,
    /// Minimum time between two eviction runs, in ms. Default 10, the period of upstream's
    /// eviction thread; it only keeps a full cluster with nothing evictable from evicting on
    /// every tick.
    pub eviction_interval_ms: u64,
    /// Replica placement strategy. Default `random`, upstream's `--allocation_strategy`.
    pub allocation_strategy: AllocationStrategy,
    /// Age after which another PutStart may take over an unfinished put, in ms. Default 30 000
    /// (upstream's put start discard timeout).
    pub put_takeover_ms: u64,
    /// Age after which the timeout handler reclaims an abandoned put's space, in ms. Default
    /// 600 000 (upstream's put start release timeout).
    pub put_reclaim_ms: u64,
    /// Largest `replica_num` a put may ask for. Default 16; more is almost certainly a bug.
    pub max_replica_num: u32,
    /// Allocation granularity in bytes (a power of two). Default 64, a cache line, as
    /// [`RangeAllocator::DEFAULT_GRANULARITY`](mooncake_core::RangeAllocator::DEFAULT_GRANULARITY).
    pub allocation_granularity: u64,
    /// Whether the master schedules copy tasks to restore `replica_num` after replicas were lost
    /// with a segment. Default `true`; upstream does not re-replicate, which this project does
    /// better behind the same API.
    pub enable_rereplication: bool,
    /// How many times a failed or timed-out copy/move task is retried before it is FAILED.
    /// Default 3.
    pub task_max_retries: u32,
    /// How long a client may hold a task in PROCESSING before it counts as failed, in ms.
    /// Default 60 000.
    pub task_timeout_ms: u64,
    /// How long finished tasks stay queryable, in ms. Default 600 000 (10 min).
    pub task_retention_ms: u64,
    /// Most unfinished tasks at once; more gives `TASK_PENDING_LIMIT_EXCEEDED`. Default 10 000.
    pub max_active_tasks: usize,
    /// Seed of the master's random number generator (placement, task ids). Default 0x6d6f6f6e
    /// ("moon"); every replica of a replicated master must use the same seed.
    pub rng_seed: u64,
    /// Cluster id, for the driver's use (metadata prefixes). Default `mooncake_cluster`, upstream's
    /// `--cluster_id`.
    pub cluster_id: String,
    /// How long a client may start writes into a reservation after asking for it, in ms; the
    /// master frees unclaimed reserved space after twice this, and a segment remounted within
    /// twice this of the master state's first command (a restart) takes no allocation until then
    /// (see
    /// [`ReservationGrant`](super::ReservationGrant)). Default 500; 0 turns reservations off.
    #[serde(default)]
    pub reservation_ttl_ms: u64,
    /// Whether eviction may remove soft-pinned objects (after every other evictable one).
    /// Default `true`, upstream's `--allow_evict_soft_pinned_objects`; `false` keeps them until
    /// their pin ends.
    #[serde(default = "default_true")]
    pub allow_evict_soft_pinned_objects: bool,
}

fn default_true() -> bool {
    true
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            default_kv_lease_ttl_ms: 10_000,
            default_kv_soft_pin_ttl_ms: 30 * 60 * 1000,
            client_ttl_ms: 10_000,
            eviction_high_watermark_ratio: 0.90,
            eviction_ratio: 0.05,
            eviction_interval_ms: 10,
            allocation_strategy: AllocationStrategy::Random,
            put_takeover_ms: 30_000,
            put_reclaim_ms: 600_000,
            max_replica_num: 16,
            allocation_granularity: mooncake_core::RangeAllocator::DEFAULT_GRANULARITY,
            enable_rereplication: true,
            task_max_retries: 3,
            task_timeout_ms: 60_000,
            task_retention_ms: 600_000,
            max_active_tasks: 10_000,
            rng_seed: 0x6d6f_6f6e,
            cluster_id: "mooncake_cluster".to_owned(),
            reservation_ttl_ms: 500,
            allow_evict_soft_pinned_objects: true,
        }
    }
}

impl MasterConfig {
    /// Rejects values that would make the master misbehave, with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        if self.default_kv_lease_ttl_ms == 0 {
            return bad("default_kv_lease_ttl_ms must be > 0".into());
        }
        if self.client_ttl_ms == 0 {
            return bad("client_ttl_ms must be > 0".into());
        }
        let ratio_ok = |r: f64| r.is_finite() && r > 0.0 && r <= 1.0;
        if !ratio_ok(self.eviction_high_watermark_ratio) {
            return bad(format!(
                "eviction_high_watermark_ratio must be in (0, 1], got {}",
                self.eviction_high_watermark_ratio
            ));
        }
        if !ratio_ok(self.eviction_ratio) {
            return bad(format!(
                "eviction_ratio must be in (0, 1], got {}",
                self.eviction_ratio
            ));
        }
        if self.put_takeover_ms > self.put_reclaim_ms {
            return bad(format!(
                "put_takeover_ms ({}) must not exceed put_reclaim_ms ({})",
                self.put_takeover_ms, self.put_reclaim_ms
            ));
        }
        if self.max_replica_num == 0 {
            return bad("max_replica_num must be > 0".into());
        }
        if !self.allocation_granularity.is_power_of_two() {
            return bad(format!(
                "allocation_granularity must be a power of two, got {}",
                self.allocation_granularity
            ));
        }
        if self.task_timeout_ms == 0 {
            return bad("task_timeout_ms must be > 0".into());
        }
        if self.max_active_tasks == 0 {
            return bad("max_active_tasks must be > 0".into());
        }
        // A client expired for silence must not still be writing into a reservation.
        if self.reservation_ttl_ms.saturating_mul(2) >= self.client_ttl_ms {
            return bad(format!(
                "reservation_ttl_ms ({}) must be less than half of client_ttl_ms ({})",
                self.reservation_ttl_ms, self.client_ttl_ms
            ));
        }
        Ok(())
    }
}

/// What an upsert does to the soft pin of the object it replaces (`SoftPinAction`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum SoftPinAction {
    /// Keep the previous pin unless `with_soft_pin` asks for one (`PRESERVE` = 0).
    #[default]
    Preserve = 0,
    /// Soft-pin the new value (`ENABLE` = 1).
    Enable = 1,
    /// Drop any soft pin (`DISABLE` = 2).
    Disable = 2,
}

/// Per-put replication options, with upstream's field names and defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicateConfig {
    /// Replicas wanted, on distinct segments (and distinct hosts when possible). Default 1.
    pub replica_num: u32,
    /// Evict only when nothing else is evictable. Default false.
    pub with_soft_pin: bool,
    /// Never evict. Default false.
    pub with_hard_pin: bool,
    /// A segment to try first (empty: none). Ignored when not mounted.
    pub preferred_segment: String,
    /// Segments to try first, in order. Ignored when not mounted.
    pub preferred_segments: Vec<String>,
    /// Put replicas on the same host as the preferred segment (or the requesting client) instead
    /// of spreading them over hosts. Default false.
    pub prefer_alloc_in_same_node: bool,
    /// Soft-pin handling on upsert. Default [`SoftPinAction::Preserve`].
    pub soft_pin_action: SoftPinAction,
    /// Soft-pin lifetime in ms; 0 uses the master's default. Default 0.
    pub soft_pin_ttl_ms: u64,
}

impl Default for ReplicateConfig {
    fn default() -> Self {
        ReplicateConfig {
            replica_num: 1,
            with_soft_pin: false,
            with_hard_pin: false,
            preferred_segment: String::new(),
            preferred_segments: Vec::new(),
            prefer_alloc_in_same_node: false,
            soft_pin_action: SoftPinAction::Preserve,
            soft_pin_ttl_ms: 0,
        }
    }
}

impl ReplicateConfig {
    /// A config asking for `n` replicas and nothing else.
    pub fn with_replicas(n: u32) -> Self {
        ReplicateConfig {
            replica_num: n,
            ..Default::default()
        }
    }

    /// Preferred segments in the order they are tried: `preferred_segment` first, then
    /// `preferred_segments`, without duplicates.
    pub fn preferred(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let first = (!self.preferred_segment.is_empty()).then_some(self.preferred_segment.as_str());
        for s in first
            .into_iter()
            .chain(self.preferred_segments.iter().map(String::as_str))
        {
            if !s.is_empty() && !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_nonsense_is_rejected() {
        MasterConfig::default().validate().unwrap();
        let c = MasterConfig {
            eviction_ratio: 0.0,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("eviction_ratio"));
        let c = MasterConfig {
            eviction_high_watermark_ratio: f64::NAN,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = MasterConfig {
            put_takeover_ms: 10,
            put_reclaim_ms: 5,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = MasterConfig {
            allocation_granularity: 48,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        for s in ["random", "free_ratio_first", "local_first"] {
            assert_eq!(s.parse::<AllocationStrategy>().unwrap().name(), s);
        }
        assert!("best".parse::<AllocationStrategy>().is_err());
    }

    #[test]
    fn preferred_order_dedups() {
        let c = ReplicateConfig {
            preferred_segment: "a:1".into(),
            preferred_segments: vec!["b:1".into(), "a:1".into(), "".into()],
            ..Default::default()
        };
        assert_eq!(c.preferred(), vec!["a:1", "b:1"]);
    }
}
