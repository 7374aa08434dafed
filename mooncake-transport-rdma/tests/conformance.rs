//! The core conformance suite on the fake verbs backend, with 1, 2 and 4 NICs per host and
//! small slices and registration chunks, so requests spread over NICs and cross chunks.

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::conformance::Harness;
use mooncake_core::Transport;
use mooncake_transport_rdma::fake::FakeFabric;
use mooncake_transport_rdma::{RdmaConfig, RdmaTransport};

struct Fake {
    fabric: Arc<FakeFabric>,
    nics: usize,
    config: RdmaConfig,
}

impl Fake {
    fn new(nics: usize, config: RdmaConfig) -> Self {
        Fake {
            fabric: FakeFabric::new(),
            nics,
            config: RdmaConfig {
                request_timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(2),
                ..config
            },
        }
    }
}

impl Harness for Fake {
    fn transport(&self) -> Arc<dyn Transport> {
        RdmaTransport::with_provider(self.config.clone(), self.fabric.host(self.nics))
            .expect("fake NICs open")
    }
    fn hostname(&self) -> String {
        "127.0.0.1".into()
    }
    fn keyed_protocols(&self) -> Vec<&'static str> {
        vec!["rdma"]
    }
}

mod one_nic {
    use super::*;
    mooncake_core::conformance_tests!(Fake::new(1, RdmaConfig::default()));
}

mod two_nics {
    use super::*;
    mooncake_core::conformance_tests!(Fake::new(
        2,
        RdmaConfig {
            slice_size: 16 << 10,
            max_mr_chunk: 1 << 20,
            ..RdmaConfig::default()
        }
    ));
}

mod four_nics_tight_limits {
    use super::*;
    mooncake_core::conformance_tests!(Fake::new(
        4,
        RdmaConfig {
            slice_size: 4096,
            max_mr_chunk: 256 << 10,
            max_slices_per_batch: 7,
            max_bytes_per_batch: 20 << 10,
            max_slices_per_peer: 16,
            qp_depth: 3,
            ..RdmaConfig::default()
        }
    ));
}
