//! TLS over byte streams: accepting and connecting with mutual certificates, and the
//! authenticate-then-plain mode of bulk transfers.
//!
//! Authenticate-then-plain runs a full TLS 1.3 handshake (both certificates verified), then one
//! confirmation each way inside TLS: the connecting side sends [`PLAIN_HELLO`] and waits; the
//! accepting side answers [`PLAIN_READY`] only after checking it. Neither side sends anything
//! else until it has the other's message, so when both hold it no TLS bytes are left in flight
//! or in a buffer, and the bare socket carries the rest of the connection unencrypted. Session
//! tickets are off (see [`crate::TlsIdentity::configs`]), so no TLS record can trail the
//! handshake.

use std::net::IpAddr;
use std::time::Duration;

use mooncake_core::{Error, Result};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::{client, server};

use crate::{PeerIdentity, TlsConfigs, TlsIdentity};

/// How long a handshake may take before the connection is dropped (a peer that connects and
/// says nothing must not hold a task or a socket for long).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connecting side's confirmation in authenticate-then-plain mode.
pub const PLAIN_HELLO: &[u8; 16] = b"mooncake-plain/1";
/// The accepting side's answer in authenticate-then-plain mode.
pub const PLAIN_READY: &[u8; 16] = b"mooncake-ready/1";

/// Accepts TLS connections that present a certificate of the cluster CA.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: tokio_rustls::TlsAcceptor,
    timeout: Duration,
    revocation: Option<crate::revocation::Revocation>,
}

impl std::fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// An acceptor for `identity` offering the ALPN protocol `alpn`.
    pub fn new(identity: &TlsIdentity, alpn: &[u8]) -> Result<Self> {
        Ok(Self::from_configs(&identity.configs(alpn)?))
    }

    /// An acceptor from configurations built already.
    pub fn from_configs(configs: &TlsConfigs) -> Self {
        TlsAcceptor {
            inner: tokio_rustls::TlsAcceptor::from(configs.server.clone()),
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            revocation: configs.revocation.clone(),
        }
    }

    /// Whether `peer`, admitted by this acceptor earlier, is still admitted: an error once the
    /// revocation list (if the identity has one) revokes its certificate. A server calls it
    /// before each request of a long-lived connection, with `seen` (0 at first) kept per
    /// connection; it costs a clock read unless the list changed.
    pub fn recheck(&self, peer: &PeerIdentity, seen: &mut u64) -> Result<()> {
        match &self.revocation {
            Some(r) => r.check(peer, seen),
            None => Ok(()),
        }
    }

    /// Sets how long a handshake may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs the server side of the handshake; the peer's identity comes from its verified
    /// certificate. An error says why the peer was refused (no certificate, unknown CA,
    /// expired, timeout).
    pub async fn accept<IO>(&self, io: IO) -> Result<(server::TlsStream<IO>, PeerIdentity)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = tokio::time::timeout(self.timeout, self.inner.accept(io))
            .await
            .map_err(|_| refused("handshake", "timed out"))?
            .map_err(|e| refused("handshake", &e))?;
        let peer = PeerIdentity::from_chain(stream.get_ref().1.peer_certificates())?;
        Ok((stream, peer))
    }

    /// Authenticates the peer with a full handshake, then returns the bare stream for plain
    /// (unencrypted) use; see the module's description.
    pub async fn accept_plain<IO>(&self, io: IO) -> Result<(IO, PeerIdentity)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, async move {
            let (mut tls, peer) = self.accept(io).await?;
            let mut hello = [0u8; PLAIN_HELLO.len()];
            tls.read_exact(&mut hello)
                .await
                .map_err(|e| refused("authentication", &e))?;
            if &hello != PLAIN_HELLO {
                return Err(refused("authentication", "unexpected confirmation"));
            }
            tls.write_all(PLAIN_READY)
                .await
                .map_err(|e| refused("authentication", &e))?;
            tls.flush()
                .await
                .map_err(|e| refused("authentication", &e))?;
            let (io, conn) = tls.into_inner();
            ensure_drained(conn.wants_write())?;
            Ok((io, peer))
        })
        .await
        .map_err(|_| refused("authentication", "timed out"))?
    }
}

/// Connects over TLS, presenting this node's certificate and checking the target's.
#[derive(Clone)]
pub struct TlsConnector {
    inner: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TlsConnector {
    /// A connector for `identity` offering the ALPN protocol `alpn`.
    pub fn new(identity: &TlsIdentity, alpn: &[u8]) -> Result<Self> {
        Ok(Self::from_configs(&identity.configs(alpn)?))
    }

    /// A connector from configurations built already.
    pub fn from_configs(configs: &TlsConfigs) -> Self {
        TlsConnector {
            inner: tokio_rustls::TlsConnector::from(configs.client.clone()),
            timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// Sets how long a handshake may take.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs the client side of the handshake with the target reached as `host` (an IP address
    /// or a DNS name its certificate must name).
    pub async fn connect<IO>(
        &self,
        io: IO,
        host: &str,
    ) -> Result<(client::TlsStream<IO>, PeerIdentity)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = server_name(host)?;
        let stream = tokio::time::timeout(self.timeout, self.inner.connect(name, io))
            .await
            .map_err(|_| refused_by(host, "timed out"))?
            .map_err(|e| refused_by(host, &e))?;
        let peer = PeerIdentity::from_chain(stream.get_ref().1.peer_certificates())?;
        Ok((stream, peer))
    }

    /// Authenticates both ends with a full handshake, then returns the bare stream for plain
    /// (unencrypted) use; see the module's description.
    pub async fn connect_plain<IO>(&self, io: IO, host: &str) -> Result<(IO, PeerIdentity)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, async move {
            let (mut tls, peer) = self.connect(io, host).await?;
            tls.write_all(PLAIN_HELLO)
                .await
                .map_err(|e| refused_by(host, &e))?;
            tls.flush().await.map_err(|e| refused_by(host, &e))?;
            let mut ready = [0u8; PLAIN_READY.len()];
            tls.read_exact(&mut ready)
                .await
                .map_err(|e| refused_by(host, &e))?;
            if &ready != PLAIN_READY {
                return Err(refused_by(host, "unexpected confirmation"));
            }
            let (io, conn) = tls.into_inner();
            ensure_drained(conn.wants_write())?;
            Ok((io, peer))
        })
        .await
        .map_err(|_| refused_by(host, "timed out"))?
    }
}

fn ensure_drained(wants_write: bool) -> Result<()> {
    if wants_write {
        return Err(Error::Protocol(
            "TLS data left unsent when switching to plain".into(),
        ));
    }
    Ok(())
}

/// The server name rustls checks the target's certificate against.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(bare.to_owned())
        .map_err(|e| Error::InvalidArgument(format!("{host:?} is not a valid host name: {e}")))
}

fn refused(stage: &str, e: impl std::fmt::Display) -> Error {
    Error::PermissionDenied(format!("peer refused at TLS {stage}: {e}"))
}

fn refused_by(host: &str, e: impl std::fmt::Display) -> Error {
    Error::PermissionDenied(format!("TLS with {host} failed: {e}"))
}
