//! The [`Transport`] trait: how a process reads and writes another process's registered memory.
//!
//! The model is one-sided access to registered memory, which is what RDMA offers natively: a
//! request names a local registered range and a range in the target's address space, and the
//! data moves between them. Stream transports (TCP, QUIC) emulate it with a small request/response
//! protocol served by the target, which checks every range against its registered buffers. A
//! batch of requests to one segment is one call, so transports can pipeline and coalesce.
//!
//! Contract for implementors:
//! - [`Transport::transfer`] completes every op of the batch exactly once through the
//!   [`BatchState`] it is given, then returns. Failures are per op.
//! - Local memory is touched only through the ops' [`MemRegion`]s, and never after the op has
//!   been completed. When an op times out the transport tears down whatever could still deliver
//!   data for it (a connection, a queue pair) before completing it as timed out.
//! - A range outside the target's registered buffers is an error for that op, never an access.
//! - Every buffer of the served segment is announced with [`Transport::on_register`], whenever it
//!   is registered (before or after [`Transport::serve`]), and [`Transport::on_unregister`] when
//!   it goes: after that, peers must not reach it through this transport. What a transport
//!   attaches to a buffer is found lock-free from any [`MemRegion`] of it
//!   ([`RegisteredBuffer::attachment`]), fit for per-request use.

use std::fmt;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::memory::{
    BufferDesc, MemRegion, MemoryProvider, MemoryRegistry, RegisteredBuffer, Registration,
};

/// Direction of a request, seen from the initiator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OpCode {
    /// Copy target memory into local memory.
    Read,
    /// Copy local memory into target memory.
    Write,
}

/// How a transport can reach a segment: protocol name and protocol-specific address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Protocol (`tcp`, `rdma`, `quic`, `mem`).
    pub protocol: String,
    /// Address in that protocol (`127.0.0.1:12345` for TCP).
    pub address: String,
}

/// What peers know about a segment: its name, how to reach it and its registered buffers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentDesc {
    /// Unique name, `host:port`.
    pub name: String,
    /// One endpoint per transport the owner serves.
    pub endpoints: Vec<Endpoint>,
    /// Registered buffers, by address.
    pub buffers: Vec<BufferDesc>,
}

impl SegmentDesc {
    /// The endpoint for `protocol`, if the segment offers it.
    pub fn endpoint(&self, protocol: &str) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.protocol == protocol)
    }

    /// Encodes the descriptor (postcard).
    pub fn encode(&self) -> Result<Vec<u8>> {
        Ok(postcard::to_stdvec(self)?)
    }

    /// Decodes a descriptor.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        Ok(postcard::from_bytes(bytes)?)
    }
}

/// Told of every WRITE into this segment that asked for a landing notice (see
/// [`LocalSegment::landed`]).
pub trait LandingObserver: Send + Sync {
    /// All bytes of the WRITE (or of a piece of one) of `len` bytes at `addr` are in memory.
    fn landed(&self, addr: u64, len: u64);
    /// The transport is about to acknowledge the WRITEs reported since the last flush (it
    /// gathers acknowledgements, so reports can be gathered too): deliver them now.
    fn flush(&self) {}
}

/// The process's own segment, as transports serve it: its memory and its current descriptor.
pub struct LocalSegment {
    memory: Arc<MemoryRegistry>,
    name: OnceLock<String>,
    endpoints: Mutex<Vec<Endpoint>>,
    observer: OnceLock<Arc<dyn LandingObserver>>,
}

impl fmt::Debug for LocalSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalSegment")
            .field("name", &self.name())
            .field("observed", &self.observer.get().is_some())
            .finish()
    }
}

impl LocalSegment {
    /// A segment over `memory`; the name is set once transports have bound their endpoints.
    pub fn new(memory: Arc<MemoryRegistry>) -> Arc<Self> {
        Arc::new(LocalSegment {
            memory,
            name: OnceLock::new(),
            endpoints: Mutex::new(Vec::new()),
            observer: OnceLock::new(),
        })
    }
    /// The registered memory.
    pub fn memory(&self) -> &Arc<MemoryRegistry> {
        &self.memory
    }
    /// The segment name (empty until set).
    pub fn name(&self) -> &str {
        self.name.get().map_or("", String::as_str)
    }
    /// Sets the segment name, once: a segment keeps its name for life.
    pub fn set_name(&self, name: String) -> Result<()> {
        self.name
            .set(name)
            .map_err(|n| Error::InvalidArgument(format!("segment already named; refusing {n:?}")))
    }
    /// Adds an endpoint.
    pub fn add_endpoint(&self, endpoint: Endpoint) {
        self.endpoints.lock().expect("endpoint lock").push(endpoint);
    }
    /// Sets who is told of landed WRITEs that asked for a notice, once.
    pub fn set_landing_observer(&self, observer: Arc<dyn LandingObserver>) -> Result<()> {
        self.observer
            .set(observer)
            .map_err(|_| Error::InvalidArgument("segment already has a landing observer".into()))
    }
    /// Transports call this when a WRITE of `len` bytes at `addr` that asked for a landing
    /// notice ([`TransferOp::notify`]) has put all its bytes in this segment's memory, and
    /// [`LocalSegment::flush_landings`] before they acknowledge it. A WRITE a transport splits
    /// may be reported in pieces.
    pub fn landed(&self, addr: u64, len: u64) {
        if let Some(observer) = self.observer.get() {
            observer.landed(addr, len);
        }
    }
    /// See [`LandingObserver::flush`].
    pub fn flush_landings(&self) {
        if let Some(observer) = self.observer.get() {
            observer.flush();
        }
    }
    /// The current descriptor.
    pub fn descriptor(&self) -> SegmentDesc {
        SegmentDesc {
            name: self.name().to_owned(),
            endpoints: self.endpoints.lock().expect("endpoint lock").clone(),
            buffers: self.memory.descriptors(),
        }
    }
}

/// Status of one request of a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransferStatus {
    /// Submitted, not finished.
    Pending,
    /// Finished; the bytes have moved.
    Completed,
    /// Failed; [`BatchState::error`] says why.
    Failed,
    /// Did not finish within the transport's timeout.
    TimedOut,
}

const PENDING: u8 = 0;
const COMPLETED: u8 = 1;
const FAILED: u8 = 2;
const TIMED_OUT: u8 = 3;

/// Completion state of a batch: one status per request, the error of each failed one, and a
/// wake-up for whoever waits for the whole batch.
pub struct BatchState {
    status: Vec<AtomicU8>,
    errors: Mutex<Vec<Option<Error>>>,
    remaining: AtomicUsize,
    done: tokio::sync::Notify,
}

impl fmt::Debug for BatchState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BatchState({} ops, {} remaining)",
            self.status.len(),
            self.remaining.load(Ordering::Relaxed)
        )
    }
}

impl BatchState {
    /// A batch of `len` pending requests.
    pub fn new(len: usize) -> Arc<Self> {
        Arc::new(BatchState {
            status: (0..len).map(|_| AtomicU8::new(PENDING)).collect(),
            errors: Mutex::new(Vec::new()),
            remaining: AtomicUsize::new(len),
            done: tokio::sync::Notify::new(),
        })
    }

    /// Number of requests.
    pub fn len(&self) -> usize {
        self.status.len()
    }

    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.status.is_empty()
    }

    /// Completes request `index`. Completing a request twice is a transport bug: the second
    /// result is ignored (and debug builds panic).
    pub fn complete(&self, index: usize, result: Result<()>) {
        let new = match &result {
            Ok(()) => COMPLETED,
            Err(Error::Timeout(_)) => TIMED_OUT,
            Err(_) => FAILED,
        };
        if let Err(e) = result {
            let mut errors = self.errors.lock().expect("batch errors lock");
            if errors.len() < self.status.len() {
                errors.resize(self.status.len(), None);
            }
            errors[index] = Some(e);
        }
        let prev = self.status[index].swap(new, Ordering::AcqRel);
        debug_assert_eq!(prev, PENDING, "request {index} completed twice");
        if prev == PENDING && self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_waiters();
            self.done.notify_one();
        }
    }

    /// The status of request `index`.
    pub fn status(&self, index: usize) -> TransferStatus {
        match self.status[index].load(Ordering::Acquire) {
            PENDING => TransferStatus::Pending,
            COMPLETED => TransferStatus::Completed,
            TIMED_OUT => TransferStatus::TimedOut,
            _ => TransferStatus::Failed,
        }
    }

    /// The error of request `index`, if it failed.
    pub fn error(&self, index: usize) -> Option<Error> {
        self.errors
            .lock()
            .expect("batch errors lock")
            .get(index)
            .cloned()
            .flatten()
    }

    /// True when every request has finished.
    pub fn is_done(&self) -> bool {
        self.remaining.load(Ordering::Acquire) == 0
    }

    /// Waits until every request has finished.
    pub async fn wait(&self) {
        loop {
            let notified = self.done.notified();
            if self.is_done() {
                return;
            }
            notified.await;
        }
    }

    /// Per-request results, in order. Pending requests report [`Error::Shutdown`].
    pub fn results(&self) -> Vec<Result<()>> {
        (0..self.len())
            .map(|i| match self.status(i) {
                TransferStatus::Completed => Ok(()),
                TransferStatus::Pending => Err(Error::Shutdown),
                _ => Err(self
                    .error(i)
                    .unwrap_or_else(|| Error::Protocol("failed without an error".into()))),
            })
            .collect()
    }
}

/// One request as transports receive it: validated local memory, target address, and where to
/// report completion.
#[derive(Debug, Clone)]
pub struct TransferOp {
    /// Direction.
    pub opcode: OpCode,
    /// Local registered memory (the op's length is `local.len()`).
    pub local: MemRegion,
    /// Start address in the target's address space.
    pub target_addr: u64,
    /// Index of this request in `batch`.
    pub index: usize,
    /// For a WRITE: the target reports its landing to its segment's observer
    /// ([`LocalSegment::landed`]). Lets a target-side party act on the bytes (the store's
    /// master commits a put once they landed) without waiting for the initiator.
    pub notify: bool,
    /// For a WRITE: no byte may land after this instant
    /// ([`TransferRequest::with_deadline`](crate::TransferRequest::with_deadline)). A transport
    /// whose target takes part carries it to the target, which refuses to start or go on
    /// writing past it; one that cannot (the initiator copies the bytes itself) at least does
    /// not start past it.
    pub deadline: Option<std::time::Instant>,
}

/// What a transport can do ([`Transport::capabilities`]). Whether it carries a given request is
/// [`Transport::reaches`], which depends on the target and the range.
#[derive(Clone, Debug, Default)]
pub struct Capabilities {
    /// The initiator alone moves the bytes, so that a completed WRITE is in the target's memory
    /// without the target taking part (shared memory, RDMA). A landing notice then costs an
    /// extra message to the target and tells the initiator nothing new. Default: no.
    pub one_sided: bool,
    /// Where buffers the engine allocates should come from, because this transport can expose
    /// only memory of that kind to peers (shared memory: memfds that processes of this host can
    /// map). The engine uses the provider of the first installed transport that offers one.
    /// Default: none, ordinary memory.
    pub memory: Option<Arc<dyn MemoryProvider>>,
}

/// [`Capabilities::default`], for transports that declare none.
static NO_CAPABILITIES: Capabilities = Capabilities {
    one_sided: false,
    memory: None,
};

/// A way to move bytes to and from other processes' registered memory.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// Protocol name, matched against [`Endpoint::protocol`].
    fn protocol(&self) -> &'static str;

    /// Whether this transport carries a request for `[addr, addr + len)` of `target`, which
    /// offers this transport's protocol. The engine gives each request to the first installed
    /// transport that says yes, so a transport that reaches only some peers or some buffers
    /// (same-host shared memory) goes first and the others carry the rest. Default: yes.
    fn reaches(&self, target: &SegmentDesc, addr: u64, len: u64) -> bool {
        let _ = (target, addr, len);
        true
    }

    /// What this transport can do, for the engine and the store to plan around (read per
    /// request by the store, so it is borrowed, not built). Default: nothing special
    /// ([`Capabilities::default`]).
    fn capabilities(&self) -> &Capabilities {
        &NO_CAPABILITIES
    }

    /// A buffer is being registered in the segment this transport serves (or will serve), at
    /// any time in the engine's life, before or after [`serve`](Self::serve). The transport may
    /// publish keys in the buffer's descriptor and keep an attachment with it (see
    /// [`Registration`]); an RDMA transport registers the buffer with each device here and
    /// publishes the remote keys. An error fails the registration. Default: nothing.
    fn on_register(&self, buffer: &RegisteredBuffer) -> Result<Registration> {
        let _ = buffer;
        Ok(Registration::default())
    }

    /// A buffer this transport accepted in [`on_register`](Self::on_register) is being
    /// unregistered: from now on peers must not reach it through this transport (revoke its
    /// keys). Local transfers may still hold regions of it; its memory and the attachment stay
    /// until they are gone, and the attachment is dropped just before the memory is released.
    /// Called on the unregistering thread, which may be an async worker: do not block.
    /// Default: nothing.
    fn on_unregister(&self, buffer: &RegisteredBuffer) {
        let _ = buffer;
    }

    /// Starts serving `segment` to peers and returns the endpoint to publish.
    async fn serve(&self, segment: Arc<LocalSegment>) -> Result<Endpoint>;

    /// Moves a batch of requests to or from one target segment, completing each op in `batch`.
    /// Returns when every op is complete (see the module docs for the contract).
    async fn transfer(&self, target: &SegmentDesc, ops: Vec<TransferOp>, batch: &Arc<BatchState>);

    /// Asks the peer at `address` (a segment name, `host:port`) for its descriptor directly, for
    /// metadata-free (`P2PHANDSHAKE`) operation. Transports without a handshake say so.
    async fn handshake(&self, address: &str) -> Result<SegmentDesc> {
        Err(Error::NotSupported(format!(
            "{} transport has no handshake (asked for {address})",
            self.protocol()
        )))
    }

    /// Stops serving and closes connections. Later transfers fail.
    async fn shutdown(&self);
}
