//! The QUIC side of mutual TLS: the node's rustls configurations for the QUIC ALPN name, and the
//! verified identity of a connection's peer. Identities, certificates and roles are
//! `mooncake-tls`'s.

use mooncake_core::{Error, Result};
use mooncake_tls::{PeerIdentity, TlsConfigs, TlsIdentity};
use rustls_pki_types::CertificateDer;

use crate::ALPN;

pub(crate) fn build(identity: &TlsIdentity) -> Result<TlsConfigs> {
    identity.configs(ALPN)
}

/// The identity of the peer of a connection, from its verified chain.
pub(crate) fn peer_of(conn: &quinn::Connection) -> Result<PeerIdentity> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| Error::Protocol("peer presented no certificate".into()))?;
    PeerIdentity::from_chain(Some(&certs))
}
