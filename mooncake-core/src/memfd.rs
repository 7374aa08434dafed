//! Memfds, the memory processes of one host share: creating them sealed against shrinking,
//! checking ones received from another process, mapping them, and passing their descriptors over
//! Unix sockets (`SCM_RIGHTS`).
//!
//! A generic utility: the same-host shared-memory transport (`mooncake-transport-shm`) builds
//! its buffers and revocation table on it, and so does the dummy-client mode, which shares a
//! memory pool with its real client whatever transports are installed. A memfd sealed with
//! `F_SEAL_SHRINK` can grow but never shrink, so a peer's mapping of it can never fault, and its
//! pages live as long as any mapping of them does.

use std::io::{IoSlice, IoSliceMut, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::error::{Error, ErrorCode, Result};

/// The largest shared buffer (1 TiB).
pub const MAX_SHARED: u64 = 1 << 40;

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
    // Only ordinary shared memory (tmpfs/shmem): a hugetlb memfd can fault with SIGBUS when the
    // huge-page pool runs dry, and device memory is not ours to map.
    // SAFETY: fstatfs on a descriptor we own, with a zeroed out-parameter.
    let fs_type = unsafe {
        let mut sfs: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(fd.as_raw_fd(), &mut sfs) != 0 {
            return Err(os_error("fstatfs of shared memory"));
        }
        sfs.f_type
    };
    if fs_type != libc::TMPFS_MAGIC {
        return Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            format!("shared memory must be an ordinary memfd (file system type {fs_type:#x})"),
        ));
    }
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

/// Refuses a Unix-socket peer running as another user than this process: same-host sockets
/// hand out mappings of this process's memory, which only the same user may have. Returns the
/// peer's process id (as this process's pid namespace sees it; 0 when it cannot see it).
pub fn check_same_user(sock: &impl AsRawFd) -> Result<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(SO_PEERCRED) on a socket the caller owns, into a `ucred` of the size
    // given.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(os_error("reading the peer's credentials"));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if cred.uid != me {
        return Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            format!(
                "a process of uid {} (pid {}) is not this process's user (uid {me})",
                cred.uid, cred.pid
            ),
        ));
    }
    Ok(cred.pid)
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
        // Interrupted by a signal before anything was sent: send again.
        loop {
            let n = libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
            if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break n;
            }
        }
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
    try_recv_with_fds(sock.as_raw_fd(), buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => Error::Protocol(e.to_string()),
        _ => Error::Io(format!("recvmsg: {e}")),
    })
}

/// [`recv_with_fds`] on any Unix stream socket, with the OS error as it is: on a non-blocking
/// socket, `WouldBlock` when nothing is ready (what an async reactor's `try_io` expects).
/// Truncated descriptor data is `InvalidData`.
pub fn try_recv_with_fds(sock: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
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
        // A signal delivered while waiting is no reason to give up (nothing was received).
        let n = loop {
            let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break n;
            }
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
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
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "descriptor control data truncated",
        ));
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ordinary_memfds_pass_the_check() {
        // A hugetlb memfd, sealed like a good one: refused (it could SIGBUS its mapper).
        // SAFETY: memfd_create with a valid C string; the result is owned at once.
        let raw = unsafe {
            libc::memfd_create(
                c"mooncake-huge".as_ptr(),
                libc::MFD_HUGETLB | libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC,
            )
        };
        if raw < 0 {
            println!(
                "skipped: no hugetlb memfds here ({})",
                std::io::Error::last_os_error()
            );
            return;
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let huge = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = 2 << 20;
        // SAFETY: ftruncate/fcntl on the descriptor we own.
        let ready = unsafe {
            libc::ftruncate(huge.as_raw_fd(), len) == 0
                && libc::fcntl(huge.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) == 0
        };
        if !ready {
            println!("skipped: cannot size or seal a hugetlb memfd here");
            return;
        }
        let e = check_memfd(&huge, len as u64).unwrap_err();
        assert!(e.to_string().contains("ordinary memfd"), "{e}");
    }

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
    }

    /// A signal that interrupts a wait for a message (a handler installed without
    /// `SA_RESTART`, as Python's are) does not fail the receive.
    #[test]
    fn a_signal_while_waiting_does_not_fail_a_receive() {
        use std::os::unix::thread::JoinHandleExt;
        extern "C" fn nothing(_: libc::c_int) {}
        // SAFETY: a handler that does nothing, installed without SA_RESTART for SIGUSR2.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
            assert_eq!(libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut()), 0);
        }
        let (a, b) = UnixStream::pair().unwrap();
        let waiter = std::thread::spawn(move || {
            let mut buf = [0u8; 4];
            recv_with_fds(&b, &mut buf).map(|(n, _)| buf[..n].to_vec())
        });
        // Signal the waiting thread a few times (whether it is in recvmsg yet or not), then
        // send; it must receive the message, not an error.
        for _ in 0..5 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            // SAFETY: the thread is alive until it has received the message sent below.
            unsafe { libc::pthread_kill(waiter.as_pthread_t(), libc::SIGUSR2) };
        }
        send_with_fds(&a, b"ping", &[]).unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), b"ping");
    }
}
