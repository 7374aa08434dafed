//! RDMA transport for the mooncake-rs transfer engine: one-sided READ and WRITE straight between
//! registered memory of two processes, over every NIC of both hosts.
//!
//! What it does:
//! - opens the host's devices (all, or those named in [`RdmaConfig::devices`]), one protection
//!   domain and one completion queue each; no device, or a kernel without RDMA (`ENOSYS`), is
//!   the error "no RDMA devices", never a panic;
//! - registers every buffer of the segment with every device, in chunks below the devices'
//!   region size limit, and publishes the remote keys in the buffer's descriptor (under `rdma`:
//!   see [`plan::encode_keys`]), with which of its NICs the owner prefers for that memory;
//!   unregistering deregisters them at once, so peers are refused from then on;
//! - connects RC queue pairs per peer and NIC pair on first use, exchanging their addresses
//!   (and negotiating the path MTU) over a small TCP side channel ([`side`]), which also
//!   answers the `P2PHANDSHAKE` descriptor request and carries landing notices;
//! - cuts requests into slices ([`RdmaConfig::slice_size`], never across a registration chunk)
//!   and spreads them over the NICs of both ends after the NIC priority matrix
//!   ([`NicPriorityMatrix`]; auto-selection by NUMA node when empty);
//! - bounds the slices and bytes in flight per peer and per batch, so a batch of hundreds of
//!   thousands of slices is fed to the NICs gradually instead of timing out;
//! - polls the completion queues from the transfers themselves, one queue per NIC (no thread per
//!   queue pair);
//! - retries a slice that failed for a transport reason (retry exceeded, a flushed or broken
//!   queue pair, a lost completion) on another NIC pair, replacing the broken queue pair; a
//!   refused key fails exactly the request it belongs to;
//! - reports WRITEs that asked for a landing notice to the target with a follow-up message once
//!   all their slices completed, and completes them when the target acknowledged;
//! - once a peer's slices failed on every NIC pair, declines the peer for a while
//!   ([`RdmaConfig::failover_cooldown`]) so the engine's next transport (TCP) carries its later
//!   requests; the requests that failed are not sent again by the transport.
//!
//! The verbs are behind a small trait family ([`verbs`]) with two implementations: `sideway`
//! (feature `rdma`) and an in-process fake ([`fake`]) on which the conformance suite runs.
//!
//! ```
//! use mooncake_core::{EngineConfig, TransferEngine};
//! use mooncake_transport_rdma::{fake::FakeFabric, RdmaConfig, RdmaTransport};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let fabric = FakeFabric::new();
//! let rdma = RdmaTransport::with_provider(RdmaConfig::default(), fabric.host(2)).unwrap();
//! let engine = TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![rdma]).await.unwrap();
//! assert!(engine.local_descriptor().endpoint("rdma").is_some());
//! # engine.shutdown().await;
//! # });
//! ```

pub mod fake;
pub mod plan;
mod sched;
pub mod side;
#[cfg(feature = "rdma")]
pub mod sideway_verbs;
pub mod verbs;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use mooncake_core::memory::range_within;
use mooncake_core::{
    BatchState, Capabilities, Endpoint, Error, LocalSegment, OpCode, RegisteredBuffer,
    Registration, Result, SegmentDesc, TransferOp, Transport,
};
use tokio::task::JoinHandle;

pub use plan::NicPriorityMatrix;
use plan::{pick_nic, slice_request, Chunking, NicInfo, RemoteKeys, MAX_NICS};
use sched::{Blocked, Core, Inbox, Limits, Outgoing};
use side::{Client, PathRequest, Request, Response};
use verbs::{negotiate_mtu, Device, MemoryRegion, Provider, WcStatus, WrOp};

/// RDMA transport settings.
#[derive(Clone, Debug)]
pub struct RdmaConfig {
    /// Address the side channel listens on. Default `127.0.0.1:0`: set the host's address for a
    /// multi-host cluster.
    pub bind: SocketAddr,
    /// Host name or address to advertise, when peers must use another than the bound IP.
    pub advertise_host: Option<String>,
    /// Devices to use, by name; empty (the default) uses every device present.
    pub devices: Vec<String>,
    /// Which NICs serve which memory; empty (the default) is auto-selection.
    pub nic_priority: NicPriorityMatrix,
    /// Largest slice a request is cut into. Default 64 KiB.
    pub slice_size: u64,
    /// Largest registration chunk (also capped by each device's limit). Default 1 GiB.
    pub max_mr_chunk: u64,
    /// Most slices in flight to one peer. Default 4096.
    pub max_slices_per_peer: usize,
    /// Most bytes in flight to one peer. Default 256 MiB.
    pub max_bytes_per_peer: u64,
    /// Most slices one batch has in flight. Default 1024.
    pub max_slices_per_batch: usize,
    /// Most bytes one batch has in flight. Default 64 MiB.
    pub max_bytes_per_batch: u64,
    /// Send queue depth of each queue pair. Default 512.
    pub qp_depth: u32,
    /// Depth of each NIC's completion queue (also the bound on its slices in flight).
    /// Default 16384.
    pub cq_depth: u32,
    /// Attempts after the first for a slice that failed for a transport reason. Default 4.
    pub max_retries: u32,
    /// Bound on one `transfer` call. Requests still pending then time out, after the queue
    /// pairs carrying them are torn down. Default 30 s.
    pub request_timeout: Duration,
    /// Bound on connecting the side channel. Default 5 s.
    pub connect_timeout: Duration,
    /// Side-channel connections served at once (one per peer process that transfers with this
    /// one); more are closed as they are accepted. Default 1024.
    pub max_connections: usize,
    /// Side-channel connections served at once from one IP address. Default 256.
    pub max_per_address: usize,
    /// After a peer's slices failed on every NIC pair they tried, this transport declines the
    /// peer for this long ([`Transport::reaches`] says no when the peer offers another
    /// protocol), so the engine's next transport that reaches it (TCP) carries its requests;
    /// then RDMA is tried again. Default 10 s.
    pub failover_cooldown: Duration,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_host: None,
            devices: Vec::new(),
            nic_priority: NicPriorityMatrix::new(),
            slice_size: 64 << 10,
            max_mr_chunk: 1 << 30,
            max_slices_per_peer: 4096,
            max_bytes_per_peer: 256 << 20,
            max_slices_per_batch: 1024,
            max_bytes_per_batch: 64 << 20,
            qp_depth: 512,
            cq_depth: 16384,
            max_retries: 4,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_connections: 1024,
            max_per_address: 256,
            failover_cooldown: Duration::from_secs(10),
        }
    }
}

impl RdmaConfig {
    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(format!("rdma config: {m}")));
        if self.slice_size == 0 || self.slice_size > 1 << 30 {
            return bad("slice_size must be between 1 byte and 1 GiB");
        }
        if self.max_mr_chunk < 4096 {
            return bad("max_mr_chunk below 4 KiB");
        }
        if self.max_slices_per_peer == 0 || self.max_slices_per_batch == 0 {
            return bad("slice limits must be at least 1");
        }
        if self.max_bytes_per_peer == 0 || self.max_bytes_per_batch == 0 {
            return bad("byte limits must be at least 1");
        }
        if self.qp_depth == 0 || self.cq_depth == 0 {
            return bad("queue depths must be at least 1");
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad("timeouts must be non-zero");
        }
        if self.max_connections == 0 || self.max_per_address == 0 {
            return bad("max_connections and max_per_address must be at least 1");
        }
        Ok(())
    }
}

/// Kept with each registered buffer: its regions on every device, revoked at unregistration.
struct BufferMrs {
    /// Which transport registered them.
    owner: u64,
    chunking: Chunking,
    devices: usize,
    /// `lkeys[chunk * devices + device]`.
    lkeys: Vec<u32>,
    regions: Mutex<Vec<Box<dyn MemoryRegion>>>,
}

impl BufferMrs {
    fn lkey(&self, chunk: u32, device: u16) -> u32 {
        self.lkeys[chunk as usize * self.devices + device as usize]
    }
}

/// One peer as this transport reaches it.
#[derive(Debug)]
struct PeerLink {
    id: u32,
    client: tokio::sync::Mutex<Client>,
    /// Declined until then (see [`RdmaConfig::failover_cooldown`]).
    down_until: Mutex<Option<Instant>>,
}

impl PeerLink {
    fn is_down(&self) -> bool {
        let mut d = self.down_until.lock().expect("down_until");
        match *d {
            Some(t) if t > Instant::now() => true,
            Some(_) => {
                *d = None;
                false
            }
            None => false,
        }
    }
}

static NEXT_TRANSPORT: AtomicU64 = AtomicU64::new(1);

/// See the crate docs.
pub struct RdmaTransport {
    id: u64,
    config: Arc<RdmaConfig>,
    core: Arc<Core>,
    infos: Vec<NicInfo>,
    chunk: u64,
    links: Mutex<HashMap<String, Arc<PeerLink>>>,
    server: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
    capabilities: Capabilities,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field(
                "nics",
                &self.infos.iter().map(|i| &i.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl RdmaTransport {
    /// A transport on the host's RDMA devices (through `sideway`). Without the `rdma` feature,
    /// or without devices, an error says what is missing.
    pub fn new(config: RdmaConfig) -> Result<Arc<Self>> {
        #[cfg(feature = "rdma")]
        {
            Self::with_provider(config, Arc::new(sideway_verbs::SidewayProvider::new()))
        }
        #[cfg(not(feature = "rdma"))]
        {
            let _ = config;
            Err(Error::NotSupported(
                "no RDMA devices: this build has no RDMA support (the `rdma` feature is off)"
                    .into(),
            ))
        }
    }

    /// A transport on the devices of `provider` (the fake, in tests).
    pub fn with_provider(config: RdmaConfig, provider: Arc<dyn Provider>) -> Result<Arc<Self>> {
        config.validate()?;
        let present = provider.devices()?;
        let names: Vec<String> = if config.devices.is_empty() {
            present
        } else {
            for d in &config.devices {
                if !present.contains(d) {
                    return Err(Error::InvalidArgument(format!(
                        "RDMA device {d:?} not found (present: {})",
                        present.join(", ")
                    )));
                }
            }
            config.devices.clone()
        };
        if names.is_empty() {
            return Err(verbs::no_devices("none selected"));
        }
        if names.len() > MAX_NICS {
            return Err(Error::InvalidArgument(format!(
                "{} RDMA devices; at most {MAX_NICS} are supported",
                names.len()
            )));
        }
        let nics: Vec<Arc<dyn Device>> = names
            .iter()
            .map(|n| provider.open(n))
            .collect::<Result<_>>()?;
        let infos: Vec<NicInfo> = nics
            .iter()
            .map(|d| NicInfo {
                name: d.attrs().name.clone(),
                numa_node: d.attrs().numa_node,
            })
            .collect();
        let chunk = nics
            .iter()
            .map(|d| d.attrs().max_mr_size)
            .fold(config.max_mr_chunk, u64::min)
            & !4095;
        if chunk == 0 {
            return Err(Error::InvalidArgument(
                "an RDMA device registers less than a page".into(),
            ));
        }
        let qp_depth = nics
            .iter()
            .map(|d| d.attrs().max_qp_wr)
            .fold(config.qp_depth, u32::min);
        let cq_depth = nics
            .iter()
            .map(|d| d.attrs().max_cqe)
            .fold(config.cq_depth, u32::min);
        let core = Core::new(
            nics,
            Limits {
                peer_slices: config.max_slices_per_peer,
                peer_bytes: config.max_bytes_per_peer,
                cq_depth,
                qp_depth,
            },
        )?;
        tracing::info!(nics = ?names, chunk, "rdma transport ready");
        Ok(Arc::new(RdmaTransport {
            id: NEXT_TRANSPORT.fetch_add(1, Ordering::Relaxed),
            config: Arc::new(config),
            core: Arc::new(core),
            infos,
            chunk,
            links: Mutex::new(HashMap::new()),
            server: Mutex::new(None),
            closed: AtomicBool::new(false),
            capabilities: Capabilities {
                one_sided: true,
                memory: None,
            },
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &RdmaConfig {
        &self.config
    }

    /// Names of the NICs in use, in index order.
    pub fn nics(&self) -> Vec<String> {
        self.infos.iter().map(|i| i.name.clone()).collect()
    }

    fn link(&self, address: &str) -> Arc<PeerLink> {
        let mut links = self.links.lock().expect("links");
        links
            .entry(address.to_owned())
            .or_insert_with(|| {
                Arc::new(PeerLink {
                    id: self.core.add_peer(),
                    client: tokio::sync::Mutex::new(Client::new(address.to_owned())),
                    down_until: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Connects the paths (`local_nic * MAX_NICS + remote_nic`) not connected yet. Returns the
    /// paths that could not be connected, with why.
    async fn connect(&self, link: &PeerLink, paths: &[u16]) -> Vec<(u16, Error)> {
        let mut client = link.client.lock().await;
        let todo: Vec<u16> = paths
            .iter()
            .copied()
            .filter(|&p| !self.core.connected(link.id, p))
            .collect();
        if todo.is_empty() {
            return Vec::new();
        }
        let mut failed = Vec::new();
        let mut pending = Vec::new();
        for &path in &todo {
            let nic = path as usize / MAX_NICS;
            match self.core.nics[nic].create_qp(&self.core.cq(nic as u16), self.core.qp_depth()) {
                Ok(qp) => pending.push((path, qp)),
                Err(e) => failed.push((path, e)),
            }
        }
        if pending.is_empty() {
            return failed;
        }
        let req = Request::Connect(
            pending
                .iter()
                .map(|(path, qp)| PathRequest {
                    key: *path as u32,
                    server_nic: (*path as usize % MAX_NICS) as u16,
                    qp: qp.address(),
                })
                .collect(),
        );
        let answers = match client
            .call(
                &req,
                self.config.connect_timeout,
                self.config.request_timeout,
            )
            .await
        {
            Ok(Response::Connected(a)) if a.len() == pending.len() => a,
            Ok(other) => {
                client.close();
                let e = Error::Protocol(format!("unexpected answer to connect: {other:?}"));
                failed.extend(pending.into_iter().map(|(p, _)| (p, e.clone())));
                return failed;
            }
            Err(e) => {
                failed.extend(pending.into_iter().map(|(p, _)| (p, e.clone())));
                return failed;
            }
        };
        for ((path, mut qp), answer) in pending.into_iter().zip(answers) {
            let nic = &self.core.nics[path as usize / MAX_NICS];
            let connected = answer
                .map_err(|reason| Error::PeerUnreachable {
                    peer: format!("{link:?}"),
                    reason,
                })
                .and_then(|remote| {
                    let mtu = negotiate_mtu(nic.attrs().active_mtu, remote.mtu);
                    qp.connect(&remote, mtu).map(|()| mtu)
                });
            match connected {
                Ok(mtu) => {
                    tracing::debug!(path, mtu, nic = %nic.attrs().name, "queue pair connected");
                    self.core.install(link.id, path, qp);
                }
                Err(e) => failed.push((path, e)),
            }
        }
        failed
    }

    /// Sends landing notices for `ranges` and waits for the acknowledgement.
    async fn notify_landed(&self, link: &PeerLink, ranges: Vec<(u64, u64)>) -> Result<()> {
        let mut client = link.client.lock().await;
        match client
            .call(
                &Request::Landed(ranges),
                self.config.connect_timeout,
                self.config.request_timeout,
            )
            .await?
        {
            Response::Ack => Ok(()),
            other => {
                client.close();
                Err(Error::Protocol(format!(
                    "unexpected answer to a landing notice: {other:?}"
                )))
            }
        }
    }
}

/// The target's buffer holding `[addr, addr + len)` and its keys.
fn remote_buffer(target: &SegmentDesc, addr: u64, len: u64) -> Result<(u64, RemoteKeys<'_>)> {
    let invalid = Error::RemoteRangeInvalid { addr, len };
    let i = target.buffers.partition_point(|b| b.addr <= addr);
    let b = &target.buffers[i.checked_sub(1).ok_or(invalid.clone())?];
    if !range_within(b.addr, b.len, addr, len) {
        return Err(invalid);
    }
    let keys = b.key("rdma").ok_or_else(|| {
        Error::Protocol(format!(
            "target buffer {:#x} has no rdma keys in its descriptor",
            b.addr
        ))
    })?;
    let keys = RemoteKeys::parse(keys, b.len).ok_or_else(|| {
        Error::Protocol(format!(
            "malformed rdma keys for target buffer {:#x}",
            b.addr
        ))
    })?;
    Ok((b.addr, keys))
}

/// One request of a running batch.
struct OpRun<'a> {
    op: TransferOp,
    keys: RemoteKeys<'a>,
    local_cands: (Vec<u16>, Vec<u16>),
    remote_cands: (Vec<u16>, Vec<u16>),
    /// Slices not yet completed successfully or dropped.
    pending: u32,
    failed: Option<Error>,
    done: bool,
}

/// One slice of a running batch.
#[derive(Clone, Copy)]
struct SliceRun {
    op: u32,
    offset: u64,
    len: u32,
    local_chunk: u32,
    remote_chunk: u32,
    /// Its number among the batch's slices, for round-robin over NICs.
    n: u32,
    attempt: u32,
}

struct Run<'a> {
    ops: Vec<OpRun<'a>>,
    slices: Vec<SliceRun>,
    queue: std::collections::VecDeque<u32>,
    inbox: Arc<Inbox>,
    inflight_slices: usize,
    inflight_bytes: u64,
    /// Ops not completed yet.
    open: usize,
    landed: Vec<(u64, u64)>,
    landed_ops: Vec<usize>,
    /// A slice failed on every NIC pair it tried.
    exhausted: bool,
}

impl RdmaTransport {
    fn outgoing(&self, run: &Run<'_>, s: u32) -> Outgoing {
        let sl = run.slices[s as usize];
        let op = &run.ops[sl.op as usize];
        let local_nic = pick_nic(
            &op.local_cands.0,
            &all(&op.local_cands),
            sl.n as u64,
            sl.attempt,
        );
        let remote_nic = pick_nic(
            &op.remote_cands.0,
            &all(&op.remote_cands),
            sl.n as u64,
            sl.attempt,
        );
        let mrs = op
            .op
            .local
            .buffer()
            .attachment::<BufferMrs>()
            .expect("checked when the batch started");
        Outgoing {
            slice: s,
            local_nic,
            remote_nic,
            op: match op.op.opcode {
                OpCode::Read => WrOp::Read,
                OpCode::Write => WrOp::Write,
            },
            local_addr: op.op.local.addr() + sl.offset,
            lkey: mrs.lkey(sl.local_chunk, local_nic),
            remote_addr: op.op.target_addr + sl.offset,
            rkey: op.keys.rkey(sl.remote_chunk, remote_nic),
            len: sl.len,
        }
    }

    /// Completes op `i` if nothing of it is pending any more.
    fn settle(&self, run: &mut Run<'_>, i: usize, batch: &BatchState) {
        let op = &mut run.ops[i];
        if op.done || op.pending > 0 {
            return;
        }
        op.done = true;
        if let Some(e) = op.failed.take() {
            run.open -= 1;
            batch.complete(op.op.index, Err(e));
        } else if op.op.notify {
            run.landed.push((op.op.target_addr, op.op.local.len()));
            run.landed_ops.push(i);
        } else {
            run.open -= 1;
            batch.complete(op.op.index, Ok(()));
        }
    }

    /// Handles the completions delivered to the batch. Returns how many there were.
    fn drain(
        &self,
        run: &mut Run<'_>,
        peer: &str,
        buf: &mut Vec<(u32, WcStatus)>,
        batch: &BatchState,
    ) -> usize {
        run.inbox.take(buf);
        for &(s, status) in buf.iter() {
            let sl = &mut run.slices[s as usize];
            run.inflight_slices -= 1;
            run.inflight_bytes -= sl.len as u64;
            let i = sl.op as usize;
            let op = &mut run.ops[i];
            match status {
                WcStatus::Success => op.pending -= 1,
                WcStatus::RemoteAccess => {
                    op.pending -= 1;
                    op.failed.get_or_insert(Error::RemoteRangeInvalid {
                        addr: op.op.target_addr,
                        len: op.op.local.len(),
                    });
                }
                WcStatus::LocalProtection => {
                    op.pending -= 1;
                    op.failed.get_or_insert(Error::LocalRangeNotRegistered {
                        addr: op.op.local.addr(),
                        len: op.op.local.len(),
                    });
                }
                other => {
                    if op.failed.is_some() {
                        op.pending -= 1;
                    } else if sl.attempt >= self.config.max_retries {
                        op.pending -= 1;
                        run.exhausted = true;
                        tracing::warn!(peer, attempts = sl.attempt + 1, "slice failed: {other:?}");
                        op.failed = Some(Error::PeerUnreachable {
                            peer: peer.to_owned(),
                            reason: format!(
                                "a slice failed on {} NIC pairs, last with {other:?}",
                                sl.attempt + 1
                            ),
                        });
                    } else {
                        tracing::debug!(
                            peer,
                            attempt = sl.attempt,
                            "slice failed ({other:?}): retrying on another NIC"
                        );
                        sl.attempt += 1;
                        run.queue.push_back(s);
                    }
                }
            }
            self.settle(run, i, batch);
        }
        buf.len()
    }

    /// Fails slice `s` (not in flight) for a path that could not be connected: retried on
    /// another NIC pair while attempts remain.
    fn path_failed(&self, run: &mut Run<'_>, s: u32, e: &Error, batch: &BatchState) {
        let sl = &mut run.slices[s as usize];
        let i = sl.op as usize;
        let op = &mut run.ops[i];
        if op.failed.is_none() && sl.attempt < self.config.max_retries {
            sl.attempt += 1;
            run.queue.push_back(s);
            return;
        }
        op.pending -= 1;
        if op.failed.is_none() {
            run.exhausted = true;
        }
        op.failed.get_or_insert_with(|| e.clone());
        self.settle(run, i, batch);
    }

    /// Fails every op still open with `e` (WRITEs waiting for their landing notice included),
    /// once nothing of the batch is in flight.
    fn fail_open(&self, run: &mut Run<'_>, e: Error, batch: &BatchState) {
        for i in run.landed_ops.drain(..) {
            batch.complete(run.ops[i].op.index, Err(e.clone()));
        }
        run.landed.clear();
        for op in run.ops.iter_mut().filter(|o| !o.done) {
            op.done = true;
            batch.complete(op.op.index, Err(e.clone()));
        }
        run.open = 0;
    }
}

fn all(c: &(Vec<u16>, Vec<u16>)) -> Vec<u16> {
    let mut v = c.0.clone();
    v.extend(&c.1);
    v
}

#[async_trait]
impl Transport for RdmaTransport {
    fn protocol(&self) -> &'static str {
        "rdma"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn reaches(&self, target: &SegmentDesc, addr: u64, len: u64) -> bool {
        let _ = (addr, len);
        // A peer whose RDMA path died goes to the next transport, when it offers another.
        if target.endpoints.len() < 2 {
            return true;
        }
        let Some(endpoint) = target.endpoint("rdma") else {
            return true;
        };
        let link = self
            .links
            .lock()
            .expect("links")
            .get(&endpoint.address)
            .cloned();
        !link.is_some_and(|l| l.is_down())
    }

    fn on_register(&self, buffer: &RegisteredBuffer) -> Result<Registration> {
        let (addr, len) = (buffer.addr(), buffer.len());
        let devices = self.core.nics.len();
        let chunks = len.div_ceil(self.chunk);
        let mut regions = Vec::with_capacity(chunks as usize * devices);
        let mut lkeys = Vec::with_capacity(regions.capacity());
        let mut rkeys = Vec::with_capacity(regions.capacity());
        for c in 0..chunks {
            let start = addr + c * self.chunk;
            let this = self.chunk.min(len - c * self.chunk);
            for nic in &self.core.nics {
                // SAFETY: the buffer's memory stays valid until its attachments are dropped
                // (the registry drops them before releasing it), and the regions are either in
                // the attachment or deregistered before that, in `on_unregister`.
                let mr = unsafe { nic.register(start, this) }.map_err(|e| {
                    tracing::warn!(nic = %nic.attrs().name, addr = start, len = this, "registration failed: {e}");
                    e
                })?;
                lkeys.push(mr.lkey());
                rkeys.push(mr.rkey());
                regions.push(mr);
            }
        }
        let preferred = self
            .config
            .nic_priority
            .candidates(&buffer.location().0, &self.infos)
            .0;
        let mask = preferred.iter().fold(0u64, |m, &d| m | 1 << d);
        Ok(Registration {
            keys: Some(plan::encode_keys(self.chunk, devices, mask, &rkeys)),
            attachment: Some(Box::new(BufferMrs {
                owner: self.id,
                chunking: Chunking {
                    base: addr,
                    chunk: self.chunk,
                },
                devices,
                lkeys,
                regions: Mutex::new(regions),
            })),
        })
    }

    fn on_unregister(&self, buffer: &RegisteredBuffer) {
        if let Some(mrs) = buffer.attachment::<BufferMrs>() {
            if mrs.owner == self.id {
                // Deregistered now: peers' keys are refused from here on.
                mrs.regions.lock().expect("regions").clear();
            }
        }
    }

    async fn serve(&self, segment: Arc<LocalSegment>) -> Result<Endpoint> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        let listener = tokio::net::TcpListener::bind(self.config.bind)
            .await
            .map_err(|e| Error::Io(format!("binding {}: {e}", self.config.bind)))?;
        let local = listener.local_addr()?;
        let host = match &self.config.advertise_host {
            Some(h) => h.clone(),
            None if local.is_ipv6() => format!("[{}]", local.ip()),
            None => local.ip().to_string(),
        };
        let task = tokio::spawn(side::accept_loop(
            listener,
            segment,
            self.core.clone(),
            self.config.request_timeout,
            mooncake_core::admission::Admission::new(
                "rdma side channel",
                self.config.max_connections,
                self.config.max_per_address,
            ),
        ));
        if let Some(old) = self.server.lock().expect("server").replace(task) {
            old.abort();
        }
        Ok(Endpoint {
            protocol: "rdma".into(),
            address: format!("{host}:{}", local.port()),
        })
    }

    async fn transfer(&self, target: &SegmentDesc, ops: Vec<TransferOp>, batch: &Arc<BatchState>) {
        if self.closed.load(Ordering::Acquire) {
            for op in ops {
                batch.complete(op.index, Err(Error::Shutdown));
            }
            return;
        }
        let Some(endpoint) = target.endpoint("rdma") else {
            for op in ops {
                batch.complete(
                    op.index,
                    Err(Error::NoTransport {
                        segment: target.name.clone(),
                        offered: "no rdma endpoint".into(),
                    }),
                );
            }
            return;
        };
        let peer = endpoint.address.as_str();
        let link = self.link(peer);
        let mut run = Run {
            ops: Vec::with_capacity(ops.len()),
            slices: Vec::new(),
            queue: Default::default(),
            inbox: Arc::default(),
            inflight_slices: 0,
            inflight_bytes: 0,
            open: 0,
            landed: Vec::new(),
            landed_ops: Vec::new(),
            exhausted: false,
        };
        let mut n = 0u32;
        for op in ops {
            let len = op.local.len();
            let checked = remote_buffer(target, op.target_addr, len).and_then(|(base, keys)| {
                let mrs = op
                    .local
                    .buffer()
                    .attachment::<BufferMrs>()
                    .filter(|m| m.owner == self.id)
                    .ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "local buffer {:#x} is not registered with this rdma transport",
                            op.local.buffer().addr()
                        ))
                    })?;
                if keys.devices == 0 {
                    return Err(Error::Protocol("target publishes no NICs".into()));
                }
                Ok((base, keys, mrs.chunking))
            });
            let (base, keys, local_chunking) = match checked {
                Ok(c) => c,
                Err(e) => {
                    batch.complete(op.index, Err(e));
                    continue;
                }
            };
            let i = run.ops.len() as u32;
            let mut pending = 0;
            slice_request(
                op.local.addr(),
                op.target_addr,
                len,
                self.config.slice_size,
                local_chunking,
                Chunking {
                    base,
                    chunk: keys.chunk,
                },
                |p| {
                    run.queue.push_back(run.slices.len() as u32);
                    run.slices.push(SliceRun {
                        op: i,
                        offset: p.offset,
                        len: p.len as u32,
                        local_chunk: p.local_chunk,
                        remote_chunk: p.remote_chunk,
                        n,
                        attempt: 0,
                    });
                    n = n.wrapping_add(1);
                    pending += 1;
                },
            );
            let local_cands = self
                .config
                .nic_priority
                .candidates(&op.local.buffer().location().0, &self.infos);
            let remote_cands = keys.candidates();
            run.ops.push(OpRun {
                op,
                keys,
                local_cands,
                remote_cands,
                pending,
                failed: None,
                done: false,
            });
            run.open += 1;
        }
        for i in 0..run.ops.len() {
            self.settle(&mut run, i, batch);
        }
        let deadline = Instant::now() + self.config.request_timeout;
        let mut buf = Vec::new();
        let mut idle = 0u32;
        let mut needed: Vec<u16> = Vec::new();
        let mut take: Vec<Outgoing> = Vec::new();
        while run.open > run.landed_ops.len() || run.inflight_slices > 0 {
            if self.closed.load(Ordering::Acquire) {
                self.core.abandon(&run.inbox);
                self.fail_open(&mut run, Error::Shutdown, batch);
                return;
            }
            // Post what the batch's limits allow.
            let mut progressed = 0;
            while let Some(&s) = run.queue.front() {
                let sl = run.slices[s as usize];
                if run.ops[sl.op as usize].failed.is_some() {
                    run.queue.pop_front();
                    run.ops[sl.op as usize].pending -= 1;
                    self.settle(&mut run, sl.op as usize, batch);
                    continue;
                }
                if run.inflight_slices >= self.config.max_slices_per_batch
                    || (run.inflight_bytes > 0
                        && run.inflight_bytes + sl.len as u64 > self.config.max_bytes_per_batch)
                {
                    break;
                }
                // Gather slices within the batch limits and post them in one call.
                let room_slices = (self.config.max_slices_per_batch - run.inflight_slices).min(256);
                let mut room_bytes = self
                    .config
                    .max_bytes_per_batch
                    .saturating_sub(run.inflight_bytes);
                take.clear();
                while take.len() < room_slices {
                    let Some(&s) = run.queue.front() else { break };
                    let sl = run.slices[s as usize];
                    if run.ops[sl.op as usize].failed.is_some()
                        || (!take.is_empty() && sl.len as u64 > room_bytes)
                    {
                        break;
                    }
                    room_bytes = room_bytes.saturating_sub(sl.len as u64);
                    run.queue.pop_front();
                    take.push(self.outgoing(&run, s));
                }
                let (posted, blocked) = self.core.post(link.id, &run.inbox, &take);
                for o in &take[..posted] {
                    run.inflight_slices += 1;
                    run.inflight_bytes += o.len as u64;
                }
                for o in take[posted..].iter().rev() {
                    run.queue.push_front(o.slice);
                }
                progressed += posted;
                match blocked {
                    Some(Blocked::Unconnected) => {
                        // Connect every path the queued slices need, together.
                        for &s in &run.queue {
                            let o = self.outgoing(&run, s);
                            let path = o.local_nic * MAX_NICS as u16 + o.remote_nic;
                            if !needed.contains(&path) && !self.core.connected(link.id, path) {
                                needed.push(path);
                            }
                        }
                        break;
                    }
                    Some(Blocked::Full) => break,
                    None => {}
                }
            }
            progressed += self.core.poll();
            progressed += self.drain(&mut run, peer, &mut buf, batch);
            if !needed.is_empty() {
                let failed = self.connect(&link, &needed).await;
                needed.clear();
                for (path, e) in failed {
                    tracing::warn!(peer, path, "connecting a queue pair failed: {e}");
                    let stuck: Vec<u32> = run
                        .queue
                        .iter()
                        .copied()
                        .filter(|&s| {
                            let o = self.outgoing(&run, s);
                            o.local_nic * MAX_NICS as u16 + o.remote_nic == path
                        })
                        .collect();
                    run.queue.retain(|s| !stuck.contains(s));
                    for s in stuck {
                        self.path_failed(&mut run, s, &e, batch);
                    }
                }
                idle = 0;
                continue;
            }
            if run.open == run.landed_ops.len() && run.inflight_slices == 0 {
                break;
            }
            if Instant::now() >= deadline {
                // Nothing of the batch may run after it completes: tear its queue pairs down.
                self.core.abandon(&run.inbox);
                self.drain(&mut run, peer, &mut buf, batch);
                tracing::warn!(
                    peer,
                    "rdma transfer timed out after {:?}",
                    self.config.request_timeout
                );
                self.fail_open(&mut run, Error::Timeout(self.config.request_timeout), batch);
                return;
            }
            if progressed == 0 {
                idle += 1;
                if idle < 64 {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(Duration::from_micros(50)).await;
                }
            } else {
                idle = 0;
            }
        }
        if run.exhausted {
            let cooldown = self.config.failover_cooldown;
            tracing::warn!(
                peer,
                "every NIC pair failed for some slices: declining the peer for {cooldown:?} so \
                 another transport carries its requests"
            );
            *link.down_until.lock().expect("down_until") = Some(Instant::now() + cooldown);
        }
        if !run.landed.is_empty() {
            let landed = std::mem::take(&mut run.landed);
            let result = self.notify_landed(&link, landed).await;
            for &i in &run.landed_ops {
                batch.complete(run.ops[i].op.index, result.clone());
            }
        }
    }

    async fn handshake(&self, address: &str) -> Result<SegmentDesc> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        match address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "segment name {address:?} is not host:port"
                )))
            }
        }
        let link = self.link(address);
        let mut client = link.client.lock().await;
        match client
            .call(
                &Request::Describe,
                self.config.connect_timeout,
                self.config.request_timeout,
            )
            .await?
        {
            Response::Descriptor(bytes) => SegmentDesc::decode(&bytes),
            other => {
                client.close();
                Err(Error::Protocol(format!(
                    "unexpected answer to a handshake: {other:?}"
                )))
            }
        }
    }

    async fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        let server = self.server.lock().expect("server").take();
        if let Some(task) = server {
            task.abort();
            let _ = task.await;
        }
        self.core.close_all();
        let links: Vec<_> = self
            .links
            .lock()
            .expect("links")
            .drain()
            .map(|(_, l)| l)
            .collect();
        for l in links {
            l.client.lock().await.close();
        }
    }
}
