//! Socket I/O straight between a tokio `TcpStream` and raw memory.
//!
//! Performance-critical: payloads move between sockets and registered memory here, with no
//! intermediate buffer. Registered memory may be written by peers at any time, so it is never
//! turned into a Rust slice: these helpers hand its address to `send`/`recv` directly.

use std::io;
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Moves exactly `len` bytes at `addr` with `op` (a `send` or `recv` of at most the given
/// length), waiting for `interest` readiness whenever the socket would block. `op` returning 0
/// is `at_zero` (the peer closed).
async fn raw_io(
    stream: &TcpStream,
    interest: Interest,
    mut addr: usize,
    mut len: usize,
    at_zero: io::ErrorKind,
    op: impl Fn(libc::c_int, usize, usize) -> libc::ssize_t,
) -> io::Result<()> {
    let fd = stream.as_raw_fd();
    while len > 0 {
        let r = stream.try_io(interest, || match op(fd, addr, len) {
            n if n < 0 => Err(io::Error::last_os_error()),
            n => Ok(n as usize),
        });
        match r {
            Ok(0) => return Err(at_zero.into()),
            Ok(n) => {
                addr += n;
                len -= n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                stream.ready(interest).await?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends exactly `len` bytes starting at address `addr`.
///
/// # Safety
/// `[addr, addr + len)` must be readable for the whole call (a live `MemRegion`, or a buffer the
/// caller owns and does not move).
pub(crate) async unsafe fn send_raw(stream: &TcpStream, addr: usize, len: usize) -> io::Result<()> {
    raw_io(
        stream,
        Interest::WRITABLE,
        addr,
        len,
        io::ErrorKind::WriteZero,
        |fd, a, n| {
            // SAFETY: the caller guarantees the range is readable; MSG_NOSIGNAL turns a closed peer
            // into EPIPE instead of SIGPIPE.
            unsafe { libc::send(fd, a as *const libc::c_void, n, libc::MSG_NOSIGNAL) }
        },
    )
    .await
}

/// Receives exactly `len` bytes into address `addr`. A closed connection before `len` bytes
/// arrived is `UnexpectedEof`.
///
/// # Safety
/// `[addr, addr + len)` must be writable for the whole call.
pub(crate) async unsafe fn recv_raw(stream: &TcpStream, addr: usize, len: usize) -> io::Result<()> {
    raw_io(
        stream,
        Interest::READABLE,
        addr,
        len,
        io::ErrorKind::UnexpectedEof,
        |fd, a, n| {
            // SAFETY: the caller guarantees the range is writable.
            unsafe { libc::recv(fd, a as *mut libc::c_void, n, 0) }
        },
    )
    .await
}

/// Sends all of `buf` (a buffer the caller owns).
pub(crate) async fn send_all(stream: &TcpStream, buf: &[u8]) -> io::Result<()> {
    // SAFETY: `buf` is a live slice borrowed for the whole call.
    unsafe { send_raw(stream, buf.as_ptr() as usize, buf.len()).await }
}

/// A read buffer over a stream: refills in large chunks so that many small frames cost one
/// syscall, and hands out what it holds before the caller reads the rest of a payload directly.
pub(crate) struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    pub(crate) fn new(capacity: usize) -> Self {
        ReadBuf {
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    /// Bytes buffered and not consumed.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads at least once more from the stream without blocking if data is there, else waits.
    /// Returns `UnexpectedEof` at end of stream.
    pub(crate) async fn fill(&mut self, stream: &TcpStream) -> io::Result<()> {
        if self.start > 0 && self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            match stream.try_read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.readable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Ensures at least `n` bytes are buffered (`n` at most the capacity).
    pub(crate) async fn fill_to(&mut self, stream: &TcpStream, n: usize) -> io::Result<()> {
        while self.end - self.start < n {
            self.fill(stream).await?;
        }
        Ok(())
    }

    /// Moves `len` payload bytes into memory at `addr`: first what is buffered, then straight
    /// from the socket.
    ///
    /// # Safety
    /// `[addr, addr + len)` must be writable for the whole call.
    pub(crate) async unsafe fn read_payload_into(
        &mut self,
        stream: &TcpStream,
        addr: usize,
        len: usize,
    ) -> io::Result<()> {
        let have = (self.end - self.start).min(len);
        // SAFETY: the caller guarantees the destination; the source is our own buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.buf[self.start..].as_ptr(), addr as *mut u8, have)
        };
        self.consume(have);
        if have < len {
            // SAFETY: forwarded contract, on the rest of the range.
            unsafe { recv_raw(stream, addr + have, len - have).await? };
        }
        Ok(())
    }

    /// Discards `len` payload bytes (of a refused WRITE).
    pub(crate) async fn discard(&mut self, stream: &TcpStream, mut len: u64) -> io::Result<()> {
        loop {
            let have = ((self.end - self.start) as u64).min(len);
            self.consume(have as usize);
            len -= have;
            if len == 0 {
                return Ok(());
            }
            self.fill(stream).await?;
        }
    }
}
