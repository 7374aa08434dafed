//! Identifiers, time and the deterministic random number generator of the master.
//!
//! Every value here is plain data: the master never reads a clock or an entropy source, so two
//! masters that apply the same commands with the same timestamps end in the same state.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A point in time in milliseconds, as supplied by whoever drives the master (the RPC server, the
/// Raft apply loop or a test's virtual clock). The epoch is the driver's choice.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The epoch.
    pub const ZERO: Timestamp = Timestamp(0);

    /// A timestamp `ms` milliseconds after the epoch.
    pub const fn from_millis(ms: u64) -> Timestamp {
        Timestamp(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// This time plus `ms` milliseconds, saturating at the end of time.
    pub const fn plus(self, ms: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(ms))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub const fn since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0)
    }
}

/// The end of a read lease. A client whose transfer finished at or after the deadline must treat
/// the bytes it read as suspect and report `LEASE_EXPIRED` (-707), as upstream does.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LeaseDeadline(pub Timestamp);

impl LeaseDeadline {
    /// Whether the lease still protects the object at `now`.
    pub fn is_active(self, now: Timestamp) -> bool {
        self.0 > now
    }

    /// `Ok` while the lease is active at `now`, `LEASE_EXPIRED` afterwards. Clients call this when
    /// a read transfer completes.
    pub fn check(self, now: Timestamp) -> Result<(), mooncake_core::ErrorCode> {
        if self.is_active(now) {
            Ok(())
        } else {
            Err(mooncake_core::ErrorCode::LEASE_EXPIRED)
        }
    }
}

/// Formats a 128-bit value as a UUID string (`8-4-4-4-12` hex digits).
fn fmt_uuid(v: u128, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    write!(
        f,
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        (v >> 96) as u32,
        (v >> 80) as u16,
        (v >> 64) as u16,
        (v >> 48) as u16,
        v & 0xffff_ffff_ffff
    )
}

/// Parses a UUID string (with or without hyphens) into 128 bits.
fn parse_uuid(s: &str) -> Option<u128> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

/// Error returned when a string is not a UUID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a UUID: {0:?}")]
pub struct ParseIdError(pub String);

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        pub struct $name(pub u128);

        impl $name {
            /// The all-zero id, which upstream returns alongside an error.
            pub const NIL: $name = $name(0);

            /// The id made of two 64-bit halves, as upstream's `UUID` pair.
            pub const fn from_parts(high: u64, low: u64) -> $name {
                $name(((high as u128) << 64) | low as u128)
            }

            /// The two 64-bit halves.
            pub const fn parts(self) -> (u64, u64) {
                ((self.0 >> 64) as u64, self.0 as u64)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt_uuid(self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_uuid(s).map($name).ok_or_else(|| ParseIdError(s.to_owned()))
            }
        }
    };
}

uuid_id! {
    /// A store client, identified by the UUID it generates at start-up.
    ClientId
}

uuid_id! {
    /// A copy or move task, rendered as a UUID string.
    TaskId
}

/// A mounted segment, numbered by the master in mount order; never reused, so a segment that is
/// remounted after a failure gets a new id.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct SegmentId(pub u64);

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seg#{}", self.0)
    }
}

/// A replica, numbered by the master in allocation order; never reused.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ReplicaId(pub u64);

/// A SplitMix64 generator: tiny, fast, and good enough for placement and task ids. Its state is
/// part of the master's state, so replaying the same commands draws the same numbers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`), by multiply-shift (bias below 2^-32 for small `n`).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Shuffles `items` in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// A random version-4 UUID value, never nil.
    pub fn uuid(&mut self) -> u128 {
        let v = ((self.next_u64() as u128) << 64) | self.next_u64() as u128;
        // Version 4, RFC 4122 variant.
        (v & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62)
    }
}

/// The host part of a segment name `host:port` (the whole name when it has no port).
pub fn host_of(segment_name: &str) -> &str {
    match segment_name.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => segment_name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_round_trip() {
        let id = TaskId::from_parts(0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210);
        let s = id.to_string();
        assert_eq!(s, "01234567-89ab-cdef-fedc-ba9876543210");
        assert_eq!(s.parse::<TaskId>().unwrap(), id);
        assert_eq!(id.parts(), (0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210));
        assert!("nope".parse::<TaskId>().is_err());
        assert_eq!(
            TaskId::NIL.to_string(),
            "00000000-0000-0000-0000-000000000000"
        );
    }

    #[test]
    fn rng_is_deterministic_and_uuids_are_v4() {
        let mut a = SplitMix64::new(7);
        let mut b = SplitMix64::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        for _ in 0..100 {
            let u = a.uuid();
            assert_ne!(u, 0);
            assert_eq!((u >> 76) & 0xf, 4);
            assert!(a.below(10) < 10);
        }
        let mut v: Vec<u32> = (0..20).collect();
        a.shuffle(&mut v);
        v.sort_unstable();
        assert_eq!(v, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn hosts_and_leases() {
        assert_eq!(host_of("10.0.0.1:12345"), "10.0.0.1");
        assert_eq!(host_of("node-a"), "node-a");
        assert_eq!(host_of("[::1]:80"), "[::1]");
        let d = LeaseDeadline(Timestamp(100));
        assert!(d.check(Timestamp(99)).is_ok());
        assert_eq!(
            d.check(Timestamp(100)),
            Err(mooncake_core::ErrorCode::LEASE_EXPIRED)
        );
        assert_eq!(Timestamp(5).plus(u64::MAX), Timestamp(u64::MAX));
        assert_eq!(Timestamp(5).since(Timestamp(9)), 0);
    }
}
