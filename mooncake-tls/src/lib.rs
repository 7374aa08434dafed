//! Cluster certificates and mutual TLS for every mooncake-rs listener.
//!
//! A cluster that wants only its members admitted gives each node a certificate signed by the
//! cluster's CA ([`certs`], or the `mooncake_certs` command). The certificate names the node
//! (common name, IP and DNS subject alternative names) and its [`Role`]s: `master` (a member of
//! the master group), `client` (a storage node or client of the store), `admin` (may change the
//! master group's membership and read the admin endpoints).
//!
//! Every listener takes the same [`TlsIdentity`] and:
//! - over TCP streams, wraps connections with [`TlsAcceptor`] / [`TlsConnector`] (TLS 1.3,
//!   mutual certificates, ring as the only crypto provider);
//! - for bulk transfers that choose speed over secrecy, [`TlsAcceptor::accept_plain`] /
//!   [`TlsConnector::connect_plain`] authenticate both ends with a full TLS handshake and then
//!   hand back the bare socket, which carries the rest of the connection unencrypted;
//! - QUIC builds its endpoints from [`TlsIdentity::configs`].
//!
//! A peer without a certificate, with one of another CA, an expired one, a revoked one (see
//! [`revocation`]) or one lacking the role a listener requires is refused before any request is
//! read.

#![deny(unsafe_code)]

pub mod certs;
#[cfg(feature = "cli")]
pub mod cli;
mod identity;
mod peer;
pub mod revocation;
mod stream;

pub use identity::{TlsConfigs, TlsIdentity, TLS_ENV};
pub use peer::{PeerAuthorizer, PeerIdentity, Role, RoleAuthorizer};
pub use revocation::{Revocation, TLS_CRL_ENV};
pub use stream::{TlsAcceptor, TlsConnector, DEFAULT_HANDSHAKE_TIMEOUT, PLAIN_HELLO, PLAIN_READY};

/// Re-exported so users of [`TlsAcceptor`] and [`TlsConnector`] name the stream types without a
/// direct dependency.
pub use tokio_rustls;
