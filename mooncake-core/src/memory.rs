//! Registered memory: the only memory a peer may read or write.
//!
//! A process registers buffers (address, length, location such as `cpu:0`) in a
//! [`MemoryRegistry`]. Every access made on behalf of a transfer, local or remote, first resolves
//! the requested range to a [`MemRegion`], which succeeds only when the whole range lies inside
//! one registered buffer. A `MemRegion` holds its buffer registered: unregistering returns an
//! [`Unregistering`] future that completes once no region of that buffer is alive, so no transfer
//! touches memory after its owner took it back.
//!
//! Transports learn of every registration through [`RegistrationHook`]s installed with the
//! registry ([`MemoryRegistry::with_hooks`]; the engine installs one per transport): a hook may
//! publish keys in the buffer's descriptor ([`BufferDesc::keys`], RDMA's remote keys) and keep an
//! attachment with the buffer for its own use ([`RegisteredBuffer::attachment`]). Buffers the
//! engine allocates may come from a transport's [`MemoryProvider`] (shared memory that peers of
//! this host can map); the registry does not know what kind of memory that is.
//!
//! This is the one module that turns addresses into memory accesses; its `unsafe` blocks are
//! small and each states why it is sound.

use std::alloc::{self, Layout};
use std::any::Any;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod hooks;
mod release;

pub use hooks::{MemoryProvider, ProvidedMemory, Registration, RegistrationHook};
use release::Release;
pub use release::Unregistering;

/// Where a buffer lives, as upstream names it: `cpu:0`, `cuda:1`, ... (`*` for "anywhere").
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Location(pub String);

impl Location {
    /// CPU memory on NUMA node `node`.
    pub fn cpu(node: u32) -> Self {
        Location(format!("cpu:{node}"))
    }
}

impl Default for Location {
    fn default() -> Self {
        Location::cpu(0)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What backs an [`AlignedBuffer`].
enum Backing {
    /// `alloc_zeroed` with the buffer's layout.
    Heap,
    /// An anonymous private mapping of the buffer's length.
    Mapped,
    /// A [`ProvidedMemory`] value, kept here as `Any` so its owner can find it again.
    Provided(Box<dyn Any + Send + Sync>),
}

/// A page-aligned, zero-initialised buffer that can be registered and handed to peers: heap or
/// anonymous mapping ([`AlignedBuffer::new`]), or memory from a [`MemoryProvider`].
///
/// The buffer is never exposed as a Rust slice once registered: peers may write it at any time,
/// so all access goes through raw copies ([`MemRegion::read_into`], [`MemRegion::write_from`]).
pub struct AlignedBuffer {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
    backing: Backing,
}

// SAFETY: the buffer is plain bytes owned by this value (provided memory is `Send + Sync`);
// access is through raw copies.
unsafe impl Send for AlignedBuffer {}
// SAFETY: as above; no `&`-references to the contents are ever handed out.
unsafe impl Sync for AlignedBuffer {}

impl AlignedBuffer {
    /// Page alignment used for every buffer.
    pub const ALIGN: usize = 4096;

    /// Buffers of at least this size are mapped from the kernel rather than the heap: their
    /// pages are zero-filled on first touch, so a large segment or staging buffer costs memory
    /// only as it is used (a heap allocation at page alignment is zeroed eagerly).
    pub const MAP_THRESHOLD: usize = 2 << 20;

    /// Allocates `len` zeroed bytes aligned to 4 KiB. `len` must be non-zero.
    pub fn new(len: usize) -> Result<Self> {
        let layout = Self::layout(len)?;
        let failed = || {
            Error::with_code(
                crate::ErrorCode::NO_AVAILABLE_HANDLE,
                format!("allocating {len} bytes failed"),
            )
        };
        if len >= Self::MAP_THRESHOLD {
            // SAFETY: an anonymous private mapping of `len` bytes; no existing memory is touched.
            let raw = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if raw == libc::MAP_FAILED {
                return Err(failed());
            }
            let ptr = std::ptr::NonNull::new(raw.cast::<u8>()).ok_or_else(failed)?;
            return Ok(AlignedBuffer {
                ptr,
                layout,
                backing: Backing::Mapped,
            });
        }
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or_else(failed)?;
        Ok(AlignedBuffer {
            ptr,
            layout,
            backing: Backing::Heap,
        })
    }

    /// A buffer over memory from a [`MemoryProvider`], which it owns from now on.
    pub fn from_provided<M: ProvidedMemory>(memory: M) -> Result<Self> {
        let layout = Self::layout(memory.len())?;
        let ptr = std::ptr::NonNull::new(memory.addr() as usize as *mut u8)
            .filter(|p| p.as_ptr() as usize % Self::ALIGN == 0)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "provided memory at {:#x} is not page-aligned",
                    memory.addr()
                ))
            })?;
        Ok(AlignedBuffer {
            ptr,
            layout,
            backing: Backing::Provided(Box::new(memory)),
        })
    }

    fn layout(len: usize) -> Result<Layout> {
        if len == 0 {
            return Err(Error::InvalidArgument(
                "buffer length must be non-zero".into(),
            ));
        }
        Layout::from_size_align(len, Self::ALIGN)
            .map_err(|e| Error::InvalidArgument(format!("buffer of {len} bytes: {e}")))
    }

    /// The provided memory behind this buffer, when it came from a [`MemoryProvider`] as an `M`.
    pub fn provided<M: ProvidedMemory>(&self) -> Option<&M> {
        match &self.backing {
            Backing::Provided(m) => m.downcast_ref(),
            _ => None,
        }
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Always false: buffers are non-empty.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        match self.backing {
            // SAFETY: mapped in `new` with this length; nothing refers to it any more.
            Backing::Mapped => unsafe {
                libc::munmap(self.ptr.as_ptr().cast(), self.layout.size());
            },
            // SAFETY: allocated in `new` with this layout.
            Backing::Heap => unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) },
            // The provided value releases its memory when the backing drops.
            Backing::Provided(_) => {}
        }
    }
}

impl fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuffer({:#x}+{})", self.addr(), self.len())
    }
}

/// One registered buffer, as [`RegistrationHook`]s see it and as [`MemRegion`]s hold it.
pub struct RegisteredBuffer {
    addr: u64,
    len: u64,
    location: Location,
    /// Keys the hooks published, one entry per hook that published any.
    keys: Vec<BufferKey>,
    /// What the hooks keep with the buffer; dropped before the memory is released.
    attachments: Vec<Box<dyn Any + Send + Sync>>,
    /// Keeps memory that the registry owns alive (none for caller-owned memory).
    owned: Option<AlignedBuffer>,
    /// Told when this value drops: no region of the buffer is left.
    release: Arc<Release>,
    /// Set once the buffer is unregistered (see [`MemRegion::revoked`]).
    revoked: Revocation,
}

/// Whether a buffer was unregistered, as a flag and as a future that many may await.
#[derive(Debug)]
struct Revocation {
    /// Dropped at unregistration, which completes `done` for every waiter.
    signal: Mutex<Option<futures::channel::oneshot::Sender<()>>>,
    done: futures::future::Shared<futures::channel::oneshot::Receiver<()>>,
}

impl Default for Revocation {
    fn default() -> Self {
        use futures::FutureExt;
        let (tx, rx) = futures::channel::oneshot::channel();
        Revocation {
            signal: Mutex::new(Some(tx)),
            done: rx.shared(),
        }
    }
}

impl Revocation {
    fn revoke(&self) {
        self.signal.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl fmt::Debug for RegisteredBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisteredBuffer")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("location", &self.location)
            .field("keys", &self.keys)
            .field("attachments", &self.attachments.len())
            .field("owned", &self.owned.is_some())
            .finish()
    }
}

impl RegisteredBuffer {
    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Always false: zero-length buffers cannot be registered.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Location string.
    pub fn location(&self) -> &Location {
        &self.location
    }
    /// The provided memory behind the buffer, when the registry owns it and it came from a
    /// [`MemoryProvider`] as an `M` (see [`AlignedBuffer::provided`]).
    pub fn provided<M: ProvidedMemory>(&self) -> Option<&M> {
        self.owned.as_ref()?.provided()
    }
    /// The first attachment of type `T` a hook keeps with this buffer
    /// ([`Registration::attachment`]). Lock-free: fit for per-request lookups.
    pub fn attachment<T: Any>(&self) -> Option<&T> {
        self.attachments.iter().find_map(|a| a.downcast_ref())
    }
    /// The keys published for this buffer.
    pub fn keys(&self) -> &[BufferKey] {
        &self.keys
    }
}

impl Drop for RegisteredBuffer {
    fn drop(&mut self) {
        // Attachments (RDMA memory regions, shared-memory slots) go before the memory they
        // describe.
        self.attachments.clear();
        self.owned = None;
        self.release.complete();
    }
}

/// Keys one transport published for a buffer, for peers to present when they access it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferKey {
    /// Protocol of the transport that published them ([`Endpoint::protocol`](crate::Endpoint)).
    pub protocol: String,
    /// Meaningful to that transport only: RDMA's remote keys, one per device; none for a
    /// shared-memory buffer (the entry itself says peers of the host can map it).
    pub values: Vec<u64>,
}

/// A buffer as peers see it in a segment descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferDesc {
    /// Start address in the owner's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Location (`cpu:0`).
    pub location: Location,
    /// Transport-specific access keys, at most one entry per protocol; empty when no transport
    /// published any (TCP publishes none).
    pub keys: Vec<BufferKey>,
}

impl BufferDesc {
    /// The keys the transport of `protocol` published for this buffer, if it published any.
    pub fn key(&self, protocol: &str) -> Option<&[u64]> {
        self.keys
            .iter()
            .find(|k| k.protocol == protocol)
            .map(|k| k.values.as_slice())
    }
}

/// A validated byte range inside one registered buffer, which stays registered while this
/// region (or a clone) lives.
#[derive(Clone)]
pub struct MemRegion {
    buffer: Arc<RegisteredBuffer>,
    addr: u64,
    len: u64,
}
impl fmt::Debug for MemRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemRegion({:#x}+{})", self.addr, self.len)
    }
}

impl MemRegion {
    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Length.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True for a zero-length region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Raw pointer to the first byte, for transports' I/O syscalls. Valid for `len` bytes while
    /// `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as usize as *mut u8
    }
    /// The sub-range `[offset, offset + len)` of this region.
    pub fn slice(&self, offset: u64, len: u64) -> Result<MemRegion> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::InvalidArgument("sub-range overflows".into()))?;
        if end > self.len {
            return Err(Error::InvalidArgument(format!(
                "sub-range {offset}+{len} outside region of {} bytes",
                self.len
            )));
        }
        Ok(MemRegion {
            buffer: self.buffer.clone(),
            addr: self.addr + offset,
            len,
        })
    }
    /// The registered buffer this region lies in.
    pub fn buffer(&self) -> &RegisteredBuffer {
        &self.buffer
    }

    /// Completes once the buffer has been unregistered. A transport that holds a region for as
    /// long as a peer takes (receiving a WRITE, sending a READ) must stop at this point and drop
    /// the region, so that `unregister` completes and the caller may free the memory: no byte
    /// may land in it afterwards.
    pub fn revoked(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        use futures::FutureExt;
        self.buffer.revoked.done.clone().map(|_| ())
    }

    /// Whether the buffer has been unregistered.
    pub fn is_revoked(&self) -> bool {
        self.buffer.revoked.done.peek().is_some()
            || self
                .buffer
                .revoked
                .signal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none()
    }

    /// Has the kernel back every page of this region now (one byte per 4 KiB page is read and
    /// written back unchanged), so later writes into it do not wait on page faults. For memory
    /// nothing else writes yet: a concurrent write of the same byte could be undone.
    pub fn prefault(&self) {
        const PAGE: u64 = 4096;
        let mut off = 0;
        while off < self.len {
            // SAFETY: `off < len`, so the byte lies in this validated range of a registered
            // buffer kept alive by `self.buffer`.
            unsafe {
                let p = self.as_ptr().add(off as usize);
                p.write_volatile(p.read_volatile());
            }
            off += PAGE;
        }
    }

    /// Copies `self.len()` bytes from `src` into this region.
    pub fn write_from(&self, src: &[u8]) -> Result<()> {
        if src.len() as u64 != self.len {
            return Err(Error::InvalidArgument(format!(
                "source of {} bytes for a region of {}",
                src.len(),
                self.len
            )));
        }
        // SAFETY: `self` is a validated range of a registered buffer kept alive by `self.buffer`;
        // `src` is a distinct Rust slice (registered memory is never lent out as a slice).
        unsafe { std::ptr::copy(src.as_ptr(), self.as_ptr(), src.len()) };
        Ok(())
    }

    /// Copies this region's bytes into `dst`, which must be exactly as long.
    pub fn read_into(&self, dst: &mut [u8]) -> Result<()> {
        if dst.len() as u64 != self.len {
            return Err(Error::InvalidArgument(format!(
                "destination of {} bytes for a region of {}",
                dst.len(),
                self.len
            )));
        }
        // SAFETY: as in `write_from`, with the roles swapped.
        unsafe { std::ptr::copy(self.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// This region's bytes, lent out without a copy: for reading bytes at memory speed (a
    /// checksum over a value), where [`MemRegion::read_into`] would copy them first.
    ///
    /// # Safety
    ///
    /// Nothing may write the range while the slice lives: no transfer into it (in this process
    /// or, through shared memory, another), no caller pointer. The destination of a transfer
    /// that has completed, and a put's source (which the caller must leave alone during the
    /// call), qualify.
    pub unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: `self` is a validated range of a registered buffer kept alive by
        // `self.buffer` for as long as `self`, which the slice borrows; the caller guarantees
        // that nothing writes it meanwhile.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len as usize) }
    }

    /// Copies this region's bytes into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len as usize];
        self.read_into(&mut v).expect("lengths match");
        v
    }

    /// Copies `self` into `dst` (same length). Overlap is allowed.
    pub fn copy_to(&self, dst: &MemRegion) -> Result<()> {
        if dst.len != self.len {
            return Err(Error::InvalidArgument(format!(
                "copy of {} bytes into a region of {}",
                self.len, dst.len
            )));
        }
        // SAFETY: both are validated ranges of registered buffers kept alive by the regions;
        // `ptr::copy` allows overlap.
        unsafe { std::ptr::copy(self.as_ptr(), dst.as_ptr(), self.len as usize) };
        Ok(())
    }
}

/// The set of buffers a process has registered.
#[derive(Default)]
pub struct MemoryRegistry {
    buffers: RwLock<BTreeMap<u64, Arc<RegisteredBuffer>>>,
    version: AtomicU64,
    /// Told of every registration and unregistration, in order.
    hooks: Vec<Arc<dyn RegistrationHook>>,
}

impl fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegistry")
            .field("buffers", &self.descriptors().len())
            .field("hooks", &self.hooks)
            .finish()
    }
}

/// How long [`MemoryRegistry::unregister_blocking`] waits for in-flight transfers to release a
/// buffer.
pub const UNREGISTER_WAIT: Duration = Duration::from_secs(60);

impl MemoryRegistry {
    /// An empty registry without hooks.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry whose registrations and unregistrations `hooks` are told of, in order.
    pub fn with_hooks(hooks: Vec<Arc<dyn RegistrationHook>>) -> Self {
        MemoryRegistry {
            hooks,
            ..Self::default()
        }
    }

    /// Registers caller-owned memory.
    ///
    /// # Safety
    /// `[addr, addr + len)` must be valid for reads and writes by any thread until the
    /// [`Unregistering`] that [`unregister`](Self::unregister) returns for `addr` has completed
    /// (or [`unregister_blocking`](Self::unregister_blocking) has returned `Ok`), and must not be
    /// accessed through Rust references while peers may write it.
    ///
    /// A range that is not mapped readable and writable in this process is refused
    /// (`InvalidArgument`) before it is registered: a wrong pointer is an error here, not a
    /// segfault in a later transfer or a peer's READ.
    pub unsafe fn register(&self, addr: u64, len: u64, location: Location) -> Result<()> {
        if len > 0 {
            crate::mapped::check_mapped(addr, len)
                .map_err(|why| Error::InvalidArgument(format!("cannot register: {why}")))?;
        }
        self.insert(addr, len, location, None).map(|_| ())
    }

    /// Registers a buffer whose memory the registry takes over; it is freed when unregistered
    /// and every region of it is gone. Returns the buffer's start address.
    pub fn register_owned(&self, buffer: AlignedBuffer, location: Location) -> Result<u64> {
        let (addr, len) = (buffer.addr(), buffer.len() as u64);
        self.insert(addr, len, location, Some(buffer))
    }

    fn insert(
        &self,
        addr: u64,
        len: u64,
        location: Location,
        owned: Option<AlignedBuffer>,
    ) -> Result<u64> {
        if len == 0 {
            return Err(Error::InvalidArgument(
                "cannot register a zero-length buffer".into(),
            ));
        }
        if addr == 0 {
            return Err(Error::InvalidArgument("cannot register address 0".into()));
        }
        let end = addr
            .checked_add(len)
            .ok_or_else(|| Error::InvalidArgument("buffer wraps the address space".into()))?;
        // Refuse an overlap before the hooks do any work (checked again when inserting).
        check_free(&self.buffers.read().expect("registry lock"), addr, len, end)?;
        let mut buf = RegisteredBuffer {
            addr,
            len,
            location,
            keys: Vec::new(),
            attachments: Vec::new(),
            owned,
            release: Arc::default(),
            revoked: Revocation::default(),
        };
        // Outside the registry's lock: a hook may take long (an RDMA registration pins pages).
        for (i, hook) in self.hooks.iter().enumerate() {
            match hook.on_register(&buf) {
                Ok(reg) => {
                    if let Some(values) = reg.keys {
                        buf.keys.push(BufferKey {
                            protocol: hook.protocol().to_owned(),
                            values,
                        });
                    }
                    buf.attachments.extend(reg.attachment);
                }
                Err(e) => {
                    self.hooks[..i].iter().for_each(|h| h.on_unregister(&buf));
                    return Err(e);
                }
            }
        }
        let mut map = self.buffers.write().expect("registry lock");
        if let Err(e) = check_free(&map, addr, len, end) {
            drop(map);
            self.hooks.iter().for_each(|h| h.on_unregister(&buf));
            return Err(e);
        }
        map.insert(addr, Arc::new(buf));
        self.version.fetch_add(1, Ordering::Release);
        Ok(addr)
    }

    /// Unregisters the buffer starting at `addr`: from now on no range of it resolves and the
    /// hooks have been told. Returns a future that completes once no transfer holds a region of
    /// it; it never blocks the thread, so async code awaits it (or drops it, not waiting).
    pub fn unregister(&self, addr: u64) -> Result<Unregistering> {
        let buf = {
            let mut map = self.buffers.write().expect("registry lock");
            let buf = map.remove(&addr).ok_or(Error::NotRegistered(addr))?;
            self.version.fetch_add(1, Ordering::Release);
            buf
        };
        // Peers stop reaching it (revoked keys, shared-memory slots) before local users end.
        self.hooks.iter().for_each(|h| h.on_unregister(&buf));
        // Transfers that hold regions of it and may take long (a peer's stalled WRITE) end now.
        buf.revoked.revoke();
        Ok(Unregistering::new(addr, buf.release.clone()))
        // `buf` drops here: when no region is left, that releases the buffer at once.
    }

    /// [`unregister`](Self::unregister), then blocks the calling thread until no transfer holds
    /// a region of the buffer, for at most [`UNREGISTER_WAIT`]. For callers outside async code
    /// (the Python binding, synchronous APIs); async code awaits [`unregister`](Self::unregister).
    pub fn unregister_blocking(&self, addr: u64) -> Result<()> {
        self.unregister(addr)?.wait_blocking(UNREGISTER_WAIT)
    }

    /// Validates `[addr, addr + len)` against the registered buffers. Succeeds only when the whole
    /// range lies inside one buffer; a zero-length range must start inside or at the end of one.
    pub fn resolve(&self, addr: u64, len: u64) -> Result<MemRegion> {
        let map = self.buffers.read().expect("registry lock");
        let found = map
            .range(..=addr)
            .next_back()
            .map(|(_, b)| b)
            .filter(|b| range_within(b.addr, b.len, addr, len));
        match found {
            Some(b) => Ok(MemRegion {
                buffer: b.clone(),
                addr,
                len,
            }),
            None => Err(Error::LocalRangeNotRegistered { addr, len }),
        }
    }

    /// Descriptors of all registered buffers, by address.
    pub fn descriptors(&self) -> Vec<BufferDesc> {
        let map = self.buffers.read().expect("registry lock");
        map.values()
            .map(|b| BufferDesc {
                addr: b.addr,
                len: b.len,
                location: b.location.clone(),
                keys: b.keys.clone(),
            })
            .collect()
    }

    /// A counter bumped by every registration change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }
}

/// Refuses `[addr, end)` when it overlaps a buffer of `map`.
fn check_free(
    map: &BTreeMap<u64, Arc<RegisteredBuffer>>,
    addr: u64,
    len: u64,
    end: u64,
) -> Result<()> {
    match map.range(..end).next_back() {
        Some((_, prev)) if prev.addr + prev.len > addr => {
            Err(Error::AddressOverlapped { addr, len })
        }
        _ => Ok(()),
    }
}

/// True when `[addr, addr + len)` lies inside the buffer `[base, base + size)`, without overflow.
pub fn range_within(base: u64, size: u64, addr: u64, len: u64) -> bool {
    let Some(buf_end) = base.checked_add(size) else {
        return false;
    };
    let Some(end) = addr.checked_add(len) else {
        return false;
    };
    addr >= base && end <= buf_end
}

#[cfg(test)]
mod tests;
