//! Fuzzes both ends of the shared-memory transport's socket protocol.
//!
//! Input: `[mode][...]`. Even mode: the rest goes, as it is, to a real target's abstract socket
//! (MAP and LANDED requests, garbage, requests cut short), which this side then reads to the
//! end. Odd mode: `[flags][hello 16 bytes][replies...]`, this side plays a target that greets
//! a real initiator with that hello (and, per `flags`, a revocation table of the right size, of
//! a wrong size, or none) and answers its requests with the reply bytes (each with, per
//! `flags`, a memfd filled with a known pattern, of the announced size or not, or none), while
//! the initiator READs from it.
//!
//! Checks: no panic and no fault in either; the target answers exactly what a model of the
//! protocol predicts (for MAP, from its own registry: OK with the buffer holding the range and
//! its memfd, NOT_REGISTERED or NOT_SHARED; LANDED, OK; anything else BAD_REQUEST, and then it
//! hangs up), and afterwards it greets a new connection and maps a known buffer; the initiator
//! completes every op, and a READ it reports done holds the bytes of the memfd it was given.
#![no_main]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mooncake_core::memfd::{create_memfd, recv_with_fds, send_with_fds, Mapping};
use mooncake_core::{
    AlignedBuffer, BatchState, BufferDesc, BufferKey, Endpoint, EngineConfig, Location,
    MemoryRegistry, OpCode, SegmentDesc, TransferEngine, TransferOp, Transport,
};
use mooncake_transport_shm::{ShmConfig, ShmTransport};
use tokio::runtime::Runtime;

const MAP: u32 = 1;
const LANDED: u32 = 2;
const MAX_LANDED: u32 = 4096;
const OK: u32 = 0;
const NOT_REGISTERED: u32 = 1;
const NOT_SHARED: u32 = 2;
const BAD_REQUEST: u32 = 3;
/// The revocation table's size: 65,536 slots of 8 bytes.
const TABLE_BYTES: u64 = 65_536 * 8;

struct Target {
    rt: Runtime,
    engine: Arc<TransferEngine>,
    socket: String,
    host: String,
    /// Shared buffers (addr, len).
    shared: Vec<(u64, u64)>,
    _private: AlignedBuffer,
}

fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(|| {
        // libFuzzer's own main leaves SIGPIPE at its default: a write to a peer that hung up
        // must be an error here, not the end of the process.
        // SAFETY: setting a signal's disposition to "ignore".
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let engine = rt.block_on(async {
            let shm = ShmTransport::new(ShmConfig {
                timeout: Duration::from_secs(2),
                ..ShmConfig::default()
            })
            .expect("shm");
            TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![shm])
                .await
                .expect("engine")
        });
        let shared: Vec<(u64, u64)> = [4096usize, 65536, 8192]
            .iter()
            .map(|&len| {
                let a = engine
                    .allocate_buffer(len, Location::cpu(0))
                    .expect("buffer");
                (a, len as u64)
            })
            .collect();
        let private = AlignedBuffer::new(4096).expect("private buffer");
        // SAFETY: `private` lives as long as the engine (both are kept in the static).
        unsafe {
            engine
                .register_memory(private.addr(), 4096, Location::cpu(0))
                .expect("register")
        };
        let address = engine
            .local_descriptor()
            .endpoint("shm")
            .expect("shm endpoint")
            .address
            .clone();
        let (host, socket) = address.split_once('/').expect("host/socket");
        Target {
            host: host.to_owned(),
            socket: socket.to_owned(),
            rt,
            engine,
            shared,
            _private: private,
        }
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn connect(name: &str) -> UnixStream {
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let s = UnixStream::connect_addr(&addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads everything until the other end closes: the bytes and how many descriptors came. (A
/// target that hangs up with requests still unread in its socket resets the connection after
/// its last reply.)
fn read_to_end(s: &UnixStream) -> (Vec<u8>, usize) {
    let (mut out, mut fds) = (Vec::new(), 0);
    let mut buf = [0u8; 4096];
    loop {
        match recv_with_fds(s, &mut buf) {
            Ok((0, _)) => return (out, fds),
            Ok((n, f)) => {
                out.extend_from_slice(&buf[..n]);
                fds += f.len();
            }
            Err(mooncake_core::Error::Io(e)) if e.contains("os error 104") => return (out, fds),
            Err(e) => panic!("the target neither answered nor hung up: {e}"),
        }
    }
}

/// What the target must answer to `input`: the replies (status, addr, len) in order.
fn model(t: &Target, input: &[u8]) -> Vec<(u32, u64, u64)> {
    let mut out = Vec::new();
    let mut rest = input;
    while rest.len() >= 24 {
        let (op, count, a, b) = (
            u32_at(rest, 0),
            u32_at(rest, 4),
            u64_at(rest, 8),
            u64_at(rest, 16),
        );
        match op {
            MAP => {
                rest = &rest[24..];
                let status = match t.engine.memory().resolve(a, b) {
                    Err(_) => (NOT_REGISTERED, 0, 0),
                    Ok(r) => {
                        let buf = r.buffer();
                        match t.shared.iter().find(|&&(s, _)| s == buf.addr()) {
                            Some(&(s, l)) => (OK, s, l),
                            None => (NOT_SHARED, 0, 0),
                        }
                    }
                };
                out.push(status);
            }
            LANDED if count <= MAX_LANDED => {
                let need = 24 + count as usize * 16;
                if rest.len() < need {
                    break;
                }
                rest = &rest[need..];
                out.push((OK, 0, 0));
            }
            _ => {
                out.push((BAD_REQUEST, 0, 0));
                break;
            }
        }
    }
    out
}

fn fuzz_target_side(t: &Target, input: &[u8]) {
    let mut s = connect(&t.socket);
    let mut hello = [0u8; 16];
    let fds = mooncake_core::memfd::recv_exact_with_fds(&s, &mut hello).expect("a hello");
    assert_eq!(fds.len(), 1, "a hello without the table");
    // A target that hung up early (a bad request) makes the rest of the write fail.
    let _ = s.write_all(input);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let (replies, fds) = read_to_end(&s);
    let want = model(t, input);
    assert_eq!(
        replies.len(),
        want.len() * 32,
        "{} reply bytes, {} requests",
        replies.len(),
        want.len()
    );
    let mut maps = 0;
    for (i, (r, &(status, addr, len))) in replies.chunks_exact(32).zip(&want).enumerate() {
        assert_eq!(u32_at(r, 0), status, "reply {i}: {r:02x?}");
        if status == OK && (addr, len) != (0, 0) {
            assert_eq!(
                (u64_at(r, 8), u64_at(r, 16)),
                (addr, len),
                "reply {i} maps another buffer"
            );
            maps += 1;
        }
    }
    assert_eq!(fds, maps, "descriptors passed");
    // The target still greets and maps.
    let s = connect(&t.socket);
    let mut hello = [0u8; 16];
    mooncake_core::memfd::recv_exact_with_fds(&s, &mut hello).expect("a hello after");
    let (addr, len) = t.shared[1];
    let mut req = [0u8; 24];
    req[0..4].copy_from_slice(&MAP.to_le_bytes());
    req[8..16].copy_from_slice(&addr.to_le_bytes());
    req[16..24].copy_from_slice(&len.to_le_bytes());
    (&s).write_all(&req).unwrap();
    let mut reply = [0u8; 32];
    let fds = mooncake_core::memfd::recv_exact_with_fds(&s, &mut reply).expect("a MAP reply");
    assert_eq!((u32_at(&reply, 0), fds.len()), (OK, 1));
}

/// A memfd of `len` bytes whose byte at offset `i` is `i as u8 ^ 0x5a`, sealed against
/// shrinking when `sealed`.
fn patterned_memfd(len: u64, sealed: bool) -> Option<OwnedFd> {
    if sealed {
        let fd = create_memfd("fuzz-shm", len).ok()?;
        let map = Mapping::map(&fd, len).ok()?;
        // SAFETY: the mapping is `len` bytes of a memfd of `len` bytes, ours alone.
        let bytes = unsafe { std::slice::from_raw_parts_mut(map.addr() as *mut u8, len as usize) };
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = i as u8 ^ 0x5a;
        }
        return Some(fd);
    }
    // SAFETY: plain system calls; the descriptor is new and ours.
    unsafe {
        let raw = libc::memfd_create(c"fuzz-unsealed".as_ptr(), libc::MFD_CLOEXEC);
        if raw < 0 {
            return None;
        }
        let fd = OwnedFd::from_raw_fd(raw);
        (libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) == 0).then_some(fd)
    }
}

/// Plays a target for one connection (then stops listening): greets with `hello` (and a table per `flags`), then
/// answers each request with the next 32 bytes of `replies` (with a memfd per `flags`).
fn fake_target(listener: UnixListener, flags: u8, hello: &[u8], replies: &[u8]) {
    let mut p = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll(2) on one valid pollfd.
    if unsafe { libc::poll(&mut p, 1, 10_000) } != 1 {
        return;
    }
    let Ok((s, _)) = listener.accept() else {
        return;
    };
    // One connection: a reconnection (after this one hangs up) is refused at once, as by a
    // target that is gone, instead of waiting out the initiator's timeout for a hello.
    drop(listener);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let table = match flags & 3 {
        0 => None,
        1 => create_memfd("fuzz-table", TABLE_BYTES).ok(),
        2 => create_memfd("fuzz-table", 4096).ok(),
        _ => patterned_memfd(TABLE_BYTES, false),
    };
    let fds: Vec<i32> = table.iter().map(AsRawFd::as_raw_fd).collect();
    if send_with_fds(&s, hello, &fds).is_err() {
        return;
    }
    // Each request gets the next reply; one past the replies, or the initiator hanging up,
    // ends the connection (a target that hangs up early looks gone).
    let mut replies = replies.chunks(32);
    loop {
        let mut req = [0u8; 24];
        if (&s).read_exact(&mut req).is_err() {
            return;
        }
        if u32_at(&req, 0) == LANDED {
            let count = u32_at(&req, 4).min(MAX_LANDED) as usize;
            let mut body = vec![0u8; count * 16];
            if (&s).read_exact(&mut body).is_err() {
                return;
            }
        }
        let Some(reply) = replies.next() else { return };
        let len = if reply.len() >= 24 {
            u64_at(reply, 16)
        } else {
            0
        };
        let fd = match (flags >> 2) & 3 {
            0 => None,
            // The announced size (when it is a sane one), or a page.
            1 => patterned_memfd(
                if (1..=1 << 20).contains(&len) {
                    len
                } else {
                    4096
                },
                true,
            ),
            2 => patterned_memfd(4096, true),
            _ => patterned_memfd(4096, false),
        };
        let fds: Vec<i32> = fd.iter().map(AsRawFd::as_raw_fd).collect();
        // A reply cut short is the last thing said: hang up rather than let the initiator
        // wait out its timeout for the rest.
        if send_with_fds(&s, reply, &fds).is_err() || reply.len() < 32 {
            return;
        }
    }
}

fn fuzz_initiator_side(t: &Target, data: &[u8]) {
    static N: AtomicU64 = AtomicU64::new(0);
    if data.len() < 17 {
        return;
    }
    let (flags, hello, replies) = (data[0], &data[1..17], &data[17..]);
    let name = format!(
        "mooncake-fuzz-shm.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let listener =
        UnixListener::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .expect("bind");
    // The initiator reads 64 bytes at a target address the replies may or may not map.
    let target_addr = if replies.len() >= 16 {
        u64_at(replies, 8)
    } else {
        0x10_0000
    };
    let desc = SegmentDesc {
        name: "fake:1".into(),
        endpoints: vec![Endpoint {
            protocol: "shm".into(),
            address: format!("{}/{name}", t.host),
        }],
        buffers: vec![BufferDesc {
            addr: target_addr,
            len: 1 << 20,
            location: Location::cpu(0),
            keys: vec![BufferKey {
                protocol: "shm".into(),
                values: Vec::new(),
            }],
        }],
    };
    let registry = Arc::new(MemoryRegistry::new());
    let local = registry
        .register_owned(AlignedBuffer::new(4096).unwrap(), Location::cpu(0))
        .unwrap();
    let shm = ShmTransport::new(ShmConfig {
        timeout: Duration::from_secs(2),
        ..ShmConfig::default()
    })
    .expect("shm");
    let ops: Vec<TransferOp> = (0..2u64)
        .map(|i| TransferOp {
            opcode: if i == 0 { OpCode::Read } else { OpCode::Write },
            local: registry.resolve(local + i * 64, 64).unwrap(),
            target_addr: target_addr.wrapping_add(i * 64),
            index: i as usize,
            notify: i == 1,
            deadline: None,
        })
        .collect();
    let results = std::thread::scope(|scope| {
        scope.spawn(|| fake_target(listener, flags, hello, replies));
        let batch = BatchState::new(ops.len());
        t.rt.block_on(shm.transfer(&desc, ops, &batch));
        // Hanging up ends the fake target's connection.
        t.rt.block_on(shm.shutdown());
        batch.results()
    });
    assert_eq!(results.len(), 2);
    if results[0].is_ok() {
        // A READ reported done holds the bytes of the memfd the fake target passed: the reply
        // said where its buffer starts, so each byte is its offset there, patterned.
        // (Which reply mapped it depends on how many the initiator needed.)
        let got = registry.resolve(local, 64).unwrap().to_vec();
        let from = |start: u64| -> Vec<u8> {
            (0..64u64)
                .map(|i| target_addr.wrapping_sub(start).wrapping_add(i) as u8 ^ 0x5a)
                .collect()
        };
        assert!(
            replies.chunks_exact(32).any(|r| got == from(u64_at(r, 8))),
            "a READ reported done with other bytes: {got:02x?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let t = target();
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => fuzz_target_side(t, rest),
        Some((_, rest)) => fuzz_initiator_side(t, rest),
        None => {}
    }
});
