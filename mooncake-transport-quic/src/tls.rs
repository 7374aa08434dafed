//! Mutual TLS: the node's identity, the rustls configurations built from it, and what a target
//! learns of a verified peer.
//!
//! Both sides use the ring provider only, TLS 1.3 only (QUIC requires it), and the ALPN name
//! [`crate::ALPN`]. The target requires a client certificate chained to the cluster CA
//! (`WebPkiClientVerifier`); the initiator checks the target's certificate against the same CA
//! and the host of the target's endpoint (an IP SAN for an IP endpoint).

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use mooncake_core::{Error, Result};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ALPN;

/// A node's TLS identity: the cluster CA it trusts, its certificate (chain) and private key, all
/// PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsIdentity {
    /// Certificates of the CA(s) peers' certificates must chain to.
    pub ca_pem: String,
    /// This node's certificate, optionally followed by intermediates.
    pub cert_pem: String,
    /// This node's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// Environment variables naming the PEM files of a node's identity: the cluster CA's
/// certificate, the node's certificate and its private key (see [`TlsIdentity::from_env`]).
pub const TLS_ENV: [&str; 3] = ["MC_TLS_CA", "MC_TLS_CERT", "MC_TLS_KEY"];

impl TlsIdentity {
    /// Reads the PEM files the [`TLS_ENV`] variables name; an error names the variables when
    /// one is not set.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| {
            std::env::var_os(name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "QUIC needs a certificate: set {} to the PEM files of the cluster CA, this \
                     node's certificate and its key ({name} is not set)",
                    TLS_ENV.join(", ")
                ))
            })
        };
        let (ca, cert, key) = (var(TLS_ENV[0])?, var(TLS_ENV[1])?, var(TLS_ENV[2])?);
        Self::from_pem_files(ca, cert, key)
    }

    /// Reads the three PEM files.
    pub fn from_pem_files(
        ca: impl AsRef<Path>,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| Error::InvalidArgument(format!("reading {}: {e}", p.display())))
        };
        Ok(TlsIdentity {
            ca_pem: read(ca.as_ref())?,
            cert_pem: read(cert.as_ref())?,
            key_pem: read(key.as_ref())?,
        })
    }

    fn parsed(&self) -> Result<Parsed> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            Error::InvalidArgument(format!("quic tls identity: {what}: {e}"))
        };
        let certs = |pem: &str, what: &str| -> Result<Vec<CertificateDer<'static>>> {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad(what, &e))?;
            if certs.is_empty() {
                return Err(bad(what, &"no certificate in the PEM text"));
            }
            Ok(certs)
        };
        let mut roots = RootCertStore::empty();
        for ca in certs(&self.ca_pem, "CA certificate")? {
            roots.add(ca).map_err(|e| bad("CA certificate", &e))?;
        }
        let chain = certs(&self.cert_pem, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| bad("private key", &e))?;
        Ok(Parsed {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }
}

struct Parsed {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// The ring provider, the only one compiled in. rustls marks it deprecated because ring offers
/// no post-quantum key exchange; the cluster accepts that (see the workspace's dependency notes
/// for why aws-lc-rs is not used alongside quinn's ring).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configurations of one node, checked once.
pub(crate) struct TlsConfigs {
    pub(crate) server: Arc<rustls::ServerConfig>,
    pub(crate) client: Arc<rustls::ClientConfig>,
}

pub(crate) fn build(identity: &TlsIdentity) -> Result<TlsConfigs> {
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        Error::InvalidArgument(format!("quic tls config: {what}: {e}"))
    };
    let p = identity.parsed()?;
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(p.roots.clone(), provider.clone())
        .build()
        .map_err(|e| bad("client verifier", &e))?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad("server protocol versions", &e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(p.chain.clone(), p.key.clone_key())
        .map_err(|e| bad("server certificate", &e))?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.max_early_data_size = 0;
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad("client protocol versions", &e))?
        .with_root_certificates(p.roots)
        .with_client_auth_cert(p.chain, p.key)
        .map_err(|e| bad("client certificate", &e))?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok(TlsConfigs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

/// What a target knows of a peer whose certificate it verified: for authorization decisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject's common name, if the certificate has one.
    pub common_name: Option<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// The peer's end-entity certificate, DER-encoded.
    pub certificate_der: Vec<u8>,
}

impl PeerIdentity {
    /// The identity in a verified end-entity certificate.
    pub fn from_der(der: &[u8]) -> Result<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| Error::Protocol(format!("unparsable peer certificate: {e}")))?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let mut dns_names = Vec::new();
        let mut ip_addresses = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => dns_names.push((*n).to_owned()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => ip_addresses
                            .push(IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes"))),
                        16 => ip_addresses
                            .push(IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes"))),
                        _ => {}
                    },
                    _ => {}
                }
            }
        }
        Ok(PeerIdentity {
            common_name,
            dns_names,
            ip_addresses,
            certificate_der: der.to_vec(),
        })
    }

    /// A short description for logs: the common name, else the first SAN.
    pub fn name(&self) -> String {
        self.common_name
            .clone()
            .or_else(|| self.dns_names.first().cloned())
            .or_else(|| self.ip_addresses.first().map(ToString::to_string))
            .unwrap_or_else(|| "<anonymous>".into())
    }

    /// The identity of the peer of a connection this node accepted, from its verified chain.
    pub(crate) fn of(conn: &quinn::Connection) -> Result<Self> {
        let certs = conn
            .peer_identity()
            .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or_else(|| Error::Protocol("peer presented no certificate".into()))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Error::Protocol("peer presented an empty chain".into()))?;
        PeerIdentity::from_der(leaf)
    }
}

/// Decides whether a verified peer may use this node's segment. Called once per accepted
/// connection, after the TLS handshake verified the peer's certificate against the CA.
pub trait PeerAuthorizer: Send + Sync + std::fmt::Debug {
    /// True to serve the peer; false closes its connection before any request is read.
    fn authorize(&self, peer: &PeerIdentity, remote: std::net::SocketAddr) -> bool;
}
