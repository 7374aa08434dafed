//! What a listener knows of a peer whose certificate it verified, and the roles certificates
//! carry.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use mooncake_core::{Error, Result};

/// What a certificate allows its holder to do. A certificate lists its roles in its subject's
/// organizational unit, comma-separated (`master,admin`); `mooncake_certs issue --role` writes it.
/// A certificate of the cluster CA that lists no role (one made by another tool) is a `client`
/// certificate: the master and admin roles are only ever granted explicitly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A member of the master group: may join its Raft group and serve the master's RPC.
    Master,
    /// A storage node or client of the store (also written `storage`): may use the master's
    /// data commands, the metadata service and other nodes' transfer ports.
    Client,
    /// An operator: may change the master group's membership and read the admin endpoints.
    Admin,
}

impl Role {
    /// Every role, in the order certificates list them.
    pub const ALL: [Role; 3] = [Role::Master, Role::Client, Role::Admin];

    /// The role's name in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "master" => Ok(Role::Master),
            "client" | "storage" => Ok(Role::Client),
            "admin" => Ok(Role::Admin),
            other => Err(Error::InvalidArgument(format!(
                "unknown role {other:?} (roles: master, client (or storage), admin)"
            ))),
        }
    }
}

/// Parses a certificate's organizational unit into roles; unknown words are ignored (a newer
/// CA's roles do not lock out an older node), and an empty unit means no role.
pub(crate) fn parse_roles(unit: &str) -> Vec<Role> {
    let mut roles: Vec<Role> = unit.split(',').filter_map(|r| r.parse().ok()).collect();
    roles.sort();
    roles.dedup();
    roles
}

/// What a listener knows of a peer whose certificate it verified: for authorization decisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject's common name, if the certificate has one.
    pub common_name: Option<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// The roles the certificate grants.
    pub roles: Vec<Role>,
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
        let mut roles: Vec<Role> = cert
            .subject()
            .iter_organizational_unit()
            .filter_map(|ou| ou.as_str().ok())
            .flat_map(parse_roles)
            .collect();
        if roles.is_empty() {
            roles.push(Role::Client);
        }
        let mut dns_names = Vec::new();
        let mut ip_addresses = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => dns_names.push((*n).to_owned()),
                    GeneralName::IPAddress(b) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                            ip_addresses.push(IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                            ip_addresses.push(IpAddr::from(v6));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(PeerIdentity {
            common_name,
            dns_names,
            ip_addresses,
            roles,
            certificate_der: der.to_vec(),
        })
    }

    /// The identity in the first certificate of a verified chain (as rustls hands it over).
    pub fn from_chain(chain: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> Result<Self> {
        let leaf = chain
            .and_then(|c| c.first())
            .ok_or_else(|| Error::Protocol("peer presented no certificate".into()))?;
        Self::from_der(leaf)
    }

    /// The certificate's serial number, big-endian without leading zero bytes (as revocation
    /// lists name it).
    pub fn serial(&self) -> Result<Vec<u8>> {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.certificate_der)
            .map_err(|e| Error::Protocol(format!("unparsable peer certificate: {e}")))?;
        Ok(crate::certs::trim_serial(cert.raw_serial()))
    }

    /// A short description for logs: the common name, else the first SAN.
    pub fn name(&self) -> String {
        self.common_name
            .clone()
            .or_else(|| self.dns_names.first().cloned())
            .or_else(|| self.ip_addresses.first().map(ToString::to_string))
            .unwrap_or_else(|| "<anonymous>".into())
    }

    /// True when the certificate grants `role`.
    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// True when the certificate grants any of `roles`.
    pub fn has_any_role(&self, roles: &[Role]) -> bool {
        roles.iter().any(|r| self.has_role(*r))
    }

    /// `Ok` when the certificate grants one of `roles`, else a permission error naming the
    /// peer, what it holds and what `what` needs.
    pub fn require_any(&self, roles: &[Role], what: &str) -> Result<()> {
        if self.has_any_role(roles) {
            return Ok(());
        }
        Err(Error::PermissionDenied(format!(
            "{} (roles: {}) may not {what}: it needs the {} role",
            self.name(),
            if self.roles.is_empty() {
                "none".to_owned()
            } else {
                self.roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            },
            roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(" or ")
        )))
    }
}

/// Decides whether a verified peer may use a listener. Called once per accepted connection,
/// after the TLS handshake verified the peer's certificate against the CA.
pub trait PeerAuthorizer: Send + Sync + fmt::Debug {
    /// True to serve the peer; false closes its connection before any request is read.
    fn authorize(&self, peer: &PeerIdentity, remote: SocketAddr) -> bool;
}

/// Admits peers whose certificate grants one of the listed roles.
#[derive(Clone, Debug)]
pub struct RoleAuthorizer(pub Vec<Role>);

impl PeerAuthorizer for RoleAuthorizer {
    fn authorize(&self, peer: &PeerIdentity, _remote: SocketAddr) -> bool {
        peer.has_any_role(&self.0)
    }
}
