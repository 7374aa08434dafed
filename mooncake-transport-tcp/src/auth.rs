//! Authenticated plain TCP: both ends of every connection show a certificate of the cluster CA
//! before the first byte of the transfer protocol, then the connection carries that protocol
//! unencrypted, exactly as without authentication.
//!
//! Initiator: TCP connect, then [`TlsConnector::connect_plain`] (a full TLS 1.3 handshake with
//! ALPN [`ALPN`], both certificates verified, the target's against the address dialled), then the
//! target's roles are checked, then the preamble. Target: [`TlsAcceptor::accept_plain`], then the
//! peer's roles, then the preamble; all of it within the connect timeout, holding one place of
//! the listener's connection caps.
//!
//! Refusals are explicit on the wire, so the refused side gets a clear error rather than a reset:
//! - a plain initiator at an authenticating target (its first byte is the preamble's, not a TLS
//!   record's) and an authenticated initiator whose certificate's roles the target does not
//!   admit are answered with [`frame::encode_refusal`] and closed, nothing of theirs served;
//! - an authenticated initiator at a plain target sends a TLS ClientHello where the preamble
//!   should be: the plain target answers with a TLS `no_application_protocol` alert
//!   (`TLS_ALERT_NO_APPLICATION_PROTOCOL`), which the initiator reports as "the target does not
//!   authenticate";
//! - with a revocation list ([`TlsIdentity::crl_file`]), a peer revoked while its connection is
//!   open is refused at its next request: the target checks the certificate the connection
//!   authenticated with before every request ([`Auth::recheck`]: a clock read and an atomic
//!   load unless the list changed), answers the requests it had served, then sends the refusal,
//!   logs the certificate's name and closes. A revoked certificate's new connections fail the
//!   handshake.
//!
//! A refused connection's unread bytes are discarded, not interpreted, for a short bounded time
//! after the refusal is sent, so the refusal is not lost to a connection reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mooncake_core::admission::RefusalLog;
use mooncake_core::{Error, Result};
use mooncake_tls::{
    PeerAuthorizer, PeerIdentity, Role, RoleAuthorizer, TlsAcceptor, TlsConnector, TlsIdentity,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::frame;
use crate::TcpConfig;

/// The ALPN protocol name of authenticated transfer connections (so a certificate's handshake
/// meant for another listener kind cannot be replayed here).
pub const ALPN: &[u8] = b"mooncake-tcp/1";

/// The roles a peer's certificate needs by default, on both ends: a storage node or client
/// (`client`), or a member of the master group (`master`).
pub const DEFAULT_ROLES: [Role; 2] = [Role::Client, Role::Master];

/// What a plain target sends to a peer that opens with a TLS handshake: a fatal TLS alert
/// record (content type 21, TLS 1.2 record version, length 2, level fatal,
/// `no_application_protocol`), which a TLS client reports as such.
pub(crate) const TLS_ALERT_NO_APPLICATION_PROTOCOL: [u8; 7] =
    [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x78];

/// First byte of a TLS handshake record (a ClientHello).
pub(crate) const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// How long a refused connection's unread bytes are discarded, at most, so that the refusal
/// reaches the peer before the socket closes.
const LINGER: Duration = Duration::from_millis(500);
/// How many unread bytes of a refused connection are discarded, at most.
const LINGER_BYTES: usize = 1 << 20;

/// The authentication of one transport: its acceptor and connector (configurations built once)
/// and who it admits.
pub(crate) struct Auth {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    authorizer: Arc<dyn PeerAuthorizer>,
    /// This node's certificate, described for error messages.
    own: String,
    refusals: RefusalLog,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("own", &self.own)
            .field("authorizer", &self.authorizer)
            .finish_non_exhaustive()
    }
}

/// An accepted connection refused: why (for the target's log line), and the connection when
/// a refusal was sent on it (to [`linger`] on once the refusal is logged).
pub(crate) struct Refused {
    pub(crate) reason: String,
    pub(crate) answered: Option<TcpStream>,
}

impl Refused {
    fn new(reason: String) -> Self {
        Refused {
            reason,
            answered: None,
        }
    }
}

impl Auth {
    /// The authentication `config` asks for, if any; an unusable identity is an error here, at
    /// construction, rather than at the first connection.
    pub(crate) fn from_config(config: &TcpConfig) -> Result<Option<Arc<Auth>>> {
        let Some(identity) = &config.auth else {
            return Ok(None);
        };
        Ok(Some(Arc::new(Auth::new(
            identity,
            config.authorizer.clone(),
            config.connect_timeout,
        )?)))
    }

    fn new(
        identity: &TlsIdentity,
        authorizer: Option<Arc<dyn PeerAuthorizer>>,
        timeout: Duration,
    ) -> Result<Auth> {
        let configs = identity.configs(ALPN)?;
        let own = identity.own()?;
        Ok(Auth {
            acceptor: TlsAcceptor::from_configs(&configs).with_timeout(timeout),
            connector: TlsConnector::from_configs(&configs).with_timeout(timeout),
            authorizer: authorizer
                .unwrap_or_else(|| Arc::new(RoleAuthorizer(DEFAULT_ROLES.to_vec()))),
            own: describe(&own),
            refusals: RefusalLog::default(),
        })
    }

    /// This node's certificate, described for error messages.
    pub(crate) fn own(&self) -> &str {
        &self.own
    }

    /// Initiator side: authenticates a fresh connection to `peer` (`host:port`) and checks the
    /// target's roles. The caller bounds the time.
    pub(crate) async fn connect(&self, stream: TcpStream, peer: &str) -> Result<TcpStream> {
        let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h);
        let remote = stream.peer_addr().map_err(|e| Error::PeerUnreachable {
            peer: peer.to_owned(),
            reason: format!("connection lost before authentication: {e}"),
        })?;
        let (stream, target) = match self.connector.connect_plain(stream, host).await {
            Ok(r) => r,
            Err(e) => {
                let reason = match e {
                    Error::PermissionDenied(m) => m,
                    other => other.to_string(),
                };
                let hint = if reason.contains("NoApplicationProtocol") {
                    " (the target does not authenticate transfer connections: it serves plain \
                     TCP without certificates, or the port is not a transfer port)"
                } else {
                    ""
                };
                return Err(Error::PermissionDenied(format!(
                    "transfer target {peer} could not be authenticated: {reason}{hint}"
                )));
            }
        };
        if !self.authorizer.authorize(&target, remote) {
            tracing::warn!(%peer, target = %describe(&target), authorizer = ?self.authorizer,
                "refusing transfer target: its certificate's roles are not admitted");
            return Err(Error::PermissionDenied(format!(
                "transfer target {peer} presented a certificate ({}) whose roles this node does \
                 not admit ({:?})",
                describe(&target),
                self.authorizer
            )));
        }
        Ok(stream)
    }

    /// Target side: authenticates an accepted connection from `remote` and checks its roles.
    /// Refused peers get a refusal (see the module's description); the caller logs the reason
    /// with [`Auth::log_refusal`], lingers on the answered connection, and bounds the time.
    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
        remote: SocketAddr,
    ) -> std::result::Result<(TcpStream, PeerIdentity), Refused> {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(0) => return Err(Refused::new("closed before authenticating".into())),
            Ok(_) => {}
            Err(e) => {
                return Err(Refused::new(format!(
                    "i/o error before authenticating: {e}"
                )))
            }
        }
        if first[0] == frame::MAGIC[0] {
            return Err(refuse(
                stream,
                "it speaks the plain transfer protocol without a certificate; this target \
                 requires one of its cluster CA"
                    .into(),
            )
            .await);
        }
        let (stream, peer) = self
            .acceptor
            .accept_plain(stream)
            .await
            .map_err(|e| Refused::new(e.to_string()))?;
        if !self.authorizer.authorize(&peer, remote) {
            let reason = format!(
                "its certificate ({}) lacks the roles this target admits ({:?})",
                describe(&peer),
                self.authorizer
            );
            // The peer reads TLS until it has the confirmation, and may read ahead: the refusal
            // goes out only once its first plain bytes (the preamble) show it stopped.
            let mut first = [0u8; 1];
            return Err(match stream.peek(&mut first).await {
                Ok(n) if n > 0 => refuse(stream, reason).await,
                _ => Refused::new(reason),
            });
        }
        Ok((stream, peer))
    }

    /// `Ok` while `peer`, admitted by [`Auth::accept`] earlier, is not revoked by the
    /// revocation list (if the identity has one); an error naming its certificate once it is.
    /// `seen` (0 at first) is kept per connection: see [`TlsAcceptor::recheck`].
    pub(crate) fn recheck(&self, peer: &PeerIdentity, seen: &mut u64) -> Result<()> {
        self.acceptor.recheck(peer, seen)
    }

    /// Logs a refused connection: at most one line a second, with the count of those not
    /// logged since.
    pub(crate) fn log_refusal(&self, remote: SocketAddr, reason: &str) {
        log_refusal(&self.refusals, remote, reason);
    }
}

/// Sends the refusal ([`frame::encode_refusal`]) on `stream`.
async fn refuse(mut stream: TcpStream, reason: String) -> Refused {
    let sent = stream.write_all(&frame::encode_refusal()).await.is_ok();
    Refused {
        reason,
        answered: sent.then_some(stream),
    }
}

/// Half-closes `stream` and discards its unread bytes until the peer closes, for at most
/// [`LINGER`] and [`LINGER_BYTES`]: closing a socket with unread bytes resets the connection,
/// which could destroy the answer just sent before the peer reads it.
pub(crate) async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            if stream.readable().await.is_err() {
                return;
            }
            match stream.try_read(&mut sink) {
                Ok(0) => return,
                Ok(n) => left = left.saturating_sub(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// A certificate described for logs and errors: its name and roles.
fn describe(peer: &PeerIdentity) -> String {
    let roles: Vec<&str> = peer.roles.iter().map(|r| r.as_str()).collect();
    format!(
        "{}, roles: {}",
        peer.name(),
        if roles.is_empty() {
            "none".to_owned()
        } else {
            roles.join(",")
        }
    )
}

/// Logs a refused transfer connection, at most one line a second.
fn log_refusal(log: &RefusalLog, remote: SocketAddr, reason: &str) {
    match log.admit() {
        None => {}
        Some(0) => {
            tracing::warn!(%remote, "refusing a transfer connection from {remote}: {reason}")
        }
        Some(suppressed) => tracing::warn!(%remote, suppressed,
            "refusing a transfer connection from {remote}: {reason} ({suppressed} more \
             refusals not logged in the last second)"),
    }
}
