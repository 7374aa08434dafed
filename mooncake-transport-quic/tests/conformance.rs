//! The core conformance suite, run over real loopback QUIC with mutual TLS.

mod common;

use std::sync::Arc;

use mooncake_core::conformance::Harness;
use mooncake_core::Transport;
use mooncake_transport_quic::QuicTransport;

struct Quic;

impl Harness for Quic {
    fn transport(&self) -> Arc<dyn Transport> {
        common::transport("node")
    }
    fn hostname(&self) -> String {
        "127.0.0.1".into()
    }
}

mooncake_core::conformance_tests!(Quic);

/// The same suite over one connection per peer with a low split threshold, so single-connection
/// ordering and the split path with several streams on one connection are exercised, with the
/// largest packets (a known loopback path) and small windows, so flow control blocks often.
mod one_connection {
    use super::*;

    struct One;

    impl Harness for One {
        fn transport(&self) -> Arc<dyn Transport> {
            QuicTransport::new(mooncake_transport_quic::QuicConfig {
                connections_per_peer: 1,
                split_threshold: 64 * 1024,
                min_udp_payload: mooncake_transport_quic::MAX_UDP_PAYLOAD,
                max_udp_payload: mooncake_transport_quic::MAX_UDP_PAYLOAD,
                stream_receive_window: 64 * 1024,
                receive_window: 256 * 1024,
                send_window: 256 * 1024,
                ..common::config(common::identity("node"))
            })
            .expect("valid config")
        }
        fn hostname(&self) -> String {
            "127.0.0.1".into()
        }
    }

    mooncake_core::conformance_tests!(One);
}
