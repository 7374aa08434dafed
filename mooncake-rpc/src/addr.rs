//! Addresses given as `host`, `host:port`, an IP or a socket address.

use std::net::{SocketAddr, ToSocketAddrs};

use mooncake_core::{Error, Result};

/// The socket address to listen on for `host` or `host:port` (port 0 when none is given).
pub fn bind_address(local_hostname: &str) -> Result<SocketAddr> {
    if let Ok(addr) = local_hostname.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = local_hostname.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 0));
    }
    let (host, port) = match local_hostname.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (
            h,
            p.parse::<u16>()
                .map_err(|_| Error::InvalidArgument(format!("bad port in {local_hostname:?}")))?,
        ),
        _ => (local_hostname, 0),
    };
    (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::InvalidArgument(format!("resolving {local_hostname:?}: {e}")))?
        .next()
        .ok_or_else(|| Error::InvalidArgument(format!("{local_hostname:?} resolves to no address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_addresses() {
        assert_eq!(bind_address("127.0.0.1").unwrap().port(), 0);
        assert_eq!(bind_address("127.0.0.1:4567").unwrap().port(), 4567);
        assert!(bind_address("localhost").unwrap().ip().is_loopback());
        assert!(bind_address("::1").unwrap().is_ipv6());
        assert_eq!(bind_address("[::1]:80").unwrap().port(), 80);
        assert!(bind_address("localhost:x").is_err());
        assert!(bind_address("no-such-host.invalid").is_err());
    }
}
