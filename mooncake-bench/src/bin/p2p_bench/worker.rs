//! The processes the benchmark starts inside the namespaces (hidden subcommands of `p2p_bench`).
//! Each talks to the driver in lines: it prints `ready ...` once set up and takes commands on
//! stdin; end of stdin makes it close its store and exit after printing `cpu SECONDS`. A
//! failure prints `error MESSAGE` and exits with status 1.

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mooncake_core::{Location, MemoryMetadataStore, MetadataStore};
use mooncake_meta_http::{serve_http, HttpEndpoints, HttpMetadataStore};
use mooncake_p2p::{Buffer, P2PConfig, P2PStore, PullMode, PullOptions};
use tokio::sync::mpsc;

pub(crate) type Fallible<T = ()> = Result<T, String>;

/// Wall-clock nanoseconds: every process runs on this machine, so their clocks agree.
pub(crate) fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// User plus system CPU seconds of this process (`RUSAGE_SELF`) or of its waited-for children
/// (`RUSAGE_CHILDREN`).
pub(crate) fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: `rusage` is a plain C struct for which all-zero bytes are a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage`; `who` is RUSAGE_SELF or RUSAGE_CHILDREN.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Lines of stdin; the channel closes at end of input.
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim().to_owned()).is_err() {
                break;
            }
        }
    });
    rx
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Deterministic bytes for `offset..offset + buf.len()` of the payload (splitmix64 of the word
/// index and `seed`); `offset` is a multiple of 8.
fn fill(buf: &mut [u8], offset: u64, seed: u64) {
    for (i, word) in buf.chunks_mut(8).enumerate() {
        let mut z = (offset / 8 + i as u64)
            .wrapping_add(seed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let bytes = z.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

const CHUNK: u64 = 8 << 20;

fn catalog(url: &str) -> Fallible<Arc<dyn MetadataStore>> {
    Ok(Arc::new(
        HttpMetadataStore::new(url).map_err(|e| e.to_string())?,
    ))
}

/// BLAKE3 of `len` bytes of registered memory at `addr`.
fn hash_copy(store: &P2PStore, addr: u64, len: u64) -> Fallible<String> {
    let region = store
        .engine()
        .memory()
        .resolve(addr, len)
        .map_err(|e| e.to_string())?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let mut at = 0;
    while at < len {
        let n = CHUNK.min(len - at);
        region
            .slice(at, n)
            .and_then(|r| r.read_into(&mut buf[..n as usize]))
            .map_err(|e| e.to_string())?;
        hasher.update(&buf[..n as usize]);
        at += n;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// The HTTP metadata server (`serve_http` over an in-memory store) on `listen`.
pub(crate) async fn meta(listen: &str) -> Fallible {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("bind {listen}: {e}"))?;
    let _server = serve_http(
        listener,
        HttpEndpoints {
            metadata: Some(Arc::new(MemoryMetadataStore::new())),
            metrics: Arc::new(String::new),
            health: Arc::new(|| true),
        },
    );
    let mut lines = stdin_lines();
    say("ready");
    while lines.recv().await.is_some() {}
    say(&format!("cpu {:.3}", cpu_seconds(libc::RUSAGE_SELF)));
    Ok(())
}

/// Fills `size` bytes from `seed`, registers them as `name` and serves until stdin ends.
/// Prints `ready HASH` (BLAKE3 of the payload).
pub(crate) async fn origin(
    url: &str,
    local: &str,
    name: &str,
    size: u64,
    shard: u64,
    piece_size: u64,
    seed: u64,
) -> Fallible {
    let config = P2PConfig {
        piece_size: (piece_size > 0).then_some(piece_size),
        ..P2PConfig::default()
    };
    let store = P2PStore::new(catalog(url)?, local, config)
        .await
        .map_err(|e| e.to_string())?;
    let addr = store
        .engine()
        .allocate_buffer(size as usize, Location::cpu(0))
        .map_err(|e| e.to_string())?;
    let region = store
        .engine()
        .memory()
        .resolve(addr, size)
        .map_err(|e| e.to_string())?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK.min(size) as usize];
    let mut at = 0;
    while at < size {
        let n = CHUNK.min(size - at);
        fill(&mut buf[..n as usize], at, seed);
        region
            .slice(at, n)
            .and_then(|r| r.write_from(&buf[..n as usize]))
            .map_err(|e| e.to_string())?;
        hasher.update(&buf[..n as usize]);
        at += n;
    }
    store
        .register(name, &[Buffer::new(addr, size)], shard, "", false)
        .await
        .map_err(|e| e.to_string())?;
    let mut lines = stdin_lines();
    say(&format!("ready {}", hasher.finalize().to_hex()));
    while lines.recv().await.is_some() {}
    let closed = store.close().await.map_err(|e| e.to_string());
    say(&format!("cpu {:.3}", cpu_seconds(libc::RUSAGE_SELF)));
    closed
}

/// Prepares a store and a destination of `size` bytes and prints `ready`; on `go`, pulls `name`
/// and prints `done START_NS END_NS PIECES FETCHED DUPLICATES FAILED_REQUESTS CORRUPT` (with
/// `half NS` first when `report_half`, once half the bytes are verified); it serves what it holds
/// meanwhile and afterwards. On `verify` it prints `hash HASH` of its copy.
pub(crate) async fn receiver(
    url: &str,
    local: &str,
    name: &str,
    size: u64,
    upstream: bool,
    report_half: bool,
) -> Fallible {
    let mut config = P2PConfig {
        pull_timeout: Duration::from_secs(1800),
        ..P2PConfig::default()
    };
    if upstream {
        config.mode = PullMode::Upstream;
    }
    let store = P2PStore::new(catalog(url)?, local, config)
        .await
        .map_err(|e| e.to_string())?;
    let addr = store
        .engine()
        .allocate_buffer(size as usize, Location::cpu(0))
        .map_err(|e| e.to_string())?;
    let mut lines = stdin_lines();
    say("ready");
    loop {
        match lines.recv().await.as_deref() {
            Some("go") => break,
            Some(_) => continue,
            None => return store.close().await.map_err(|e| e.to_string()),
        }
    }
    let start = now_ns();
    let verified = Arc::new(AtomicU64::new(0));
    let watcher = report_half.then(|| {
        let verified = verified.clone();
        tokio::spawn(async move {
            while verified.load(Ordering::Relaxed) < size / 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            say(&format!("half {}", now_ns()));
        })
    });
    let pulled = store
        .get_replica_with(
            name,
            &[Buffer::new(addr, size)],
            &PullOptions {
                progress: Some(verified.clone()),
                ..PullOptions::default()
            },
        )
        .await;
    let end = now_ns();
    if let Some(w) = watcher {
        w.abort();
    }
    let r = pulled.map_err(|e| format!("get_replica: {e}"))?;
    say(&format!(
        "done {start} {end} {} {} {} {} {}",
        r.pieces, r.fetched, r.duplicates, r.failed_requests, r.corrupt
    ));
    while let Some(line) = lines.recv().await {
        if line == "verify" {
            say(&format!("hash {}", hash_copy(&store, addr, size)?));
        }
    }
    let closed = store.close().await.map_err(|e| e.to_string());
    say(&format!("cpu {:.3}", cpu_seconds(libc::RUSAGE_SELF)));
    closed
}

/// Calibration sink: accepts `conns` connections on `listen`, prints `ready`, then for each one
/// `flow BYTES SECONDS` (from its first byte to its end).
pub(crate) fn sink(listen: &str, conns: usize) -> Fallible {
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    say("ready");
    let mut threads = Vec::new();
    for _ in 0..conns {
        let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            let (mut bytes, mut first, mut last) = (0u64, None, Instant::now());
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if first.is_none() {
                    first = Some(Instant::now());
                } else {
                    bytes += n as u64;
                }
                last = Instant::now();
            }
            let secs = first.map_or(0.0, |f| (last - f).as_secs_f64());
            say(&format!("flow {bytes} {secs:.6}"));
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Calibration source: sends to `to` for `secs` seconds.
pub(crate) fn source(to: &str, secs: f64) -> Fallible {
    let mut conn = TcpStream::connect(to).map_err(|e| format!("connect {to}: {e}"))?;
    let buf = vec![0x5au8; 256 << 10];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        conn.write_all(&buf).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::fill;

    #[test]
    fn fill_is_deterministic_and_offset_consistent() {
        let mut whole = vec![0u8; 64];
        fill(&mut whole, 0, 7);
        let mut tail = vec![0u8; 32];
        fill(&mut tail, 32, 7);
        assert_eq!(&whole[32..], &tail[..]);
        let mut other = vec![0u8; 64];
        fill(&mut other, 0, 8);
        assert_ne!(whole, other);
    }
}
