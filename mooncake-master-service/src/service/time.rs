//! [`MasterTime`]: the time a master stamps on its commands, which no wall-clock step moves.
//!
//! Every lease deadline of the master (read leases, client TTLs, reservations, task timeouts)
//! is a [`Timestamp`] computed from the time stamped on a log entry, and every replica applies
//! the entry at that time. If that time came from the wall clock, a step of the leader's clock
//! (NTP, an operator) would move every deadline at once: a step forward ends read leases early
//! (their ranges are reused while readers still copy from them) and expires live clients; and a
//! new leader whose wall clock is ahead of its predecessor's would do the same at a failover.
//!
//! So the wall clock is read once, when a member starts, and never again:
//!
//! - a member that runs alone (or leads) stamps `start + elapsed`, where `elapsed` is read from
//!   the monotonic clock, which no step moves;
//! - every member follows the log's time: when it applies an entry whose time is the latest it
//!   has seen, it notes that time and the monotonic instant it saw it. Its estimate of the
//!   group's time is that entry's time plus the monotonic time since;
//! - a member that takes over as leader continues from that estimate (never from its own wall
//!   clock, whatever it says). The entry was stamped before it was applied here, so the
//!   estimate is behind the old leader's time by the replication delay, never ahead: deadlines
//!   can only end that much later in real time, never earlier;
//! - the replicated master never lets time go backwards ([`Master::now`]), so a stamp below the
//!   state's time is applied at the state's time.
//!
//! A group restarted as a whole resumes from the last time in its log (the time it was down is
//! not counted): leases and TTLs then end later than they would have, never earlier.
//!
//! [`Master::now`]: mooncake_master::Master::now

use std::sync::Arc;

use mooncake_core::Clock;
use mooncake_master::Timestamp;
use tokio::time::Instant;

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct MasterTime {
    /// Where monotonic readings come from; set when the service starts (entries applied before
    /// that are noted without an instant, and get the start's).
    clock: Option<Arc<dyn Clock>>,
    /// The latest time an applied entry carried, and when this member first saw it applied.
    log: Option<(Timestamp, Option<Instant>)>,
    /// The time this member stamps with while it runs alone or leads, as a time and the
    /// instant it was that time.
    own: Option<(Timestamp, Instant)>,
}

fn project((t, at): (Timestamp, Instant), now: Instant) -> Timestamp {
    t.plus(now.saturating_duration_since(at).as_millis() as u64)
}

impl MasterTime {
    /// The service starts, reading `clock`: its own time begins at the wall clock's reading (or
    /// the state's time, if later).
    pub(crate) fn start(&mut self, clock: Arc<dyn Clock>, state_now: Timestamp) {
        let now = clock.monotonic();
        let wall = Timestamp::from_millis(clock.unix_millis());
        self.own = Some((wall.max(state_now), now));
        if let Some((_, at @ None)) = &mut self.log {
            *at = Some(now);
        }
        self.clock = Some(clock);
    }

    /// An entry (or a snapshot) was applied and the state's time is now `state_now`.
    pub(crate) fn applied(&mut self, state_now: Timestamp) {
        if self.log.is_some_and(|(t, _)| t >= state_now) || state_now == Timestamp(0) {
            return;
        }
        let at = self.clock.as_ref().map(|c| c.monotonic());
        self.log = Some((state_now, at));
    }

    /// The group's time as this member estimates it from the log (its own time when it has
    /// seen no entry yet).
    fn following(&self, now: Instant) -> Timestamp {
        match self.log {
            Some((t, Some(at))) => project((t, at), now),
            Some((t, None)) => t,
            None => self.own.map_or(Timestamp(0), |o| project(o, now)),
        }
    }

    /// This member takes over as leader: from now on it stamps its estimate of the group's
    /// time, running on its monotonic clock.
    pub(crate) fn take_over(&mut self) {
        let Some(clock) = &self.clock else { return };
        let now = clock.monotonic();
        let t = self.following(now);
        self.own = Some((t, now));
    }

    /// The time now: this member's own when `stamping` (it runs alone or leads a term it took
    /// over), else its estimate of the group's.
    pub(crate) fn now(&self, stamping: bool) -> Timestamp {
        let Some(clock) = &self.clock else {
            return self.log.map_or(Timestamp(0), |(t, _)| t);
        };
        let now = clock.monotonic();
        match self.own {
            Some(own) if stamping => project(own, now),
            _ => self.following(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// A clock whose wall reading the test sets (steps), and whose monotonic reading is
    /// tokio's (paused) clock.
    #[derive(Debug, Default)]
    struct SteppedClock(AtomicU64);

    impl Clock for SteppedClock {
        fn unix_millis(&self) -> u64 {
            self.0.load(Ordering::Relaxed)
        }
        fn monotonic(&self) -> Instant {
            Instant::now()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wall_clock_step_moves_nothing_once_started() {
        let clock = Arc::new(SteppedClock(AtomicU64::new(1_000_000)));
        let mut t = MasterTime::default();
        t.start(clock.clone(), Timestamp(0));
        assert_eq!(t.now(true), Timestamp(1_000_000));
        clock.0.store(1_000_000 + 3_600_000, Ordering::Relaxed);
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(t.now(true), Timestamp(1_000_250));
        clock.0.store(5, Ordering::Relaxed);
        tokio::time::advance(Duration::from_millis(250)).await;
        assert_eq!(t.now(true), Timestamp(1_000_500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_continues_the_log_time_not_its_own_wall_clock() {
        // This member's wall clock is an hour ahead of the leader that stamped the log.
        let clock = Arc::new(SteppedClock(AtomicU64::new(10_000_000 + 3_600_000)));
        let mut t = MasterTime::default();
        t.start(clock.clone(), Timestamp(0));
        t.applied(Timestamp(10_000_000));
        tokio::time::advance(Duration::from_millis(400)).await;
        t.applied(Timestamp(10_000_300));
        // Follows the log: the latest entry's time plus what passed since it was applied.
        assert_eq!(t.now(false), Timestamp(10_000_300));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(t.now(false), Timestamp(10_000_400));
        // An entry stamped earlier than one already seen changes nothing.
        t.applied(Timestamp(10_000_200));
        assert_eq!(t.now(false), Timestamp(10_000_400));
        t.take_over();
        assert_eq!(t.now(true), Timestamp(10_000_400));
        clock.0.store(1, Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(t.now(true), Timestamp(10_002_400));
    }

    #[tokio::test(start_paused = true)]
    async fn state_restored_before_the_start_is_the_floor() {
        let clock = Arc::new(SteppedClock(AtomicU64::new(500)));
        let mut t = MasterTime::default();
        // Replayed before the service started (no clock yet).
        t.applied(Timestamp(9_000));
        assert_eq!(t.now(false), Timestamp(9_000));
        t.start(clock, Timestamp(9_000));
        assert_eq!(t.now(true), Timestamp(9_000));
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(t.now(false), Timestamp(9_010));
        t.take_over();
        assert_eq!(t.now(true), Timestamp(9_010));
    }
}
