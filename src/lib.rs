//! mooncake-rs: a distributed KV-cache store and transfer engine, as one dependency.
//!
//! This facade re-exports [`mooncake_core`] and the transports chosen with Cargo features
//! (`tcp` and same-host `shm`, on by default), and offers [`start_engine`] to get a running transfer engine with them.
//!
//! ```no_run
//! # async fn demo() -> mooncake::Result<()> {
//! use mooncake::{Discovery, Location, TransferRequest};
//! let engine = mooncake::start_engine("127.0.0.1", Discovery::P2PHandshake).await?;
//! let buf = engine.allocate_buffer(1 << 20, Location::cpu(0))?;
//! let peer = engine.open_segment("127.0.0.1:12345").await?;
//! let results = engine.transfer(vec![TransferRequest::read(&peer, 0x7f00_0000_0000, buf, 4096)]).await;
//! # Ok(()) }
//! ```

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;

pub mod admin;
pub mod http;
pub mod landing;
pub mod master_cli;
pub mod master_group;
pub mod real_client;
pub mod rpc;
pub mod service;
pub mod store;

pub use mooncake_core::master;
pub use mooncake_core::*;
#[cfg(feature = "shm")]
pub use mooncake_transport_shm as shm;
#[cfg(feature = "tcp")]
pub use mooncake_transport_tcp as tcp;

/// Starts a transfer engine named after `local_hostname` (`host` or `host:port`) with every
/// transport enabled by this crate's features, each listening on that host's address (and port,
/// when given). Same-host shared memory goes first unless [`same_host_shm_allowed`] says no.
pub async fn start_engine(
    local_hostname: &str,
    discovery: Discovery,
) -> Result<Arc<TransferEngine>> {
    start_engine_with(local_hostname, discovery, same_host_shm_allowed()).await
}

/// The environment's word on same-host shared memory: `MC_SAME_HOST_SHM=0` (or `false`, `off`)
/// turns it off for every engine of the process; anything else leaves it on.
pub fn same_host_shm_allowed() -> bool {
    !matches!(
        std::env::var("MC_SAME_HOST_SHM").as_deref().map(str::trim),
        Ok("0" | "false" | "off" | "no")
    )
}

/// [`start_engine`], saying whether peers of this host are reached through shared memory
/// (feature `shm`): the engine's buffers are then memfds that such peers map, and requests into
/// a same-host peer's shared buffers are one memcpy instead of a socket round trip. Without
/// shared-memory support on the machine the engine starts without it.
pub async fn start_engine_with(
    local_hostname: &str,
    discovery: Discovery,
    same_host_shm: bool,
) -> Result<Arc<TransferEngine>> {
    #[allow(unused_mut)]
    let mut transports: Vec<Arc<dyn Transport>> = Vec::new();
    #[cfg(feature = "shm")]
    if same_host_shm {
        match shm::ShmTransport::new(shm::ShmConfig::default()) {
            Ok(t) => transports.push(t),
            Err(e) => tracing::info!("same-host shared memory is off: {e}"),
        }
    }
    #[cfg(not(feature = "shm"))]
    let _ = same_host_shm;
    #[cfg(feature = "tcp")]
    {
        let bind = bind_address(local_hostname)?;
        let tcp = tcp::TcpTransport::new(tcp::TcpConfig {
            bind,
            ..tcp::TcpConfig::default()
        })?;
        transports.push(tcp);
    }
    let mut config = EngineConfig::new(local_hostname);
    config.discovery = discovery;
    TransferEngine::start(config, transports).await
}

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
