//! The initiator side: one connection per target process, its revocation table and the target
//! buffers mapped so far.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use mooncake_core::memfd::recv_exact_with_fds;
use mooncake_core::{Error, OpCode, Result, TransferOp};

use crate::proto::{self, Reply, Request};
use crate::table::{SharedInfo, SharedRange, SlotView};

/// A connected target process.
#[derive(Debug)]
pub(crate) struct Peer {
    /// The target's abstract socket name.
    name: String,
    /// The target's process id, from its hello.
    pid: u64,
    timeout: Duration,
    sock: Mutex<UnixStream>,
    table: Arc<SlotView>,
    /// Mapped target buffers by start address.
    ranges: RwLock<BTreeMap<u64, Arc<SharedRange>>>,
    dead: AtomicBool,
}

impl Peer {
    /// Connects to the target listening on abstract socket `name` and maps its table.
    pub(crate) fn connect(name: &str, timeout: Duration) -> Result<Peer> {
        let (sock, pid, fds) = open(name, timeout)?;
        let table = fds
            .first()
            .ok_or_else(|| Error::Protocol("hello without the revocation table".into()))?;
        Ok(Peer {
            name: name.to_owned(),
            pid,
            timeout,
            table: Arc::new(SlotView::map(table)?),
            sock: Mutex::new(sock),
            ranges: RwLock::new(BTreeMap::new()),
            dead: AtomicBool::new(false),
        })
    }

    /// True once the peer was found gone (or closed by us).
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Hangs up.
    pub(crate) fn close(&self) {
        self.dead.store(true, Ordering::Release);
        let _ = self
            .sock
            .lock()
            .expect("shm socket")
            .shutdown(std::net::Shutdown::Both);
    }

    /// Checks that the target process is still there and has not closed its segment: it still
    /// holds its end of the socket (checked without blocking), or, when it hung up (as a target
    /// does on a connection idle for long), it answers a new connection, which replaces this
    /// one (an abstract socket's name goes with the process that listens on it).
    pub(crate) fn alive(&self) -> bool {
        if self.is_dead() || self.table.closed() {
            return false;
        }
        let mut sock = self.sock.lock().expect("shm socket");
        let alive = self.usable(&mut sock).is_ok();
        if !alive {
            self.dead.store(true, Ordering::Release);
        }
        alive
    }

    /// Makes `sock` usable for an exchange: as it is while the target holds its end, else a
    /// new connection to the same target.
    fn usable(&self, sock: &mut UnixStream) -> Result<()> {
        if !hung_up(sock) {
            return Ok(());
        }
        let (fresh, pid, _table) = open(&self.name, self.timeout)?;
        if pid != self.pid {
            return Err(Error::Protocol(format!(
                "the target's socket is now served by process {pid}, not {}",
                self.pid
            )));
        }
        *sock = fresh;
        Ok(())
    }

    /// Runs one op by memcpy through a mapping of the target buffer holding its range (mapped
    /// on first use; mapped again once if the mapping went stale).
    pub(crate) fn copy(&self, op: &TransferOp, mappings: &AtomicU64) -> Result<()> {
        let (addr, len) = (op.target_addr, op.local.len());
        let mut last = None;
        for _ in 0..2 {
            let range = match self.lookup(addr, len) {
                Some(r) => r,
                None => {
                    let r = self.map(addr, len)?;
                    mappings.fetch_add(1, Ordering::Relaxed);
                    r
                }
            };
            let r = match op.opcode {
                OpCode::Read => range.read(addr, &op.local),
                OpCode::Write => range.write(addr, &op.local),
            };
            match r {
                Err(e @ Error::StaleMapping(_)) => {
                    self.ranges
                        .write()
                        .expect("ranges")
                        .remove(&range.info().addr);
                    if self.table.closed() {
                        return Err(e);
                    }
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| Error::StaleMapping("mapping went stale twice".into())))
    }

    fn lookup(&self, addr: u64, len: u64) -> Option<Arc<SharedRange>> {
        let ranges = self.ranges.read().expect("ranges");
        let (_, r) = ranges.range(..=addr).next_back()?;
        r.covers(addr, len).then(|| r.clone())
    }

    /// Asks the target for the buffer holding `[addr, addr + len)` and maps it.
    fn map(&self, addr: u64, len: u64) -> Result<Arc<SharedRange>> {
        let exchange = || -> Result<(Reply, Vec<std::os::fd::OwnedFd>)> {
            let mut sock = self.sock.lock().expect("shm socket");
            self.usable(&mut sock)?;
            let req = Request {
                op: proto::OP_MAP,
                count: 0,
                a: addr,
                b: len,
            };
            (&*sock).write_all(&req.encode())?;
            let mut buf = [0u8; proto::REPLY_LEN];
            let fds = recv_exact_with_fds(&sock, &mut buf)?;
            Ok((Reply::decode(&buf), fds))
        };
        // A failed exchange leaves the stream mid-message: the connection is done for.
        let (reply, fds) = exchange().inspect_err(|_| self.dead.store(true, Ordering::Release))?;
        match reply.status {
            proto::OK => {}
            proto::NOT_REGISTERED => return Err(Error::RemoteRangeInvalid { addr, len }),
            proto::NOT_SHARED => {
                return Err(Error::NotSupported(format!(
                    "target range {addr:#x}+{len} is not in shared memory"
                )))
            }
            s => return Err(Error::Protocol(format!("MAP answered with status {s}"))),
        }
        let info = SharedInfo {
            addr: reply.addr,
            len: reply.len,
            slot: reply.slot,
            generation: reply.generation,
        };
        let fd = fds
            .first()
            .ok_or_else(|| Error::Protocol("MAP reply without a descriptor".into()))?;
        let range = Arc::new(SharedRange::map(info, fd, self.table.clone())?);
        if !range.covers(addr, len) {
            return Err(Error::Protocol(format!(
                "MAP for {addr:#x}+{len} answered with {:#x}+{}",
                info.addr, info.len
            )));
        }
        let mut ranges = self.ranges.write().expect("ranges");
        // Drop mappings of revoked buffers this one may replace.
        ranges.retain(|_, r| r.live());
        ranges.insert(info.addr, range.clone());
        Ok(range)
    }

    /// Tells the target which WRITEs that asked for a landing notice have landed, and waits
    /// for its acknowledgement.
    pub(crate) fn report_landed(&self, landed: &[(u64, u64)]) -> Result<()> {
        self.exchange_landed(landed)
            .inspect_err(|_| self.dead.store(true, Ordering::Release))
    }

    fn exchange_landed(&self, landed: &[(u64, u64)]) -> Result<()> {
        let mut sock = self.sock.lock().expect("shm socket");
        self.usable(&mut sock)?;
        for chunk in landed.chunks(proto::MAX_LANDED as usize) {
            let req = Request {
                op: proto::OP_LANDED,
                count: chunk.len() as u32,
                a: 0,
                b: 0,
            };
            let mut msg = Vec::with_capacity(proto::REQUEST_LEN + chunk.len() * 16);
            msg.extend_from_slice(&req.encode());
            for (addr, len) in chunk {
                msg.extend_from_slice(&addr.to_le_bytes());
                msg.extend_from_slice(&len.to_le_bytes());
            }
            (&*sock).write_all(&msg)?;
            let mut buf = [0u8; proto::REPLY_LEN];
            (&*sock).read_exact(&mut buf)?;
            let reply = Reply::decode(&buf);
            if reply.status != proto::OK {
                return Err(Error::Protocol(format!(
                    "LANDED answered with status {}",
                    reply.status
                )));
            }
        }
        Ok(())
    }
}

/// Connects to the target listening on abstract socket `name`: the socket, the target's
/// process id and the descriptors of its hello (the revocation table).
fn open(name: &str, timeout: Duration) -> Result<(UnixStream, u64, Vec<std::os::fd::OwnedFd>)> {
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let sock = UnixStream::connect_addr(&addr)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let mut hello = [0u8; proto::HELLO_LEN];
    let fds = recv_exact_with_fds(&sock, &mut hello)?;
    let pid = proto::check_hello(&hello)?;
    Ok((sock, pid, fds))
}

/// Whether the other end of `sock` hung up (checked without blocking).
fn hung_up(sock: &UnixStream) -> bool {
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd, with no timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n < 0 || (n > 0 && p.revents != 0)
}
