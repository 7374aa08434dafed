//! Same-host shared-memory transport for the mooncake-rs transfer engine.
//!
//! When two processes run on one host, moving bytes through a socket costs two copies and a
//! round trip; mapping the target's memory costs one memcpy. This transport does that, one-sided
//! like RDMA:
//!
//! - **Target.** Buffers the engine allocates are sealed memfds: the transport supplies them as
//!   its [`MemoryProvider`](mooncake_core::MemoryProvider) ([`Capabilities::memory`]). When such
//!   a buffer is registered ([`Transport::on_register`]) it takes a slot in the transport's
//!   revocation table, keeps it with the buffer and publishes an empty `shm` key in the buffer's
//!   descriptor, which tells peers it can be mapped; unregistering revokes the slot
//!   ([`Transport::on_unregister`]). The transport listens on an abstract Unix socket and
//!   publishes an `shm` endpoint naming this host (boot id and network namespace) and that
//!   socket. A connecting peer receives the revocation table; asked for the buffer holding a
//!   range, the target passes that buffer's memfd (`SCM_RIGHTS`).
//! - **Initiator.** A request whose target offers `shm` from this same host, into a buffer with
//!   an `shm` key, goes here ([`Transport::reaches`]); everything else goes to the next
//!   transport (TCP). The initiator maps each target buffer once and then copies with memcpy,
//!   checking the target's revocation table before and after each copy, and after each batch
//!   whether the target process is still there (its socket hangs up when it dies). WRITEs that
//!   ask for a landing notice are reported to the target over the socket, and acknowledged,
//!   before they complete.
//!
//! **Deadlines.** A WRITE may carry a deadline
//! ([`TransferRequest::with_deadline`](mooncake_core::TransferRequest::with_deadline)): after
//! it the target's space may belong to other data. This transport does not start a copy past
//! its deadline, but it cannot fence one that has begun: the initiator itself copies into its
//! mapping, and a copy paused midway (the process stopped, swapped out, descheduled) goes on
//! writing when it resumes, with no party in between to refuse it. The target cannot revoke the
//! mapping for one range either. Where that matters the guard is the reader's: the store
//! records a checksum of every value at commit and a reader never returns bytes that do not
//! match it (`CHECKSUM_MISMATCH`, or another replica's bytes).
//!
//! Memory is never at risk: the initiator touches only its mappings, whose pages live as long
//! as the mappings do, and its own registered memory through validated regions. What this crate
//! does not do: share caller-owned memory (only buffers the engine allocates are memfds), or
//! reach peers of another host.
//!
//! ```no_run
//! # async fn demo() -> mooncake_core::Result<()> {
//! use std::sync::Arc;
//! use mooncake_core::{EngineConfig, Location, TransferEngine, Transport};
//! use mooncake_transport_shm::{ShmConfig, ShmTransport};
//! let shm: Arc<dyn Transport> = ShmTransport::new(ShmConfig::default())?;
//! // Put it first, with TCP (say) after it for other hosts and caller-owned memory.
//! let engine = TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![shm]).await?;
//! let buf = engine.allocate_buffer(1 << 20, Location::cpu(0))?; // a memfd peers can map
//! # let _ = buf; Ok(()) }
//! ```

mod client;
mod memory;
mod proto;
mod server;
mod table;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mooncake_core::{
    BatchState, Capabilities, Endpoint, Error, LocalSegment, RegisteredBuffer, Registration,
    Result, SegmentDesc, TransferOp, Transport,
};

use client::Peer;
use memory::{Share, ShmMemory, ShmProvider};
use server::Server;
use table::SlotTable;

/// Protocol name in endpoints.
pub const PROTOCOL: &str = "shm";

/// Transport settings.
#[derive(Clone, Debug)]
pub struct ShmConfig {
    /// Bound on each exchange with a target's socket (mapping a buffer, reporting landings).
    pub timeout: Duration,
    /// After a target's socket could not be reached, requests to it go to the other transports
    /// for this long before it is tried again.
    pub retry_after: Duration,
    /// As a target: connections served at once (one per initiator process, and its threads
    /// share it); more are closed as they are accepted. Default 256.
    pub max_connections: usize,
    /// As a target: connections served at once from one process (an initiator keeps one per
    /// transport). Default 16.
    pub max_per_process: usize,
    /// As a target: a connection that sends nothing for this long is closed; its initiator
    /// connects again when it next needs to. Default 10 minutes.
    pub idle_timeout: Duration,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig {
            timeout: Duration::from_secs(5),
            retry_after: Duration::from_secs(5),
            max_connections: 256,
            max_per_process: 16,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Counters of what the transport did, for tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShmStats {
    /// Requests completed by memcpy.
    pub copies: u64,
    /// Bytes moved by them.
    pub bytes: u64,
    /// Target buffers mapped.
    pub mappings: u64,
}

/// See the crate docs.
#[derive(Debug)]
pub struct ShmTransport {
    config: ShmConfig,
    host: String,
    /// Revocation table of the buffers this transport shares.
    table: Arc<SlotTable>,
    /// One-sided, and buffers from [`ShmProvider`].
    capabilities: Capabilities,
    server: Mutex<Option<Server>>,
    peers: RwLock<HashMap<String, Arc<Peer>>>,
    unreachable: RwLock<HashMap<String, Instant>>,
    copies: AtomicU64,
    bytes: AtomicU64,
    mappings: AtomicU64,
}

impl ShmTransport {
    /// A transport for this host, or [`Error::NotSupported`] when the host cannot be
    /// identified (no `/proc`) or has no memfd support.
    pub fn new(config: ShmConfig) -> Result<Arc<ShmTransport>> {
        if config.max_connections == 0 || config.max_per_process == 0 {
            return Err(Error::InvalidArgument(
                "shm: max_connections and max_per_process must be at least 1".into(),
            ));
        }
        let host = host_identity()?;
        // Shared buffers need memfds, as the table does: find out now rather than at the first
        // allocation.
        let table =
            SlotTable::new().map_err(|e| Error::NotSupported(format!("shared memory: {e}")))?;
        Ok(Arc::new(ShmTransport {
            config,
            host,
            table: Arc::new(table),
            capabilities: Capabilities {
                one_sided: true,
                memory: Some(Arc::new(ShmProvider)),
            },
            server: Mutex::new(None),
            peers: RwLock::new(HashMap::new()),
            unreachable: RwLock::new(HashMap::new()),
            copies: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            mappings: AtomicU64::new(0),
        }))
    }

    /// What the transport has done so far.
    pub fn stats(&self) -> ShmStats {
        ShmStats {
            copies: self.copies.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            mappings: self.mappings.load(Ordering::Relaxed),
        }
    }

    /// The socket name in `endpoint` when it names this host.
    fn local_socket<'a>(&self, endpoint: &'a Endpoint) -> Option<&'a str> {
        let (host, socket) = endpoint.address.split_once('/')?;
        (host == self.host).then_some(socket)
    }

    fn peer(&self, socket: &str) -> Result<Arc<Peer>> {
        if let Some(p) = self.peers.read().expect("peers").get(socket) {
            if !p.is_dead() {
                return Ok(p.clone());
            }
        }
        // Connected without the lock: a target that does not answer holds up only its callers.
        match Peer::connect(socket, self.config.timeout) {
            Ok(p) => {
                let mut peers = self.peers.write().expect("peers");
                if let Some(q) = peers.get(socket).filter(|q| !q.is_dead()) {
                    // Another caller connected meanwhile: keep one connection.
                    p.close();
                    return Ok(q.clone());
                }
                let p = Arc::new(p);
                peers.insert(socket.to_owned(), p.clone());
                Ok(p)
            }
            Err(e) => {
                let mut peers = self.peers.write().expect("peers");
                if peers.get(socket).is_some_and(|p| p.is_dead()) {
                    peers.remove(socket);
                }
                drop(peers);
                self.unreachable
                    .write()
                    .expect("unreachable")
                    .insert(socket.to_owned(), Instant::now());
                Err(e)
            }
        }
    }

    fn forget(&self, socket: &str, peer: &Arc<Peer>) {
        let mut peers = self.peers.write().expect("peers");
        if peers.get(socket).is_some_and(|p| Arc::ptr_eq(p, peer)) {
            peers.remove(socket);
        }
    }

    fn recently_unreachable(&self, socket: &str) -> bool {
        let map = self.unreachable.read().expect("unreachable");
        match map.get(socket) {
            None => false,
            Some(at) if at.elapsed() < self.config.retry_after => true,
            Some(_) => {
                drop(map);
                self.unreachable
                    .write()
                    .expect("unreachable")
                    .remove(socket);
                false
            }
        }
    }
}

#[async_trait]
impl Transport for ShmTransport {
    fn protocol(&self) -> &'static str {
        PROTOCOL
    }

    fn reaches(&self, target: &SegmentDesc, addr: u64, len: u64) -> bool {
        let Some(socket) = target.endpoint(PROTOCOL).and_then(|e| self.local_socket(e)) else {
            return false;
        };
        let i = target.buffers.partition_point(|b| b.addr <= addr);
        let shared = i > 0 && {
            let b = &target.buffers[i - 1];
            b.key(PROTOCOL).is_some()
                && mooncake_core::memory::range_within(b.addr, b.len, addr, len)
        };
        shared && !self.recently_unreachable(socket)
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn on_register(&self, buffer: &RegisteredBuffer) -> Result<Registration> {
        // Only memfds this transport's provider made can be passed to peers; the rest (caller
        // memory, private fallbacks) is served by the other transports.
        if buffer.provided::<ShmMemory>().is_none() {
            return Ok(Registration::default());
        }
        let Some((slot, generation)) = self.table.take() else {
            tracing::warn!(
                "all {} shared-memory slots are in use; buffer {:#x} is not shared",
                table::SLOTS,
                buffer.addr()
            );
            return Ok(Registration::default());
        };
        Ok(Registration {
            keys: Some(Vec::new()),
            attachment: Some(Box::new(Share {
                slot,
                generation,
                table: self.table.clone(),
            })),
        })
    }

    fn on_unregister(&self, buffer: &RegisteredBuffer) {
        // Peers that mapped the buffer stop using it now (their copies check the slot).
        if let Some(share) = buffer.attachment::<Share>() {
            share.table.revoke(share.slot);
        }
    }

    async fn serve(&self, segment: Arc<LocalSegment>) -> Result<Endpoint> {
        let mut server = self.server.lock().expect("server");
        if server.is_some() {
            return Err(Error::InvalidArgument(
                "the shm transport serves one segment".into(),
            ));
        }
        let limits = server::Limits {
            max_connections: self.config.max_connections,
            max_per_process: self.config.max_per_process,
            request_timeout: self.config.timeout,
            idle_timeout: self.config.idle_timeout,
        };
        let s = Server::start(segment, self.table.clone(), limits)?;
        let endpoint = Endpoint {
            protocol: PROTOCOL.into(),
            address: format!("{}/{}", self.host, s.socket_name()),
        };
        *server = Some(s);
        Ok(endpoint)
    }

    async fn transfer(&self, target: &SegmentDesc, ops: Vec<TransferOp>, batch: &Arc<BatchState>) {
        let connected = target
            .endpoint(PROTOCOL)
            .and_then(|e| self.local_socket(e))
            .ok_or_else(|| Error::NoTransport {
                segment: target.name.clone(),
                offered: "no shm endpoint on this host".into(),
            })
            .and_then(|s| Ok((s, self.peer(s)?)));
        let (socket, peer) = match connected {
            Ok(p) => p,
            Err(e) => {
                let e = unreachable(&target.name, e);
                for op in ops {
                    batch.complete(op.index, Err(e.clone()));
                }
                return;
            }
        };
        let mut results: Vec<Result<()>> = Vec::with_capacity(ops.len());
        let mut landed = Vec::new();
        let (mut copies, mut bytes) = (0u64, 0u64);
        for op in &ops {
            // The copies of a batch run one after the other: a WRITE whose deadline passed
            // while earlier ones ran is not started (see "Deadlines" above).
            let r = match op.deadline {
                Some(d) if Instant::now() >= d => Err(mooncake_core::past_deadline(op.local.len())),
                _ => peer.copy(op, &self.mappings),
            };
            if r.is_ok() {
                copies += 1;
                bytes += op.local.len();
                if op.notify && op.opcode == mooncake_core::OpCode::Write {
                    landed.push((op.target_addr, op.local.len()));
                }
            }
            results.push(r);
        }
        self.copies.fetch_add(copies, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let reported = match landed.is_empty() {
            true => Ok(()),
            false => peer.report_landed(&landed),
        };
        let still_there = reported.and_then(|()| match peer.alive() {
            true => Ok(()),
            false => Err(Error::Io("the target process is gone".into())),
        });
        if let Err(e) = still_there {
            // Copies into a process that is gone are lost with it; nothing succeeded.
            self.forget(socket, &peer);
            let e = unreachable(&target.name, e);
            for r in &mut results {
                if r.is_ok() || matches!(r, Err(Error::StaleMapping(_))) {
                    *r = Err(e.clone());
                }
            }
        }
        for (op, r) in ops.iter().zip(results) {
            batch.complete(op.index, r);
        }
    }

    async fn shutdown(&self) {
        if let Some(s) = self.server.lock().expect("server").take() {
            s.stop();
        }
        for (_, p) in self.peers.write().expect("peers").drain() {
            p.close();
        }
    }
}

fn unreachable(peer: &str, e: Error) -> Error {
    match e {
        e @ (Error::PeerUnreachable { .. } | Error::NoTransport { .. }) => e,
        other => Error::PeerUnreachable {
            peer: peer.to_owned(),
            reason: format!("shared memory: {other}"),
        },
    }
}

/// This host as peers that can share memory with us see it: the kernel's boot id and our
/// network namespace (abstract sockets are per namespace).
fn host_identity() -> Result<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| Error::NotSupported(format!("reading the boot id: {e}")))?;
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map_err(|e| Error::NotSupported(format!("reading the network namespace: {e}")))?;
    let netns = netns.to_string_lossy();
    let inode: String = netns.chars().filter(char::is_ascii_digit).collect();
    Ok(format!("{}-{inode}", boot.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_identity_is_stable_and_slash_free() {
        let a = host_identity().unwrap();
        assert_eq!(a, host_identity().unwrap());
        assert!(!a.contains('/') && a.len() > 36, "{a}");
    }

    #[test]
    fn only_endpoints_of_this_host_are_local() {
        let t = ShmTransport::new(ShmConfig::default()).unwrap();
        let ep = |address: String| Endpoint {
            protocol: PROTOCOL.into(),
            address,
        };
        assert_eq!(
            t.local_socket(&ep(format!("{}/sock", t.host))),
            Some("sock")
        );
        assert_eq!(t.local_socket(&ep("other-host-1/sock".into())), None);
        assert_eq!(t.local_socket(&ep("no-slash".into())), None);
    }
}
