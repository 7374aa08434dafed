//! The transfer engine: one process's segment, its transports, and batches of READ/WRITE requests.
//!
//! Performance-critical: `run_batch` is on every transfer's path.
//!
//! A process registers buffers into its segment, serves the segment through each installed
//! [`Transport`], and publishes the segment descriptor (through a [`MetadataStore`], or not at all
//! in `P2PHANDSHAKE` mode, where peers ask it directly). Remote segments are opened by name;
//! batches are submitted and complete asynchronously with a status per request. Requests whose
//! target is this process's own segment are served by memcpy, with no socket; each other request
//! goes to the first installed transport that offers an endpoint of its target and reaches its
//! range ([`Transport::reaches`]), so a same-host shared-memory transport placed first carries
//! what it can and TCP the rest.
//!
//! Every transport hears of every buffer of the segment, whenever it is registered
//! ([`Transport::on_register`], [`Transport::on_unregister`]), and buffers the engine allocates
//! come from the first transport that offers a [`MemoryProvider`] in its
//! [`Capabilities`](crate::transport::Capabilities).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::memory::{
    AlignedBuffer, Location, MemoryProvider, MemoryRegistry, RegisteredBuffer, Registration,
    RegistrationHook, Unregistering,
};
use crate::metadata::{segment_key, MetadataStore};
use crate::transport::{
    BatchState, LocalSegment, OpCode, SegmentDesc, TransferOp, TransferStatus, Transport,
};

/// How segment descriptors are found.
#[derive(Clone, Debug)]
pub enum Discovery {
    /// Published to and looked up in a metadata store.
    Metadata(Arc<dyn MetadataStore>),
    /// Asked from the peer directly over a transport handshake (`P2PHANDSHAKE`).
    P2PHandshake,
}

/// Engine configuration.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// This process's host name, optionally with a port (`localhost`, `node1:12345`). Without a
    /// port, the segment is named after the first endpoint's port: `host:port`.
    pub local_hostname: String,
    /// How descriptors are found. Default: [`Discovery::P2PHandshake`].
    pub discovery: Discovery,
}

impl EngineConfig {
    /// A config for `local_hostname` with peer-to-peer handshake discovery.
    pub fn new(local_hostname: impl Into<String>) -> Self {
        EngineConfig {
            local_hostname: local_hostname.into(),
            discovery: Discovery::P2PHandshake,
        }
    }
}

/// An opened remote (or the local) segment.
pub type SegmentHandle = Arc<SegmentDesc>;

/// One request: move `len` bytes between local registered memory at `local_addr` and
/// `target_addr` in `target`'s address space.
#[derive(Clone, Debug)]
pub struct TransferRequest {
    /// Direction.
    pub opcode: OpCode,
    /// Local address, inside a buffer registered with this engine.
    pub local_addr: u64,
    /// Number of bytes.
    pub len: u64,
    /// Target segment.
    pub target: SegmentHandle,
    /// Address in the target's address space, inside a buffer the target registered.
    pub target_addr: u64,
    /// For a WRITE: ask the target to report the landing to its segment's observer
    /// ([`LocalSegment::landed`](crate::LocalSegment::landed)).
    pub notify: bool,
    /// For a WRITE: no byte of it may land after this instant (see
    /// [`TransferRequest::with_deadline`]).
    pub deadline: Option<Instant>,
}

impl TransferRequest {
    /// A READ of `len` bytes from `target_addr` into `local_addr`.
    pub fn read(target: &SegmentHandle, target_addr: u64, local_addr: u64, len: u64) -> Self {
        TransferRequest {
            opcode: OpCode::Read,
            local_addr,
            len,
            target: target.clone(),
            target_addr,
            notify: false,
            deadline: None,
        }
    }
    /// This request, asking the target to report when its bytes have landed (WRITEs only; a
    /// READ ignores it).
    pub fn with_landing_notice(mut self) -> Self {
        self.notify = self.opcode == OpCode::Write;
        self
    }
    /// A WRITE of `len` bytes from `local_addr` to `target_addr`.
    pub fn write(target: &SegmentHandle, target_addr: u64, local_addr: u64, len: u64) -> Self {
        TransferRequest {
            opcode: OpCode::Write,
            local_addr,
            len,
            target: target.clone(),
            target_addr,
            notify: false,
            deadline: None,
        }
    }
    /// This WRITE, fenced by `deadline` (a READ ignores it): the space it writes may be handed
    /// to other data after that instant, so none of its bytes may land later. The engine does
    /// not start it past the deadline (`LEASE_EXPIRED`); a transport whose target takes part
    /// (TCP) carries the deadline in the request, and the target refuses to start, or to go
    /// on, writing after it. A one-sided transport (same-host shared memory) cannot be fenced
    /// once its copy has begun: there, the reader's per-object checksum is the guard.
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        if self.opcode == OpCode::Write {
            self.deadline = Some(deadline);
        }
        self
    }
}

/// The error of a WRITE that would start, or go on, past its deadline.
pub fn past_deadline(len: u64) -> Error {
    Error::with_code(
        crate::ErrorCode::LEASE_EXPIRED,
        format!("a WRITE of {len} bytes is past its deadline: its space may belong to others now"),
    )
}

/// A submitted batch. Dropping it does not cancel the transfers.
#[derive(Debug, Clone)]
pub struct Batch {
    state: Arc<BatchState>,
}

impl Batch {
    /// Status of request `index`.
    pub fn status(&self, index: usize) -> TransferStatus {
        self.state.status(index)
    }
    /// The error of request `index`, if it failed or timed out.
    pub fn error(&self, index: usize) -> Option<Error> {
        self.state.error(index)
    }
    /// True when every request has finished.
    pub fn is_done(&self) -> bool {
        self.state.is_done()
    }
    /// Waits for every request and returns the per-request results.
    pub async fn wait(&self) -> Vec<Result<()>> {
        self.state.wait().await;
        self.state.results()
    }
}

/// See the module docs.
pub struct TransferEngine {
    segment: Arc<LocalSegment>,
    transports: Vec<Arc<dyn Transport>>,
    discovery: Discovery,
    remote: RwLock<HashMap<String, SegmentHandle>>,
    closed: AtomicBool,
    /// Where allocated buffers come from, when a transport needs a kind of memory
    /// ([`Capabilities::memory`](crate::transport::Capabilities)).
    memory_provider: Option<Arc<dyn MemoryProvider>>,
}

/// Tells one transport of the segment's registrations.
#[derive(Debug)]
struct TransportHook(Arc<dyn Transport>);

impl RegistrationHook for TransportHook {
    fn protocol(&self) -> &str {
        self.0.protocol()
    }
    fn on_register(&self, buffer: &RegisteredBuffer) -> Result<Registration> {
        self.0.on_register(buffer)
    }
    fn on_unregister(&self, buffer: &RegisteredBuffer) {
        self.0.on_unregister(buffer)
    }
}

impl fmt::Debug for TransferEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransferEngine")
            .field("segment", &self.segment.name())
            .field("transports", &self.transports)
            .finish()
    }
}

impl TransferEngine {
    /// Starts an engine: serves the (initially empty) segment through every transport, names it
    /// and publishes its descriptor.
    pub async fn start(
        config: EngineConfig,
        transports: Vec<Arc<dyn Transport>>,
    ) -> Result<Arc<TransferEngine>> {
        if config.local_hostname.is_empty() {
            return Err(Error::InvalidArgument("local_hostname is empty".into()));
        }
        // Every transport hears of every registration, including those after `serve`.
        let hooks = transports
            .iter()
            .map(|t| Arc::new(TransportHook(t.clone())) as Arc<dyn RegistrationHook>)
            .collect();
        let segment = LocalSegment::new(Arc::new(MemoryRegistry::with_hooks(hooks)));
        let mut endpoints = Vec::new();
        for t in &transports {
            let ep = t.serve(segment.clone()).await?;
            segment.add_endpoint(ep.clone());
            endpoints.push(ep);
        }
        // Named after the first endpoint with a port (a same-host endpoint has none).
        let port = endpoints
            .iter()
            .find(|e| has_port(&e.address))
            .and_then(|e| e.address.rsplit_once(':'))
            .map(|(_, p)| p.to_owned());
        let name = match port {
            Some(port) if !has_port(&config.local_hostname) => {
                format!("{}:{}", config.local_hostname, port)
            }
            _ => config.local_hostname.clone(),
        };
        segment.set_name(name)?;
        let memory_provider = transports
            .iter()
            .find_map(|t| t.capabilities().memory.clone());
        let engine = Arc::new(TransferEngine {
            segment,
            transports,
            discovery: config.discovery,
            remote: RwLock::new(HashMap::new()),
            closed: AtomicBool::new(false),
            memory_provider,
        });
        engine.publish().await?;
        Ok(engine)
    }

    /// This segment's name (`host:port`).
    pub fn segment_name(&self) -> &str {
        self.segment.name()
    }

    /// Sets who is told of WRITEs into this segment that asked for a landing notice (once per
    /// engine; see [`LocalSegment::landed`](crate::LocalSegment::landed)).
    pub fn set_landing_observer(
        &self,
        observer: Arc<dyn crate::transport::LandingObserver>,
    ) -> Result<()> {
        self.segment.set_landing_observer(observer)
    }

    /// This segment's current descriptor.
    pub fn local_descriptor(&self) -> SegmentDesc {
        self.segment.descriptor()
    }

    /// The registered memory of this segment.
    pub fn memory(&self) -> &Arc<MemoryRegistry> {
        self.segment.memory()
    }

    /// The installed transports.
    pub fn transports(&self) -> &[Arc<dyn Transport>] {
        &self.transports
    }

    /// Registers caller-owned memory. Call [`publish`](Self::publish) afterwards when peers
    /// discover this segment through a metadata store.
    ///
    /// # Safety
    /// As [`MemoryRegistry::register`]: the range stays valid until unregistered.
    pub unsafe fn register_memory(&self, addr: u64, len: u64, location: Location) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.segment.memory().register(addr, len, location) }
    }

    /// Allocates and registers a zeroed buffer of `len` bytes owned by the engine; returns its
    /// address.
    ///
    /// When a transport needs buffers of a particular kind
    /// ([`Capabilities::memory`](crate::transport::Capabilities), shared memory that peers of
    /// this host map), the buffer comes from it, or from ordinary memory if that fails.
    pub fn allocate_buffer(&self, len: usize, location: Location) -> Result<u64> {
        let buffer = match &self.memory_provider {
            Some(provider) => provider.allocate(len).or_else(|e| {
                if len > 0 {
                    tracing::warn!(
                        "buffer of {len} bytes from {provider:?} failed ({e}); using private"
                    );
                }
                AlignedBuffer::new(len)
            })?,
            None => AlignedBuffer::new(len)?,
        };
        self.segment.memory().register_owned(buffer, location)
    }

    /// Unregisters the buffer at `addr` and blocks the calling thread until no transfer uses it
    /// (for at most [`UNREGISTER_WAIT`](crate::memory::UNREGISTER_WAIT)). For synchronous
    /// callers; async code awaits [`unregister_memory_async`](Self::unregister_memory_async).
    pub fn unregister_memory(&self, addr: u64) -> Result<()> {
        self.segment.memory().unregister_blocking(addr)
    }

    /// Unregisters the buffer at `addr` at once; the returned future completes when no transfer
    /// uses it any more (see [`MemoryRegistry::unregister`]).
    pub fn unregister_memory_async(&self, addr: u64) -> Result<Unregistering> {
        self.segment.memory().unregister(addr)
    }

    /// Publishes the current descriptor (no-op in `P2PHANDSHAKE` mode, where peers ask for it).
    pub async fn publish(&self) -> Result<()> {
        if let Discovery::Metadata(store) = &self.discovery {
            let desc = self.segment.descriptor();
            store.put(&segment_key(&desc.name), desc.encode()?).await?;
        }
        Ok(())
    }

    /// Opens a segment by name, from the cache or by discovery.
    pub async fn open_segment(&self, name: &str) -> Result<SegmentHandle> {
        if let Some(h) = self.remote.read().expect("segment cache").get(name) {
            return Ok(h.clone());
        }
        self.refresh_segment(name).await
    }

    /// Looks a segment's descriptor up again, replacing the cached one.
    pub async fn refresh_segment(&self, name: &str) -> Result<SegmentHandle> {
        self.check_open()?;
        let desc = if name == self.segment_name() {
            self.segment.descriptor()
        } else {
            match &self.discovery {
                Discovery::Metadata(store) => {
                    let v = store
                        .get(&segment_key(name))
                        .await?
                        .ok_or_else(|| Error::SegmentNotFound(name.to_owned()))?;
                    SegmentDesc::decode(&v.value)?
                }
                Discovery::P2PHandshake => self.handshake(name).await?,
            }
        };
        let handle = Arc::new(desc);
        self.remote
            .write()
            .expect("segment cache")
            .insert(name.to_owned(), handle.clone());
        Ok(handle)
    }

    async fn handshake(&self, name: &str) -> Result<SegmentDesc> {
        let mut last = Error::NoTransport {
            segment: name.to_owned(),
            offered: "unknown (no transport with a handshake is installed)".into(),
        };
        for t in &self.transports {
            match t.handshake(name).await {
                Ok(d) => return Ok(d),
                Err(Error::NotSupported(_)) => continue,
                Err(e) => last = e,
            }
        }
        Err(match last {
            Error::PeerUnreachable { .. } => Error::SegmentNotFound(format!("{name}: {last}")),
            other => other,
        })
    }

    /// Forgets a cached segment descriptor (after the peer went away, say).
    pub fn close_segment(&self, name: &str) {
        self.remote.write().expect("segment cache").remove(name);
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Shutdown)
        } else {
            Ok(())
        }
    }

    /// Submits a batch; it runs in the background on the current tokio runtime.
    pub fn submit(self: &Arc<Self>, requests: Vec<TransferRequest>) -> Batch {
        let state = BatchState::new(requests.len());
        let engine = self.clone();
        let st = state.clone();
        tokio::spawn(async move { engine.run_batch(requests, &st).await });
        Batch { state }
    }

    /// Runs a batch to completion in the calling task and returns per-request results.
    pub async fn transfer(&self, requests: Vec<TransferRequest>) -> Vec<Result<()>> {
        let state = BatchState::new(requests.len());
        self.run_batch(requests, &state).await;
        state.results()
    }

    /// Runs one batch: validates local ranges, serves local targets by memcpy and hands each
    /// remote target's requests to a transport that reaches it.
    async fn run_batch(&self, requests: Vec<TransferRequest>, batch: &Arc<BatchState>) {
        if let Err(e) = self.check_open() {
            for i in 0..requests.len() {
                batch.complete(i, Err(e.clone()));
            }
            return;
        }
        let local_name = self.segment.name();
        let memory = self.segment.memory();
        // Group requests by target segment and transport, keeping order within a group.
        let mut groups: Vec<(SegmentHandle, usize, Vec<TransferOp>)> = Vec::new();
        for (index, req) in requests.into_iter().enumerate() {
            let local = match memory.resolve(req.local_addr, req.len) {
                Ok(r) => r,
                Err(e) => {
                    batch.complete(index, Err(e));
                    continue;
                }
            };
            if req.len == 0 {
                batch.complete(index, Ok(()));
                continue;
            }
            if req.deadline.is_some_and(|d| Instant::now() >= d) {
                batch.complete(index, Err(past_deadline(req.len)));
                continue;
            }
            if req.target.name == local_name {
                let copied = local_copy(memory, req.opcode, &local, req.target_addr);
                if copied.is_ok() && req.notify {
                    self.segment.landed(req.target_addr, req.len);
                    self.segment.flush_landings();
                }
                batch.complete(index, copied);
                continue;
            }
            let transport = match self.transport_for(&req.target, req.target_addr, req.len) {
                Ok(t) => t,
                Err(e) => {
                    batch.complete(index, Err(e));
                    continue;
                }
            };
            let op = TransferOp {
                opcode: req.opcode,
                local,
                target_addr: req.target_addr,
                index,
                notify: req.notify,
                deadline: req.deadline,
            };
            match groups
                .iter_mut()
                .find(|(t, i, _)| *i == transport && Arc::ptr_eq(t, &req.target))
            {
                Some((_, _, ops)) => ops.push(op),
                None => groups.push((req.target, transport, vec![op])),
            }
        }
        if groups.len() == 1 {
            // One group (the common case): no join machinery.
            let (target, transport, ops) = groups.pop().expect("one group");
            return self.transports[transport]
                .transfer(&target, ops, batch)
                .await;
        }
        let runs = groups
            .into_iter()
            .map(|(target, transport, ops)| async move {
                self.transports[transport]
                    .transfer(&target, ops, batch)
                    .await
            });
        futures::future::join_all(runs).await;
    }

    /// The transport that would carry a request for `[addr, addr + len)` of `target` (`None`
    /// for this process's own segment, served by memcpy, or when no transport reaches it).
    pub fn carrier(&self, target: &SegmentDesc, addr: u64, len: u64) -> Option<&dyn Transport> {
        if target.name == self.segment.name() {
            return None;
        }
        let i = self.transport_for(target, addr, len).ok()?;
        Some(&*self.transports[i])
    }

    /// Index of the first transport that offers an endpoint of `target` and reaches the range.
    fn transport_for(&self, target: &SegmentDesc, addr: u64, len: u64) -> Result<usize> {
        self.transports
            .iter()
            .position(|t| target.endpoint(t.protocol()).is_some() && t.reaches(target, addr, len))
            .ok_or_else(|| Error::NoTransport {
                segment: target.name.clone(),
                offered: target
                    .endpoints
                    .iter()
                    .map(|e| e.protocol.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            })
    }

    /// Stops serving, withdraws the descriptor and closes connections. Idempotent.
    pub async fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Discovery::Metadata(store) = &self.discovery {
            if let Err(e) = store.delete(&segment_key(self.segment.name())).await {
                tracing::warn!("withdrawing segment descriptor failed: {e}");
            }
        }
        for t in &self.transports {
            t.shutdown().await;
        }
    }
}

fn local_copy(
    memory: &MemoryRegistry,
    opcode: OpCode,
    local: &crate::memory::MemRegion,
    target_addr: u64,
) -> Result<()> {
    let target =
        memory
            .resolve(target_addr, local.len())
            .map_err(|_| Error::RemoteRangeInvalid {
                addr: target_addr,
                len: local.len(),
            })?;
    match opcode {
        OpCode::Read => target.copy_to(local),
        OpCode::Write => local.copy_to(&target),
    }
}

fn has_port(host: &str) -> bool {
    // `[::1]:80`, `host:80`; a bare IPv6 address has several colons and no brackets.
    match host.rsplit_once(':') {
        Some((h, p)) => {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']'))
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_detection() {
        assert!(has_port("localhost:123"));
        assert!(has_port("[::1]:123"));
        assert!(!has_port("localhost"));
        assert!(!has_port("::1"));
        assert!(!has_port("host:"));
    }

    /// Memory from [`Provider`]: an ordinary buffer, marked as provided.
    struct Provided(AlignedBuffer);

    // SAFETY: the wrapped buffer's memory is not inside the value (it stays put when moved),
    // is page-aligned and non-empty, and lives until the buffer drops with this value.
    unsafe impl crate::memory::ProvidedMemory for Provided {
        fn addr(&self) -> u64 {
            self.0.addr()
        }
        fn len(&self) -> usize {
            self.0.len()
        }
    }

    /// Hands out [`Provided`] memory, and fails for 12 KiB.
    #[derive(Debug)]
    struct Provider;

    impl MemoryProvider for Provider {
        fn allocate(&self, len: usize) -> Result<AlignedBuffer> {
            if len == 12 << 10 {
                return Err(Error::NotSupported("not that size".into()));
            }
            AlignedBuffer::from_provided(Provided(AlignedBuffer::new(len)?))
        }
    }

    /// A transport that only records what it hears of registrations.
    #[derive(Debug)]
    struct Hooked {
        log: std::sync::Mutex<Vec<(&'static str, u64, bool)>>,
        capabilities: crate::transport::Capabilities,
    }

    impl Default for Hooked {
        fn default() -> Self {
            Hooked {
                log: Default::default(),
                capabilities: crate::transport::Capabilities {
                    one_sided: false,
                    memory: Some(Arc::new(Provider)),
                },
            }
        }
    }

    #[async_trait::async_trait]
    impl Transport for Hooked {
        fn protocol(&self) -> &'static str {
            "hooked"
        }
        fn capabilities(&self) -> &crate::transport::Capabilities {
            &self.capabilities
        }
        fn on_register(&self, buffer: &RegisteredBuffer) -> Result<Registration> {
            let provided = buffer.provided::<Provided>().is_some();
            let entry = ("register", buffer.addr(), provided);
            self.log.lock().unwrap().push(entry);
            Ok(Registration {
                keys: Some(vec![buffer.len()]),
                attachment: None,
            })
        }
        fn on_unregister(&self, buffer: &RegisteredBuffer) {
            let entry = ("unregister", buffer.addr(), false);
            self.log.lock().unwrap().push(entry);
        }
        async fn serve(&self, _: Arc<LocalSegment>) -> Result<crate::transport::Endpoint> {
            Ok(crate::transport::Endpoint {
                protocol: "hooked".into(),
                address: "nowhere".into(),
            })
        }
        async fn transfer(&self, _: &SegmentDesc, ops: Vec<TransferOp>, batch: &Arc<BatchState>) {
            for op in ops {
                batch.complete(op.index, Err(Error::NotSupported("records only".into())));
            }
        }
        async fn shutdown(&self) {}
    }

    #[tokio::test]
    async fn transports_hear_of_registrations_after_start_and_provide_memory() {
        let hooked = Arc::new(Hooked::default());
        let e = TransferEngine::start(EngineConfig::new("local:1"), vec![hooked.clone()])
            .await
            .unwrap();
        let a = e.allocate_buffer(8192, Location::cpu(0)).unwrap();
        // The provider fails for this size: ordinary memory, still announced.
        let b = e.allocate_buffer(12 << 10, Location::cpu(0)).unwrap();
        let owned = AlignedBuffer::new(4096).unwrap();
        let o = owned.addr();
        // SAFETY: `owned` outlives its registration (unregistered and waited for below).
        unsafe { e.register_memory(o, 4096, Location::cpu(0)) }.unwrap();
        let desc = e.local_descriptor();
        let key = |addr| {
            desc.buffers
                .iter()
                .find(|d| d.addr == addr)
                .unwrap()
                .key("hooked")
        };
        assert_eq!(key(a), Some(&[8192][..]));
        assert_eq!(key(b), Some(&[12 << 10][..]));
        assert_eq!(key(o), Some(&[4096][..]));
        e.unregister_memory_async(o).unwrap().await;
        e.unregister_memory(a).unwrap();
        drop(owned);
        assert_eq!(
            *hooked.log.lock().unwrap(),
            vec![
                ("register", a, true),
                ("register", b, false),
                ("register", o, false),
                ("unregister", o, false),
                ("unregister", a, false),
            ]
        );
        e.shutdown().await;
    }

    #[tokio::test]
    async fn same_process_transfers_use_memcpy() {
        let e = TransferEngine::start(EngineConfig::new("local:1"), vec![])
            .await
            .unwrap();
        let a = e.allocate_buffer(4096, Location::cpu(0)).unwrap();
        let b = e.allocate_buffer(4096, Location::cpu(0)).unwrap();
        e.memory()
            .resolve(a, 5)
            .unwrap()
            .write_from(b"hello")
            .unwrap();
        let me = e.open_segment("local:1").await.unwrap();
        let r = e
            .transfer(vec![
                TransferRequest::write(&me, b + 100, a, 5),
                TransferRequest::read(&me, b + 4095, a, 2),
                TransferRequest::read(&me, b + 100, a + 10, 0),
            ])
            .await;
        assert!(r[0].is_ok());
        assert!(matches!(r[1], Err(Error::RemoteRangeInvalid { .. })));
        assert!(r[2].is_ok());
        assert_eq!(e.memory().resolve(b + 100, 5).unwrap().to_vec(), b"hello");
        e.shutdown().await;
        let r = e.transfer(vec![TransferRequest::read(&me, b, a, 1)]).await;
        assert!(matches!(r[0], Err(Error::Shutdown)));
    }
}
