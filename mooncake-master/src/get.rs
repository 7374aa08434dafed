//! Reads: GetReplicaList and ExistKey. Both grant a read lease on a readable object.

use serde::{Deserialize, Serialize};

use super::replica::ReplicaDescriptor;
use super::types::{LeaseDeadline, Timestamp};
use super::Master;
use mooncake_core::error::ErrorCode;

/// Where to read an object from, and until when the read is protected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaList {
    /// Value size in bytes.
    pub size: u64,
    /// COMPLETE replicas only.
    pub replicas: Vec<ReplicaDescriptor>,
    /// The lease deadline: a transfer that ends at or after it gives `LEASE_EXPIRED`.
    pub lease: LeaseDeadline,
    /// The writer's checksum of the value ([`ValueChecksum`](crate::ValueChecksum)), recorded
    /// at commit; `None` for a value committed without one (read unverified).
    pub checksum: Option<u32>,
}

impl Master {
    pub(crate) fn get_replica_list(
        &mut self,
        now: Timestamp,
        key: &str,
    ) -> Result<ReplicaList, ErrorCode> {
        self.counters.get_requests += 1;
        match self.replica_list_at(now, key) {
            Ok(list) => {
                self.lease_object(now, key).expect("readable");
                self.counters.get_hits += 1;
                Ok(list)
            }
            Err(e) => {
                self.counters.get_misses += 1;
                Err(e)
            }
        }
    }

    /// What GetReplicaList answers at `now`, lease deadline included, without granting the
    /// lease: a leader serving the read outside the log records the read itself.
    pub fn replica_list_at(&self, now: Timestamp, key: &str) -> Result<ReplicaList, ErrorCode> {
        let obj = self.objects.get(key).ok_or(ErrorCode::OBJECT_NOT_FOUND)?;
        if obj.replicas.is_empty() {
            return Err(ErrorCode::REPLICA_IS_NOT_READY);
        }
        Ok(ReplicaList {
            size: obj.size,
            replicas: self.descriptors(&obj.replicas, obj.size),
            lease: obj
                .lease
                .max(LeaseDeadline(now.plus(self.config.default_kv_lease_ttl_ms))),
            checksum: obj.checksum,
        })
    }

    /// Whether `key` has a readable value (what ExistKey answers), without granting a lease.
    pub fn is_readable(&self, key: &str) -> bool {
        self.objects
            .get(key)
            .is_some_and(|o| !o.replicas.is_empty())
    }

    /// Whether `key` has a readable value; leases it if so.
    pub(crate) fn exist_key(&mut self, now: Timestamp, key: &str) -> bool {
        self.counters.exist_requests += 1;
        self.lease_object(now, key).is_some()
    }
}
