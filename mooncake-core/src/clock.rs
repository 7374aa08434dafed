//! The [`Clock`] a service takes time from, so tests can run it in virtual time.
//!
//! Two readings: wall-clock milliseconds since the Unix epoch, which a master stamps on its
//! commands (lease deadlines and TTLs are in this time, and every master of a group shares it),
//! and a monotonic instant for waits and windows. The monotonic reading is tokio's
//! [`Instant`], so a deadline taken from it and a tokio timer the caller
//! sleeps on agree, also in a runtime whose time is paused.
//!
//! [`SystemClock`] reads the system; [`VirtualClock`] derives both readings from tokio's clock,
//! so under `#[tokio::test(start_paused = true)]` (tokio's `test-util` feature) time moves only
//! when every task waits on a timer, or when the test calls `tokio::time::advance`: a TTL of a
//! minute passes in no real time, and the same run gives the same result every time.
//!
//! ```
//! use std::time::Duration;
//! use mooncake_core::{Clock, VirtualClock};
//! # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
//! let clock = VirtualClock::new(1_000);
//! tokio::time::sleep(Duration::from_secs(60)).await; // returns at once: time is paused
//! assert_eq!(clock.unix_millis(), 61_000);
//! # });
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// Where a service reads time. See the module docs.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn unix_millis(&self) -> u64;

    /// Now, for deadlines of waits and windows (tokio's clock).
    fn monotonic(&self) -> Instant;
}

/// The system's clock: [`SystemTime`] for wall time, tokio's clock (the real one, unless the
/// runtime's time is paused) for monotonic time.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_millis(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn monotonic(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that reads only tokio's clock: wall time is `base` milliseconds plus the time tokio
/// has seen pass since the clock was made. Under paused tokio time it is wholly virtual. Make it
/// inside the runtime that drives the test.
#[derive(Clone, Debug)]
pub struct VirtualClock {
    base_ms: u64,
    start: Instant,
}

impl VirtualClock {
    /// A clock reading `base_ms` ms since the epoch now.
    pub fn new(base_ms: u64) -> Self {
        VirtualClock {
            base_ms,
            start: Instant::now(),
        }
    }
}

impl Clock for VirtualClock {
    fn unix_millis(&self) -> u64 {
        self.base_ms + Instant::now().duration_since(self.start).as_millis() as u64
    }

    fn monotonic(&self) -> Instant {
        Instant::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn virtual_time_moves_only_with_tokio() {
        let clock = VirtualClock::new(5_000);
        let t0 = clock.monotonic();
        assert_eq!(clock.unix_millis(), 5_000);
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(clock.unix_millis(), 6_500);
        tokio::time::sleep(Duration::from_secs(3_600)).await;
        assert_eq!(clock.unix_millis(), 3_606_500);
        assert_eq!(clock.monotonic() - t0, Duration::from_millis(3_601_500));
    }

    #[test]
    fn system_time_is_recent() {
        // 2020-01-01 in ms: a sanity bound, not a test of the OS.
        assert!(SystemClock.unix_millis() > 1_577_836_800_000);
    }
}
