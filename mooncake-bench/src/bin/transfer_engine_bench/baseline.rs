//! The plain-socket baseline and the data pattern shared by both processes.
//!
//! Baseline protocol, over one blocking `std::net` TCP connection with `TCP_NODELAY`, one request
//! at a time (no pipelining). The client opens a connection per baseline case and sends a 24-byte
//! setup, `kind u64 | size u64 | slots u64` (little-endian); the server allocates `size * slots`
//! bytes (the same memory footprint as the engine case: `batch` slots of `size` bytes), answers
//! 8 bytes, then loops until the client closes the connection:
//!
//! - READ:  client sends an 8-byte slot index; server sends the `size` bytes of that slot back
//!   (one `write_all`, so large replies stream at full speed). Server memory holds the pattern.
//! - WRITE: client sends `size` bytes (from its slot `k % slots`); server receives them into its
//!   slot `k % slots` and answers 8 bytes.
//! - PING:  client sends `size` bytes (64); server echoes them.
//!
//! Every request is timed by the client, so the same loop yields throughput and the latency of a
//! single request.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Kinds of baseline connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Server sends `size` bytes per 8-byte request.
    Read = 1,
    /// Client sends `size` bytes, server answers 8.
    Write = 2,
    /// 64-byte echo.
    Ping = 3,
}

impl Kind {
    fn from_u64(v: u64) -> Option<Kind> {
        match v {
            1 => Some(Kind::Read),
            2 => Some(Kind::Write),
            3 => Some(Kind::Ping),
            _ => None,
        }
    }
}

/// Fill of READ destinations before the first reply, so a missing reply cannot pass the check.
const POISON: u8 = 0xA5;

/// Largest buffer a baseline connection may ask for.
const MAX_BASELINE_BYTES: u64 = 4 << 30;

/// One 8-byte word of the data pattern: a mix of `seed` and the word's index.
fn pattern_word(seed: u64, index: u64) -> u64 {
    let mut z = index ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern for `seed`, as if it started at byte `offset` of a buffer whose
/// byte `o` is byte `o % 8` of `pattern_word(seed, o / 8)`.
pub(crate) fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut o = offset;
    let mut i = 0;
    while i < buf.len() {
        let word = pattern_word(seed, o / 8).to_le_bytes();
        let start = (o % 8) as usize;
        let n = (8 - start).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[start..start + n]);
        i += n;
        o += n as u64;
    }
}

/// The pattern for `seed` at `offset`, `len` bytes.
pub(crate) fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(seed, offset, &mut v);
    v
}

/// Index of the first byte where `got` differs from the pattern, if any.
pub(crate) fn first_mismatch(seed: u64, offset: u64, got: &[u8]) -> Option<usize> {
    const CHUNK: usize = 1 << 20;
    let mut expected = vec![0u8; CHUNK.min(got.len())];
    for (k, chunk) in got.chunks(CHUNK).enumerate() {
        let exp = &mut expected[..chunk.len()];
        fill_pattern(seed, offset + (k * CHUNK) as u64, exp);
        if let Some(i) = chunk.iter().zip(exp.iter()).position(|(a, b)| a != b) {
            return Some(k * CHUNK + i);
        }
    }
    None
}

/// Starts the baseline server on 127.0.0.1 (any port) in background threads; returns its address.
pub(crate) fn start_server() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("baseline-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = std::thread::Builder::new()
                    .name("baseline-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve(stream) {
                            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                                eprintln!("baseline server: connection failed: {e}");
                            }
                        }
                    });
            }
        })?;
    Ok(addr)
}

fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let kind = read_u64(&mut s)?;
    let kind = Kind::from_u64(kind).ok_or_else(|| invalid(format!("bad kind {kind}")))?;
    let size = read_u64(&mut s)?;
    let slots = read_u64(&mut s)?.max(1);
    let total = size
        .checked_mul(slots)
        .filter(|&t| t <= MAX_BASELINE_BYTES && size > 0)
        .ok_or_else(|| invalid(format!("bad size {size} x {slots}")))?;
    let mut buf = match kind {
        Kind::Read => pattern(0, 0, total as usize),
        _ => vec![0u8; total as usize],
    };
    s.write_all(&0u64.to_le_bytes())?;
    let size = size as usize;
    let mut k = 0u64;
    loop {
        match kind {
            Kind::Read => {
                let slot = read_u64(&mut s)?;
                if slot >= slots {
                    return Err(invalid(format!("slot {slot} of {slots}")));
                }
                let at = slot as usize * size;
                s.write_all(&buf[at..at + size])?;
            }
            Kind::Write => {
                let at = (k % slots) as usize * size;
                s.read_exact(&mut buf[at..at + size])?;
                s.write_all(&k.to_le_bytes())?;
            }
            Kind::Ping => {
                s.read_exact(&mut buf[..size])?;
                s.write_all(&buf[..size])?;
            }
        }
        k += 1;
    }
}

/// What one baseline case measured: every request's round-trip time.
pub(crate) struct Measured {
    /// Requests completed.
    pub(crate) ops: u64,
    /// Wall time of the timed loop.
    pub(crate) elapsed: Duration,
    /// Per-request times, in nanoseconds.
    pub(crate) samples: Vec<u64>,
}

/// One baseline connection, kept open across the rounds of a case (like the engine's lanes), so
/// that both sides run on warmed-up connections.
pub(crate) struct Client {
    stream: TcpStream,
    kind: Kind,
    size: usize,
    slots: u64,
    /// Source (WRITE, PING) or destination (READ) of the payloads, `size * slots` bytes.
    buf: Vec<u8>,
    reply: Vec<u8>,
    /// Requests sent so far.
    k: u64,
}

impl Client {
    /// Connects to the server at `addr` for `kind` requests of `size` bytes cycling over `slots`
    /// slots.
    pub(crate) fn connect(
        addr: SocketAddr,
        kind: Kind,
        size: u64,
        slots: u64,
    ) -> Result<Client, String> {
        let err =
            |what: &str, e: std::io::Error| format!("baseline {kind:?} {size} B: {what}: {e}");
        let mut stream = TcpStream::connect(addr).map_err(|e| err("connect", e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| err("TCP_NODELAY", e))?;
        let mut setup = Vec::with_capacity(24);
        for v in [kind as u64, size, slots] {
            setup.extend_from_slice(&v.to_le_bytes());
        }
        stream.write_all(&setup).map_err(|e| err("setup", e))?;
        read_u64(&mut stream).map_err(|e| err("setup reply", e))?;
        let size = size as usize;
        let buf = match kind {
            Kind::Write => pattern(7, 0, size * slots as usize),
            Kind::Read => vec![POISON; size * slots as usize],
            Kind::Ping => pattern(9, 0, size),
        };
        Ok(Client {
            stream,
            kind,
            size,
            slots,
            buf,
            reply: vec![0u8; size],
            k: 0,
        })
    }

    /// One request, round trip. The first READ reply and every PING echo are checked.
    fn one(&mut self) -> Result<(), String> {
        let (kind, size) = (self.kind, self.size);
        let err =
            |what: &str, e: std::io::Error| format!("baseline {kind:?} {size} B: {what}: {e}");
        let slot = self.k % self.slots;
        let at = slot as usize * size;
        let s = &mut self.stream;
        match kind {
            Kind::Read => {
                s.write_all(&slot.to_le_bytes())
                    .map_err(|e| err("send", e))?;
                let dst = &mut self.buf[at..at + size];
                s.read_exact(dst).map_err(|e| err("receive", e))?;
                if self.k == 0 {
                    if let Some(i) = first_mismatch(0, at as u64, dst) {
                        return Err(format!(
                            "baseline READ {size} B: reply differs from the pattern at byte {i}"
                        ));
                    }
                }
            }
            Kind::Write => {
                s.write_all(&self.buf[at..at + size])
                    .map_err(|e| err("send", e))?;
                read_u64(s).map_err(|e| err("receive", e))?;
            }
            Kind::Ping => {
                s.write_all(&self.buf[..size]).map_err(|e| err("send", e))?;
                s.read_exact(&mut self.reply)
                    .map_err(|e| err("receive", e))?;
                if self.reply[..] != self.buf[..size] {
                    return Err("baseline PING: echo differs".into());
                }
            }
        }
        self.k += 1;
        Ok(())
    }

    /// Runs requests for `warmup` (untimed, at least one), then for `duration`, timing each.
    pub(crate) fn measure(
        &mut self,
        duration: Duration,
        warmup: Duration,
    ) -> Result<Measured, String> {
        let warm_start = Instant::now();
        loop {
            self.one()?;
            if warm_start.elapsed() >= warmup {
                break;
            }
        }
        let mut samples = Vec::new();
        let start = Instant::now();
        loop {
            let t = Instant::now();
            self.one()?;
            samples.push(t.elapsed().as_nanos() as u64);
            if start.elapsed() >= duration {
                break;
            }
        }
        Ok(Measured {
            ops: samples.len() as u64,
            elapsed: start.elapsed(),
            samples,
        })
    }
}
