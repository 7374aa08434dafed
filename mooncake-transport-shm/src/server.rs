//! The target side: an abstract Unix socket and one thread serving every connected initiator
//! with `poll(2)`, answering MAP and LANDED requests.
//!
//! Bounded whatever peers do: at most [`Limits::max_connections`] connections, at most
//! [`Limits::max_per_process`] from one process; a request must arrive whole within
//! [`Limits::request_timeout`] of its first byte; a connection that sends nothing for
//! [`Limits::idle_timeout`] is closed (its initiator reconnects when it next needs to); a
//! connection's memory is what it has sent of its current request (at most one LANDED
//! request, 64 KiB), never a length it announced; a peer that does not read its replies (a
//! reply that does not fit in the socket's buffer at once) is closed.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mooncake_core::admission::RefusalLog;
use mooncake_core::memfd::send_with_fds;
use mooncake_core::{Error, LocalSegment, Result};

use crate::memory::{Share, ShmMemory};
use crate::proto::{self, Reply, Request};
use crate::table::SlotTable;

/// The connection limits of a target (from [`ShmConfig`](crate::ShmConfig)).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) max_per_process: usize,
    pub(crate) request_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

/// A running target; [`Server::stop`] ends it.
#[derive(Debug)]
pub(crate) struct Server {
    name: String,
    shared: Arc<Shared>,
    /// Written to wake the serving thread when stopping.
    wake: Arc<OwnedFd>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    segment: Arc<LocalSegment>,
    /// The transport's revocation table: peers get it on connecting.
    table: Arc<SlotTable>,
    stopped: AtomicBool,
    limits: Limits,
    refusals: RefusalLog,
}

impl Server {
    /// Listens on a fresh abstract socket and serves `segment` from it.
    pub(crate) fn start(
        segment: Arc<LocalSegment>,
        table: Arc<SlotTable>,
        limits: Limits,
    ) -> Result<Server> {
        table.open();
        let name = format!("mooncake-shm.{}.{:016x}", std::process::id(), random());
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = UnixListener::bind_addr(&addr)?;
        listener.set_nonblocking(true)?;
        // SAFETY: plain system call; the descriptor is new and owned by the OwnedFd.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `wake` is a new descriptor owned by nobody else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(wake) });
        let shared = Arc::new(Shared {
            segment,
            table,
            stopped: AtomicBool::new(false),
            limits,
            refusals: RefusalLog::new(),
        });
        let (s, w) = (shared.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name("mooncake-shm-serve".into())
            .spawn(move || serve(&listener, &w, &s))?;
        Ok(Server {
            name,
            shared,
            wake,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The abstract socket's name.
    pub(crate) fn socket_name(&self) -> &str {
        &self.name
    }

    /// Closes the segment to peers (their mappings fail from now on), hangs up every
    /// connection and stops listening; returns once that is done.
    pub(crate) fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.table.close();
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our own eventfd.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        let thread = self.thread.lock().expect("serve thread").take();
        if let Some(t) = thread {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Largest request: a LANDED header with its most ranges.
const MAX_REQUEST: usize = proto::REQUEST_LEN + proto::MAX_LANDED as usize * 16;

/// One connected initiator.
struct Conn {
    stream: UnixStream,
    pid: i32,
    /// The current request's bytes so far.
    buf: Vec<u8>,
    /// When the last byte arrived (or the connection was accepted).
    last_heard: Instant,
    /// When the current request's first byte arrived.
    started: Option<Instant>,
}

impl Conn {
    /// Bytes the current request still needs: its header, then its body.
    fn wanted(&self) -> usize {
        if self.buf.len() < proto::REQUEST_LEN {
            return proto::REQUEST_LEN;
        }
        let header: &[u8; proto::REQUEST_LEN] =
            self.buf[..proto::REQUEST_LEN].try_into().expect("a header");
        let req = Request::decode(header);
        match req.op {
            proto::OP_LANDED if req.count <= proto::MAX_LANDED => {
                proto::REQUEST_LEN + req.count as usize * 16
            }
            _ => proto::REQUEST_LEN,
        }
    }

    /// When this connection is to be closed unless it sends something.
    fn deadline(&self, limits: &Limits) -> Instant {
        match self.started {
            Some(t) => t + limits.request_timeout,
            None => self.last_heard + limits.idle_timeout,
        }
    }
}

/// Why a connection ends.
enum Ended {
    Closed,
    Failed(Error),
}

fn serve(listener: &UnixListener, wake: &OwnedFd, shared: &Shared) {
    let limits = shared.limits;
    let mut conns: Vec<Conn> = Vec::new();
    let mut fds: Vec<libc::pollfd> = Vec::new();
    loop {
        let now = Instant::now();
        let timeout = conns
            .iter()
            .map(|c| c.deadline(&limits).saturating_duration_since(now))
            .min()
            .map_or(-1, |d| d.as_millis().min(60_000) as i32 + 1);
        fds.clear();
        let poll_in = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        fds.push(poll_in(wake.as_raw_fd()));
        fds.push(poll_in(listener.as_raw_fd()));
        fds.extend(conns.iter().map(|c| poll_in(c.stream.as_raw_fd())));
        // SAFETY: poll(2) over `fds.len()` valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if shared.stopped.load(Ordering::Acquire) {
            break;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                tracing::warn!("shm server poll failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        // Connections first (their indices in `fds` follow the listener's), then new ones.
        let now = Instant::now();
        let mut ended = Vec::new();
        for (k, c) in conns.iter_mut().enumerate() {
            let ready = fds[2 + k].revents != 0;
            let outcome = if ready {
                serve_ready(c, shared)
            } else if now >= c.deadline(&limits) {
                // One last look, so a request that just arrived is not taken for silence.
                serve_ready(c, shared).and_then(|()| {
                    if now >= c.deadline(&limits) {
                        let why = match c.started {
                            Some(_) => format!(
                                "a request did not arrive whole within {:?}",
                                limits.request_timeout
                            ),
                            None => format!("idle for {:?}", limits.idle_timeout),
                        };
                        Err(Ended::Failed(Error::Io(why)))
                    } else {
                        Ok(())
                    }
                })
            } else {
                Ok(())
            };
            if let Err(e) = outcome {
                if let Ended::Failed(e) = e {
                    tracing::debug!("shm connection from pid {} closed: {e}", c.pid);
                }
                ended.push(k);
            }
        }
        for k in ended.into_iter().rev() {
            conns.swap_remove(k);
        }
        if fds[1].revents != 0 {
            accept_all(listener, &mut conns, shared);
        }
    }
    // Stopping: hang up on everyone (dropping the streams closes them).
    for c in &conns {
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Accepts every pending connection, greeting those within the limits and closing the others.
fn accept_all(listener: &UnixListener, conns: &mut Vec<Conn>, shared: &Shared) {
    let limits = &shared.limits;
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors, say: the pending connections wait for the next round.
                tracing::warn!("shm accept failed: {e}");
                return;
            }
        };
        // Same-host sockets hand out mappings of this process's memory: only its own user.
        let pid = match mooncake_core::memfd::check_same_user(&stream) {
            Ok(pid) => pid,
            Err(e) => {
                shared.refusals.refused("shm", "a connection", &e);
                continue;
            }
        };
        let from_pid = conns.iter().filter(|c| c.pid == pid).count();
        if conns.len() >= limits.max_connections {
            let why = format!("{} connections are open", conns.len());
            shared.refusals.refused("shm", &format!("pid {pid}"), &why);
            continue;
        }
        if from_pid >= limits.max_per_process {
            let why = format!("{from_pid} connections from it are open");
            shared.refusals.refused("shm", &format!("pid {pid}"), &why);
            continue;
        }
        let greeted = stream
            .set_nonblocking(true)
            .map_err(Error::from)
            .and_then(|()| {
                send_with_fds(&stream, &proto::hello(), &[shared.table.fd().as_raw_fd()])
            });
        if let Err(e) = greeted {
            tracing::debug!("shm connection from pid {pid} dropped: {e}");
            continue;
        }
        conns.push(Conn {
            stream,
            pid,
            buf: Vec::new(),
            last_heard: Instant::now(),
            started: None,
        });
    }
}

/// Requests of one connection answered per round, so that one busy peer does not hold up the
/// others.
const ROUND: usize = 64;

/// Reads what a connection has sent and answers the requests complete by then (at most
/// [`ROUND`]; the rest in the next round).
fn serve_ready(c: &mut Conn, shared: &Shared) -> std::result::Result<(), Ended> {
    let mut chunk = [0u8; 4096];
    let mut answered = 0;
    while answered < ROUND {
        let want = c.wanted();
        let room = (want - c.buf.len()).min(chunk.len());
        let n = match (&c.stream).read(&mut chunk[..room]) {
            Ok(0) => return Err(Ended::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Ended::Failed(e.into())),
        };
        let now = Instant::now();
        c.last_heard = now;
        c.started.get_or_insert(now);
        debug_assert!(c.buf.len() + n <= MAX_REQUEST);
        c.buf.extend_from_slice(&chunk[..n]);
        if c.buf.len() == c.wanted() {
            answer(c, shared).map_err(Ended::Failed)?;
            c.buf.clear();
            if c.buf.capacity() > 4096 {
                c.buf.shrink_to(4096);
            }
            c.started = None;
            answered += 1;
        }
    }
    Ok(())
}

/// Answers the complete request in `c.buf`. A reply that does not fit in the socket's buffer
/// at once fails the connection (its peer does not read its replies).
fn answer(c: &Conn, shared: &Shared) -> Result<()> {
    let header: &[u8; proto::REQUEST_LEN] =
        c.buf[..proto::REQUEST_LEN].try_into().expect("a header");
    let req = Request::decode(header);
    let reply = |r: Reply| (&c.stream).write_all(&r.encode()).map_err(Error::from);
    match req.op {
        proto::OP_MAP => match export(shared, req.a, req.b) {
            Ok((r, fd)) => send_with_fds(&c.stream, &r.encode(), &[fd.as_raw_fd()]),
            Err(status) => reply(Reply::status(status)),
        },
        proto::OP_LANDED if req.count <= proto::MAX_LANDED => {
            let memory = shared.segment.memory();
            for range in c.buf[proto::REQUEST_LEN..].chunks_exact(16) {
                let addr = u64::from_le_bytes(range[..8].try_into().expect("8 bytes"));
                let len = u64::from_le_bytes(range[8..].try_into().expect("8 bytes"));
                // Only ranges of this segment's memory; a confused peer reports nothing.
                if memory.resolve(addr, len).is_ok() {
                    shared.segment.landed(addr, len);
                }
            }
            shared.segment.flush_landings();
            reply(Reply::status(proto::OK))
        }
        _ => {
            let _ = reply(Reply::status(proto::BAD_REQUEST));
            Err(Error::Protocol(format!("bad request {req:?}")))
        }
    }
}

/// The reply to `MAP addr len` and the memfd to pass with it: the shared buffer of this segment
/// containing the range, or the status saying why there is none.
fn export(shared: &Shared, addr: u64, len: u64) -> std::result::Result<(Reply, OwnedFd), u32> {
    let region = shared
        .segment
        .memory()
        .resolve(addr, len)
        .map_err(|_| proto::NOT_REGISTERED)?;
    let b = region.buffer();
    let (share, memory) = match (b.attachment::<Share>(), b.provided::<ShmMemory>()) {
        (Some(s), Some(m)) if Arc::ptr_eq(&s.table, &shared.table) => (s, m),
        _ => return Err(proto::NOT_SHARED),
    };
    let fd = memory.fd().try_clone().map_err(|e| {
        tracing::warn!("passing shared buffer {:#x}: {e}", b.addr());
        proto::NOT_SHARED
    })?;
    let reply = Reply {
        status: proto::OK,
        slot: share.slot,
        addr: b.addr(),
        len: b.len(),
        generation: share.generation,
    };
    Ok((reply, fd))
}
