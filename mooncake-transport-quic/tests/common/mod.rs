//! Certificates and transports shared by the tests: one CA per test binary, node certificates
//! with the IP SAN 127.0.0.1.

#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mooncake_transport_quic::certs::{self, CertifiedPem};
use mooncake_transport_quic::{QuicConfig, QuicTransport, TlsIdentity};

/// The cluster CA of this test binary.
pub fn ca() -> &'static CertifiedPem {
    static CA: OnceLock<CertifiedPem> = OnceLock::new();
    CA.get_or_init(|| certs::new_ca("mooncake test CA").expect("CA"))
}

/// A node identity of the test CA for 127.0.0.1.
pub fn identity(name: &str) -> TlsIdentity {
    certs::issue_node_cert(ca(), name, &["127.0.0.1"])
        .expect("node cert")
        .identity(ca())
}

/// Test settings: short timeouts.
pub fn config(identity: TlsIdentity) -> QuicConfig {
    QuicConfig {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        ..QuicConfig::new(identity)
    }
}

/// A transport with test settings and a fresh identity.
pub fn transport(name: &str) -> Arc<QuicTransport> {
    QuicTransport::new(config(identity(name))).expect("valid config")
}
