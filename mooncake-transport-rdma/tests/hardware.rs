//! The core conformance suite on this host's real RDMA devices (feature `rdma-hw`; run by
//! `scripts/rdma_hw_test.sh`). Both engines of each case live in this process and reach each
//! other through the NICs (loopback through the device). `MC_RDMA_DEVICES` (comma-separated)
//! picks the devices; all by default.

#![cfg(feature = "rdma-hw")]

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::conformance::Harness;
use mooncake_core::Transport;
use mooncake_transport_rdma::{RdmaConfig, RdmaTransport};

struct Hardware;

impl Harness for Hardware {
    fn transport(&self) -> Arc<dyn Transport> {
        let devices = std::env::var("MC_RDMA_DEVICES")
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        RdmaTransport::new(RdmaConfig {
            devices,
            request_timeout: Duration::from_secs(10),
            ..RdmaConfig::default()
        })
        .expect("this test needs RDMA devices (see rdma_probe)")
    }
    fn hostname(&self) -> String {
        "127.0.0.1".into()
    }
    fn keyed_protocols(&self) -> Vec<&'static str> {
        vec!["rdma"]
    }
}

mooncake_core::conformance_tests!(Hardware);
