//! The target side: an abstract Unix socket, a thread accepting on it and a thread per
//! connected initiator answering MAP and LANDED requests.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mooncake_core::memfd::send_with_fds;
use mooncake_core::{Error, LocalSegment, Result};

use crate::memory::{Share, ShmMemory};
use crate::proto::{self, Reply, Request};
use crate::table::SlotTable;

/// A running target; [`Server::stop`] ends it.
#[derive(Debug)]
pub(crate) struct Server {
    name: String,
    listener: Arc<UnixListener>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    segment: Arc<LocalSegment>,
    /// The transport's revocation table: peers get it on connecting.
    table: Arc<SlotTable>,
    stopped: AtomicBool,
    /// Connections by id, so that stopping can hang them up.
    conns: Mutex<HashMap<u64, UnixStream>>,
    timeout: Duration,
}

impl Server {
    /// Listens on a fresh abstract socket and serves `segment` from it.
    pub(crate) fn start(
        segment: Arc<LocalSegment>,
        table: Arc<SlotTable>,
        timeout: Duration,
    ) -> Result<Server> {
        table.open();
        let name = format!("mooncake-shm.{}.{:016x}", std::process::id(), random());
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        let listener = Arc::new(UnixListener::bind_addr(&addr)?);
        let shared = Arc::new(Shared {
            segment,
            table,
            stopped: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            timeout,
        });
        let (l, s) = (listener.clone(), shared.clone());
        std::thread::Builder::new()
            .name("mooncake-shm-accept".into())
            .spawn(move || accept_loop(&l, &s))?;
        Ok(Server {
            name,
            listener,
            shared,
        })
    }

    /// The abstract socket's name.
    pub(crate) fn socket_name(&self) -> &str {
        &self.name
    }

    /// Closes the segment to peers (their mappings fail from now on) and hangs up.
    pub(crate) fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.table.close();
        // SAFETY: shutdown(2) on a socket we own; wakes the thread blocked in accept.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for (_, c) in self.shared.conns.lock().expect("conns").drain() {
            let _ = c.shutdown(std::net::Shutdown::Both);
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

/// Connections (each with its thread) a target serves at once: one per local process that
/// reaches it, so far more than a host runs.
const MAX_CONNECTIONS: usize = 256;

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    for id in 0u64.. {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if shared.stopped.load(Ordering::Acquire) {
                    return;
                }
                tracing::warn!("shm accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        // Same-host sockets hand out mappings of this process's memory: only its own user.
        if let Err(e) = mooncake_core::memfd::check_same_user(&stream) {
            tracing::warn!("refused an shm connection: {e}");
            continue;
        }
        // One thread per connection (the protocol is blocking, for latency): at most this many.
        if shared.conns.lock().expect("conns").len() >= MAX_CONNECTIONS {
            tracing::warn!("refused an shm connection: {MAX_CONNECTIONS} are open");
            continue;
        }
        match stream.try_clone() {
            Ok(keep) => shared.conns.lock().expect("conns").insert(id, keep),
            Err(e) => {
                tracing::warn!("shm connection dropped: {e}");
                continue;
            }
        };
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("mooncake-shm-conn".into())
            .spawn(move || {
                if let Err(e) = serve_conn(&stream, &s) {
                    tracing::debug!("shm connection ended: {e}");
                }
                s.conns.lock().expect("conns").remove(&id);
            });
        if let Err(e) = spawned {
            tracing::warn!("no thread for an shm connection: {e}");
            shared.conns.lock().expect("conns").remove(&id);
        }
    }
}

fn serve_conn(stream: &UnixStream, shared: &Shared) -> Result<()> {
    stream.set_write_timeout(Some(shared.timeout))?;
    send_with_fds(stream, &proto::hello(), &[shared.table.fd().as_raw_fd()])?;
    let mut reader = stream;
    let mut header = [0u8; proto::REQUEST_LEN];
    let mut ranges = Vec::new();
    loop {
        reader.read_exact(&mut header)?;
        let req = Request::decode(&header);
        match req.op {
            proto::OP_MAP => match export(shared, req.a, req.b) {
                Ok((reply, fd)) => {
                    send_with_fds(stream, &reply.encode(), &[fd.as_raw_fd()])?;
                }
                Err(status) => {
                    (&*stream).write_all(&Reply::status(status).encode())?;
                }
            },
            proto::OP_LANDED if req.count <= proto::MAX_LANDED => {
                let mut body = vec![0u8; req.count as usize * 16];
                reader.read_exact(&mut body)?;
                ranges.clear();
                ranges.extend(body.chunks_exact(16).map(|c| {
                    let addr = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
                    let len = u64::from_le_bytes(c[8..].try_into().expect("8 bytes"));
                    (addr, len)
                }));
                let memory = shared.segment.memory();
                for &(addr, len) in &ranges {
                    // Only ranges of this segment's memory; a confused peer reports nothing.
                    if memory.resolve(addr, len).is_ok() {
                        shared.segment.landed(addr, len);
                    }
                }
                shared.segment.flush_landings();
                (&*stream).write_all(&Reply::status(proto::OK).encode())?;
            }
            _ => {
                (&*stream).write_all(&Reply::status(proto::BAD_REQUEST).encode())?;
                return Err(Error::Protocol(format!("bad request {req:?}")));
            }
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
