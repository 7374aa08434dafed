//! An in-memory [`Transport`] for deterministic tests: engines in one process "connect" through a
//! shared [`MemNetwork`], and a peer's death is its removal from the network.
//!
//! Like RDMA, it publishes a key for every registered buffer ([`Transport::on_register`]) and an
//! access must present the key of the buffer as the initiator's descriptor has it: a stale
//! descriptor (the buffer unregistered, or registered again) is refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::memory::{range_within, RegisteredBuffer, Registration};
use crate::transport::{
    BatchState, Endpoint, LocalSegment, OpCode, SegmentDesc, TransferOp, Transport,
};

/// The shared "wire" of in-memory transports.
#[derive(Debug, Default)]
pub struct MemNetwork {
    segments: Mutex<HashMap<String, Weak<LocalSegment>>>,
    next: AtomicU64,
    /// The last key handed out (keys are unique on the network).
    keys: AtomicU64,
}

/// Kept with each registered buffer: the key published for it.
#[derive(Debug)]
struct MemKey(u64);

/// The key `target`'s descriptor gives for the buffer holding `[addr, addr + len)`.
fn key_of(target: &SegmentDesc, addr: u64, len: u64) -> Option<u64> {
    let i = target.buffers.partition_point(|b| b.addr <= addr);
    let b = &target.buffers[i.checked_sub(1)?];
    if !range_within(b.addr, b.len, addr, len) {
        return None;
    }
    b.key("mem")?.first().copied()
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

    fn on_register(&self, buffer: &RegisteredBuffer) -> Result<Registration> {
        let _ = buffer;
        let key = self.network.keys.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Registration {
            keys: Some(vec![key]),
            attachment: Some(Box::new(MemKey(key))),
        })
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
            let (addr, len) = (op.target_addr, op.local.len());
            let key = key_of(target, addr, len);
            let result = peer
                .memory()
                .resolve(addr, len)
                .ok()
                .filter(|r| key.is_some() && r.buffer().attachment::<MemKey>().map(|k| k.0) == key)
                .ok_or(Error::RemoteRangeInvalid { addr, len })
                .and_then(|remote| match op.opcode {
                    OpCode::Read => remote.copy_to(&op.local),
                    OpCode::Write => op.local.copy_to(&remote),
                });
            if result.is_ok() && op.notify {
                peer.landed(op.target_addr, op.local.len());
                peer.flush_landings();
            }
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
        fn keyed_protocols(&self) -> Vec<&'static str> {
            vec!["mem"]
        }
    }

    crate::conformance_tests!(MemHarness(MemNetwork::new()));

    #[tokio::test]
    async fn a_stale_key_is_refused() {
        use crate::engine::{EngineConfig, TransferEngine, TransferRequest};
        use crate::memory::{AlignedBuffer, Location};

        let net = MemNetwork::new();
        let start = || {
            TransferEngine::start(
                EngineConfig::new("127.0.0.1"),
                vec![MemTransport::new(net.clone()) as Arc<dyn Transport>],
            )
        };
        let (target, initiator) = (start().await.unwrap(), start().await.unwrap());
        let local = initiator.allocate_buffer(4096, Location::cpu(0)).unwrap();
        let owned = AlignedBuffer::new(4096).unwrap();
        let register = || {
            // SAFETY: `owned` outlives every registration (unregistered before it drops).
            unsafe { target.register_memory(owned.addr(), 4096, Location::cpu(0)) }.unwrap()
        };
        register();
        let old = initiator.open_segment(target.segment_name()).await.unwrap();
        let read = |seg| TransferRequest::read(seg, owned.addr(), local, 64);
        assert!(initiator.transfer(vec![read(&old)]).await[0].is_ok());
        // Registered again at the same address: a new key, which the old descriptor lacks.
        target.unregister_memory_async(owned.addr()).unwrap().await;
        register();
        let r = initiator.transfer(vec![read(&old)]).await;
        assert!(
            matches!(r[0], Err(Error::RemoteRangeInvalid { .. })),
            "{r:?}"
        );
        let new = initiator
            .refresh_segment(target.segment_name())
            .await
            .unwrap();
        assert_ne!(old.buffers[0].keys, new.buffers[0].keys);
        assert!(initiator.transfer(vec![read(&new)]).await[0].is_ok());
        target.unregister_memory_async(owned.addr()).unwrap().await;
        target.shutdown().await;
        initiator.shutdown().await;
    }

    #[tokio::test]
    async fn segments_are_found_through_a_metadata_store() {
        use crate::engine::{Discovery, EngineConfig, TransferEngine, TransferRequest};
        use crate::memory::Location;
        use crate::metadata::{segment_key, MemoryMetadataStore, MetadataStore};

        let net = MemNetwork::new();
        let store: Arc<dyn MetadataStore> = Arc::new(MemoryMetadataStore::new());
        let start = |host: &str| {
            let mut c = EngineConfig::new(host);
            c.discovery = Discovery::Metadata(store.clone());
            TransferEngine::start(
                c,
                vec![MemTransport::new(net.clone()) as Arc<dyn Transport>],
            )
        };
        let target = start("node-a").await.unwrap();
        let initiator = start("node-b").await.unwrap();
        assert!(target.segment_name().starts_with("node-a:"));
        let remote = target.allocate_buffer(4096, Location::cpu(0)).unwrap();
        target
            .memory()
            .resolve(remote, 3)
            .unwrap()
            .write_from(b"abc")
            .unwrap();
        target.publish().await.unwrap();
        let published = store
            .get(&segment_key(target.segment_name()))
            .await
            .unwrap()
            .unwrap();
        let desc = SegmentDesc::decode(&published.value).unwrap();
        assert_eq!(desc.buffers.len(), 1);

        let local = initiator.allocate_buffer(4096, Location::cpu(0)).unwrap();
        let seg = initiator.open_segment(target.segment_name()).await.unwrap();
        let r = initiator
            .transfer(vec![TransferRequest::read(&seg, remote, local, 3)])
            .await;
        r[0].as_ref().unwrap();
        assert_eq!(
            initiator.memory().resolve(local, 3).unwrap().to_vec(),
            b"abc"
        );
        assert!(matches!(
            initiator.open_segment("node-c:1").await,
            Err(Error::SegmentNotFound(_))
        ));
        target.shutdown().await;
        assert!(
            store
                .get(&segment_key(target.segment_name()))
                .await
                .unwrap()
                .is_none(),
            "shutdown withdraws the descriptor"
        );
    }
}
