//! Certificates the cluster CA has revoked: a certificate revocation list (CRL) file that every
//! listener and every connecting side checks peers against, re-read whenever the file changes.
//!
//! `mooncake_certs revoke NODE` writes the CA's CRL (`DIR/crl.pem`); a node given that file
//! (`MC_TLS_CRL`, `--tls_crl`) refuses the revoked certificates from the next handshake on, without
//! a restart, and its listeners (master RPC, Raft, HTTP, TCP and QUIC transfers) re-check the
//! certificate of each open connection before each request ([`crate::TlsAcceptor::recheck`],
//! [`Revocation::check`]), closing the connections of one revoked meanwhile. The file is looked at (one `stat`) at each handshake and read again when its size,
//! modification time or inode changed. A CRL that cannot be read or parsed refuses every peer
//! (failing closed, with one log line per change of the file) until a good one replaces it: a node
//! never falls back to admitting revoked certificates. Each CA of the cluster's CA file needs its
//! CRL in the file (a certificate whose issuer has no CRL there is refused as of unknown status).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use mooncake_core::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;

use crate::PeerIdentity;

/// Environment variable naming a CRL file to check peers' certificates against (optional).
pub const TLS_CRL_ENV: &str = "MC_TLS_CRL";

/// What identifies one version of the CRL file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        inode: m.ino(),
    })
}

#[derive(Clone)]
struct Loaded {
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
    /// Serial numbers (big-endian, no leading zeros) the lists revoke: for peers admitted
    /// before a change of the file.
    serials: Arc<HashSet<Vec<u8>>>,
}

struct State {
    /// The file version `verifiers` was built from; `None` when the file could not be looked at.
    stamp: Option<Stamp>,
    verifiers: std::result::Result<Loaded, String>,
}

/// The CRL file and the verifiers built from its current content.
pub(crate) struct CrlWatch {
    path: PathBuf,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    state: RwLock<State>,
    /// Serials revoked by the last list that loaded (kept while a broken file replaces it).
    revoked: RwLock<Arc<HashSet<Vec<u8>>>>,
    /// Bumped whenever the file's content is loaded again.
    generation: AtomicU64,
    /// When the watch was made: the origin of `next_look`.
    born: Instant,
    /// When (ns after `born`) an established connection's check may look at the file again.
    next_look: AtomicU64,
}

/// How often checks of established connections look at the file (handshakes always do).
const LOOK_EVERY: Duration = Duration::from_millis(500);

impl std::fmt::Debug for CrlWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrlWatch")
            .field("path", &self.path)
            .finish()
    }
}

/// Reads the CRLs of a PEM file (one or more `BEGIN X509 CRL` blocks).
pub(crate) fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let text = std::fs::read(path)
        .map_err(|e| Error::InvalidArgument(format!("reading {}: {e}", path.display())))?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&text)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    if crls.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no certificate revocation list (BEGIN X509 CRL) in the file",
            path.display()
        )));
    }
    Ok(crls)
}

impl CrlWatch {
    /// Watches `path`; an error when the file cannot be read or its CRLs do not verify now (a
    /// node does not start with a broken revocation list).
    pub(crate) fn new(
        path: PathBuf,
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self> {
        let file_stamp =
            stamp(&path).map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        let loaded = build(&path, &roots, &provider).map_err(Error::InvalidArgument)?;
        Ok(CrlWatch {
            path,
            roots,
            provider,
            revoked: RwLock::new(loaded.serials.clone()),
            state: RwLock::new(State {
                stamp: Some(file_stamp),
                verifiers: Ok(loaded),
            }),
            generation: AtomicU64::new(1),
            born: Instant::now(),
            next_look: AtomicU64::new(LOOK_EVERY.as_nanos() as u64),
        })
    }

    /// `Ok` while `peer`, admitted at its handshake, is not revoked by the current list; an
    /// error naming it once it is. `seen` is the caller's memory of the list it last checked
    /// (start at 0): the serial is looked up only when the list changed since, and the file at
    /// most every [`LOOK_EVERY`], so calling this before every request costs a clock read.
    pub(crate) fn check(&self, peer: &PeerIdentity, seen: &mut u64) -> Result<()> {
        let now = self.born.elapsed().as_nanos() as u64;
        let next = self.next_look.load(Ordering::Relaxed);
        // One caller per period wins the exchange and looks at the file.
        if now >= next
            && self
                .next_look
                .compare_exchange(
                    next,
                    now + LOOK_EVERY.as_nanos() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            // Reloads the list if the file changed; its verdict on handshakes is not needed.
            let _ = self.current();
        }
        let generation = self.generation.load(Ordering::Acquire);
        if generation == *seen {
            return Ok(());
        }
        let revoked = self
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Ok(serial) = peer.serial() {
            if revoked.contains(&serial) {
                return Err(Error::PermissionDenied(format!(
                    "the certificate of {} was revoked ({})",
                    peer.name(),
                    self.path.display()
                )));
            }
        }
        *seen = generation;
        Ok(())
    }

    /// The verifiers of the file as it is now, rebuilt if it changed since the last look.
    fn current(&self) -> std::result::Result<Loaded, rustls::Error> {
        let now = stamp(&self.path).ok();
        {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            if state.stamp == now {
                return state.verifiers.clone().map_err(rustls::Error::General);
            }
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.stamp != now {
            state.verifiers = match now {
                None => Err(format!(
                    "the revocation list {} cannot be read",
                    self.path.display()
                )),
                Some(_) => build(&self.path, &self.roots, &self.provider),
            };
            state.stamp = now;
            if let Ok(loaded) = &state.verifiers {
                *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = loaded.serials.clone();
            }
            self.generation.fetch_add(1, Ordering::AcqRel);
            match &state.verifiers {
                Ok(_) => tracing::info!(
                    path = %self.path.display(),
                    "certificate revocation list reloaded"
                ),
                Err(e) => {
                    tracing::error!("{e}: refusing every peer until the file holds a valid list")
                }
            }
        }
        state.verifiers.clone().map_err(rustls::Error::General)
    }
}

fn build(
    path: &Path,
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
) -> std::result::Result<Loaded, String> {
    let crls = read_crls(path).map_err(|e| e.to_string())?;
    let mut serials = HashSet::new();
    for der in &crls {
        let (_, crl) = x509_parser::parse_x509_crl(der)
            .map_err(|e| format!("{}: parsing a revocation list: {e}", path.display()))?;
        for revoked in crl.iter_revoked_certificates() {
            serials.insert(crate::certs::trim_serial(revoked.raw_serial()));
        }
    }
    let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls.clone())
        .only_check_end_entity_revocation()
        .build()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .build()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Loaded {
        client,
        server,
        serials: Arc::new(serials),
    })
}

/// The revocation list a listener checks, for re-checking peers it admitted earlier (see
/// [`crate::TlsAcceptor::recheck`]).
#[derive(Clone, Debug)]
pub struct Revocation(pub(crate) Arc<CrlWatch>);

impl Revocation {
    /// `Ok` while `peer` is not revoked by the current list (see [`crate::TlsAcceptor::recheck`]).
    pub fn check(&self, peer: &PeerIdentity, seen: &mut u64) -> Result<()> {
        self.0.check(peer, seen)
    }
}

/// Verifies client certificates against the CA and the current CRL. Signatures and hints do
/// not depend on the CRL and go to a verifier built once.
#[derive(Debug)]
pub(crate) struct RevocationClientVerifier {
    pub(crate) watch: Arc<CrlWatch>,
    pub(crate) base: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for RevocationClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.base.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.watch
            .current()?
            .client
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.base.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.base.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.base.supported_verify_schemes()
    }
}

/// Verifies the certificate of the node a connection dialled against the CA and the current CRL.
#[derive(Debug)]
pub(crate) struct RevocationServerVerifier {
    pub(crate) watch: Arc<CrlWatch>,
    pub(crate) base: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for RevocationServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.watch.current()?.server.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.base.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.base.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.base.supported_verify_schemes()
    }
}
