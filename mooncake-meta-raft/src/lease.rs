//! The leader's read lease: how long the leader may answer reads from its applied state without
//! a log round trip, measured on a monotonic clock from the last quorum acknowledgement.
//!
//! # Why a lease of our own, and not raft-rs's `ReadOnlyOption::LeaseBased`
//!
//! raft-rs's lease-based reads trust the leader's *role*: a leader answers at once, and relies
//! on check-quorum stepping it down one election timeout after it lost touch. That timeout is
//! counted in ticks, and ticks are counted by the process itself: a leader frozen by `SIGSTOP`
//! (or a long GC-like stall, a VM pause, a swapped-out process) counts no ticks while frozen, so
//! once it resumes it still believes it leads, and answers reads from its frozen state until a
//! message of the new term reaches it, while the new leader may already have removed those
//! objects and handed their space to others.
//!
//! So the lease here is measured in real (monotonic) time, anchored on what a quorum
//! acknowledged, with raft-rs's safe read-index round as the acknowledgement:
//!
//! 1. the leader notes the monotonic time `sent` and asks raft for a read index with a fresh
//!    context; raft broadcasts a heartbeat carrying it;
//! 2. once a quorum of voters answered that heartbeat, raft hands the context back (a
//!    `ReadState`); the lease then runs until `sent + lease`, with
//!    `lease = (election_ticks - 2) x tick`.
//!
//! Why no other leader can exist before `sent + lease`: a follower that received that heartbeat
//! (at or after `sent`) resets its election clock, and with check-quorum raft-rs refuses to grant
//! any vote (or pre-vote) until `election_ticks` ticks passed without hearing from the leader;
//! its ticks run no faster than its monotonic clock, the first one may come right after the
//! heartbeat, so no vote before `(election_ticks - 1) x tick` after it. A new leader needs a
//! quorum of votes, and every quorum shares a voter with the quorum that acknowledged. One tick
//! more is left as margin for clock rates and scheduling. Three exceptions, each handled:
//!
//! - a leadership transfer makes voters ignore their lease (raft's forced campaign): the lease
//!   ends when this leader starts a transfer, and is not renewed for two election timeouts;
//! - a voter that restarts forgets whom it heard from: a member that restarts with a term on
//!   disk ignores vote requests for its first election timeout ([`crate::RaftNode`]);
//! - a lease of an earlier term means nothing: it ends when the role or the term changes, and
//!   acknowledgements of an earlier term are never counted (raft-rs drops its pending read
//!   requests when the term changes, and so does this tracker).
//!
//! A frozen leader's lease therefore ends while it is frozen: once resumed, it answers reads
//! only after a fresh quorum acknowledgement, which it cannot get once a successor leads (the
//! voters answer with their higher term, and it steps down).
//!
//! Reads that arrive while the lease is running cost nothing more than a clock reading; the
//! leader renews the lease every heartbeat interval, so a leader in touch with a quorum always
//! holds one. The cost is one more heartbeat round per heartbeat interval.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Requests older than the newest this many are forgotten (an acknowledgement of one of them
/// would give a lease that has ended long ago anyway).
const MAX_REQUESTS: usize = 64;

/// The lease a quorum acknowledgement of a heartbeat sent at `sent` gives:
/// `(election_ticks - 2) x tick`. See the module docs.
pub fn lease_duration(election_ticks: usize, tick: Duration) -> Duration {
    tick * election_ticks.saturating_sub(2) as u32
}

/// Context bytes of a lease request: a tag and a sequence number, so no other read-index user
/// is mistaken for one.
const CTX_TAG: &[u8; 4] = b"mcls";

/// Encodes a request's context.
pub(crate) fn encode_ctx(seq: u64) -> Vec<u8> {
    let mut v = CTX_TAG.to_vec();
    v.extend_from_slice(&seq.to_le_bytes());
    v
}

/// Decodes a request's context (`None` when it is not one).
pub(crate) fn decode_ctx(ctx: &[u8]) -> Option<u64> {
    let rest = ctx.strip_prefix(CTX_TAG.as_slice())?;
    Some(u64::from_le_bytes(rest.try_into().ok()?))
}

/// The lease state of one node (meaningful while it leads). See the module docs.
#[derive(Debug, Default)]
pub(crate) struct LeaseTracker {
    /// Requests in flight: sequence number and the time it was asked.
    requests: VecDeque<(u64, Instant)>,
    next_seq: u64,
    /// When the newest request was asked (in flight or acknowledged).
    last_sent: Option<Instant>,
    /// Send time of the newest request a quorum acknowledged in this term.
    anchor: Option<Instant>,
    /// A leadership transfer was started, and when it was first seen by `maintain`.
    transfer: Option<Option<Instant>>,
}

impl LeaseTracker {
    /// Forgets everything: the role or the term changed.
    pub(crate) fn reset(&mut self) {
        self.requests.clear();
        self.anchor = None;
        self.last_sent = None;
        self.transfer = None;
    }

    /// A leadership transfer started: the lease ends now, and is not renewed for a while.
    pub(crate) fn transfer_started(&mut self) {
        self.requests.clear();
        self.anchor = None;
        self.last_sent = None;
        self.transfer = Some(None);
    }

    /// Whether a transfer started less than `quiet` before `now` (the first call after a
    /// transfer started stamps it).
    pub(crate) fn transferring(&mut self, now: Instant, quiet: Duration) -> bool {
        match &mut self.transfer {
            None => false,
            Some(at) => {
                let started = *at.get_or_insert(now);
                if now.saturating_duration_since(started) < quiet {
                    true
                } else {
                    self.transfer = None;
                    false
                }
            }
        }
    }

    /// When the newest request was asked (in flight or acknowledged).
    pub(crate) fn last_sent(&self) -> Option<Instant> {
        self.last_sent
    }

    /// Records a new request asked at `now`; returns its context.
    pub(crate) fn request(&mut self, now: Instant) -> Vec<u8> {
        self.next_seq += 1;
        self.last_sent = Some(now);
        self.requests.push_back((self.next_seq, now));
        while self.requests.len() > MAX_REQUESTS {
            self.requests.pop_front();
        }
        encode_ctx(self.next_seq)
    }

    /// A quorum acknowledged the request with context `ctx` (and every earlier one).
    pub(crate) fn acknowledged(&mut self, ctx: &[u8]) {
        let Some(seq) = decode_ctx(ctx) else { return };
        while let Some(&(s, at)) = self.requests.front() {
            if s > seq {
                break;
            }
            self.requests.pop_front();
            if s == seq {
                self.anchor = Some(self.anchor.map_or(at, |a| a.max(at)));
            }
        }
    }

    /// The send time of the newest acknowledged request.
    pub(crate) fn anchor(&self) -> Option<Instant> {
        self.anchor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_round_trip_and_foreign_ones_are_ignored() {
        assert_eq!(decode_ctx(&encode_ctx(42)), Some(42));
        assert_eq!(decode_ctx(b"other"), None);
        assert_eq!(decode_ctx(b"mcls123"), None);
    }

    #[test]
    fn the_anchor_is_the_send_time_of_the_acknowledged_request() {
        let t0 = Instant::now();
        let mut l = LeaseTracker::default();
        let a = l.request(t0);
        let b = l.request(t0 + Duration::from_millis(200));
        l.acknowledged(&b);
        assert_eq!(l.anchor(), Some(t0 + Duration::from_millis(200)));
        // A late acknowledgement of an older request never moves the anchor back.
        l.acknowledged(&a);
        assert_eq!(l.anchor(), Some(t0 + Duration::from_millis(200)));
        l.reset();
        assert_eq!(l.anchor(), None);
        // An acknowledgement of a request of before the reset counts for nothing.
        l.acknowledged(&b);
        assert_eq!(l.anchor(), None);
    }

    #[test]
    fn a_transfer_blocks_renewal_for_the_quiet_time() {
        let t0 = Instant::now();
        let quiet = Duration::from_secs(2);
        let mut l = LeaseTracker::default();
        assert!(!l.transferring(t0, quiet));
        l.transfer_started();
        assert!(l.transferring(t0, quiet));
        assert!(l.transferring(t0 + Duration::from_millis(1999), quiet));
        assert!(!l.transferring(t0 + quiet, quiet));
        assert!(!l.transferring(t0 + quiet * 2, quiet));
    }

    #[test]
    fn lease_is_two_ticks_short_of_the_election_timeout() {
        let tick = Duration::from_millis(100);
        assert_eq!(lease_duration(10, tick), Duration::from_millis(800));
        assert_eq!(lease_duration(2, tick), Duration::ZERO);
    }
}
