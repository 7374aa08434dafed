//! This client's reservation: master-granted space it writes puts into before telling the
//! master, so that a put costs the WRITE and one commit instead of PutStart, WRITE and PutEnd.
//!
//! Performance-critical: every eligible put carves here.
//!
//! The master's rules are in `mooncake_master::ReservationGrant`; this side keeps its
//! half: no write starts later than the grant's ttl after the Reserve request was sent (checked
//! when space is carved and again just before the transfer starts), and none after the master
//! session changed (a reconnect, or another master of a group). A reservation
//! is filled front to back; space of a value that was not committed (the key existed, a transfer
//! failed) is not reused, and comes back to the cluster when the master lets the reservation
//! expire.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mooncake_master::{
    MemoryDescriptor, ReplicaDescriptor, ReplicaId, ReplicaLocation, ReplicaStatus,
    ReservationGrant,
};

/// The reservation in use.
#[derive(Debug)]
struct Active {
    grant: ReservationGrant,
    session: u64,
    /// No write starts at or after this.
    usable_until: Instant,
    /// No byte of a write may land at or after this (see [`Carved::land_by`]).
    land_by: Instant,
    /// Offset of the first unused byte.
    next: u64,
}

/// Values of one wave carved out of the reservation.
#[derive(Debug)]
pub(crate) struct Carved {
    /// The reservation.
    pub(crate) id: u64,
    /// Per value, its offset from the reservation's start.
    pub(crate) offsets: Vec<u64>,
    /// Per value, where to write it.
    pub(crate) replicas: Vec<ReplicaDescriptor>,
    /// No write into these places may start at or after this.
    pub(crate) usable_until: Instant,
    /// No byte written into these places may land at or after this: the WRITEs' deadline,
    /// which the target enforces (see `TransferRequest::with_deadline`). The master frees what
    /// is unclaimed 2 TTL after granting, later than 2 TTL after the client asked; the deadline
    /// is 1.5 TTL after asking, which leaves half a TTL for the WRITE's header to reach the
    /// target (the TCP target counts the deadline from its reading of the header).
    pub(crate) land_by: Instant,
    /// The master advises committing these values as they land.
    pub(crate) commit_on_landing: bool,
}

/// How a client's reserved puts were committed (per call that wrote into a reservation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Commits the master applied once the storage node reported the bytes landed.
    pub on_landing: u64,
    /// Of those, commits this client had to confirm itself after its WRITE was acknowledged
    /// (the storage node's report was late or lost).
    pub confirmed_by_client: u64,
    /// Commits sent after the WRITE's acknowledgement (turned off, or the waiting commit
    /// failed).
    pub after_write: u64,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Reserved {
    pub(crate) on_landing: AtomicU64,
    pub(crate) confirmed_by_client: AtomicU64,
    pub(crate) after_write: AtomicU64,
    active: Mutex<Option<Active>>,
    /// Held while a Reserve request is out, so concurrent puts wait for one grant.
    pub(crate) refill: tokio::sync::Mutex<()>,
    /// After a refused Reserve, the next is not asked for before this.
    retry_after: Mutex<Option<Instant>>,
}

impl Reserved {
    fn active(&self) -> std::sync::MutexGuard<'_, Option<Active>> {
        self.active.lock().expect("reservation lock")
    }

    /// Carves `sizes` (in order, each rounded up to the granularity) out of the reservation in
    /// use, if it has room, is still usable and was granted in `session`.
    pub(crate) fn carve(&self, sizes: &[u64], session: u64) -> Option<Carved> {
        let mut guard = self.active();
        let a = guard.as_mut()?;
        if a.session != session || Instant::now() >= a.usable_until {
            *guard = None;
            return None;
        }
        let g = a.grant.granularity.max(1);
        let mut at = a.next;
        let mut offsets = Vec::with_capacity(sizes.len());
        for &size in sizes {
            offsets.push(at);
            at = at.checked_add(size.checked_next_multiple_of(g)?)?;
        }
        if at > a.grant.size {
            return None;
        }
        a.next = at;
        let replicas = offsets
            .iter()
            .zip(sizes)
            .map(|(&off, &size)| ReplicaDescriptor {
                id: ReplicaId(0),
                status: ReplicaStatus::Processing,
                location: ReplicaLocation::Memory(MemoryDescriptor {
                    segment_name: a.grant.segment_name.clone(),
                    transport_endpoint: a.grant.transport_endpoint.clone(),
                    buffer_address: a.grant.buffer_address + off,
                    size,
                }),
            })
            .collect();
        Some(Carved {
            id: a.grant.id,
            offsets,
            replicas,
            usable_until: a.usable_until,
            land_by: a.land_by,
            commit_on_landing: a.grant.commit_on_landing,
        })
    }

    /// Puts a new grant in use; `asked_at` is when the Reserve request was sent.
    pub(crate) fn install(&self, grant: ReservationGrant, session: u64, asked_at: Instant) {
        let usable_until = asked_at + Duration::from_millis(grant.ttl_ms);
        let land_by = asked_at + Duration::from_millis(grant.ttl_ms.saturating_mul(3) / 2);
        *self.active() = Some(Active {
            grant,
            session,
            usable_until,
            land_by,
            next: 0,
        });
    }

    /// Stops using reservation `id` (a transfer into it failed, or the master refused a commit).
    pub(crate) fn drop_grant(&self, id: u64) {
        let mut guard = self.active();
        if guard.as_ref().is_some_and(|a| a.grant.id == id) {
            *guard = None;
        }
    }

    /// The commit counters.
    pub(crate) fn stats(&self) -> CommitStats {
        CommitStats {
            on_landing: self.on_landing.load(Ordering::Relaxed),
            confirmed_by_client: self.confirmed_by_client.load(Ordering::Relaxed),
            after_write: self.after_write.load(Ordering::Relaxed),
        }
    }

    /// Whether a Reserve request may be sent now.
    pub(crate) fn may_ask(&self) -> bool {
        let r = self.retry_after.lock().expect("reservation lock");
        r.is_none_or(|t| Instant::now() >= t)
    }

    /// Records a refused Reserve: the next waits `pause`.
    pub(crate) fn refused(&self, pause: Duration) {
        *self.retry_after.lock().expect("reservation lock") = Some(Instant::now() + pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: u64, size: u64, ttl_ms: u64) -> ReservationGrant {
        ReservationGrant {
            id,
            segment_name: "h:1".into(),
            transport_endpoint: String::new(),
            buffer_address: 0x10_000,
            size,
            granularity: 64,
            ttl_ms,
            commit_on_landing: false,
        }
    }

    #[test]
    fn carves_front_to_back_within_the_grant_and_its_session() {
        let r = Reserved::default();
        assert!(r.carve(&[64], 1).is_none(), "nothing granted");
        r.install(grant(7, 1024, 60_000), 1, Instant::now());
        let c = r.carve(&[100, 64], 1).unwrap();
        assert_eq!((c.id, c.offsets.clone()), (7, vec![0, 128]));
        let addr = |c: &Carved, i: usize| c.replicas[i].memory().unwrap().buffer_address;
        assert_eq!((addr(&c, 0), addr(&c, 1)), (0x10_000, 0x10_000 + 128));
        assert!(r.carve(&[1024], 1).is_none(), "no room left for this");
        let c = r.carve(&[832], 1).unwrap();
        assert_eq!(c.offsets, vec![192]);
        assert!(r.carve(&[1], 1).is_none(), "full");
        r.install(grant(8, 1024, 60_000), 1, Instant::now());
        assert!(r.carve(&[64], 2).is_none(), "another session");
        assert!(
            r.carve(&[64], 1).is_none(),
            "dropped with the session change"
        );
        r.install(grant(9, 1024, 60_000), 1, Instant::now());
        r.drop_grant(8);
        assert!(
            r.carve(&[64], 1).is_some(),
            "only the named grant is dropped"
        );
        r.drop_grant(9);
        assert!(r.carve(&[64], 1).is_none());
        assert!(r.carve(&[u64::MAX], 1).is_none());
    }

    #[test]
    fn no_write_starts_after_the_ttl() {
        let r = Reserved::default();
        r.install(grant(1, 1024, 0), 1, Instant::now());
        assert!(r.carve(&[64], 1).is_none());
        r.install(
            grant(2, 1024, 10_000),
            1,
            Instant::now() - Duration::from_secs(11),
        );
        assert!(r.carve(&[64], 1).is_none(), "asked for 11 s ago");
        assert!(r.may_ask());
        r.refused(Duration::from_secs(60));
        assert!(!r.may_ask());
    }
}
