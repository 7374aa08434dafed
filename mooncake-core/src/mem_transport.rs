//! An in-memory [`Transport`] for deterministic tests: engines in one process "connect" through a
//! shared [`MemNetwork`], and a peer's death is its removal from the network.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::transport::{
    BatchState, Endpoint, LocalSegment, OpCode, SegmentDesc, TransferOp, Transport,
};

/// The shared "wire" of in-memory transports.
#[derive(Debug, Default)]
pub struct MemNetwork {
    segments: Mutex<HashMap<String, Weak<LocalSegment>>>,
    next: AtomicU64,
}

impl MemNetwork {
    /// A new, empty network.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lookup(&self, address: &str) -> Option<Arc<LocalSegment>> {
        self.segments
            .lock()
            .expect("mem network")
            .get(address)
            .and_then(Weak::upgrade)
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct MemTransport {
    network: Arc<MemNetwork>,
    address: Mutex<Option<String>>,
}

impl MemTransport {
    /// A transport attached to `network`.
    pub fn new(network: Arc<MemNetwork>) -> Arc<Self> {
        Arc::new(MemTransport {
            network,
            address: Mutex::new(None),
        })
    }
}

#[async_trait]
impl Transport for MemTransport {
    fn protocol(&self) -> &'static str {
        "mem"
    }

    async fn serve(&self, segment: Arc<LocalSegment>) -> Result<Endpoint> {
        let port = 10_000 + self.network.next.fetch_add(1, Ordering::Relaxed);
        let address = format!("mem:{port}");
        self.network
            .segments
            .lock()
            .expect("mem network")
            .insert(address.clone(), Arc::downgrade(&segment));
        *self.address.lock().expect("mem address") = Some(address.clone());
        Ok(Endpoint {
            protocol: "mem".into(),
            address,
        })
    }

    async fn transfer(&self, target: &SegmentDesc, ops: Vec<TransferOp>, batch: &Arc<BatchState>) {
        let peer = target
            .endpoint("mem")
            .and_then(|ep| self.network.lookup(&ep.address));
        let Some(peer) = peer else {
            for op in ops {
                batch.complete(
                    op.index,
                    Err(Error::PeerUnreachable {
                        peer: target.name.clone(),
                        reason: "not on the in-memory network".into(),
                    }),
                );
            }
            return;
        };
        for op in ops {
            let result = peer
                .memory()
                .resolve(op.target_addr, op.local.len())
                .map_err(|_| Error::RemoteRangeInvalid {
                    addr: op.target_addr,
                    len: op.local.len(),
                })
                .and_then(|remote| match op.opcode {
                    OpCode::Read => remote.copy_to(&op.local),
                    OpCode::Write => op.local.copy_to(&remote),
                });
            batch.complete(op.index, result);
        }
    }

    async fn handshake(&self, address: &str) -> Result<SegmentDesc> {
        let segments: Vec<Arc<LocalSegment>> = self
            .network
            .segments
            .lock()
            .expect("mem network")
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        segments
            .into_iter()
            .find(|s| s.name() == address)
            .map(|s| s.descriptor())
            .ok_or_else(|| Error::PeerUnreachable {
                peer: address.to_owned(),
                reason: "no such segment on the in-memory network".into(),
            })
    }

    async fn shutdown(&self) {
        if let Some(a) = self.address.lock().expect("mem address").take() {
            self.network
                .segments
                .lock()
                .expect("mem network")
                .remove(&a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::Harness;

    struct MemHarness(Arc<MemNetwork>);

    impl Harness for MemHarness {
        fn transport(&self) -> Arc<dyn Transport> {
            MemTransport::new(self.0.clone())
        }
        fn hostname(&self) -> String {
            "127.0.0.1".into()
        }
    }

    crate::conformance_tests!(MemHarness(MemNetwork::new()));
}
