//! Shared memory between a dummy client and the real client: a sealed memfd mapped by both, its
//! descriptor passed with `SCM_RIGHTS`, and a small range allocator for the dummy's side.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use mooncake_core::{Error, ErrorCode, Result};

/// The largest pool a session may register (1 TiB).
pub(crate) const MAX_POOL: u64 = 1 << 40;

fn os_error(what: &str) -> Error {
    Error::Io(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// A `MAP_SHARED` mapping of a whole memfd; unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    addr: u64,
    len: u64,
}

impl Mapping {
    /// Maps `len` bytes of `fd` read-write and shared.
    pub(crate) fn map(fd: &OwnedFd, len: u64) -> Result<Mapping> {
        let size = usize::try_from(len)
            .map_err(|_| Error::InvalidArgument(format!("{len} bytes cannot be mapped")))?;
        // SAFETY: a fresh mapping chosen by the kernel; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os_error("mmap of the shared pool"));
        }
        Ok(Mapping {
            addr: p as u64,
            len,
        })
    }

    /// Start address in this process.
    pub(crate) fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range is exactly the mapping created in `map`, unmapped once.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len as usize);
        }
    }
}

/// Creates a memfd of `len` bytes that cannot shrink (so a peer mapping it never faults).
pub(crate) fn create_memfd(name: &str, len: u64) -> Result<OwnedFd> {
    if len == 0 || len > MAX_POOL {
        return Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            format!("shared pool of {len} bytes (expected 1 byte to 1 TiB)"),
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
            return Err(os_error("sizing the shared pool"));
        }
        if libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        ) != 0
        {
            return Err(os_error("sealing the shared pool"));
        }
    }
    Ok(fd)
}

/// Checks that a received descriptor is a memfd of at least `len` bytes that cannot shrink.
pub(crate) fn check_memfd(fd: &OwnedFd, len: u64) -> Result<()> {
    if len == 0 || len > MAX_POOL {
        return Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            format!("pool of {len} bytes (expected 1 byte to 1 TiB)"),
        ));
    }
    // SAFETY: fstat/fcntl on a descriptor we own, with a zeroed out-parameter.
    let (size, seals) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(os_error("fstat of the pool"));
        }
        (
            st.st_size as u64,
            libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS),
        )
    };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            "the pool must be a memfd sealed with F_SEAL_SHRINK",
        ));
    }
    if size < len {
        return Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            format!("the pool holds {size} bytes, not {len}"),
        ));
    }
    Ok(())
}

/// Sends `payload` with one descriptor attached.
pub(crate) fn send_with_fd(sock: &UnixStream, payload: &[u8], fd: RawFd) -> Result<()> {
    let iov = [IoSlice::new(payload)];
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call, and the
    // control buffer is CMSG_SPACE bytes for one descriptor.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        let n = libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(os_error("sending the pool descriptor"));
        }
        if n as usize != payload.len() {
            return Err(Error::Io("short write of the pool registration".into()));
        }
    }
    Ok(())
}

/// Receives up to `buf.len()` bytes and the one descriptor sent with them (extra descriptors are
/// closed). Returns the byte count and the descriptor, if any.
pub(crate) fn recv_with_fd(sock: &UnixStream, buf: &mut [u8]) -> Result<(usize, Option<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    // Room for a few descriptors so that a peer sending several does not truncate silently.
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((4 * size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut first: Option<OwnedFd> = None;
    // SAFETY: as in `send_with_fd`; descriptors read from SCM_RIGHTS are new and owned by us.
    let n = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = iov.as_mut_ptr().cast();
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(os_error("receiving the pool registration"));
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..bytes / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    let owned = OwnedFd::from_raw_fd(fd);
                    if first.is_none() {
                        first = Some(owned);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(Error::Protocol(
                "pool registration: control data truncated".into(),
            ));
        }
        n as usize
    };
    Ok((n, first))
}

/// A first-fit allocator of offsets in `[0, len)`, with coalescing frees.
#[derive(Debug)]
pub(crate) struct RangeAlloc {
    free: Mutex<BTreeMap<u64, u64>>,
}

impl RangeAlloc {
    /// All of `[0, len)` free.
    pub(crate) fn new(len: u64) -> Self {
        let mut free = BTreeMap::new();
        if len > 0 {
            free.insert(0, len);
        }
        RangeAlloc {
            free: Mutex::new(free),
        }
    }

    /// An offset of `size` bytes aligned to `align` (a power of two), or `None` when no free
    /// range is large enough. The allocation is `size` rounded up to `align`.
    pub(crate) fn alloc(&self, size: u64, align: u64) -> Option<u64> {
        let size = size.max(1).checked_add(align - 1)? & !(align - 1);
        let mut free = self.free.lock().expect("allocator lock");
        let (start, len, at) = free.iter().find_map(|(&start, &len)| {
            let at = start.checked_add(align - 1)? & !(align - 1);
            (at.checked_add(size)? <= start + len).then_some((start, len, at))
        })?;
        free.remove(&start);
        if at > start {
            free.insert(start, at - start);
        }
        let end = at + size;
        if end < start + len {
            free.insert(end, start + len - end);
        }
        Some(at)
    }

    /// Frees what `alloc(size, align)` returned at `offset`.
    pub(crate) fn free(&self, offset: u64, size: u64, align: u64) {
        let mut size = size.max(1).saturating_add(align - 1) & !(align - 1);
        let mut offset = offset;
        let mut free = self.free.lock().expect("allocator lock");
        if let Some((&s, &l)) = free.range(..offset).next_back() {
            if s + l == offset {
                free.remove(&s);
                offset = s;
                size += l;
            }
        }
        if let Some(&l) = free.get(&(offset + size)) {
            free.remove(&(offset + size));
            size += l;
        }
        free.insert(offset, size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_fits_aligns_and_coalesces() {
        let a = RangeAlloc::new(4096);
        let x = a.alloc(100, 64).unwrap();
        let y = a.alloc(1000, 64).unwrap();
        assert_eq!(x, 0);
        assert_eq!(y, 128);
        assert!(a.alloc(4096, 64).is_none());
        a.free(x, 100, 64);
        a.free(y, 1000, 64);
        assert_eq!(a.alloc(4096, 64), Some(0));
        assert!(a.alloc(1, 64).is_none());
        let b = RangeAlloc::new(3 * 4096);
        assert_eq!(b.alloc(10, 4096), Some(0));
        assert_eq!(b.alloc(10, 4096), Some(4096));
    }

    #[test]
    fn memfd_round_trip_over_a_socket() {
        let fd = create_memfd("mooncake-test", 8192).unwrap();
        check_memfd(&fd, 8192).unwrap();
        assert!(check_memfd(&fd, 8193).is_err());
        let a = Mapping::map(&fd, 8192).unwrap();
        let (s1, s2) = UnixStream::pair().unwrap();
        send_with_fd(&s1, b"hello", fd.as_raw_fd()).unwrap();
        let mut buf = [0u8; 16];
        let (n, got) = recv_with_fd(&s2, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        let b = Mapping::map(&got.unwrap(), 8192).unwrap();
        // SAFETY: both mappings are 8192 bytes of the same live memfd.
        unsafe {
            *((a.addr() + 100) as *mut u8) = 42;
            assert_eq!(*((b.addr() + 100) as *const u8), 42);
        }
        assert_eq!(b.len(), 8192);
    }
}
