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
