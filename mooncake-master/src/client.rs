//! Client liveness: heartbeats and expiry.
//!
//! A client becomes known when it mounts a segment (or, holding none, registers with an empty
//! RemountSegments). It then pings (Heartbeat) about once a
//! second; after `client_ttl_ms` of silence the timeout handler emits
//! [`Command::ExpireClient`](super::Command::ExpireClient), which unmounts all its segments. A
//! heartbeat from a client the master does not know answers [`HeartbeatStatus::NeedRemount`], and
//! the client remounts (upstream's `NEED_REMOUNT`).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::types::{ClientId, SegmentId, Timestamp};
use super::Master;
use mooncake_core::error::ErrorCode;

/// Answer to a heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HeartbeatStatus {
    /// The master knows the client.
    Ok,
    /// The master does not know the client (it expired, or the master restarted without its
    /// state): mount the segments again.
    NeedRemount,
}

/// What the master tracks per client.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct ClientEntry {
    pub(crate) last_seen: Timestamp,
    pub(crate) segments: BTreeSet<SegmentId>,
}

impl Master {
    /// Records that `client` was heard from at `now`, registering it if new.
    pub(crate) fn touch_client(&mut self, now: Timestamp, client: ClientId) {
        let entry = self.clients.entry(client).or_default();
        entry.last_seen = entry.last_seen.max(now);
    }

    pub(crate) fn heartbeat(&mut self, now: Timestamp, client: ClientId) -> HeartbeatStatus {
        match self.clients.get_mut(&client) {
            Some(c) => {
                c.last_seen = c.last_seen.max(now);
                HeartbeatStatus::Ok
            }
            None => HeartbeatStatus::NeedRemount,
        }
    }

    /// When `client` expires if it stays silent.
    pub(crate) fn client_deadline(&self, client: ClientId) -> Option<Timestamp> {
        self.clients
            .get(&client)
            .map(|c| c.last_seen.plus(self.config.client_ttl_ms))
    }

    /// Unmounts every segment of `client` if its TTL has passed at `now`.
    pub(crate) fn expire_client(
        &mut self,
        now: Timestamp,
        client: ClientId,
    ) -> Result<(), ErrorCode> {
        let deadline = self
            .client_deadline(client)
            .ok_or(ErrorCode::CLIENT_NOT_FOUND)?;
        if deadline > now {
            // It spoke up again after the timeout handler looked: nothing to do.
            return Err(ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS);
        }
        let entry = self.clients.remove(&client).expect("deadline came from it");
        tracing::info!(%client, segments = entry.segments.len(), "client expired");
        self.counters.clients_expired += 1;
        self.requests.forget_client(client);
        // Tasks it was running go back to the queue (or fail after too many tries).
        self.tasks_on_client_lost(now, client);
        let _ = self.drop_reservations_where(|r| r.client == client);
        for id in entry.segments {
            self.drop_segment(now, id);
        }
        Ok(())
    }
}
