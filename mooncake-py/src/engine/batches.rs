//! The batches of the asynchronous calls (`batch_transfer_async*`, `transfer_submit_write`),
//! by the ids handed to Python, until `get_batch_transfer_status` or `transfer_check_status`
//! collects them.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mooncake::Batch;

/// A submitted batch.
pub(super) struct Pending {
    pub(super) batch: Batch,
    /// Requests in the batch.
    pub(super) len: usize,
    /// Bytes in the batch.
    pub(super) bytes: u64,
    pub(super) target: String,
    pub(super) started: Instant,
}

impl Pending {
    /// When a waiter gives up on the batch: the transfer timeout plus a second per GiB, from
    /// submission (as upstream bounds its waits).
    pub(super) fn deadline(&self) -> Instant {
        self.started + transfer_timeout() + Duration::from_nanos(self.bytes)
    }
}

/// `MC_TRANSFER_TIMEOUT` in seconds (at least 5), default 30.
pub(super) fn transfer_timeout() -> Duration {
    static TIMEOUT: OnceLock<Duration> = OnceLock::new();
    *TIMEOUT.get_or_init(|| {
        let secs = std::env::var("MC_TRANSFER_TIMEOUT")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(30, |s| s.max(5));
        Duration::from_secs(secs)
    })
}

/// Batches by id. Ids start at 1: 0 is the asynchronous calls' "failed".
#[derive(Default)]
pub(super) struct Batches {
    last: u64,
    pending: HashMap<u64, Pending>,
}

impl Batches {
    /// Keeps `p`; its id.
    pub(super) fn insert(&mut self, p: Pending) -> u64 {
        self.last += 1;
        self.pending.insert(self.last, p);
        self.last
    }

    /// The batch `id`, if it was not collected.
    pub(super) fn get(&self, id: u64) -> Option<&Pending> {
        self.pending.get(&id)
    }

    /// Collects the batch `id`.
    pub(super) fn take(&mut self, id: u64) -> Option<Pending> {
        self.pending.remove(&id)
    }

    /// Forgets every batch (the engine that ran them is gone).
    pub(super) fn clear(&mut self) {
        self.pending.clear();
    }
}
