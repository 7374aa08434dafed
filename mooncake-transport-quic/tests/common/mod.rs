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

/// A raw QUIC client endpoint on loopback trusting `trust`, presenting `identity`'s certificate
/// (none when `None`), speaking the transport's ALPN: for tests that talk the wire protocol by
/// hand or present credentials the transport itself would not.
#[allow(deprecated)] // the ring provider: see the crate's tls module
pub fn raw_client(trust: &CertifiedPem, identity: Option<&TlsIdentity>) -> quinn::Endpoint {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(trust.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(id.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![mooncake_transport_quic::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
}

/// Logs to the test's output (shown for failing tests), once per binary.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("mooncake_transport_quic=debug")
        .with_test_writer()
        .try_init();
}

/// Waits for `f` to become true, polling, up to `bound`.
pub async fn eventually(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < bound {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// A raw QUIC server endpoint on loopback with `identity`, requiring client certificates of the
/// test CA, granting `stream_window` bytes per stream: for tests that play a misbehaving target.
#[allow(deprecated)] // the ring provider: see the crate's tls module
pub fn raw_server(identity: &TlsIdentity, stream_window: u32) -> quinn::Endpoint {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(identity.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(identity.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    tls.alpn_protocols = vec![mooncake_transport_quic::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(stream_window.into());
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap()
}
