//! Registered memory: the only memory a peer may read or write.
//!
//! A process registers buffers (address, length, location such as `cpu:0`) in a
//! [`MemoryRegistry`]. Every access made on behalf of a transfer, local or remote, first resolves
//! the requested range to a [`MemRegion`], which succeeds only when the whole range lies inside
//! one registered buffer. A `MemRegion` holds its buffer registered: unregistering waits until no
//! region of that buffer is alive, so no transfer touches memory after its owner took it back.
//!
//! This is the one module that turns addresses into memory accesses; its `unsafe` blocks are
//! small and each states why it is sound.

use std::alloc::{self, Layout};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::shm::{SharedInfo, SlotTable};

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

/// A page-aligned, zero-initialised heap buffer that can be registered and handed to peers.
///
/// The buffer is never exposed as a Rust slice once registered: peers may write it at any time,
/// so all access goes through raw copies ([`MemRegion::read_into`], [`MemRegion::write_from`]).
pub struct AlignedBuffer {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
    /// Mapped with `mmap` (large buffers) rather than taken from the heap.
    mapped: bool,
    /// The memfd behind a shared buffer ([`AlignedBuffer::new_shared`]).
    memfd: Option<std::os::fd::OwnedFd>,
}

// SAFETY: the buffer is plain bytes owned by this value; access is through raw copies.
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
        if len == 0 {
            return Err(Error::InvalidArgument(
                "buffer length must be non-zero".into(),
            ));
        }
        let layout = Layout::from_size_align(len, Self::ALIGN)
            .map_err(|e| Error::InvalidArgument(format!("buffer of {len} bytes: {e}")))?;
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
                mapped: true,
                memfd: None,
            });
        }
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or_else(failed)?;
        Ok(AlignedBuffer {
            ptr,
            layout,
            mapped: false,
            memfd: None,
        })
    }

    /// Allocates `len` zeroed bytes in a sealed memfd, mapped shared, so that processes of this
    /// host it is passed to can map it too (see [`crate::shm`]). Pages are allocated on first
    /// touch, as for large [`AlignedBuffer::new`] buffers.
    pub fn new_shared(len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::InvalidArgument(
                "buffer length must be non-zero".into(),
            ));
        }
        let layout = Layout::from_size_align(len, Self::ALIGN)
            .map_err(|e| Error::InvalidArgument(format!("buffer of {len} bytes: {e}")))?;
        let fd = crate::shm::create_memfd("mooncake-segment", len as u64)?;
        let map = crate::shm::Mapping::map(&fd, len as u64)?;
        let ptr = std::ptr::NonNull::new(map.addr() as *mut u8)
            .ok_or_else(|| Error::Io("mmap returned address 0".into()))?;
        // The mapping is now owned by this buffer and unmapped in its Drop.
        std::mem::forget(map);
        Ok(AlignedBuffer {
            ptr,
            layout,
            mapped: true,
            memfd: Some(fd),
        })
    }

    /// The memfd behind a buffer from [`AlignedBuffer::new_shared`].
    pub fn memfd(&self) -> Option<&std::os::fd::OwnedFd> {
        self.memfd.as_ref()
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
        if self.mapped {
            // SAFETY: mapped in `new` with this length; nothing refers to it any more.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.layout.size()) };
        } else {
            // SAFETY: allocated in `new` with this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
        }
    }
}

impl fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AlignedBuffer({:#x}+{})", self.addr(), self.len())
    }
}

/// One registered buffer.
#[derive(Debug)]
pub struct RegisteredBuffer {
    addr: u64,
    len: u64,
    location: Location,
    /// Keeps memory that the registry owns alive (none for caller-owned memory).
    owned: Option<AlignedBuffer>,
    /// Slot and generation in the registry's [`SlotTable`] of a shared buffer.
    share: Option<(u32, u64)>,
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
    /// Transport-specific access keys (RDMA remote keys, one per device); empty for TCP.
    pub keys: Vec<u32>,
    /// Backed by shared memory that processes of the owner's host can map (see [`crate::shm`]).
    pub shared: bool,
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
    /// Revocation table of the shared buffers, made with the first one (`None` inside when the
    /// table could not be made: buffers are then registered unshared).
    slots: OnceLock<Option<SlotTable>>,
}

impl fmt::Debug for MemoryRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRegistry")
            .field("buffers", &self.descriptors().len())
            .finish()
    }
}

/// How long [`MemoryRegistry::unregister`] waits for in-flight transfers to release a buffer.
pub const UNREGISTER_WAIT: Duration = Duration::from_secs(60);

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers caller-owned memory.
    ///
    /// # Safety
    /// `[addr, addr + len)` must be valid for reads and writes by any thread until
    /// [`unregister`](Self::unregister) for `addr` has returned, and must not be accessed through
    /// Rust references while peers may write it.
    pub unsafe fn register(&self, addr: u64, len: u64, location: Location) -> Result<()> {
        self.insert(RegisteredBuffer {
            addr,
            len,
            location,
            owned: None,
            share: None,
        })
        .map(|_| ())
    }

    /// Registers a buffer whose memory the registry takes over; it is freed when unregistered
    /// and every region of it is gone. Returns the buffer's start address.
    pub fn register_owned(&self, buffer: AlignedBuffer, location: Location) -> Result<u64> {
        let addr = buffer.addr();
        let share = match buffer.memfd() {
            Some(_) => self.slot_table().and_then(SlotTable::take),
            None => None,
        };
        let inserted = self.insert(RegisteredBuffer {
            addr,
            len: buffer.len() as u64,
            location,
            owned: Some(buffer),
            share,
        });
        if let (Err(_), Some((slot, table))) = (&inserted, self.table_of(share)) {
            table.release(slot);
        }
        inserted.map(|_| addr)
    }

    /// The slot of a buffer registered shared (`share`), with the table holding it.
    fn table_of(&self, share: Option<(u32, u64)>) -> Option<(u32, &SlotTable)> {
        let (slot, _) = share?;
        Some((slot, self.slot_table()?))
    }

    /// The table of shared buffers' generations, made on first use; `None` when it cannot be
    /// made (no memfd support).
    pub fn slot_table(&self) -> Option<&SlotTable> {
        self.slots
            .get_or_init(|| match SlotTable::new() {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("shared buffers cannot be revoked, so none are shared: {e}");
                    None
                }
            })
            .as_ref()
    }

    /// The shared buffer containing `[addr, addr + len)`, with a new descriptor of its memfd,
    /// for a peer of this host to map. Fails with [`Error::RemoteRangeInvalid`] when no
    /// registered buffer contains the range, [`Error::NotSupported`] when the one that does is
    /// not shared.
    pub fn export(&self, addr: u64, len: u64) -> Result<(SharedInfo, std::os::fd::OwnedFd)> {
        let region = self
            .resolve(addr, len)
            .map_err(|_| Error::RemoteRangeInvalid { addr, len })?;
        let b = region.buffer();
        match (b.share, b.owned.as_ref().and_then(AlignedBuffer::memfd)) {
            (Some((slot, generation)), Some(fd)) => Ok((
                SharedInfo {
                    addr: b.addr,
                    len: b.len,
                    slot,
                    generation,
                },
                fd.try_clone()?,
            )),
            _ => Err(Error::NotSupported(format!(
                "buffer {:#x}+{} is not shared memory",
                b.addr, b.len
            ))),
        }
    }

    fn insert(&self, buf: RegisteredBuffer) -> Result<Arc<RegisteredBuffer>> {
        if buf.len == 0 {
            return Err(Error::InvalidArgument(
                "cannot register a zero-length buffer".into(),
            ));
        }
        if buf.addr == 0 {
            return Err(Error::InvalidArgument("cannot register address 0".into()));
        }
        let end = buf
            .addr
            .checked_add(buf.len)
            .ok_or_else(|| Error::InvalidArgument("buffer wraps the address space".into()))?;
        let mut map = self.buffers.write().expect("registry lock");
        let before = map.range(..end).next_back();
        if let Some((_, prev)) = before {
            if prev.addr + prev.len > buf.addr {
                return Err(Error::AddressOverlapped {
                    addr: buf.addr,
                    len: buf.len,
                });
            }
        }
        let buf = Arc::new(buf);
        map.insert(buf.addr, buf.clone());
        self.version.fetch_add(1, Ordering::Release);
        Ok(buf)
    }

    /// Unregisters the buffer starting at `addr`, waiting (up to [`UNREGISTER_WAIT`]) until no
    /// transfer holds a region of it. After it returns no peer can touch that memory.
    pub fn unregister(&self, addr: u64) -> Result<()> {
        let buf = {
            let mut map = self.buffers.write().expect("registry lock");
            let buf = map.remove(&addr).ok_or(Error::NotRegistered(addr))?;
            self.version.fetch_add(1, Ordering::Release);
            buf
        };
        // Peers that mapped the buffer stop using it now (their copies check the slot).
        let shared = self.table_of(buf.share);
        if let Some((slot, table)) = shared {
            table.revoke(slot);
        }
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        while Arc::strong_count(&buf) > 1 {
            if start.elapsed() > UNREGISTER_WAIT {
                // Leaking the Arc keeps owned memory alive; caller-owned memory is the caller's
                // to keep until transfers time out, which the error says.
                std::mem::forget(buf);
                return Err(Error::with_code(
                    crate::ErrorCode::OBJECT_REPLICA_BUSY,
                    format!("buffer {addr:#x} still in use by transfers after {UNREGISTER_WAIT:?}"),
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        if let Some((slot, table)) = shared {
            table.release(slot);
        }
        Ok(())
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
                keys: Vec::new(),
                shared: b.share.is_some(),
            })
            .collect()
    }

    /// A counter bumped by every registration change.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
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
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn register_resolve_unregister() {
        let reg = MemoryRegistry::new();
        let a = reg
            .register_owned(AlignedBuffer::new(8192).unwrap(), Location::cpu(0))
            .unwrap();
        let r = reg.resolve(a + 100, 200).unwrap();
        r.write_from(&[7u8; 200]).unwrap();
        assert_eq!(reg.resolve(a + 100, 200).unwrap().to_vec(), vec![7u8; 200]);
        assert!(reg.resolve(a + 8000, 200).is_err());
        assert!(reg.resolve(a - 1, 2).is_err());
        assert!(reg.resolve(a, u64::MAX).is_err());
        assert!(reg.resolve(u64::MAX - 2, 10).is_err());
        assert!(reg.resolve(a + 8192, 0).is_ok());
        drop(r);
        reg.unregister(a).unwrap();
        assert!(reg.resolve(a, 1).is_err());
        assert!(matches!(reg.unregister(a), Err(Error::NotRegistered(_))));
    }

    #[test]
    fn large_buffers_are_mapped_zeroed_and_aligned() {
        for len in [
            AlignedBuffer::MAP_THRESHOLD - 1,
            AlignedBuffer::MAP_THRESHOLD,
            64 << 20,
        ] {
            let b = AlignedBuffer::new(len).unwrap();
            assert_eq!(b.addr() % AlignedBuffer::ALIGN as u64, 0);
            let reg = MemoryRegistry::new();
            let a = reg.register_owned(b, Location::cpu(0)).unwrap();
            let tail = reg.resolve(a + len as u64 - 4096, 4096).unwrap();
            assert!(tail.to_vec().iter().all(|&x| x == 0));
            tail.write_from(&[9u8; 4096]).unwrap();
            assert_eq!(tail.to_vec(), vec![9u8; 4096]);
            drop(tail);
            reg.unregister(a).unwrap();
        }
    }

    #[test]
    fn overlapping_and_empty_registrations_are_refused() {
        let reg = MemoryRegistry::new();
        let buf = AlignedBuffer::new(4096).unwrap();
        let a = buf.addr();
        // SAFETY: `buf` outlives the registration (unregistered below before drop).
        unsafe {
            reg.register(a, 4096, Location::cpu(0)).unwrap();
            assert!(matches!(
                reg.register(a + 10, 10, Location::cpu(0)),
                Err(Error::AddressOverlapped { .. })
            ));
            assert!(reg.register(a + 4096, 0, Location::cpu(0)).is_err());
        }
        reg.unregister(a).unwrap();
        drop(buf);
    }

    #[test]
    fn unregister_waits_for_regions() {
        let reg = Arc::new(MemoryRegistry::new());
        let a = reg
            .register_owned(AlignedBuffer::new(4096).unwrap(), Location::cpu(0))
            .unwrap();
        let region = reg.resolve(a, 16).unwrap();
        let t = std::thread::spawn(move || reg.unregister(a));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!t.is_finished(), "unregister must wait for the live region");
        region.write_from(&[1u8; 16]).unwrap();
        drop(region);
        t.join().unwrap().unwrap();
    }

    proptest! {
        #[test]
        fn resolve_agrees_with_naive_check(
            sizes in proptest::collection::vec(1u64..10_000, 1..6),
            probes in proptest::collection::vec((any::<u64>(), any::<u64>(), 0usize..6, 0u64..12_000, 0u64..12_000), 1..64),
        ) {
            let reg = MemoryRegistry::new();
            let mut bufs = Vec::new();
            for s in &sizes {
                let a = reg.register_owned(AlignedBuffer::new(*s as usize).unwrap(), Location::cpu(0)).unwrap();
                bufs.push((a, *s));
            }
            for (raw_addr, raw_len, which, off, len) in probes {
                // Mix wild probes with probes near real buffers.
                for (addr, len) in [(raw_addr, raw_len), (bufs[which % bufs.len()].0.wrapping_add(off), len)] {
                    let naive = bufs.iter().any(|&(b, s)| {
                        (addr as u128) >= b as u128 && (addr as u128 + len as u128) <= (b as u128 + s as u128)
                    });
                    prop_assert_eq!(reg.resolve(addr, len).is_ok(), naive, "addr {:#x} len {}", addr, len);
                }
            }
        }
    }
}
