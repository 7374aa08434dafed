//! Making a cluster's certificates: a CA and one certificate per node.
//!
//! Every node gets a certificate signed by the cluster's CA, valid both as a server certificate
//! (peers check it against the node's address) and as a client certificate (listeners check it
//! before serving anything). Its subject alternative names must cover every address peers use
//! to reach the node: IP addresses for IP endpoints, DNS names for named hosts. Its roles (see
//! [`Role`]) are written in the subject's organizational unit.
//!
//! ```
//! use mooncake_tls::certs::{new_ca, issue_node_cert, issue_role_cert};
//! use mooncake_tls::Role;
//! let ca = new_ca("mooncake test CA").unwrap();
//! let node = issue_node_cert(&ca, "node-a", &["127.0.0.1", "node-a.local"]).unwrap();
//! let identity = node.identity(&ca);
//! assert!(identity.cert_pem.contains("BEGIN CERTIFICATE"));
//! assert_eq!(identity.own().unwrap().roles, vec![Role::Client]);
//! let admin = issue_role_cert(&ca, "ops", &["127.0.0.1"], &[Role::Admin]).unwrap();
//! assert!(admin.identity(&ca).own().unwrap().has_role(Role::Admin));
//! ```

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use mooncake_core::{Error, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};

use crate::{Role, TlsIdentity};

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct CertifiedPem {
    /// The certificate (`BEGIN CERTIFICATE`).
    pub cert_pem: String,
    /// Its private key (PKCS#8, `BEGIN PRIVATE KEY`).
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedPem")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl CertifiedPem {
    /// The TLS identity of a node holding this certificate, trusting `ca`.
    pub fn identity(&self, ca: &CertifiedPem) -> TlsIdentity {
        TlsIdentity {
            ca_pem: ca.cert_pem.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            crl_file: None,
        }
    }
}

fn cert_error(what: &str, e: rcgen::Error) -> Error {
    Error::InvalidArgument(format!("{what}: {e}"))
}

/// How long certificates made here are valid by default: ten years.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A new self-signed CA named `common_name`, valid from an hour ago for [`DEFAULT_VALIDITY`].
pub fn new_ca(common_name: &str) -> Result<CertifiedPem> {
    let key = KeyPair::generate().map_err(|e| cert_error("generating a CA key", e))?;
    let cert = ca_params(common_name)
        .self_signed(&key)
        .map_err(|e| cert_error("self-signing the CA", e))?;
    Ok(CertifiedPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - Duration::from_secs(3600)).into();
    params.not_after = (now + DEFAULT_VALIDITY).into();
    params
}

/// A certificate of the `client` role (a storage node or client of the store) for
/// `common_name` signed by `ca`, valid for client and server use, with one subject alternative
/// name per entry of `names` (an IP address becomes an IP SAN, anything else a DNS SAN). Valid
/// from an hour ago for [`DEFAULT_VALIDITY`].
pub fn issue_node_cert(
    ca: &CertifiedPem,
    common_name: &str,
    names: &[&str],
) -> Result<CertifiedPem> {
    issue_role_cert(ca, common_name, names, &[Role::Client])
}

/// [`issue_node_cert`] granting `roles` instead (none at all reads as `client`).
pub fn issue_role_cert(
    ca: &CertifiedPem,
    common_name: &str,
    names: &[&str],
    roles: &[Role],
) -> Result<CertifiedPem> {
    let now = SystemTime::now();
    issue_cert(
        ca,
        common_name,
        names,
        roles,
        now - Duration::from_secs(3600),
        now + DEFAULT_VALIDITY,
    )
}

/// [`issue_node_cert`] with an explicit validity period (tests make expired certificates).
pub fn issue_node_cert_valid(
    ca: &CertifiedPem,
    common_name: &str,
    names: &[&str],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertifiedPem> {
    issue_cert(
        ca,
        common_name,
        names,
        &[Role::Client],
        not_before,
        not_after,
    )
}

/// A node certificate with every field chosen: name, subject alternative names, roles and
/// validity period.
pub fn issue_cert(
    ca: &CertifiedPem,
    common_name: &str,
    names: &[&str],
    roles: &[Role],
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertifiedPem> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| cert_error("reading the CA key", e))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
        .map_err(|e| cert_error("reading the CA certificate", e))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if !roles.is_empty() {
        let mut roles = roles.to_vec();
        roles.sort();
        roles.dedup();
        let unit = roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(",");
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, unit);
    }
    params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => (*name)
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e| cert_error(&format!("subject name {name:?}"), e)),
        })
        .collect::<Result<_>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let key = KeyPair::generate().map_err(|e| cert_error("generating a node key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| cert_error("signing the node certificate", e))?;
    Ok(CertifiedPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// One certificate a revocation list revokes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokedEntry {
    /// The certificate's serial number, big-endian, without leading zero bytes.
    pub serial: Vec<u8>,
    /// When the CA revoked it.
    pub revoked_at: SystemTime,
}

pub(crate) fn trim_serial(raw: &[u8]) -> Vec<u8> {
    let start = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].to_vec()
}

/// The serial number of the (first) certificate in `cert_pem`, big-endian without leading zero
/// bytes: what a revocation list names it by.
pub fn serial_of(cert_pem: &str) -> Result<Vec<u8>> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| Error::InvalidArgument(format!("reading a certificate: {e}")))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| Error::InvalidArgument(format!("parsing a certificate: {e}")))?;
    Ok(trim_serial(cert.raw_serial()))
}

/// The entries and the CRL number of a revocation list in PEM (the first list in the text).
pub fn read_revocation_list(crl_pem: &str) -> Result<(Vec<RevokedEntry>, u64)> {
    let der = CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes())
        .map_err(|e| Error::InvalidArgument(format!("reading a revocation list: {e}")))?;
    let (_, crl) = x509_parser::parse_x509_crl(&der)
        .map_err(|e| Error::InvalidArgument(format!("parsing a revocation list: {e}")))?;
    let entries = crl
        .iter_revoked_certificates()
        .map(|r| RevokedEntry {
            serial: trim_serial(r.raw_serial()),
            revoked_at: SystemTime::UNIX_EPOCH
                + Duration::from_secs(r.revocation_date.timestamp().max(0) as u64),
        })
        .collect();
    let number = match crl.crl_number() {
        None => 0,
        Some(n) => match n.to_u64_digits().as_slice() {
            [] => 0,
            [one] => *one,
            _ => {
                return Err(Error::InvalidArgument(
                    "the revocation list's number does not fit 64 bits".into(),
                ))
            }
        },
    };
    Ok((entries, number))
}

/// Writes `ca`'s revocation list number `crl_number`, revoking now each certificate of
/// `revoked` (PEM), to `path`: written beside it and renamed over it, so a node watching the file
/// never reads half a list. For tests and scripts that build a list from scratch
/// (`mooncake_certs revoke` adds to the list already there).
pub fn write_revocation_list(
    ca: &CertifiedPem,
    path: &std::path::Path,
    revoked: &[&str],
    crl_number: u64,
) -> Result<()> {
    let entries = revoked
        .iter()
        .map(|pem| {
            Ok(RevokedEntry {
                serial: serial_of(pem)?,
                revoked_at: SystemTime::now(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let pem = revocation_list(ca, &entries, crl_number)?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pem)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A revocation list signed by `ca` revoking `entries`, numbered `crl_number` (each new list of
/// a CA takes a higher number), valid from now for [`DEFAULT_VALIDITY`]; PEM-encoded.
pub fn revocation_list(
    ca: &CertifiedPem,
    entries: &[RevokedEntry],
    crl_number: u64,
) -> Result<String> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|e| cert_error("reading the CA key", e))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
        .map_err(|e| cert_error("reading the CA certificate", e))?;
    let now = SystemTime::now();
    let params = CertificateRevocationListParams {
        this_update: (now - Duration::from_secs(60)).into(),
        next_update: (now + DEFAULT_VALIDITY).into(),
        crl_number: SerialNumber::from(crl_number),
        issuing_distribution_point: None,
        revoked_certs: entries
            .iter()
            .map(|e| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&e.serial),
                revocation_time: e.revoked_at.into(),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    params
        .signed_by(&issuer)
        .and_then(|crl| crl.pem())
        .map_err(|e| cert_error("signing the revocation list", e))
}
