//! How many connections a listener keeps open: at most so many in all and from one IP address.
//! Servers ask [`Admission::admit`] for each accepted connection and hold the returned
//! [`Admitted`] for as long as they serve it; a refusal is logged at most once a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Connection caps of one listener. Cheap to clone: clones share the counts.
#[derive(Clone, Debug)]
pub struct Admission {
    what: &'static str,
    max_total: usize,
    max_per_address: usize,
    open: Arc<Mutex<Open>>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
    /// When a refusal was last logged.
    last_warning: Option<Instant>,
}

/// A connection's place in its listener's [`Admission`], given back when dropped.
#[derive(Debug)]
pub struct Admitted {
    open: Arc<Mutex<Open>>,
    ip: IpAddr,
}

impl Admission {
    /// Caps for the listener of `what` (named in log lines): `max_total` connections, and
    /// `max_per_address` from one IP address.
    pub fn new(what: &'static str, max_total: usize, max_per_address: usize) -> Self {
        Admission {
            what,
            max_total,
            max_per_address,
            open: Arc::default(),
        }
    }

    /// Admits a connection from `ip`, or says why not (and logs it, once a second at most).
    pub fn admit(&self, ip: IpAddr) -> Result<Admitted, String> {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = o.per_address.get(&ip).copied().unwrap_or(0);
        let refusal = if o.total >= self.max_total {
            Some(format!("{} connections open", o.total))
        } else if from_ip >= self.max_per_address {
            Some(format!("{from_ip} connections open from {ip}"))
        } else {
            None
        };
        if let Some(why) = refusal {
            let now = Instant::now();
            if o.last_warning
                .is_none_or(|t| now - t >= Duration::from_secs(1))
            {
                o.last_warning = Some(now);
                tracing::warn!(
                    "{}: refusing a connection from {ip}: {why} (at most {} in all, {} per \
                     address)",
                    self.what,
                    self.max_total,
                    self.max_per_address
                );
            }
            return Err(why);
        }
        o.total += 1;
        *o.per_address.entry(ip).or_default() += 1;
        Ok(Admitted {
            open: self.open.clone(),
            ip,
        })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        o.total -= 1;
        if let Some(n) = o.per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                o.per_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_all_and_per_address_and_places_come_back() {
        let a = Admission::new("test", 3, 2);
        let (x, y) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let x1 = a.admit(x).unwrap();
        let _x2 = a.admit(x).unwrap();
        assert!(a.admit(x).unwrap_err().contains("from 10.0.0.1"));
        let _y1 = a.admit(y).unwrap();
        assert!(a.admit(y).unwrap_err().contains("3 connections open"));
        drop(x1);
        let _x3 = a.admit(x).unwrap();
    }
}

/// Rate limit of one listener's refusal log lines: at most one a second, the next line saying
/// how many were left out (a peer retrying in a loop must not flood the log).
#[derive(Debug, Default)]
pub struct RefusalLog {
    state: Mutex<(Option<Instant>, u64)>,
}

impl RefusalLog {
    /// A log that has logged nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `Some(left_out)` when a line may be logged now (with the number of refusals not logged
    /// since the last line), `None` when this refusal is only counted.
    pub fn admit(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if s.0
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            s.1 += 1;
            return None;
        }
        s.0 = Some(now);
        Some(std::mem::take(&mut s.1))
    }

    /// Logs (at warn) that `what` refused `peer` because of `reason`, unless a refusal was
    /// logged less than a second ago (then it is only counted, and the next line says so).
    pub fn refused(&self, what: &str, peer: &str, reason: &dyn std::fmt::Display) {
        match self.admit() {
            None => {}
            Some(0) => tracing::warn!("{what}: refused {peer}: {reason}"),
            Some(skipped) => tracing::warn!(
                "{what}: refused {peer}: {reason} ({skipped} more refusals not logged)"
            ),
        }
    }
}

/// Rate limit of refusal log lines per source address and reason (a handshake error, a
/// certificate's name): one per pair every `every`, so a peer refused again and again does not
/// flood the log while every distinct refusal is still seen. Remembers at most 1,024 pairs.
/// Cheap to clone: clones share the memory.
#[derive(Clone, Debug)]
pub struct RefusalLogByPeer {
    every: Duration,
    last: Arc<Mutex<HashMap<(IpAddr, String), Instant>>>,
}

impl RefusalLogByPeer {
    /// One line per address and reason every `every`.
    pub fn new(every: Duration) -> Self {
        RefusalLogByPeer {
            every,
            last: Arc::default(),
        }
    }

    /// Whether a refusal of `ip` for `reason` (its first 80 characters) may be logged now.
    pub fn allow(&self, ip: IpAddr, reason: &str) -> bool {
        const MOST: usize = 1024;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last.len() >= MOST {
            last.retain(|_, t| now.saturating_duration_since(*t) < self.every);
            if last.len() >= MOST {
                return false;
            }
        }
        let key = (ip, reason.chars().take(80).collect::<String>());
        match last.get(&key) {
            Some(t) if now.saturating_duration_since(*t) < self.every => false,
            _ => {
                last.insert(key, now);
                true
            }
        }
    }
}
