//! Client-held reservations: space a client fills first and commits after, so that a put costs
//! one master round trip instead of two.
//!
//! [`Command::Reserve`](super::Command::Reserve) allocates one range on a segment chosen by the
//! allocation strategy and hands it to the asking client. The client writes values into pieces of
//! it on its own, then [`Command::CommitReserved`](super::Command::CommitReserved) turns each
//! written piece into a committed single-replica object (a put: a key that has a value, or a
//! write in progress younger than the takeover age, is left alone with `OBJECT_ALREADY_EXISTS`).
//! The committed piece becomes an allocation of its own; what is never committed goes back to
//! the segment when the reservation expires, when its client expires, or with its segment.
//!
//! Safety rests on time, as the leases of reads do. With `reservation_ttl_ms` = T:
//! - a client starts no write into a reservation later than T after it asked for it (by its own
//!   clock, from before it sent the request);
//! - the master frees what is unclaimed 2T after granting, so a write started in time has T to
//!   land before its range can be handed out again;
//! - a master that lost its state (a restart without a replicated log) learns of a client's
//!   segment again through RemountSegments; such a segment takes no allocation until 2T after
//!   the new state's first command, so writes into reservations granted by the previous master
//!   have landed before anyone else is given that space. (A client the master expired was
//!   silent for `client_ttl`, longer than 2T, so none of its reservations was still usable.)
//!
//! `reservation_ttl_ms` = 0 turns reservations off (`NOT_SUPPORTED`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::config::ReplicateConfig;
use super::lease::Pin;
use super::object::Object;
use super::placement::Placement;
use super::put::pin_after_write;
use super::replica::{Replica, ReplicaStatus};
use super::types::{ClientId, LeaseDeadline, ReplicaId, SegmentId, Timestamp};
use super::Master;
use mooncake_core::allocator::{Allocation, Allocator};
use mooncake_core::error::ErrorCode;

/// Most reservations one client holds at once (one with unclaimed space left counts until it
/// expires); more are refused (`NO_AVAILABLE_HANDLE`), and the client writes through PutStart
/// instead.
pub const MAX_RESERVATIONS_PER_CLIENT: usize = 1024;

/// A reservation's largest share of its segment: a grant is at most this fraction of the
/// largest segment's capacity, so reservations never hold a small cluster's space.
pub const RESERVATION_SHARE_DIVISOR: u64 = 16;

/// Most unclaimed reserved bytes one client holds at once, in grants of the largest size.
/// (Grants also stop where they would push used space past the eviction watermark.)
pub const MAX_UNCLAIMED_GRANTS_PER_CLIENT: u64 = 4;

/// What a client is granted: a range to fill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationGrant {
    /// The reservation, named in commits.
    pub id: u64,
    /// Segment holding the range.
    pub segment_name: String,
    /// Transfer-engine endpoint of the segment.
    pub transport_endpoint: String,
    /// Address of the range's first byte in the segment owner's address space.
    pub buffer_address: u64,
    /// Length of the range.
    pub size: u64,
    /// Values start at multiples of this from `buffer_address` and take whole multiples of it.
    pub granularity: u64,
    /// How long after asking the client may start writes into the range, in ms.
    pub ttl_ms: u64,
    /// The master's advice to send commits of this range together with their WRITEs, to be
    /// applied when the segment reports them landed: set by the master service when the
    /// segment's reports reach it without a network hop (the state machine leaves it false).
    pub commit_on_landing: bool,
}

/// One value written into a reservation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReservedPut {
    /// Key.
    pub key: String,
    /// Offset of the value's first byte from the reservation's start.
    pub offset: u64,
    /// Value size in bytes.
    pub size: u64,
}

/// Why a client may report writes on a segment as landed (see [`Master::landing_reporter`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandingReporter {
    /// It owns the segment: its storage node saw the WRITEs land.
    SegmentOwner,
    /// Every range lies in unclaimed space of its own reservations: it vouches for its own
    /// acknowledged WRITEs.
    Writer,
}

/// Why a client may not report writes on a segment as landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandingRefusal {
    /// The master does not know the client.
    UnknownClient,
    /// No segment of that name is mounted.
    UnknownSegment,
    /// A range lies in another client's reservation (the one named).
    OthersReservation(ClientId),
    /// A range lies outside every reservation (space already committed, say, when a writer's
    /// report comes after its commit applied on the storage node's).
    NotReserved,
}

impl std::fmt::Display for LandingRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LandingRefusal::UnknownClient => write!(f, "the reporter is not a known client"),
            LandingRefusal::UnknownSegment => write!(f, "no such segment is mounted"),
            LandingRefusal::OthersReservation(owner) => write!(
                f,
                "a range lies in space reserved by another client ({owner}), and the reporter \
                 does not own the segment"
            ),
            LandingRefusal::NotReserved => write!(
                f,
                "a range lies outside the reporter's reservations, and the reporter does not \
                 own the segment"
            ),
        }
    }
}

/// A granted reservation, as the master tracks it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Reservation {
    pub(crate) client: ClientId,
    pub(crate) segment: SegmentId,
    /// Segment offset of the grant's first byte (commits name offsets from it).
    pub(crate) origin: u64,
    /// Unclaimed pieces, each a live allocation of the segment's allocator: offset → length.
    pub(crate) pieces: BTreeMap<u64, u64>,
    /// When the unclaimed pieces are freed.
    pub(crate) expires_at: Timestamp,
}

impl Master {
    pub(crate) fn reserve(
        &mut self,
        now: Timestamp,
        client: ClientId,
        size: u64,
        min_size: u64,
    ) -> Result<ReservationGrant, ErrorCode> {
        let ttl = self.config.reservation_ttl_ms;
        if ttl == 0 {
            return Err(ErrorCode::NOT_SUPPORTED);
        }
        let g = self.config.allocation_granularity;
        if size == 0 || min_size > size {
            return Err(ErrorCode::INVALID_PARAMS);
        }
        // Only a client the master knows holds space: one it lost track of (after a restart)
        // must remount first, which its heartbeat asks for.
        if !self.clients.contains_key(&client) {
            return Err(ErrorCode::CLIENT_NOT_FOUND);
        }
        self.touch_client(now, client);
        let (held, unclaimed) = self
            .reservations
            .values()
            .filter(|r| r.client == client)
            .fold((0, 0u64), |(n, b), r| {
                (n + 1, b + r.pieces.values().sum::<u64>())
            });
        let cap = self
            .segments
            .values()
            .map(|s| s.allocator.capacity() / RESERVATION_SHARE_DIVISOR)
            .max()
            .unwrap_or(0)
            & !(g - 1);
        // Reserved space never pushes the cluster past the eviction watermark: near it, puts go
        // through PutStart, and eviction makes room for values, not for reservations.
        let (capacity, used) = self.space();
        let below_watermark = (capacity as f64 * self.config.eviction_high_watermark_ratio) as u64;
        let room = below_watermark.saturating_sub(used) & !(g - 1);
        let size = size.min(cap).min(room);
        if size == 0
            || size < min_size
            || held >= MAX_RESERVATIONS_PER_CLIENT
            || unclaimed + size > MAX_UNCLAIMED_GRANTS_PER_CLIENT * cap
        {
            return Err(ErrorCode::NO_AVAILABLE_HANDLE);
        }
        // The size asked for, else halves of it down to what the client can use.
        let mut want = size;
        let (segment, alloc) = loop {
            let placed = self.place(Placement {
                size: want,
                count: 1,
                requester: Some(client),
                config: None,
                exclude: &BTreeSet::new(),
                avoid_hosts: BTreeSet::new(),
            });
            if let Some(&p) = placed.first() {
                break p;
            }
            let half = (want / 2) & !(g - 1);
            if half < min_size.max(g) {
                self.eviction_requested = true;
                return Err(ErrorCode::NO_AVAILABLE_HANDLE);
            }
            want = half;
        };
        let id = self.next_reservation_id;
        self.next_reservation_id += 1;
        self.reserved_pieces.insert((segment, alloc.offset), id);
        self.reservations.insert(
            id,
            Reservation {
                client,
                segment,
                origin: alloc.offset,
                pieces: BTreeMap::from([(alloc.offset, alloc.len)]),
                expires_at: now.plus(2 * ttl),
            },
        );
        self.counters.reservations_granted += 1;
        let seg = &self.segments[&segment];
        Ok(ReservationGrant {
            id,
            segment_name: seg.name.clone(),
            transport_endpoint: seg.endpoint.clone(),
            buffer_address: seg.base + alloc.offset,
            size: alloc.len,
            granularity: g,
            ttl_ms: ttl,
            commit_on_landing: false,
        })
    }

    /// Commits values written into reservation `id`; one result per item. `checksums`, when
    /// given, has one checksum per item (else every item is refused with `INVALID_PARAMS`).
    pub(crate) fn commit_reserved(
        &mut self,
        now: Timestamp,
        client: ClientId,
        id: u64,
        items: &[ReservedPut],
        config: &ReplicateConfig,
        checksums: Option<&[u32]>,
    ) -> Vec<Result<(), ErrorCode>> {
        if checksums.is_some_and(|c| c.len() != items.len()) {
            return vec![Err(ErrorCode::INVALID_PARAMS); items.len()];
        }
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let checksum = checksums.map(|c| c[i]);
                self.commit_one(now, client, id, item, config, checksum)
            })
            .collect()
    }

    fn commit_one(
        &mut self,
        now: Timestamp,
        client: ClientId,
        id: u64,
        item: &ReservedPut,
        config: &ReplicateConfig,
        checksum: Option<u32>,
    ) -> Result<(), ErrorCode> {
        self.counters.put_starts += 1;
        if item.key.is_empty() || item.size == 0 || config.replica_num != 1 {
            return Err(ErrorCode::INVALID_PARAMS);
        }
        match self.reservations.get(&id) {
            Some(r) if r.client == client && now < r.expires_at => {}
            _ => return Err(ErrorCode::INVALID_WRITE),
        }
        if let Some(obj) = self.objects.get_mut(&item.key) {
            if !obj.replicas.is_empty() {
                self.counters.put_exists += 1;
                return Err(ErrorCode::OBJECT_ALREADY_EXISTS);
            }
            if let Some(p) = &obj.pending {
                if now.since(p.started_at) < self.config.put_takeover_ms {
                    return Err(ErrorCode::OBJECT_ALREADY_EXISTS);
                }
                self.take_over_write(now, &item.key, client);
                // Nothing is left of the object: it is recreated below.
                self.objects.remove(&item.key);
            }
        }
        let (segment, alloc) = self.claim(id, item.offset, item.size)?;
        let rid = ReplicaId(self.next_replica_id);
        self.next_replica_id += 1;
        let mut replica = Replica::processing(rid, segment, alloc);
        replica.set(ReplicaStatus::Complete);
        let pin = pin_after_write(
            Pin::None,
            config,
            false,
            now,
            self.config.default_kv_soft_pin_ttl_ms,
        );
        self.objects.insert(
            item.key.clone(),
            Object {
                size: item.size,
                replicas: vec![replica],
                pending: None,
                replica_num: 1,
                // The eviction age of a value never read is its commit time.
                lease: LeaseDeadline(now),
                pin,
                task: None,
                committed_by: Some(client),
                checksum,
            },
        );
        self.counters.put_ends += 1;
        self.counters.reserved_puts += 1;
        Ok(())
    }

    /// Takes `[offset, offset + size)` of reservation `id` (offset from its start) out of its
    /// unclaimed pieces as an allocation of its own.
    fn claim(
        &mut self,
        id: u64,
        offset: u64,
        size: u64,
    ) -> Result<(SegmentId, Allocation), ErrorCode> {
        let g = self.config.allocation_granularity;
        let r = self
            .reservations
            .get_mut(&id)
            .ok_or(ErrorCode::INVALID_WRITE)?;
        let seg = self
            .segments
            .get_mut(&r.segment)
            .ok_or(ErrorCode::INVALID_WRITE)?;
        let bad = ErrorCode::INVALID_PARAMS;
        if offset % g != 0 {
            return Err(bad);
        }
        let len = size.checked_add(g - 1).ok_or(bad)? & !(g - 1);
        let at = r.origin.checked_add(offset).ok_or(bad)?;
        let end = at.checked_add(len).ok_or(bad)?;
        let (p_off, p_len) = r
            .pieces
            .range(..=at)
            .next_back()
            .map(|(&o, &l)| (o, l))
            .filter(|&(o, l)| o + l >= end)
            .ok_or(bad)?;
        let mut piece = Allocation {
            offset: p_off,
            len: p_len,
        };
        let split = |e: mooncake_core::Error| {
            tracing::error!("splitting a reservation piece: {e}");
            ErrorCode::INTERNAL_ERROR
        };
        let segment = r.segment;
        if at > p_off {
            let (head, tail) = seg.allocator.split(piece, at).map_err(split)?;
            r.pieces.insert(head.offset, head.len);
            piece = tail;
        }
        if end < piece.offset + piece.len {
            let (head, tail) = seg.allocator.split(piece, end).map_err(split)?;
            r.pieces.insert(tail.offset, tail.len);
            self.reserved_pieces.insert((segment, tail.offset), id);
            piece = head;
        }
        r.pieces.remove(&piece.offset);
        self.reserved_pieces.remove(&(segment, piece.offset));
        if r.pieces.is_empty() {
            // Used up: nothing is left to free.
            self.reservations.remove(&id);
        }
        Ok((segment, piece))
    }

    /// Frees the unclaimed pieces of expired reservations; returns how many expired.
    pub(crate) fn expire_reservations(&mut self, now: Timestamp) -> u64 {
        self.drop_reservations_where(|r| r.expires_at <= now)
    }

    /// Removes reservation `id`, freeing its unclaimed pieces (if its segment is still there).
    fn drop_reservation(&mut self, id: u64) {
        let Some(r) = self.reservations.remove(&id) else {
            return;
        };
        for offset in r.pieces.keys() {
            self.reserved_pieces.remove(&(r.segment, *offset));
        }
        if let Some(seg) = self.segments.get_mut(&r.segment) {
            for (offset, len) in r.pieces {
                let freed = seg.allocator.free(Allocation { offset, len });
                debug_assert!(freed.is_ok(), "freeing a reservation piece: {freed:?}");
            }
        }
    }

    /// Drops the reservations `pred` picks, freeing their unclaimed pieces; returns how many.
    pub(crate) fn drop_reservations_where(&mut self, pred: impl Fn(&Reservation) -> bool) -> u64 {
        let ids: Vec<u64> = self
            .reservations
            .iter()
            .filter(|(_, r)| pred(r))
            .map(|(id, _)| *id)
            .collect();
        for &id in &ids {
            self.drop_reservation(id);
        }
        ids.len() as u64
    }

    /// The index of unclaimed pieces, read off the reservations.
    pub(crate) fn reserved_pieces_from_reservations(&self) -> BTreeMap<(SegmentId, u64), u64> {
        self.reservations
            .iter()
            .flat_map(|(&id, r)| r.pieces.keys().map(move |&off| ((r.segment, off), id)))
            .collect()
    }

    /// Whether `client` may report `(address, length)` ranges of the segment named `segment`
    /// as landed: it owns the segment (its storage node saw the WRITEs land), or every range
    /// lies in unclaimed space of its own reservations (a writer vouching for its own
    /// acknowledged WRITEs). Costs O(log n) per range (per reserved piece a range spans), no
    /// scan. Empty ranges need nothing; a range past the end of the address space is refused.
    pub fn landing_reporter(
        &self,
        client: ClientId,
        segment: &str,
        ranges: &[(u64, u64)],
    ) -> Result<LandingReporter, LandingRefusal> {
        if !self.clients.contains_key(&client) {
            return Err(LandingRefusal::UnknownClient);
        }
        let Some(seg) = self
            .segment_names
            .get(segment)
            .and_then(|id| self.segments.get(id))
        else {
            return Err(LandingRefusal::UnknownSegment);
        };
        if seg.client == client {
            return Ok(LandingReporter::SegmentOwner);
        }
        for &(addr, len) in ranges {
            if len == 0 {
                continue;
            }
            let span = addr
                .checked_sub(seg.base)
                .and_then(|start| Some((start, start.checked_add(len)?)));
            let Some((start, end)) = span else {
                return Err(LandingRefusal::NotReserved);
            };
            let mut at = start;
            while at < end {
                let piece = self
                    .reserved_pieces
                    .range((seg.id, 0)..=(seg.id, at))
                    .next_back()
                    .and_then(|(&(_, off), id)| {
                        let r = self.reservations.get(id)?;
                        Some((r.client, off + r.pieces.get(&off)?))
                    });
                match piece {
                    Some((owner, piece_end)) if piece_end > at => {
                        if owner != client {
                            return Err(LandingRefusal::OthersReservation(owner));
                        }
                        at = piece_end;
                    }
                    _ => return Err(LandingRefusal::NotReserved),
                }
            }
        }
        Ok(LandingReporter::Writer)
    }

    /// When the earliest reservation expires.
    pub(crate) fn next_reservation_expiry(&self) -> Option<Timestamp> {
        self.reservations.values().map(|r| r.expires_at).min()
    }
}
