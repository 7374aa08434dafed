//! The core conformance suite with same-host shared memory in front of TCP: every request into
//! a shared buffer is a memcpy, the rest (handshakes, bounds refusals) goes over TCP.

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::conformance::Harness;
use mooncake_core::Transport;
use mooncake_transport_shm::{ShmConfig, ShmTransport};
use mooncake_transport_tcp::{TcpConfig, TcpTransport};

struct ShmThenTcp;

impl Harness for ShmThenTcp {
    fn transport(&self) -> Arc<dyn Transport> {
        ShmTransport::new(ShmConfig::default()).expect("shared memory on this host")
    }
    fn transports(&self) -> Vec<Arc<dyn Transport>> {
        let tcp = TcpTransport::new(TcpConfig {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            ..TcpConfig::default()
        })
        .expect("valid config");
        vec![self.transport(), tcp]
    }
    fn hostname(&self) -> String {
        "127.0.0.1".into()
    }
    fn keyed_protocols(&self) -> Vec<&'static str> {
        vec!["shm"]
    }
}

mooncake_core::conformance_tests!(ShmThenTcp);
