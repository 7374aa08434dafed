//! Memory shared between processes of one host: memfd-backed buffers, their mappings, passing
//! their descriptors over Unix sockets, and the revocation table that lets a peer which mapped a
//! buffer know when its owner has unregistered it.
//!
//! A buffer allocated with [`AlignedBuffer::new_shared`](crate::AlignedBuffer::new_shared) is a
//! sealed memfd (it can grow but never shrink, so a peer's mapping cannot fault). A process that
//! registers such buffers gets a [`SlotTable`]: a small memfd of 64-bit words, one per shared
//! buffer, holding that buffer's generation. Unregistering bumps the generation; a peer holding a
//! [`SharedRange`] checks the word before and after every copy, so a copy that overlaps the
//! revocation fails instead of reporting success. Word 0 is the owner's open flag: once
//! [`SlotTable::close`] has run, every range of that owner fails.
//!
//! Memory safety does not depend on those checks: a peer's mapping keeps the memfd's pages alive
//! after the owner unmapped them, and the owner never reuses a memfd for another buffer.

use std::io::{IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, ErrorCode, Result};
use crate::memory::{range_within, MemRegion};

/// The largest shared buffer (1 TiB).
pub const MAX_SHARED: u64 = 1 << 40;

/// Buffers one process can share at once (one word each in its [`SlotTable`]).
pub const SLOTS: u32 = 65_535;

fn os_error(what: &str) -> Error {
    Error::Io(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// A `MAP_SHARED` mapping of a whole memfd; unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: u64,
    len: u64,
}

impl Mapping {
    /// Maps `len` bytes of `fd` read-write and shared.
    pub fn map(fd: &OwnedFd, len: u64) -> Result<Mapping> {
        Self::map_with(fd, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// Maps `len` bytes of `fd` read-only and shared.
    pub fn map_read_only(fd: &OwnedFd, len: u64) -> Result<Mapping> {
        Self::map_with(fd, len, libc::PROT_READ)
    }

    fn map_with(fd: &OwnedFd, len: u64, prot: libc::c_int) -> Result<Mapping> {
        let size = usize::try_from(len)
            .ok()
            .filter(|&s| s > 0)
            .ok_or_else(|| Error::InvalidArgument(format!("{len} bytes cannot be mapped")))?;
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_error("mmap of shared memory"));
        }
        Ok(Mapping {
            addr: p as u64,
            len,
        })
    }

    /// Start address in this process.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: mappings are non-empty.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range is exactly the mapping created in `map_with`, unmapped once.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len as usize);
        }
    }
}

/// Creates a memfd of `len` bytes that cannot shrink (so a peer mapping it never faults).
pub fn create_memfd(name: &str, len: u64) -> Result<OwnedFd> {
    if len == 0 || len > MAX_SHARED {
        return Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            format!("shared memory of {len} bytes (expected 1 byte to 1 TiB)"),
        ));
    }
    let cname = std::ffi::CString::new(name).map_err(|_| Error::InvalidArgument(name.into()))?;
    // SAFETY: plain system call with a valid C string.
    let raw =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(os_error("memfd_create"));
    }
    // SAFETY: `raw` is a new descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain system calls on our own descriptor.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) != 0 {
            return Err(os_error("sizing shared memory"));
        }
        if libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        ) != 0
        {
            return Err(os_error("sealing shared memory"));
        }
    }
    Ok(fd)
}

/// Checks that a received descriptor is a memfd of at least `len` bytes that cannot shrink, so
/// mapping `len` bytes of it can never fault.
pub fn check_memfd(fd: &OwnedFd, len: u64) -> Result<()> {
    if len == 0 || len > MAX_SHARED {
        return Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            format!("shared memory of {len} bytes (expected 1 byte to 1 TiB)"),
        ));
    }
    // SAFETY: fstat/fcntl on a descriptor we own, with a zeroed out-parameter.
    let (size, seals) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(os_error("fstat of shared memory"));
        }
        (
            st.st_size as u64,
            libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS),
        )
    };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            "shared memory must be a memfd sealed with F_SEAL_SHRINK",
        ));
    }
    if size < len {
        return Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            format!("shared memory holds {size} bytes, not {len}"),
        ));
    }
    Ok(())
}

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 4;

/// Sends all of `payload` with `fds` attached to its first byte.
pub fn send_with_fds(sock: &UnixStream, payload: &[u8], fds: &[RawFd]) -> Result<()> {
    if fds.len() > MAX_FDS {
        return Err(Error::InvalidArgument(format!(
            "{} descriptors in one message (at most {MAX_FDS})",
            fds.len()
        )));
    }
    let iov = [IoSlice::new(payload)];
    let fd_bytes = size_of_val(fds) as u32;
    let space = if fds.is_empty() {
        0
    } else {
        // SAFETY: CMSG_SPACE is a pure computation.
        unsafe { libc::CMSG_SPACE(fd_bytes) as usize }
    };
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call, and the
    // control buffer is CMSG_SPACE bytes for `fds`.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), *fd);
            }
        }
        libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(os_error("sendmsg"));
    }
    let n = n as usize;
    if n < payload.len() {
        // The descriptors went with the first byte; the rest is plain data.
        std::io::Write::write_all(&mut &*sock, &payload[n..])?;
    }
    Ok(())
}

/// Receives exactly `buf.len()` bytes and the descriptors sent with them (at most
/// [`MAX_FDS`]). End of stream first is an [`Error::Io`].
pub fn recv_exact_with_fds(sock: &UnixStream, buf: &mut [u8]) -> Result<Vec<OwnedFd>> {
    let (n, fds) = recv_with_fds(sock, buf)?;
    if n == 0 && !buf.is_empty() {
        return Err(Error::Io("peer closed the socket".into()));
    }
    (&*sock).read_exact(&mut buf[n..])?;
    Ok(fds)
}

/// Receives up to `buf.len()` bytes and the descriptors sent with them (at most
/// [`MAX_FDS`]); returns the byte count (0 at end of stream) and the descriptors.
pub fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(size_of::<[RawFd; MAX_FDS]>() as u32) };
    let mut control = vec![0u8; space as usize];
    let mut fds = Vec::new();
    // SAFETY: as in `send_with_fds`; descriptors read from SCM_RIGHTS are new and owned by us,
    // so each is wrapped in an OwnedFd at once (closed if we return early).
    let (n, truncated) = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_mut_ptr().cast();
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(os_error("recvmsg"));
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..bytes / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        (n as usize, msg.msg_flags & libc::MSG_CTRUNC != 0)
    };
    if truncated {
        return Err(Error::Protocol("descriptor control data truncated".into()));
    }
    Ok((n, fds))
}

/// The revocation table of one process's shared buffers (see the module docs).
#[derive(Debug)]
pub struct SlotTable {
    fd: OwnedFd,
    map: Mapping,
    free: Mutex<FreeSlots>,
}

#[derive(Debug, Default)]
struct FreeSlots {
    released: Vec<u32>,
    next: u32,
}

/// Bytes of a table: the open flag and one word per slot.
const TABLE_BYTES: u64 = (SLOTS as u64 + 1) * 8;

fn word(map: &Mapping, index: u32) -> &AtomicU64 {
    debug_assert!(u64::from(index) * 8 < map.len());
    // SAFETY: the mapping is page-aligned and TABLE_BYTES long (checked by whoever mapped it),
    // `index` is at most SLOTS (callers check), AtomicU64 has u64's layout, and the words are
    // only ever accessed atomically, here and in the peer processes.
    unsafe { &*((map.addr() + u64::from(index) * 8) as *const AtomicU64) }
}

impl SlotTable {
    /// A new table with every slot free and the owner open.
    pub fn new() -> Result<SlotTable> {
        let fd = create_memfd("mooncake-shm-slots", TABLE_BYTES)?;
        let map = Mapping::map(&fd, TABLE_BYTES)?;
        Ok(SlotTable {
            fd,
            map,
            free: Mutex::new(FreeSlots {
                released: Vec::new(),
                next: 1,
            }),
        })
    }

    /// The table's memfd, for peers to map read-only.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Takes a free slot; returns it with its current generation, or `None` when all are used.
    pub fn take(&self) -> Option<(u32, u64)> {
        let mut free = self.free.lock().expect("slot lock");
        let slot = match free.released.pop() {
            Some(s) => s,
            None if free.next <= SLOTS => {
                free.next += 1;
                free.next - 1
            }
            None => return None,
        };
        Some((slot, word(&self.map, slot).load(Ordering::Acquire)))
    }

    /// Revokes `slot`: every peer range holding its old generation fails from now on.
    pub fn revoke(&self, slot: u32) {
        if (1..=SLOTS).contains(&slot) {
            word(&self.map, slot).fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Returns a revoked slot for reuse (with its new generation).
    pub fn release(&self, slot: u32) {
        if (1..=SLOTS).contains(&slot) {
            self.free.lock().expect("slot lock").released.push(slot);
        }
    }

    /// Marks the owner closed: every peer range of this table fails from now on.
    pub fn close(&self) {
        word(&self.map, 0).store(1, Ordering::Release);
    }

    /// Marks the owner open again (a transport serving the segment anew).
    pub fn open(&self) {
        word(&self.map, 0).store(0, Ordering::Release);
    }
}

/// A peer's view of another process's [`SlotTable`], mapped read-only.
#[derive(Debug)]
pub struct SlotView {
    map: Mapping,
}

impl SlotView {
    /// Maps a table received from its owner, after checking it is a sealed memfd of the right
    /// size.
    pub fn map(fd: &OwnedFd) -> Result<SlotView> {
        check_memfd(fd, TABLE_BYTES)?;
        Ok(SlotView {
            map: Mapping::map_read_only(fd, TABLE_BYTES)?,
        })
    }

    /// True while the owner is open and `slot` still holds `generation`.
    pub fn live(&self, slot: u32, generation: u64) -> bool {
        (1..=SLOTS).contains(&slot)
            && word(&self.map, 0).load(Ordering::Acquire) == 0
            && word(&self.map, slot).load(Ordering::Acquire) == generation
    }

    /// True once the owner has closed.
    pub fn closed(&self) -> bool {
        word(&self.map, 0).load(Ordering::Acquire) != 0
    }
}

/// What a process tells a peer about one of its shared buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedInfo {
    /// Start address in the owner's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Slot in the owner's table.
    pub slot: u32,
    /// Generation the slot held when the buffer was registered.
    pub generation: u64,
}

/// A peer's mapping of another process's shared buffer: copies to and from it are plain memcpy,
/// each checked against the owner's revocation table before and after.
#[derive(Debug)]
pub struct SharedRange {
    info: SharedInfo,
    map: Mapping,
    table: Arc<SlotView>,
}

impl SharedRange {
    /// Maps a buffer received from its owner with its descriptor.
    pub fn map(info: SharedInfo, fd: &OwnedFd, table: Arc<SlotView>) -> Result<SharedRange> {
        check_memfd(fd, info.len)?;
        Ok(SharedRange {
            map: Mapping::map(fd, info.len)?,
            info,
            table,
        })
    }

    /// What the owner said about the buffer.
    pub fn info(&self) -> &SharedInfo {
        &self.info
    }

    /// True while the owner has neither unregistered the buffer nor closed.
    pub fn live(&self) -> bool {
        self.table.live(self.info.slot, self.info.generation)
    }

    /// True when `[addr, addr + len)` (owner's addresses) lies inside the buffer.
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        range_within(self.info.addr, self.info.len, addr, len)
    }

    /// Copies `[addr, addr + local.len())` of the owner's buffer into `local`.
    pub fn read(&self, addr: u64, local: &MemRegion) -> Result<()> {
        let src = self.local_ptr(addr, local.len())?;
        // SAFETY: `src` is inside our live mapping (checked by local_ptr) and `local` is a
        // validated registered range kept alive by the region; they are distinct mappings, and
        // `ptr::copy` tolerates overlap anyway.
        unsafe { std::ptr::copy(src, local.as_ptr(), local.len() as usize) };
        fence(Ordering::Acquire);
        self.still_live()
    }

    /// Copies `local` into `[addr, addr + local.len())` of the owner's buffer.
    pub fn write(&self, addr: u64, local: &MemRegion) -> Result<()> {
        let dst = self.local_ptr(addr, local.len())?;
        // SAFETY: as in `read`, with the roles swapped.
        unsafe { std::ptr::copy(local.as_ptr(), dst, local.len() as usize) };
        fence(Ordering::Release);
        self.still_live()
    }

    fn local_ptr(&self, addr: u64, len: u64) -> Result<*mut u8> {
        if !self.covers(addr, len) {
            return Err(Error::RemoteRangeInvalid { addr, len });
        }
        self.still_live()?;
        Ok((self.map.addr() + (addr - self.info.addr)) as *mut u8)
    }

    fn still_live(&self) -> Result<()> {
        if self.live() {
            Ok(())
        } else {
            Err(Error::StaleMapping(format!(
                "shared buffer {:#x}+{} was unregistered or its owner closed",
                self.info.addr, self.info.len
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_round_trip_over_a_socket() {
        let fd = create_memfd("mooncake-test", 8192).unwrap();
        check_memfd(&fd, 8192).unwrap();
        assert!(check_memfd(&fd, 8193).is_err());
        let a = Mapping::map(&fd, 8192).unwrap();
        let (s1, s2) = UnixStream::pair().unwrap();
        let other = create_memfd("mooncake-test-2", 4096).unwrap();
        send_with_fds(&s1, b"hello", &[fd.as_raw_fd(), other.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 5];
        let got = recv_exact_with_fds(&s2, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(got.len(), 2);
        let b = Mapping::map(&got[0], 8192).unwrap();
        // SAFETY: both mappings are 8192 bytes of the same live memfd.
        unsafe {
            *((a.addr() + 100) as *mut u8) = 42;
            assert_eq!(*((b.addr() + 100) as *const u8), 42);
        }
        check_memfd(&got[1], 4096).unwrap();
        assert_eq!(b.len(), 8192);
        drop(s1);
        assert!(recv_exact_with_fds(&s2, &mut buf).is_err(), "end of stream");
        assert_eq!(recv_with_fds(&s2, &mut buf).unwrap().0, 0);
    }

    #[test]
    fn unsealed_or_short_memory_is_refused() {
        // SAFETY: plain system call with a valid C string.
        let raw = unsafe { libc::memfd_create(c"plain".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a new descriptor owned by nobody else.
        let plain = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sizing our own descriptor.
        assert_eq!(unsafe { libc::ftruncate(plain.as_raw_fd(), 4096) }, 0);
        assert!(check_memfd(&plain, 4096).is_err(), "not sealed");
        assert!(SlotView::map(&plain).is_err());
    }

    #[test]
    fn slots_revoke_and_close() {
        let table = SlotTable::new().unwrap();
        let view = Arc::new(SlotView::map(table.fd()).unwrap());
        let (slot, generation) = table.take().unwrap();
        assert!(view.live(slot, generation));
        assert!(!view.live(slot, generation + 1));
        assert!(!view.live(0, 0) && !view.live(SLOTS + 1, 0));
        table.revoke(slot);
        assert!(!view.live(slot, generation));
        table.release(slot);
        let (again, g2) = table.take().unwrap();
        assert_eq!(again, slot);
        assert_ne!(g2, generation, "a reused slot has a new generation");
        assert!(view.live(again, g2));
        table.close();
        assert!(view.closed() && !view.live(again, g2));
        table.open();
        assert!(view.live(again, g2));
    }

    #[test]
    fn table_runs_out_of_slots_cleanly() {
        let table = SlotTable::new().unwrap();
        for _ in 0..SLOTS {
            assert!(table.take().is_some());
        }
        assert!(table.take().is_none());
        table.revoke(7);
        table.release(7);
        assert_eq!(table.take().map(|s| s.0), Some(7));
    }
}
