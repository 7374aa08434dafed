//! The core conformance suite, run over real loopback sockets.

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::conformance::Harness;
use mooncake_core::Transport;
use mooncake_transport_tcp::{TcpConfig, TcpTransport};

struct Tcp;

impl Harness for Tcp {
    fn transport(&self) -> Arc<dyn Transport> {
        TcpTransport::new(TcpConfig {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            ..TcpConfig::default()
        })
        .expect("valid config")
    }
    fn hostname(&self) -> String {
        "127.0.0.1".into()
    }
}

mooncake_core::conformance_tests!(Tcp);

/// The same suite with one lane and small split/inline thresholds, so every code path of the
/// lane logic (direct sends, splits, single-lane ordering) is exercised.
mod one_lane_small_thresholds {
    use super::*;

    struct Tight;

    impl Harness for Tight {
        fn transport(&self) -> Arc<dyn Transport> {
            TcpTransport::new(TcpConfig {
                lanes: 1,
                inline_payload: 512,
                split_threshold: 64 * 1024,
                request_timeout: Duration::from_secs(5),
                ..TcpConfig::default()
            })
            .expect("valid config")
        }
        fn hostname(&self) -> String {
            "127.0.0.1".into()
        }
    }

    mooncake_core::conformance_tests!(Tight);
}

mod four_lanes {
    use super::*;

    struct Wide;

    impl Harness for Wide {
        fn transport(&self) -> Arc<dyn Transport> {
            TcpTransport::new(TcpConfig {
                lanes: 4,
                split_threshold: 64 * 1024,
                request_timeout: Duration::from_secs(5),
                ..TcpConfig::default()
            })
            .expect("valid config")
        }
        fn hostname(&self) -> String {
            "127.0.0.1".into()
        }
    }

    mooncake_core::conformance_tests!(Wide);
}

/// The same suite with both ends authenticating every connection (certificates of one CA).
mod authenticated {
    use super::*;
    use std::sync::OnceLock;

    use mooncake_transport_tcp::{certs, Role, TlsIdentity};

    /// One CA and node certificate for the whole binary (making keys costs a few ms).
    fn identity() -> TlsIdentity {
        static IDENTITY: OnceLock<TlsIdentity> = OnceLock::new();
        IDENTITY
            .get_or_init(|| {
                let ca = certs::new_ca("conformance CA").unwrap();
                certs::issue_role_cert(&ca, "node", &["127.0.0.1"], &[Role::Client])
                    .unwrap()
                    .identity(&ca)
            })
            .clone()
    }

    struct Authenticated;

    impl Harness for Authenticated {
        fn transport(&self) -> Arc<dyn Transport> {
            TcpTransport::new(TcpConfig {
                request_timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(2),
                auth: Some(identity()),
                ..TcpConfig::default()
            })
            .expect("valid config")
        }
        fn hostname(&self) -> String {
            "127.0.0.1".into()
        }
    }

    mooncake_core::conformance_tests!(Authenticated);
}
