//! Fuzzes a real client (the store served to dummy clients) with what its two sockets decode:
//! pool registrations on its abstract Unix socket (any bytes, with no descriptor, a sealed or
//! an unsealed memfd of several sizes, or a file that is not a memfd) and requests on its RPC
//! port (any postcard bytes, properly framed).
//!
//! Input: a sequence of ops (see `run`). The session id of a zero-copy call (`PutFrom`,
//! `GetInto`, whose postcard body starts with variant 3 or 5 and then the session) that names
//! slot 0..=3 is replaced with the id that slot's registration got, so calls reach real pools.
//!
//! Checks: no panic (a panic in any of the real client's tasks aborts this process); every
//! registration is answered, and one is accepted only when it is well formed (magic, protocol
//! version, a sealed memfd of at least the announced non-zero length); every request gets a
//! response frame with its id, or the connection is closed (an undecodable request); when the
//! dummies hang up, every session ends; and afterwards the real client still answers `Hello`.
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mooncake_core::memfd::{create_memfd, send_with_fds};
use mooncake_master::MasterConfig;
use mooncake_master_service::service::{MasterService, ServiceConfig};
use mooncake_store::real_client::{RealClient, PROTOCOL_VERSION};
use mooncake_store::{Store, StoreConfig};
use tokio::runtime::Runtime;

const RPC_VERSION: u8 = 1;
const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;

struct Server {
    _rt: Runtime,
    real: Arc<RealClient>,
    rpc: SocketAddr,
    ipc_name: String,
}

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let real = rt.block_on(async {
            let master =
                MasterService::new(MasterConfig::default(), ServiceConfig::default()).unwrap();
            let store = Store::setup_embedded(
                StoreConfig {
                    local_hostname: "127.0.0.1".into(),
                    global_segment_size: 16 << 20,
                    local_buffer_size: 16 << 20,
                    ..StoreConfig::default()
                },
                master,
            )
            .await
            .expect("store");
            RealClient::serve_tls(store, "127.0.0.1:0".parse().unwrap(), None)
                .await
                .expect("real client")
        });
        let rpc = real.rpc_address();
        let mut conn = Rpc::default();
        let reply = conn.call(rpc, &hello()).expect("hello answered");
        let ipc_name = parse_hello(&reply).expect("a Hello reply");
        Server {
            _rt: rt,
            real,
            rpc,
            ipc_name,
        }
    })
}

/// A postcard `Hello { version }` (variant 0).
fn hello() -> Vec<u8> {
    vec![0, PROTOCOL_VERSION as u8]
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A postcard varint at the start of `b`: its value and length.
fn read_varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// The `ipc_name` of a postcard `Reply::Hello { version, ipc_name, hostname }`.
fn parse_hello(body: &[u8]) -> Option<String> {
    let (variant, n) = read_varint(body)?;
    let rest = &body[n..];
    if variant != 0 {
        return None;
    }
    let (version, n) = read_varint(rest)?;
    let rest = &rest[n..];
    let (len, n) = read_varint(rest)?;
    let name = rest.get(n..n + len as usize)?;
    (version == u64::from(PROTOCOL_VERSION)).then(|| String::from_utf8(name.to_vec()).ok())?
}

/// One RPC connection, reopened when the server closes it.
#[derive(Default)]
struct Rpc {
    stream: Option<TcpStream>,
    next_id: u64,
}

impl Rpc {
    /// Sends one request frame; returns the response body, or `None` when the server closed
    /// the connection instead.
    fn call(&mut self, addr: SocketAddr, body: &[u8]) -> Option<Vec<u8>> {
        if self.stream.is_none() {
            let s = TcpStream::connect(addr).expect("connect to the real client");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            self.stream = Some(s);
        }
        let s = self.stream.as_mut().expect("connected");
        self.next_id += 1;
        let id = self.next_id;
        let mut frame = Vec::with_capacity(14 + body.len());
        frame.extend_from_slice(&((body.len() + 10) as u32).to_le_bytes());
        frame.push(RPC_VERSION);
        frame.push(KIND_REQUEST);
        frame.extend_from_slice(&id.to_le_bytes());
        frame.extend_from_slice(body);
        let mut header = [0u8; 14];
        let answered = s.write_all(&frame).is_ok() && s.read_exact(&mut header).is_ok();
        if !answered {
            self.stream = None;
            return None;
        }
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        assert!(len >= 10, "response frame length {len}");
        assert_eq!(header[4], RPC_VERSION);
        assert_eq!(header[5], KIND_RESPONSE, "not a response frame");
        assert_eq!(
            u64::from_le_bytes(header[6..14].try_into().unwrap()),
            id,
            "a response to another request"
        );
        let mut reply = vec![0u8; len - 10];
        s.read_exact(&mut reply)
            .expect("a response frame cut short");
        Some(reply)
    }
}

/// A registered dummy pool as this side knows it.
struct Session {
    _conn: UnixStream,
    id: u64,
}

const MAGIC: &[u8; 4] = b"MCDM";
const SIZES: [u64; 4] = [4096, 65536, 1 << 20, 3];

/// A file descriptor that is not a memfd.
fn not_a_memfd() -> OwnedFd {
    std::fs::File::open("/dev/null").expect("/dev/null").into()
}

/// A memfd of `len` bytes that may shrink (not sealed).
fn unsealed_memfd(len: u64) -> OwnedFd {
    // SAFETY: plain system calls with a valid C string; the descriptor is new and ours.
    unsafe {
        let raw = libc::memfd_create(c"fuzz-unsealed".as_ptr(), libc::MFD_CLOEXEC);
        assert!(raw >= 0, "memfd_create");
        let fd = OwnedFd::from_raw_fd(raw);
        assert_eq!(libc::ftruncate(fd.as_raw_fd(), len as libc::off_t), 0);
        fd
    }
}

/// Registers a pool: `flags` bits 0-1 pick the descriptor (none, a sealed memfd, an unsealed
/// one, /dev/null), bits 2-3 its size; with bit 6 the message is a well-formed registration of
/// the whole memfd at the dummy base address in the first 8 bytes of `bytes`, else `bytes`
/// as they are. Returns the session, if any.
fn register(s: &Server, flags: u8, bytes: &[u8]) -> Option<Session> {
    let size = SIZES[usize::from(flags >> 2) & 3];
    let fd = match flags & 3 {
        0 => None,
        1 => Some(create_memfd("fuzz-pool", size).expect("memfd")),
        2 => Some(unsealed_memfd(size)),
        _ => Some(not_a_memfd()),
    };
    let msg = if flags & 0x40 != 0 {
        let mut base = [0u8; 8];
        let n = bytes.len().min(8);
        base[..n].copy_from_slice(&bytes[..n]);
        let mut m = MAGIC.to_vec();
        m.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(&base);
        m
    } else {
        bytes.to_vec()
    };
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(s.ipc_name.as_bytes()).unwrap();
    let mut conn = UnixStream::connect_addr(&addr).expect("connect to the dummy socket");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let fds: Vec<i32> = fd.iter().map(AsRawFd::as_raw_fd).collect();
    if msg.is_empty() {
        let _ = conn.shutdown(std::net::Shutdown::Write);
    } else {
        send_with_fds(&conn, &msg, &fds).expect("send a registration");
    }
    drop(fd);
    let mut reply = [0u8; 12];
    conn.read_exact(&mut reply)
        .expect("every registration is answered");
    let code = i32::from_le_bytes(reply[..4].try_into().unwrap());
    let id = u64::from_le_bytes(reply[4..].try_into().unwrap());
    if code != 0 {
        assert_eq!(id, 0, "a refusal with a session");
        return None;
    }
    assert_ne!(id, 0, "an accepted registration without a session");
    // Accepted: it must be well formed, with a sealed memfd at least as long as announced
    // (messages longer than the real client reads are cut, and then cannot match).
    let announced = msg
        .get(8..16)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    assert!(
        msg.len() == 24
            && &msg[..4] == MAGIC
            && msg[4..8] == PROTOCOL_VERSION.to_le_bytes()
            && flags & 3 == 1
            && announced.is_some_and(|n| n > 0 && n <= size),
        "accepted a registration it should refuse: {msg:02x?} with fd kind {}, memfd size {size}",
        flags & 3
    );
    Some(Session { _conn: conn, id })
}

fn run(data: &[u8]) {
    let s = server();
    let mut rpc = Rpc::default();
    let mut sessions: [Option<Session>; 4] = Default::default();
    let mut rest = data;
    let mut take = |n: usize| -> Option<&[u8]> {
        if rest.len() < n {
            return None;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    };
    while let Some(&[op]) = take(1) {
        match op % 3 {
            // Register: [slot/flags][flags][len][bytes].
            0 => {
                let Some(&[slot, flags, len]) = take(3) else {
                    break;
                };
                let Some(bytes) = take(usize::from(len)) else {
                    break;
                };
                let slot = usize::from(slot) % sessions.len();
                sessions[slot] = None;
                sessions[slot] = register(s, flags, bytes);
                let live = sessions.iter().flatten().count();
                assert!(
                    s.real.session_count() >= live,
                    "{live} registered pools, {} sessions",
                    s.real.session_count()
                );
            }
            // A request: [len u16][postcard body].
            1 => {
                let Some(&[l0, l1]) = take(2) else { break };
                let Some(body) = take(usize::from(u16::from_le_bytes([l0, l1]))) else {
                    break;
                };
                let mut body = body.to_vec();
                if matches!(body.first(), Some(3 | 5)) {
                    if let Some((slot, n)) = read_varint(&body[1..]) {
                        if let Some(Some(session)) = sessions.get(slot as usize) {
                            let mut spliced = vec![body[0]];
                            varint(session.id, &mut spliced);
                            spliced.extend_from_slice(&body[1 + n..]);
                            body = spliced;
                        }
                    }
                }
                let _ = rpc.call(s.rpc, &body);
            }
            // A dummy hangs up: [slot].
            _ => {
                let Some(&[slot]) = take(1) else { break };
                sessions[usize::from(slot) % 4] = None;
            }
        }
    }
    drop(sessions);
    // Every session ends once its dummy has hung up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.real.session_count() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} sessions outlived their dummies",
            s.real.session_count()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // And the real client still answers.
    let reply = Rpc::default()
        .call(s.rpc, &hello())
        .expect("Hello answered");
    assert!(
        parse_hello(&reply).is_some(),
        "not a Hello reply: {reply:02x?}"
    );
}

fuzz_target!(|data: &[u8]| run(data));
