//! The data pattern, the 64-byte echo baseline and formatting helpers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// One 8-byte word of the data pattern (a splitmix64 of `seed` and the word index).
fn pattern_word(seed: u64, index: u64) -> u64 {
    let mut z = index ^ seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `len` bytes of the pattern for `seed`, starting at byte 0.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(8).enumerate() {
        let w = pattern_word(seed, i as u64).to_le_bytes();
        chunk.copy_from_slice(&w[..chunk.len()]);
    }
    v
}

/// Index of the first differing byte, if any.
pub(crate) fn first_diff(got: &[u8], want: &[u8]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    if got == want {
        return None;
    }
    got.iter().zip(want).position(|(a, b)| a != b)
}

/// Size of the ping-pong messages.
pub(crate) const PING: usize = 64;

/// Starts a blocking echo server on 127.0.0.1 (a thread per connection); returns its address.
pub(crate) fn start_echo_server() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("echo-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let _ = std::thread::Builder::new()
                    .name("echo-conn".into())
                    .spawn(move || {
                        let _ = s.set_nodelay(true);
                        let mut buf = [0u8; 4096];
                        loop {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
            }
        })?;
    Ok(addr)
}

/// Ping-pongs 64-byte messages with the echo server for `dur` (after a short warm-up); returns
/// the round-trip times in ns. Every echo is checked.
pub(crate) fn ping(addr: SocketAddr, dur: Duration) -> Result<Vec<u64>, String> {
    let err = |what: &str, e: std::io::Error| format!("ping baseline: {what}: {e}");
    let mut s = TcpStream::connect(addr).map_err(|e| err("connect", e))?;
    s.set_nodelay(true).map_err(|e| err("TCP_NODELAY", e))?;
    let msg = pattern(9, PING);
    let mut reply = [0u8; PING];
    let mut one = |s: &mut TcpStream| -> Result<(), String> {
        s.write_all(&msg).map_err(|e| err("send", e))?;
        s.read_exact(&mut reply).map_err(|e| err("receive", e))?;
        if reply[..] != msg[..] {
            return Err("ping baseline: the echo differs".into());
        }
        Ok(())
    };
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(50) {
        one(&mut s)?;
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < dur {
        let t = Instant::now();
        one(&mut s)?;
        samples.push(t.elapsed().as_nanos() as u64);
    }
    Ok(samples)
}

/// `4 KiB`, `16 MiB`, `2.00 GiB`, `100 B`.
pub(crate) fn fmt_bytes(n: u64) -> String {
    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;
    match n {
        n if n >= G && n % G == 0 => format!("{} GiB", n / G),
        n if n >= G => format!("{:.2} GiB", n as f64 / G as f64),
        n if n >= M && n % M == 0 => format!("{} MiB", n / M),
        n if n >= K && n % K == 0 => format!("{} KiB", n / K),
        n => format!("{n} B"),
    }
}

/// A latency in ns as `23.4us` or `1.52ms`.
pub(crate) fn fmt_ns(ns: u64) -> String {
    if ns < 1_000_000 {
        format!("{:.1}us", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2}ms", ns as f64 / 1e6)
    } else {
        format!("{:.2}s", ns as f64 / 1e9)
    }
}

/// A rate as `123.4k` / `1.23M` / `950`.
pub(crate) fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e4 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}
