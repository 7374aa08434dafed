//! A node's identity (CA, certificate, key) and the rustls configurations built from it.
//!
//! Both sides use the ring provider only and TLS 1.3 only. The accepting side requires a client
//! certificate chained to the cluster CA (`WebPkiClientVerifier`); the connecting side checks the
//! accepting side's certificate against the same CA and the host it dialled (an IP SAN for an IP
//! address). Session tickets and resumption are off: every connection presents and verifies a
//! certificate, so an expired or replaced certificate takes effect on the next connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mooncake_core::{Error, Result};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::revocation::{
    CrlWatch, Revocation, RevocationClientVerifier, RevocationServerVerifier, TLS_CRL_ENV,
};
use crate::PeerIdentity;

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
    /// A file of the CA's certificate revocation lists (PEM) to check peers against, re-read
    /// when it changes (see [`crate::revocation`]); `None` checks no revocation.
    pub crl_file: Option<PathBuf>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("ca_pem", &self.ca_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .field("crl_file", &self.crl_file)
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
        Self::from_env_opt()?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "a certificate is needed: set {} to the PEM files of the cluster CA, this \
                 node's certificate and its key",
                TLS_ENV.join(", ")
            ))
        })
    }

    /// `None` when none of the [`TLS_ENV`] variables is set, the identity when all three are,
    /// and an error naming the missing ones when only some are (a half-configured node must not
    /// silently run without TLS). [`TLS_CRL_ENV`], when set, names the revocation list to check
    /// peers against; set without the others it is an error too.
    pub fn from_env_opt() -> Result<Option<Self>> {
        let vars: Vec<_> = TLS_ENV.iter().map(std::env::var_os).collect();
        let crl = std::env::var_os(TLS_CRL_ENV).filter(|v| !v.is_empty());
        if vars.iter().all(Option::is_none) {
            if crl.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "{TLS_CRL_ENV} is set but none of {}: a revocation list needs a certificate",
                    TLS_ENV.join(", ")
                )));
            }
            return Ok(None);
        }
        let missing: Vec<&str> = TLS_ENV
            .iter()
            .zip(&vars)
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| *n)
            .collect();
        if !missing.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "TLS is half configured: {} set but {} not",
                TLS_ENV
                    .iter()
                    .filter(|n| !missing.contains(n))
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", "),
                missing.join(", ")
            )));
        }
        let [ca, cert, key] = [&vars[0], &vars[1], &vars[2]].map(|v| v.clone().expect("set"));
        let identity = Self::from_pem_files(ca, cert, key)?;
        Ok(Some(match crl {
            Some(crl) => identity.with_crl_file(crl)?,
            None => identity,
        }))
    }

    /// This identity checking peers against the revocation lists in `path` (PEM), which must
    /// exist and parse now; later changes to the file take effect at the next handshake.
    pub fn with_crl_file(mut self, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        crate::revocation::read_crls(&path)?;
        self.crl_file = Some(path);
        Ok(self)
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
            crl_file: None,
        })
    }

    /// What this node's own certificate says (name, addresses, roles).
    pub fn own(&self) -> Result<PeerIdentity> {
        let p = self.parsed()?;
        PeerIdentity::from_der(&p.chain[0])
    }

    fn parsed(&self) -> Result<Parsed> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            Error::InvalidArgument(format!("tls identity: {what}: {e}"))
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

    /// The server and client configurations of this identity, offering `alpn` (one protocol
    /// name per listener kind, so a connection meant for one listener cannot be replayed at
    /// another).
    pub fn configs(&self, alpn: &[u8]) -> Result<TlsConfigs> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            Error::InvalidArgument(format!("tls config: {what}: {e}"))
        };
        let p = self.parsed()?;
        let provider = provider();
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(p.roots.clone(), provider.clone())
                .build()
                .map_err(|e| bad("client verifier", &e))?;
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(p.roots.clone(), provider.clone())
                .build()
                .map_err(|e| bad("server verifier", &e))?;
        let (verifier, server_verifier, revocation): (
            Arc<dyn rustls::server::danger::ClientCertVerifier>,
            Arc<dyn rustls::client::danger::ServerCertVerifier>,
            Option<Revocation>,
        ) = match &self.crl_file {
            None => (client_verifier, server_verifier, None),
            Some(path) => {
                let watch = Arc::new(CrlWatch::new(
                    path.clone(),
                    p.roots.clone(),
                    provider.clone(),
                )?);
                (
                    Arc::new(RevocationClientVerifier {
                        watch: watch.clone(),
                        base: client_verifier,
                    }),
                    Arc::new(RevocationServerVerifier {
                        watch: watch.clone(),
                        base: server_verifier,
                    }),
                    Some(Revocation(watch)),
                )
            }
        };
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad("server protocol versions", &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(p.chain.clone(), p.key.clone_key())
            .map_err(|e| bad("server certificate", &e))?;
        server.alpn_protocols = vec![alpn.to_vec()];
        server.max_early_data_size = 0;
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad("client protocol versions", &e))?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(p.chain, p.key)
            .map_err(|e| bad("client certificate", &e))?;
        client.alpn_protocols = vec![alpn.to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsConfigs {
            server: Arc::new(server),
            client: Arc::new(client),
            revocation,
        })
    }
}

struct Parsed {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// The ring provider, the only one compiled in. rustls marks it deprecated because ring offers
/// no post-quantum key exchange; the cluster accepts that (quinn's TLS is built on ring, and two
/// providers compiled in make rustls refuse to pick a default).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configurations of one node for one ALPN name, checked once.
#[derive(Clone, Debug)]
pub struct TlsConfigs {
    /// For accepting: requires a client certificate of the cluster CA.
    pub server: Arc<rustls::ServerConfig>,
    /// For connecting: presents this node's certificate and checks the target's.
    pub client: Arc<rustls::ClientConfig>,
    /// The revocation list both check, when the identity names one.
    pub revocation: Option<Revocation>,
}
