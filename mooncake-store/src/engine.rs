//! A running transfer engine with the transports this crate was built with (features `tcp` and
//! `shm`), for stores and for users of the engine alone.

use std::sync::Arc;

#[cfg(feature = "quic")]
use mooncake_transport_quic as quic;
#[cfg(feature = "shm")]
use mooncake_transport_shm as shm;
#[cfg(feature = "tcp")]
use mooncake_transport_tcp as tcp;

use mooncake_core::{Discovery, EngineConfig, Result, TransferEngine, Transport};

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
    start_engine_for(local_hostname, discovery, same_host_shm, "tcp").await
}

/// The protocols [`start_engine_for`] can start in this build.
pub fn available_protocols() -> Vec<&'static str> {
    [
        (cfg!(feature = "tcp"), "tcp"),
        (cfg!(feature = "quic"), "quic"),
    ]
    .into_iter()
    .filter_map(|(built, protocol)| built.then_some(protocol))
    .collect()
}

/// Environment variables naming the PEM files of this node's TLS identity: the cluster CA's
/// certificate, this node's certificate and its private key.
#[cfg(feature = "quic")]
pub use quic::TLS_ENV;

/// [`start_engine_with`] for `protocol`: `tcp` (TCP, behind same-host shared memory) or `quic`
/// (QUIC with mutual TLS, behind same-host shared memory: every transfer between hosts is
/// encrypted and both ends show a certificate of the cluster's CA, read from the files named by
/// the `MC_TLS_CA`, `MC_TLS_CERT` and `MC_TLS_KEY` variables). Every node of a cluster uses the
/// same protocol.
pub async fn start_engine_for(
    local_hostname: &str,
    discovery: Discovery,
    same_host_shm: bool,
    protocol: &str,
) -> Result<Arc<TransferEngine>> {
    if !available_protocols().contains(&protocol) {
        return Err(mooncake_core::Error::NotSupported(format!(
            "protocol {protocol:?} is not available in this build (available: {})",
            available_protocols().join(", ")
        )));
    }
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
    if protocol == "tcp" {
        let bind = mooncake_rpc::bind_address(local_hostname)?;
        let tcp = tcp::TcpTransport::new(tcp::TcpConfig {
            bind,
            ..tcp::TcpConfig::default()
        })?;
        transports.push(tcp);
    }
    #[cfg(feature = "quic")]
    if protocol == "quic" {
        let identity = tls_identity_from_env()?;
        let mut config = quic::QuicConfig::new(identity);
        config.bind = mooncake_rpc::bind_address(local_hostname)?;
        transports.push(quic::QuicTransport::new(config)?);
    }
    let mut config = EngineConfig::new(local_hostname);
    config.discovery = discovery;
    TransferEngine::start(config, transports).await
}

/// This node's TLS identity, from the PEM files the [`TLS_ENV`] variables name.
#[cfg(feature = "quic")]
pub fn tls_identity_from_env() -> Result<quic::TlsIdentity> {
    quic::TlsIdentity::from_env()
}
