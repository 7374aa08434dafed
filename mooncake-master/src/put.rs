//! Writes: PutStart / UpsertStart, PutEnd, PutRevoke, and reclaiming abandoned puts.
//!
//! PutStart reserves up to `replica_num` ranges (best effort: one is enough) and returns them
//! PROCESSING; the client writes the bytes and calls PutEnd (COMPLETE) or PutRevoke (freed).
//!
//! - A put of a key that has a committed value returns `OBJECT_ALREADY_EXISTS`; the client maps
//!   that to success without writing, as upstream.
//! - An unfinished write younger than `put_takeover_ms` blocks another PutStart of the same key
//!   (`OBJECT_ALREADY_EXISTS` for a put, `OBJECT_REPLICA_BUSY` for an upsert); an older one is
//!   taken over: its PROCESSING replicas are freed and the new writer proceeds. After
//!   `put_reclaim_ms` the timeout handler frees it even if nobody asks.
//! - Upsert writes a complete new set of replicas next to the old ones, which stay readable until
//!   PutEnd. At PutEnd the old replicas are dropped: freed at once when no read lease is active,
//!   otherwise kept reserved (retired) until the lease deadline so that a reader in the middle of
//!   a transfer never sees its range reused. An unfinished copy/move task on the old value is
//!   cancelled, since it would copy stale bytes.
//! - PutEnd and PutRevoke must come from the client that started the write (`ILLEGAL_CLIENT`
//!   otherwise), so a writer that was taken over cannot commit the new writer's half-written
//!   replicas.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::config::{ReplicateConfig, SoftPinAction};
use super::lease::Pin;
use super::object::{Object, PendingWrite, WriteKind};
use super::placement::Placement;
use super::replica::{Replica, ReplicaDescriptor, ReplicaStatus};
use super::segment::release;
use super::task::TaskStatus;
use super::types::{ClientId, LeaseDeadline, SegmentId, Timestamp};
use super::Master;
use mooncake_core::error::ErrorCode;

/// One key of a batch put.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PutItem {
    /// The key.
    pub key: String,
    /// Value size in bytes.
    pub size: u64,
}

/// The ranges a writer must fill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutStartResponse {
    /// One descriptor per replica, PROCESSING, on distinct segments.
    pub replicas: Vec<ReplicaDescriptor>,
}

/// The pin an object gets when a write commits.
pub(crate) fn pin_after_write(
    old: Pin,
    cfg: &ReplicateConfig,
    replacing: bool,
    now: Timestamp,
    default_ttl: u64,
) -> Pin {
    if cfg.with_hard_pin {
        return Pin::Hard;
    }
    let ttl_ms = if cfg.soft_pin_ttl_ms > 0 {
        cfg.soft_pin_ttl_ms
    } else {
        default_ttl
    };
    let soft = Pin::Soft {
        until: now.plus(ttl_ms),
        ttl_ms,
    };
    match cfg.soft_pin_action {
        SoftPinAction::Enable => soft,
        SoftPinAction::Disable => Pin::None,
        SoftPinAction::Preserve if cfg.with_soft_pin => soft,
        SoftPinAction::Preserve if replacing => old,
        SoftPinAction::Preserve => Pin::None,
    }
}

impl Master {
    pub(crate) fn put_start(
        &mut self,
        now: Timestamp,
        client: ClientId,
        key: &str,
        size: u64,
        config: &ReplicateConfig,
        kind: WriteKind,
    ) -> Result<PutStartResponse, ErrorCode> {
        self.counters.put_starts += 1;
        if key.is_empty()
            || size == 0
            || config.replica_num == 0
            || config.replica_num > self.config.max_replica_num
        {
            return Err(ErrorCode::INVALID_PARAMS);
        }
        if let Some(obj) = self.objects.get_mut(key) {
            if kind == WriteKind::Put && !obj.replicas.is_empty() {
                self.counters.put_exists += 1;
                return Err(ErrorCode::OBJECT_ALREADY_EXISTS);
            }
            if let Some(p) = &obj.pending {
                if p.client == client && p.kind == kind && p.size == size {
                    // The same writer asks again (its answer was lost, say in a master
                    // failover): hand back the same reservation rather than a refusal that
                    // the writer would read as "nothing to write".
                    let replicas = p.replicas.clone();
                    self.counters.put_retries += 1;
                    return Ok(PutStartResponse {
                        replicas: self.descriptors(&replicas, size),
                    });
                }
                if now.since(p.started_at) < self.config.put_takeover_ms {
                    return Err(match kind {
                        WriteKind::Put => ErrorCode::OBJECT_ALREADY_EXISTS,
                        WriteKind::Upsert => ErrorCode::OBJECT_REPLICA_BUSY,
                    });
                }
                self.take_over_write(now, key, client);
            }
        }

        let exclude = BTreeSet::new();
        let placed = self.place(Placement {
            size,
            count: config.replica_num as usize,
            requester: Some(client),
            config: Some(config),
            exclude: &exclude,
            avoid_hosts: BTreeSet::new(),
        });
        if placed.is_empty() {
            self.counters.put_no_space += 1;
            self.eviction_requested = true;
            if self.objects.get(key).is_some_and(Object::is_empty) {
                self.objects.remove(key);
            }
            return Err(ErrorCode::NO_AVAILABLE_HANDLE);
        }
        let replicas = self.processing_replicas(placed);
        let response = PutStartResponse {
            replicas: self.descriptors(&replicas, size),
        };
        let pending = PendingWrite {
            client,
            kind,
            started_at: now,
            size,
            replicas,
            config: config.clone(),
        };
        self.writes.insert((now, key.to_owned()));
        match self.objects.get_mut(key) {
            Some(obj) => obj.pending = Some(pending),
            None => {
                self.objects.insert(
                    key.to_owned(),
                    Object {
                        size,
                        replicas: Vec::new(),
                        pending: Some(pending),
                        replica_num: config.replica_num,
                        lease: LeaseDeadline::default(),
                        pin: Pin::None,
                        task: None,
                        committed_by: None,
                        checksum: None,
                    },
                );
            }
        }
        Ok(response)
    }

    /// Frees the write in progress on `key`, which `client` takes over (the caller checked that
    /// it is older than `put_takeover_ms`).
    pub(crate) fn take_over_write(&mut self, now: Timestamp, key: &str, client: ClientId) {
        let Some(mut old) = self.objects.get_mut(key).and_then(|o| o.pending.take()) else {
            return;
        };
        self.writes.remove(&(old.started_at, key.to_owned()));
        tracing::debug!(key, old_client = %old.client, %client, "put taken over");
        for r in &mut old.replicas {
            release(&mut self.segments, r, LeaseDeadline::default(), now);
        }
        self.counters.puts_taken_over += 1;
    }

    /// The write in progress on `key` by `client`, checked.
    fn owned_pending(&mut self, client: ClientId, key: &str) -> Result<&mut Object, ErrorCode> {
        let obj = self
            .objects
            .get_mut(key)
            .ok_or(ErrorCode::OBJECT_NOT_FOUND)?;
        let p = obj.pending.as_ref().ok_or(ErrorCode::INVALID_WRITE)?;
        if p.client != client {
            return Err(ErrorCode::ILLEGAL_CLIENT);
        }
        Ok(obj)
    }

    /// PutEnd, recording the value's `checksum` (if the commit carries one) with the object.
    pub(crate) fn put_end(
        &mut self,
        now: Timestamp,
        client: ClientId,
        key: &str,
        checksum: Option<u32>,
    ) -> Result<(), ErrorCode> {
        let default_soft_ttl = self.config.default_kv_soft_pin_ttl_ms;
        if let Some(obj) = self.objects.get(key) {
            if obj.pending.is_none() && obj.committed_by == Some(client) {
                // A retry of a PutEnd that already committed (its answer was lost).
                return Ok(());
            }
        }
        let obj = self.owned_pending(client, key)?;
        obj.committed_by = Some(client);
        obj.checksum = checksum;
        let mut p = obj.pending.take().expect("checked");
        let started = p.started_at;
        for r in &mut p.replicas {
            r.set(ReplicaStatus::Complete);
        }
        let mut old = std::mem::replace(&mut obj.replicas, p.replicas);
        let replacing = !old.is_empty();
        obj.size = p.size;
        obj.replica_num = p.config.replica_num;
        obj.pin = pin_after_write(obj.pin, &p.config, replacing, now, default_soft_ttl);
        let lease = obj.lease;
        if obj.lease.0 < now {
            // The eviction age of a value never read is its commit time.
            obj.lease = LeaseDeadline(now);
        }
        let task = obj.task;
        self.writes.remove(&(started, key.to_owned()));
        for r in &mut old {
            release(&mut self.segments, r, lease, now);
        }
        self.counters.put_ends += 1;
        // A task copies the previous value: stale now.
        if let Some(t) = task {
            self.end_task(now, t, TaskStatus::Failed, ErrorCode::OBJECT_REPLICA_BUSY);
        }
        if replacing {
            self.under_replicated.remove(key);
        }
        Ok(())
    }

    /// Frees the write in progress on `key` and drops the object if nothing else is left.
    fn abort_write(&mut self, now: Timestamp, key: &str) {
        let Some(obj) = self.objects.get_mut(key) else {
            return;
        };
        if let Some(mut p) = obj.pending.take() {
            self.writes.remove(&(p.started_at, key.to_owned()));
            for r in &mut p.replicas {
                r.set(ReplicaStatus::Failed);
                release(&mut self.segments, r, LeaseDeadline::default(), now);
            }
        }
        if obj.is_empty() {
            self.objects.remove(key);
        }
    }

    pub(crate) fn put_revoke(
        &mut self,
        now: Timestamp,
        client: ClientId,
        key: &str,
    ) -> Result<(), ErrorCode> {
        self.owned_pending(client, key)?;
        self.abort_write(now, key);
        self.counters.put_revokes += 1;
        Ok(())
    }

    /// ReplaceReplicas for one key: frees the replicas of `client`'s write in progress on
    /// `key` that lie on `failed` segments (or on segments no longer mounted) and places as
    /// many new ones elsewhere. Returns the new replicas only (possibly none: the write then
    /// commits with fewer replicas, as a PutStart that found fewer segments would);
    /// `NO_AVAILABLE_HANDLE` when the write has no replica left, in which case it is revoked.
    pub(crate) fn replace_replicas(
        &mut self,
        now: Timestamp,
        client: ClientId,
        key: &str,
        failed: &BTreeSet<SegmentId>,
    ) -> Result<PutStartResponse, ErrorCode> {
        self.owned_pending(client, key)?;
        let segments = &self.segments;
        let p = (self.objects.get_mut(key).and_then(|o| o.pending.as_mut())).expect("checked");
        let (mut dropped, kept): (Vec<Replica>, Vec<Replica>) = std::mem::take(&mut p.replicas)
            .into_iter()
            .partition(|r| failed.contains(&r.segment) || !segments.contains_key(&r.segment));
        p.replicas = kept;
        let (size, config) = (p.size, p.config.clone());
        let mut exclude: BTreeSet<SegmentId> = p.replicas.iter().map(|r| r.segment).collect();
        let avoid_hosts = exclude
            .iter()
            .filter_map(|s| segments.get(s).map(|s| s.host.clone()))
            .collect();
        exclude.extend(failed.iter().copied());
        for r in &mut dropped {
            r.set(ReplicaStatus::Failed);
            release(&mut self.segments, r, LeaseDeadline::default(), now);
        }
        let placed = self.place(Placement {
            size,
            count: dropped.len(),
            requester: Some(client),
            config: Some(&config),
            exclude: &exclude,
            avoid_hosts,
        });
        let fresh = self.processing_replicas(placed);
        let response = PutStartResponse {
            replicas: self.descriptors(&fresh, size),
        };
        let p = (self.objects.get_mut(key).and_then(|o| o.pending.as_mut()))
            .expect("the write is still in progress");
        p.replicas.extend(fresh);
        if p.replicas.is_empty() {
            self.abort_write(now, key);
            self.counters.put_no_space += 1;
            self.eviction_requested = true;
            return Err(ErrorCode::NO_AVAILABLE_HANDLE);
        }
        Ok(response)
    }

    pub(crate) fn reclaim_put(&mut self, now: Timestamp, key: &str) -> Result<(), ErrorCode> {
        let obj = self.objects.get(key).ok_or(ErrorCode::OBJECT_NOT_FOUND)?;
        let p = obj.pending.as_ref().ok_or(ErrorCode::INVALID_WRITE)?;
        if now.since(p.started_at) < self.config.put_reclaim_ms {
            return Err(ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS);
        }
        tracing::info!(key, client = %p.client, "reclaiming abandoned put");
        self.abort_write(now, key);
        self.counters.puts_reclaimed += 1;
        Ok(())
    }

    /// When the write in progress on each key may be reclaimed, as `(deadline, key)`, earliest
    /// first.
    pub(crate) fn reclaim_deadlines(&self) -> impl Iterator<Item = (Timestamp, &String)> + '_ {
        let ms = self.config.put_reclaim_ms;
        self.writes.iter().map(move |(t, k)| (t.plus(ms), k))
    }

    /// Rebuilds what is derived from `objects` (after a restore).
    pub(crate) fn rebuild_indexes(&mut self) {
        self.writes = self.writes_from_objects();
        self.reserved_pieces = self.reserved_pieces_from_reservations();
        self.requests.rebuild();
    }

    /// The writes in progress, read off the objects.
    pub(crate) fn writes_from_objects(&self) -> BTreeSet<(Timestamp, String)> {
        self.objects
            .iter()
            .filter_map(|(k, o)| o.pending.as_ref().map(|p| (p.started_at, k.clone())))
            .collect()
    }
}
