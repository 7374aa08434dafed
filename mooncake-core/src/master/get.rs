//! Reads: GetReplicaList and ExistKey. Both grant a read lease on a readable object.

use serde::{Deserialize, Serialize};

use super::replica::ReplicaDescriptor;
use super::types::{LeaseDeadline, Timestamp};
use super::Master;
use crate::error::ErrorCode;

/// Where to read an object from, and until when the read is protected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaList {
    /// Value size in bytes.
    pub size: u64,
    /// COMPLETE replicas only.
    pub replicas: Vec<ReplicaDescriptor>,
    /// The lease deadline: a transfer that ends at or after it gives `LEASE_EXPIRED`.
    pub lease: LeaseDeadline,
}

impl Master {
    pub(crate) fn get_replica_list(
        &mut self,
        now: Timestamp,
        key: &str,
    ) -> Result<ReplicaList, ErrorCode> {
        self.counters.get_requests += 1;
        let Some(obj) = self.objects.get(key) else {
            self.counters.get_misses += 1;
            return Err(ErrorCode::OBJECT_NOT_FOUND);
        };
        if obj.replicas.is_empty() {
            self.counters.get_misses += 1;
            return Err(ErrorCode::REPLICA_IS_NOT_READY);
        }
        let replicas = self.descriptors(&obj.replicas, obj.size);
        let size = obj.size;
        let lease = self.lease_object(now, key).expect("readable");
        self.counters.get_hits += 1;
        Ok(ReplicaList {
            size,
            replicas,
            lease,
        })
    }

    /// Whether `key` has a readable value; leases it if so.
    pub(crate) fn exist_key(&mut self, now: Timestamp, key: &str) -> bool {
        self.counters.exist_requests += 1;
        self.lease_object(now, key).is_some()
    }
}
