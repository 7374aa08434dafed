//! `transfer_engine_bench`: throughput and latency of the transfer engine over the TCP transport
//! (and, with `--protocol`, authenticated TCP, QUIC and same-host shared memory) on loopback,
//! next to a plain-socket baseline measured in the same run, between the same two processes.
//!
//! With no arguments it runs everything: it starts itself again as a child in `--mode target`
//! (a `TransferEngine` with a `TcpTransport` and one registered buffer filled with a known
//! pattern, plus a small blocking-socket baseline server), opens the child's segment by P2P
//! handshake, measures READ and WRITE for each size and lane count, and ends with a summary of
//! the performance targets. Run `transfer_engine_bench --help` for the flags.
//!
//! Every case first checks its data (READs against the target's pattern, WRITEs by reading them
//! back), so a broken path cannot be measured. Any transfer error ends the run with exit code 1;
//! a missed target does not.

mod baseline;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::Transport;
use mooncake_core::{
    AlignedBuffer, EngineConfig, Location, SegmentHandle, TransferEngine, TransferRequest,
};
use mooncake_transport_quic::{certs, QuicConfig, QuicTransport, TlsIdentity};
use mooncake_transport_shm::{ShmConfig, ShmTransport};
use mooncake_transport_tcp::{TcpConfig, TcpTransport};

const USAGE: &str = "\
transfer_engine_bench: TCP transfer engine vs plain sockets on loopback (127.0.0.1)

USAGE:
    transfer_engine_bench [FLAGS]

With no --mode, runs the whole benchmark: spawns itself as the target process, then measures.

FLAGS:
    --sizes LIST      transfer sizes, e.g. 4K,64K,1M,16M (default; suffixes K, M, G = KiB, MiB, GiB)
    --batch N|LIST    requests per batch: one value for every size, or one per size
                      (default by size: <=4K: 256, <=64K: 32, <=1M: 16, larger: 4)
    --lanes LIST      TcpConfig::lanes (QUIC: QuicConfig::connections_per_peer) values; each
                      case runs once per protocol and value (default 1,2)
    --protocol LIST   transports to measure, any of tcp, tcp-auth, quic, shm (default tcp);
                      each gets its own initiator engine, the target serves them all.
                      tcp-auth: TCP with both ends authenticated by certificate at connection
                      start (TcpConfig::auth), served by a second target engine over the same
                      buffer; shm: same-host shared memory (the target's buffer becomes a
                      memfd, for every protocol of the run). A comparison against plain TCP of
                      the same run follows the table when tcp is measured
    --quic-ca FILE    QUIC and tcp-auth: the cluster CA certificate (PEM); with --quic-cert and
    --quic-cert FILE  --quic-key (also spelled --tls-ca, --tls-cert, --tls-key). Without them, a
    --quic-key FILE   full run makes a throwaway CA and one node certificate for 127.0.0.1 in a
                      temporary directory, used by both processes, removed after
    --quic-mtu N      QUIC: the UDP payload size of a known path, used from the first packet
                      (QuicConfig::min_udp_payload and max_udp_payload; 1200..=6500). Default:
                      discover it, from 1200 up to 1452
    --seconds S       timed throughput phase per case, in seconds, over all rounds (default 2)
    --rounds N        split every case into N rounds, alternating baseline and engine
                      measurements so background load hits both alike (default 2)
    --inflight N      batches in flight at once per case (default 1)
    --json            print a JSON report on stdout (the human-readable report goes to stderr)
    --mode MODE       all (default) | target | initiator
    --segment NAME    initiator mode: the target's segment name (host:port)
    --auth-segment NAME  initiator mode with tcp-auth: the target's authenticating segment
    --baseline ADDR   initiator mode: the target's baseline server address (host:port)
    --buffer-bytes N  target mode: size of the registered buffer (default: what the cases need)
    -h, --help        this text

Baseline, measured between the same two processes: one blocking std::net TCP connection with
TCP_NODELAY, one request at a time (no pipelining):
    READ   the initiator sends an 8-byte request, the target answers with `size` bytes
    WRITE  the initiator sends `size` bytes, the target answers with 8 bytes
    PING   64 bytes each way (the reference for the 64-byte READ latency case)
Both sides of the baseline cycle through `batch` slots of `size` bytes, the memory footprint of
the engine case, so neither side runs from a cache-hot buffer the other cannot use.

Columns: GB/s and ops/s of the timed phase (GB = 1e9 bytes of payload); p50/p99 of one request
(batch 1, in a separate phase); thr/base = engine GB/s over baseline GB/s (same op and size);
p50/base = engine p50 over baseline p50 (same op and size; the ping-pong for the 64-byte case).

Targets evaluated at the end (from this run's numbers):
    (1) transfers >= 1 MiB: >= 0.9x the single-connection baseline with 1 lane, >= 1.5x with 2
    (2) batched 4 KiB transfers: >= 200k requests/s
    (3) 64-byte READ round trip p50 <= 2x the baseline 64-byte ping-pong p50
    (4) QUIC transfers >= 16 MiB with several connections: >= 1.5 GB/s
    (5) authenticated TCP against plain TCP (same op, size, lanes): >= 0.95x at >= 1 MiB,
        >= 0.9x below
Targets (1) to (3) are evaluated on plain TCP rows only.
";

/// When set, human-readable output goes to stderr (stdout carries the JSON report).
static JSON_MODE: AtomicBool = AtomicBool::new(false);

fn emit(s: &str) {
    if JSON_MODE.load(Ordering::Relaxed) {
        eprintln!("{s}");
    } else {
        println!("{s}");
    }
}

macro_rules! say {
    ($($t:tt)*) => { emit(&format!($($t)*)) };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    All,
    Target,
    Initiator,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "READ",
            Op::Write => "WRITE",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Tcp,
    /// TCP with both ends authenticated at connection start.
    TcpAuth,
    Quic,
    /// Same-host shared memory (no lanes: measured once, with the first `--lanes` value).
    Shm,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::TcpAuth => "tcp-auth",
            Protocol::Quic => "quic",
            Protocol::Shm => "shm",
        }
    }

    /// True for protocols that need the certificate files.
    fn needs_certificates(self) -> bool {
        matches!(self, Protocol::TcpAuth | Protocol::Quic)
    }
}

#[derive(Clone, Debug)]
struct Args {
    mode: Mode,
    protocols: Vec<Protocol>,
    quic_ca: Option<PathBuf>,
    quic_cert: Option<PathBuf>,
    quic_key: Option<PathBuf>,
    quic_mtu: Option<u16>,
    sizes: Vec<u64>,
    batch: Option<Vec<usize>>,
    lanes: Vec<usize>,
    seconds: f64,
    rounds: usize,
    inflight: usize,
    json: bool,
    buffer_bytes: Option<u64>,
    segment: Option<String>,
    auth_segment: Option<String>,
    baseline: Option<SocketAddr>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            mode: Mode::All,
            protocols: vec![Protocol::Tcp],
            quic_ca: None,
            quic_cert: None,
            quic_key: None,
            quic_mtu: None,
            sizes: vec![4 << 10, 64 << 10, 1 << 20, 16 << 20],
            batch: None,
            lanes: vec![1, 2],
            seconds: 2.0,
            rounds: 2,
            inflight: 1,
            json: false,
            buffer_bytes: None,
            segment: None,
            auth_segment: None,
            baseline: None,
        }
    }
}

/// Size of the dedicated latency case and of the baseline ping-pong.
const SMALL: u64 = 64;
/// Requests per second needed by target (2).
const TARGET_SMALL_OPS: f64 = 200_000.0;
/// GB/s needed by target (4) for QUIC transfers of at least 16 MiB.
const TARGET_QUIC_GBPS: f64 = 1.5;

impl Args {
    /// Requests per batch for size number `i`.
    fn batch_for(&self, i: usize) -> usize {
        match &self.batch {
            Some(b) if b.len() == 1 => b[0],
            Some(b) => b[i],
            None => match self.sizes[i] {
                s if s <= 4 << 10 => 256,
                s if s <= 64 << 10 => 32,
                s if s <= 1 << 20 => 16,
                _ => 4,
            },
        }
    }

    /// Bytes each side must have registered: the largest `size * batch * inflight`.
    fn buffer_needed(&self) -> u64 {
        let most = (0..self.sizes.len())
            .map(|i| self.sizes[i] * (self.batch_for(i) * self.inflight) as u64)
            .max()
            .unwrap_or(0)
            .max(SMALL);
        most.div_ceil(1 << 20) << 20
    }

    fn uses(&self, p: Protocol) -> bool {
        self.protocols.contains(&p)
    }

    /// The identity (of QUIC and authenticated TCP) from the certificate files.
    fn identity(&self) -> Result<TlsIdentity, String> {
        match (&self.quic_ca, &self.quic_cert, &self.quic_key) {
            (Some(ca), Some(cert), Some(key)) => {
                TlsIdentity::from_pem_files(ca, cert, key).map_err(|e| e.to_string())
            }
            _ => Err("QUIC and tcp-auth need --quic-ca, --quic-cert and --quic-key".into()),
        }
    }

    /// A TCP transport with `lanes` lanes, authenticating both ends when `auth`.
    fn tcp(&self, lanes: usize, auth: bool) -> Result<Arc<TcpTransport>, String> {
        TcpTransport::new(TcpConfig {
            lanes,
            auth: if auth { Some(self.identity()?) } else { None },
            ..TcpConfig::default()
        })
        .map_err(|e| e.to_string())
    }

    /// A QUIC transport with `connections` per peer.
    fn quic(&self, connections: usize) -> Result<Arc<QuicTransport>, String> {
        let mut config = QuicConfig::new(self.identity()?);
        config.connections_per_peer = connections;
        if let Some(mtu) = self.quic_mtu {
            config.min_udp_payload = mtu;
            config.max_udp_payload = mtu;
        }
        QuicTransport::new(config).map_err(|e| e.to_string())
    }

    /// Timed throughput phase of one round of a case.
    fn timed(&self) -> Duration {
        Duration::from_secs_f64(self.seconds / self.rounds as f64)
    }

    /// Untimed warm-up before each timed phase.
    fn warmup(&self) -> Duration {
        Duration::from_secs_f64((self.seconds / self.rounds as f64 / 10.0).clamp(0.02, 0.1))
    }

    /// Batch-1 latency phase of one round of a case.
    fn latency_phase(&self) -> Duration {
        Duration::from_secs_f64((self.seconds / 4.0).clamp(0.05, 1.0) / self.rounds as f64)
    }

    /// One round of the 64-byte latency cases (engine and ping-pong).
    fn small_phase(&self) -> Duration {
        Duration::from_secs_f64((self.seconds / 2.0).clamp(0.1, 2.0) / self.rounds as f64)
    }
}

/// A size flag: [`mooncake_core::parse_size`]'s rules, and not zero.
fn positive_size(s: &str) -> Result<u64, String> {
    match mooncake_core::parse_size(s) {
        Ok(0) => Err(format!("bad size {s:?}: must be positive")),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("bad size: {e}")),
    }
}

fn parse_list<T>(s: &str, f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    let v = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| f(p.trim()))
        .collect::<Result<Vec<T>, String>>()?;
    if v.is_empty() {
        return Err(format!("empty list {s:?}"));
    }
    Ok(v)
}

fn parse_count(s: &str) -> Result<usize, String> {
    s.parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("bad count {s:?}"))
}

fn parse_args(argv: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--mode" => {
                a.mode = match value()?.as_str() {
                    "all" => Mode::All,
                    "target" => Mode::Target,
                    "initiator" => Mode::Initiator,
                    other => return Err(format!("unknown mode {other:?}")),
                }
            }
            "--sizes" => a.sizes = parse_list(&value()?, positive_size)?,
            "--batch" => a.batch = Some(parse_list(&value()?, parse_count)?),
            "--lanes" => a.lanes = parse_list(&value()?, parse_count)?,
            "--protocol" => {
                let mut protocols = parse_list(&value()?, |p| match p {
                    "tcp" => Ok(Protocol::Tcp),
                    "tcp-auth" => Ok(Protocol::TcpAuth),
                    "quic" => Ok(Protocol::Quic),
                    "shm" => Ok(Protocol::Shm),
                    other => Err(format!(
                        "unknown protocol {other:?} (tcp, tcp-auth, quic or shm)"
                    )),
                })?;
                a.protocols.clear();
                for p in protocols.drain(..) {
                    if !a.protocols.contains(&p) {
                        a.protocols.push(p);
                    }
                }
            }
            "--quic-ca" | "--tls-ca" => a.quic_ca = Some(value()?.into()),
            "--quic-cert" | "--tls-cert" => a.quic_cert = Some(value()?.into()),
            "--quic-key" | "--tls-key" => a.quic_key = Some(value()?.into()),
            "--quic-mtu" => {
                let v = value()?;
                a.quic_mtu = Some(
                    v.parse::<u16>()
                        .ok()
                        .filter(|m| (1200..=mooncake_transport_quic::MAX_UDP_PAYLOAD).contains(m))
                        .ok_or_else(|| format!("bad --quic-mtu {v:?} (1200..=6500)"))?,
                );
            }
            "--inflight" => a.inflight = parse_count(&value()?)?,
            "--rounds" => a.rounds = parse_count(&value()?)?,
            "--seconds" => {
                let v = value()?;
                a.seconds = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0)
                    .ok_or_else(|| format!("bad --seconds {v:?}"))?;
            }
            "--json" => a.json = true,
            "--buffer-bytes" => a.buffer_bytes = Some(positive_size(&value()?)?),
            "--segment" => a.segment = Some(value()?),
            "--auth-segment" => a.auth_segment = Some(value()?),
            "--baseline" => {
                let v = value()?;
                a.baseline = Some(v.parse().map_err(|_| format!("bad --baseline {v:?}"))?);
            }
            _ => return Err(format!("unknown argument {arg:?} (try --help)")),
        }
    }
    if let Some(b) = &a.batch {
        if b.len() != 1 && b.len() != a.sizes.len() {
            return Err(format!(
                "--batch has {} values for {} sizes",
                b.len(),
                a.sizes.len()
            ));
        }
    }
    if a.lanes.iter().any(|&l| l > 64) {
        return Err("--lanes values must be 1..=64".into());
    }
    let cert_flags = [&a.quic_ca, &a.quic_cert, &a.quic_key]
        .iter()
        .filter(|f| f.is_some())
        .count();
    if cert_flags != 0 && cert_flags != 3 {
        return Err("--quic-ca, --quic-cert and --quic-key go together".into());
    }
    Ok(a)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the tokio runtime: {e}"))
}

fn main() {
    let code = match parse_args(std::env::args().skip(1)) {
        Err(e) => {
            eprintln!("transfer_engine_bench: {e}");
            2
        }
        Ok(args) => {
            JSON_MODE.store(args.json, Ordering::Relaxed);
            let r = match args.mode {
                Mode::Target => run_target(&args),
                Mode::All => run_all(&args),
                Mode::Initiator => run_initiator_mode(&args),
            };
            match r {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("transfer_engine_bench: error: {e}");
                    1
                }
            }
        }
    };
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// Target process
// ---------------------------------------------------------------------------------------------

/// Serves one registered buffer (filled with pattern 0) and the baseline server until stdin
/// closes.
fn run_target(args: &Args) -> Result<(), String> {
    let len = args.buffer_bytes.unwrap_or_else(|| args.buffer_needed());
    let rt = runtime()?;
    let baseline_addr =
        baseline::start_server().map_err(|e| format!("starting the baseline server: {e}"))?;
    let (engine, auth_engine, addr) = rt.block_on(async {
        let mut transports: Vec<Arc<dyn Transport>> = Vec::new();
        if args.uses(Protocol::Shm) {
            // First, so that the engine's buffer is a memfd same-host peers can map.
            transports.push(ShmTransport::new(ShmConfig::default()).map_err(|e| e.to_string())?);
        }
        transports.push(args.tcp(TcpConfig::default().lanes, false)?);
        if args.uses(Protocol::Quic) {
            transports.push(args.quic(1)?);
        }
        let engine = TransferEngine::start(EngineConfig::new("127.0.0.1"), transports)
            .await
            .map_err(|e| format!("starting the target engine: {e}"))?;
        let addr = engine
            .allocate_buffer(len as usize, Location::cpu(0))
            .map_err(|e| format!("allocating {len} bytes: {e}"))?;
        // Authenticated TCP: a second engine (an engine has one endpoint per protocol) serving
        // the same buffer.
        let auth_engine = if args.uses(Protocol::TcpAuth) {
            let e = TransferEngine::start(
                EngineConfig::new("127.0.0.1"),
                vec![args.tcp(TcpConfig::default().lanes, true)?],
            )
            .await
            .map_err(|e| format!("starting the authenticating target engine: {e}"))?;
            // SAFETY: the buffer is registered (and kept alive) by `engine`, which outlives
            // this registration: it is unregistered before `engine` shuts down.
            unsafe { e.register_memory(addr, len, Location::cpu(0)) }
                .map_err(|e| format!("registering the buffer for tcp-auth: {e}"))?;
            Some(e)
        } else {
            None
        };
        Ok::<_, String>((engine, auth_engine, addr))
    })?;
    fill_registered(&engine, addr, len, 0)?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "READY segment={} addr={addr:#x} len={len} baseline={baseline_addr} pid={}{}",
            engine.segment_name(),
            std::process::id(),
            auth_engine.as_ref().map_or(String::new(), |e| format!(
                " auth_segment={}",
                e.segment_name()
            ))
        )
        .and_then(|()| out.flush())
        .map_err(|e| format!("writing the ready line: {e}"))?;
    }
    // Serve until the parent closes our stdin (or dies).
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin().lock();
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    if let Some(e) = auth_engine {
        rt.block_on(e.shutdown());
        let _ = e.unregister_memory(addr);
    }
    rt.block_on(engine.shutdown());
    Ok(())
}

/// Writes pattern `seed` (offsets relative to `base`) over `[base, base + len)`.
fn fill_registered(engine: &TransferEngine, base: u64, len: u64, seed: u64) -> Result<(), String> {
    let mut chunk = vec![0u8; (1usize << 20).min(len as usize)];
    let mut off = 0u64;
    while off < len {
        let n = (chunk.len() as u64).min(len - off) as usize;
        baseline::fill_pattern(seed, off, &mut chunk[..n]);
        engine
            .memory()
            .resolve(base + off, n as u64)
            .and_then(|r| r.write_from(&chunk[..n]))
            .map_err(|e| format!("filling registered memory: {e}"))?;
        off += n as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Full run: spawn the target, then measure
// ---------------------------------------------------------------------------------------------

/// The target child: closing its stdin ends it; dropping this waits for it (then kills it).
struct TargetChild {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Kept open so the child never writes into a closed pipe.
    stdout: Option<BufReader<ChildStdout>>,
}

impl Drop for TargetChild {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the initiator knows about the target.
struct TargetInfo {
    segment: String,
    /// The segment of the target's authenticating engine (tcp-auth).
    auth_segment: Option<String>,
    addr: Option<u64>,
    baseline: SocketAddr,
    pid: Option<u32>,
}

/// A temporary directory of throwaway QUIC certificates, removed on drop.
struct CertDir(PathBuf);

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Makes a throwaway CA and one node certificate for 127.0.0.1 (used by both processes) in a
/// new temporary directory, and points `args` at them.
fn throwaway_certs(args: &mut Args) -> Result<CertDir, String> {
    let dir = std::env::temp_dir().join(format!("transfer_engine_bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let dir = CertDir(dir);
    let ca = certs::new_ca("transfer_engine_bench throwaway CA").map_err(|e| e.to_string())?;
    let node = certs::issue_node_cert(&ca, "transfer_engine_bench", &["127.0.0.1"])
        .map_err(|e| e.to_string())?;
    let write = |name: &str, text: &str| {
        let path = dir.0.join(name);
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok::<_, String>(path)
    };
    args.quic_ca = Some(write("ca.pem", &ca.cert_pem)?);
    args.quic_cert = Some(write("node.pem", &node.cert_pem)?);
    args.quic_key = Some(write("node.key", &node.key_pem)?);
    Ok(dir)
}

fn run_all(args: &Args) -> Result<(), String> {
    let mut args = args.clone();
    let _certs = if args.protocols.iter().any(|p| p.needs_certificates()) && args.quic_ca.is_none()
    {
        Some(throwaway_certs(&mut args)?)
    } else {
        None
    };
    let args = &args;
    let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    let len = args.buffer_needed();
    let mut child_args: Vec<String> = [
        "--mode",
        "target",
        "--buffer-bytes",
        &len.to_string(),
        "--protocol",
        &args
            .protocols
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(","),
    ]
    .map(String::from)
    .to_vec();
    if let (Some(ca), Some(cert), Some(key)) = (&args.quic_ca, &args.quic_cert, &args.quic_key) {
        for (flag, path) in [
            ("--quic-ca", ca),
            ("--quic-cert", cert),
            ("--quic-key", key),
        ] {
            child_args.push(flag.into());
            child_args.push(path.display().to_string());
        }
    }
    if let Some(mtu) = args.quic_mtu {
        child_args.push("--quic-mtu".into());
        child_args.push(mtu.to_string());
    }
    let mut child = Command::new(&exe)
        .args(&child_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("spawning {}: {e}", exe.display()))?;
    let pid = child.id();
    let mut guard = TargetChild {
        stdin: child.stdin.take(),
        stdout: child.stdout.take().map(BufReader::new),
        child,
    };
    let mut line = String::new();
    guard
        .stdout
        .as_mut()
        .expect("piped stdout")
        .read_line(&mut line)
        .map_err(|e| format!("reading the target's ready line: {e}"))?;
    let target = parse_ready(&line, pid)?;
    run_initiator(args, &target)
}

/// Parses `READY segment=.. addr=0x.. len=.. baseline=.. pid=..`.
fn parse_ready(line: &str, pid: u32) -> Result<TargetInfo, String> {
    let line = line.trim();
    if !line.starts_with("READY ") {
        return Err(format!(
            "the target did not start (its first line was {line:?})"
        ));
    }
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .ok_or_else(|| format!("no {key}= in the target's ready line {line:?}"))
    };
    let addr = field("addr")?;
    let addr = u64::from_str_radix(addr.trim_start_matches("0x"), 16)
        .map_err(|_| format!("bad addr in {line:?}"))?;
    let baseline = field("baseline")?
        .parse()
        .map_err(|_| format!("bad baseline address in {line:?}"))?;
    Ok(TargetInfo {
        segment: field("segment")?.to_owned(),
        auth_segment: field("auth_segment").ok().map(str::to_owned),
        addr: Some(addr),
        baseline,
        pid: Some(pid),
    })
}

fn run_initiator_mode(args: &Args) -> Result<(), String> {
    let (Some(segment), Some(baseline)) = (args.segment.clone(), args.baseline) else {
        return Err("--mode initiator needs --segment and --baseline".into());
    };
    run_initiator(
        args,
        &TargetInfo {
            segment,
            auth_segment: args.auth_segment.clone(),
            addr: None,
            baseline,
            pid: None,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Initiator: engine cases
// ---------------------------------------------------------------------------------------------

/// One initiator engine (one `lanes` setting) and the opened target segment.
#[derive(Clone)]
struct Lanes {
    protocol: Protocol,
    lanes: usize,
    engine: Arc<TransferEngine>,
    seg: SegmentHandle,
    /// Start of the local buffer (shared by every engine).
    local: u64,
    /// Start of the target's buffer.
    remote: u64,
}

/// Runs `batch` requests of `size` bytes at offset `off + i * size` of both buffers, in one
/// `transfer` call. Any failed request is an error.
async fn transfer_batch(
    l: &Lanes,
    op: Op,
    size: u64,
    batch: usize,
    off: u64,
) -> Result<(), String> {
    let reqs = (0..batch as u64)
        .map(|i| {
            let o = off + i * size;
            match op {
                Op::Read => TransferRequest::read(&l.seg, l.remote + o, l.local + o, size),
                Op::Write => TransferRequest::write(&l.seg, l.remote + o, l.local + o, size),
            }
        })
        .collect();
    for (i, r) in l.engine.transfer(reqs).await.into_iter().enumerate() {
        if let Err(e) = r {
            return Err(format!(
                "{} {} of {size} B failed (request {i} of a batch of {batch}, lanes {}): {e}",
                l.protocol.name(),
                op.name(),
                l.lanes
            ));
        }
    }
    Ok(())
}

const POISON: u8 = 0xA5;

/// Checks the data path of a case with one batch of its shape at offset `off`.
///
/// READ: poisons the local range, reads, and compares with the target's pattern (seed 0).
/// WRITE: writes pattern `seed`, poisons the local range, reads back and compares; then restores
/// pattern 0 locally, so the timed WRITEs keep the target's pattern intact for later READ checks.
async fn verify(
    l: &Lanes,
    op: Op,
    size: u64,
    batch: usize,
    off: u64,
    seed: u64,
) -> Result<(), String> {
    let len = size * batch as u64;
    let local = l
        .engine
        .memory()
        .resolve(l.local + off, len)
        .map_err(|e| e.to_string())?;
    let poison = vec![POISON; len as usize];
    let set = |data: &[u8]| local.write_from(data).map_err(|e| e.to_string());
    let check = |seed: u64, what: &str| match baseline::first_mismatch(seed, off, &local.to_vec()) {
        None => Ok(()),
        Some(i) => Err(format!(
            "data check failed: {} {what} {} x {size} B (lanes {}): byte {i} of the batch \
             differs from the expected pattern",
            l.protocol.name(),
            batch,
            l.lanes
        )),
    };
    match op {
        Op::Read => {
            set(&poison)?;
            transfer_batch(l, Op::Read, size, batch, off).await?;
            check(0, "READ")
        }
        Op::Write => {
            set(&baseline::pattern(seed, off, len as usize))?;
            transfer_batch(l, Op::Write, size, batch, off).await?;
            set(&poison)?;
            transfer_batch(l, Op::Read, size, batch, off).await?;
            check(seed, "WRITE (read back)")?;
            set(&baseline::pattern(0, off, len as usize))
        }
    }
}

/// Runs batches back to back for `dur` with `inflight` batches at a time; returns the number of
/// requests completed and the elapsed time.
async fn throughput(
    l: &Lanes,
    op: Op,
    size: u64,
    batch: usize,
    inflight: usize,
    dur: Duration,
) -> Result<(u64, Duration), String> {
    let start = Instant::now();
    if inflight == 1 {
        let mut batches = 0u64;
        loop {
            transfer_batch(l, op, size, batch, 0).await?;
            batches += 1;
            if start.elapsed() >= dur {
                return Ok((batches * batch as u64, start.elapsed()));
            }
        }
    }
    let mut tasks = Vec::with_capacity(inflight);
    for t in 0..inflight {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let off = (t * batch) as u64 * size;
            let mut batches = 0u64;
            loop {
                transfer_batch(&l, op, size, batch, off).await?;
                batches += 1;
                if start.elapsed() >= dur {
                    return Ok::<_, String>((batches, Instant::now()));
                }
            }
        }));
    }
    let mut requests = 0;
    let mut end = start;
    for t in tasks {
        let (batches, done) = t.await.map_err(|e| format!("benchmark task: {e}"))??;
        requests += batches * batch as u64;
        end = end.max(done);
    }
    Ok((requests, end - start))
}

/// Times single-request transfers (batch 1) for `dur`, cycling over `slots` slots of `size`.
async fn latency(
    l: &Lanes,
    op: Op,
    size: u64,
    slots: usize,
    dur: Duration,
) -> Result<(Vec<u64>, Duration), String> {
    let mut samples = Vec::new();
    let start = Instant::now();
    let mut k = 0u64;
    while (start.elapsed() < dur || samples.len() < 20) && samples.len() < 2_000_000 {
        let off = (k % slots as u64) * size;
        let t = Instant::now();
        transfer_batch(l, op, size, 1, off).await?;
        samples.push(t.elapsed().as_nanos() as u64);
        k += 1;
    }
    Ok((samples, start.elapsed()))
}

/// One round of an engine case.
#[derive(Clone, Copy, Debug)]
struct Spec {
    op: Op,
    size: u64,
    batch: usize,
    inflight: usize,
    /// Check the data path first (first round only), with this seed for WRITE data.
    verify_seed: Option<u64>,
    warmup: Duration,
    /// Timed throughput phase.
    timed: Duration,
    /// Batch-1 latency phase.
    lat: Duration,
}

/// Raw results of one round of an engine case.
struct EngineCase {
    requests: u64,
    elapsed: Duration,
    lat_samples: Vec<u64>,
}

async fn engine_case(l: Lanes, s: Spec) -> Result<EngineCase, String> {
    if let Some(seed) = s.verify_seed {
        for t in 0..s.inflight {
            let off = (t * s.batch) as u64 * s.size;
            verify(&l, s.op, s.size, s.batch, off, seed).await?;
        }
    }
    throughput(&l, s.op, s.size, s.batch, s.inflight, s.warmup).await?;
    let (requests, elapsed) = throughput(&l, s.op, s.size, s.batch, s.inflight, s.timed).await?;
    let (lat_samples, _) = latency(&l, s.op, s.size, s.batch, s.lat).await?;
    Ok(EngineCase {
        requests,
        elapsed,
        lat_samples,
    })
}

/// One round of the dedicated 64-byte READ latency case: samples and the timed duration.
async fn small_read_case(
    l: Lanes,
    verify_seed: Option<u64>,
    warmup: Duration,
    dur: Duration,
) -> Result<(Vec<u64>, Duration), String> {
    if let Some(seed) = verify_seed {
        verify(&l, Op::Read, SMALL, 1, 0, seed).await?;
    }
    latency(&l, Op::Read, SMALL, 1, warmup).await?;
    latency(&l, Op::Read, SMALL, 1, dur).await
}

// ---------------------------------------------------------------------------------------------
// Initiator: orchestration and report
// ---------------------------------------------------------------------------------------------

/// One line of the report.
struct Row {
    /// false for the plain-socket baseline.
    engine: bool,
    /// The engine's transport (`-` for the baseline).
    protocol: &'static str,
    /// `READ`, `WRITE` or `PING`.
    op: &'static str,
    size: u64,
    batch: usize,
    /// 0 for the baseline.
    lanes: usize,
    gbps: f64,
    ops: f64,
    p50_us: f64,
    p99_us: f64,
    /// Engine GB/s over the baseline's, same op and size.
    thr_ratio: Option<f64>,
    /// Engine p50 (batch 1) over the baseline's p50 (same op and size, or the ping-pong).
    p50_ratio: Option<f64>,
    /// The dedicated 64-byte latency case (GB/s and ops/s come from its batch-1 loop).
    latency_case: bool,
}

/// (p50, p99) in microseconds, nearest rank.
fn percentiles(samples: &mut [u64]) -> (f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    samples.sort_unstable();
    let at = |p: f64| {
        let rank = (p / 100.0 * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1] as f64 / 1000.0
    };
    (at(50.0), at(99.0))
}

/// A measurement summed over its rounds.
#[derive(Default)]
struct Acc {
    /// Requests completed in the timed phases.
    ops: u64,
    /// Total duration of the timed phases.
    elapsed: Duration,
    /// Single-request times in nanoseconds.
    samples: Vec<u64>,
}

impl Acc {
    fn add(&mut self, ops: u64, elapsed: Duration, mut samples: Vec<u64>) {
        self.ops += ops;
        self.elapsed += elapsed;
        self.samples.append(&mut samples);
    }

    fn into_row(
        mut self,
        engine: bool,
        protocol: &'static str,
        op: &'static str,
        size: u64,
        batch: usize,
        lanes: usize,
    ) -> Row {
        let (p50_us, p99_us) = percentiles(&mut self.samples);
        let secs = self.elapsed.as_secs_f64();
        Row {
            engine,
            protocol,
            op,
            size,
            batch,
            lanes,
            gbps: (self.ops * size) as f64 / secs / 1e9,
            ops: self.ops as f64 / secs,
            p50_us,
            p99_us,
            thr_ratio: None,
            p50_ratio: None,
            latency_case: false,
        }
    }
}

fn fmt_size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn fmt_ops(ops: f64) -> String {
    if ops >= 1e6 {
        format!("{:.2}M", ops / 1e6)
    } else if ops >= 1e3 {
        format!("{:.1}k", ops / 1e3)
    } else {
        format!("{ops:.1}")
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
}

fn print_header() {
    say!(
        "{:<11} {:>8} {:>7} {:>5} {:>5} {:>7} {:>8} {:>9} {:>9} {:>8} {:>8}",
        "case",
        "proto",
        "size",
        "batch",
        "lanes",
        "GB/s",
        "ops/s",
        "p50 us",
        "p99 us",
        "thr/base",
        "p50/base"
    );
}

fn print_row(r: &Row) {
    let case = match (r.engine, r.latency_case) {
        (false, _) => format!("base {}", r.op),
        (true, true) => format!("{} lat", r.op),
        (true, false) => r.op.to_owned(),
    };
    let lanes = if r.engine {
        r.lanes.to_string()
    } else {
        "-".into()
    };
    say!(
        "{:<11} {:>8} {:>7} {:>5} {:>5} {:>7.3} {:>8} {:>9.1} {:>9.1} {:>8} {:>8}",
        case,
        r.protocol,
        fmt_size(r.size),
        r.batch,
        lanes,
        r.gbps,
        fmt_ops(r.ops),
        r.p50_us,
        r.p99_us,
        fmt_ratio(r.thr_ratio),
        fmt_ratio(r.p50_ratio)
    );
}

/// Finds the target's buffer in its descriptor and checks it is large enough.
fn pick_remote(seg: &SegmentHandle, addr: Option<u64>, need: u64) -> Result<u64, String> {
    let buf = match addr {
        Some(a) => seg.buffers.iter().find(|b| b.addr == a).ok_or_else(|| {
            format!(
                "segment {} does not list the buffer {a:#x} its target printed",
                seg.name
            )
        })?,
        None => seg
            .buffers
            .iter()
            .max_by_key(|b| b.len)
            .ok_or_else(|| format!("segment {} has no registered buffer", seg.name))?,
    };
    if buf.len < need {
        return Err(format!(
            "the target's buffer has {} bytes; these cases need {need}",
            buf.len
        ));
    }
    Ok(buf.addr)
}

fn run_initiator(args: &Args, target: &TargetInfo) -> Result<(), String> {
    let need = args.buffer_needed();
    // Declared before the runtime and the engines, so it is dropped after them: no task can
    // touch it once it is freed.
    let local = AlignedBuffer::new(need as usize).map_err(|e| e.to_string())?;
    let local_base = local.addr();
    let rt = runtime()?;
    let engines: Vec<Lanes> = rt.block_on(async {
        let mut v = Vec::new();
        for (protocol, lanes) in args.protocols.iter().flat_map(|&p| {
            // Shared memory has no lanes: once, with the first value.
            let lanes = if p == Protocol::Shm {
                &args.lanes[..1]
            } else {
                &args.lanes[..]
            };
            lanes.iter().map(move |&l| (p, l))
        }) {
            let transports: Vec<Arc<dyn Transport>> = match protocol {
                Protocol::Tcp => vec![args.tcp(lanes, false)?],
                Protocol::TcpAuth => vec![args.tcp(lanes, true)?],
                Protocol::Quic => vec![args.quic(lanes)?],
                // TCP behind it for the descriptor (the handshake).
                Protocol::Shm => vec![
                    ShmTransport::new(ShmConfig::default()).map_err(|e| e.to_string())?,
                    args.tcp(lanes, false)?,
                ],
            };
            let engine = TransferEngine::start(EngineConfig::new("127.0.0.1"), transports)
                .await
                .map_err(|e| format!("starting an initiator engine: {e}"))?;
            // SAFETY: `local` outlives every access through this registration: the engines are
            // shut down and the buffer unregistered before it is dropped, and on early return the
            // runtime (whose tasks are the only other users) is dropped first.
            unsafe { engine.register_memory(local_base, need, Location::cpu(0)) }
                .map_err(|e| format!("registering the local buffer: {e}"))?;
            let seg = match protocol {
                Protocol::Tcp | Protocol::Shm => engine
                    .open_segment(&target.segment)
                    .await
                    .map_err(|e| format!("opening segment {}: {e}", target.segment))?,
                Protocol::TcpAuth => {
                    let name = target.auth_segment.as_ref().ok_or(
                        "tcp-auth needs the target's authenticating segment (--auth-segment)",
                    )?;
                    engine
                        .open_segment(name)
                        .await
                        .map_err(|e| format!("opening segment {name}: {e}"))?
                }
                // The segment is named after its TCP endpoint (the target's first transport),
                // which a QUIC-only engine cannot ask: take the descriptor over TCP.
                Protocol::Quic => {
                    let tcp = TcpTransport::new(TcpConfig::default()).map_err(|e| e.to_string())?;
                    let desc = tcp.handshake(&target.segment).await;
                    tcp.shutdown().await;
                    Arc::new(desc.map_err(|e| {
                        format!("asking segment {} for its descriptor: {e}", target.segment)
                    })?)
                }
            };
            let remote = pick_remote(&seg, target.addr, need)?;
            v.push(Lanes {
                protocol,
                lanes,
                engine,
                seg,
                local: local_base,
                remote,
            });
        }
        Ok::<_, String>(v)
    })?;
    let first = engines.first().ok_or("no --lanes given")?;
    fill_registered(&first.engine, local_base, need, 0)?;

    say!(
        "transfer_engine_bench: {} transfer engine vs one plain TCP connection, loopback, {} cores",
        args.protocols
            .iter()
            .map(|p| p.name().to_uppercase())
            .collect::<Vec<_>>()
            .join(" and "),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    say!(
        "target: segment {}{}, buffer {:#x} ({}), baseline server {}",
        target.segment,
        target.pid.map_or(String::new(), |p| format!(" (pid {p})")),
        first.remote,
        fmt_size(need),
        target.baseline
    );
    let batches: Vec<String> = (0..args.sizes.len())
        .map(|i| args.batch_for(i).to_string())
        .collect();
    say!(
        "sizes {}; batches {}; protocols {:?}; lanes {:?}; inflight {}; per case: {} rounds of {:.2} s timed \
         (after {:.2} s warm-up) + {:.2} s of batch-1 latency; baseline and engine alternate",
        args.sizes
            .iter()
            .map(|&s| fmt_size(s))
            .collect::<Vec<_>>()
            .join(","),
        batches.join(","),
        args.protocols.iter().map(|p| p.name()).collect::<Vec<_>>(),
        args.lanes,
        args.inflight,
        args.rounds,
        args.timed().as_secs_f64(),
        args.warmup().as_secs_f64(),
        args.latency_phase().as_secs_f64()
    );
    say!(
        "GB/s = 1e9 bytes/s of payload; baseline = blocking std::net, TCP_NODELAY, one request at \
         a time; latency = one request (batch 1)"
    );
    say!("");
    print_header();

    let mut rows: Vec<Row> = Vec::new();
    let mut seed = 1u64;
    let mut next_seed = || {
        seed += 1;
        seed
    };
    let rounds = args.rounds;
    let warmup = args.warmup();

    // 64-byte round trips: ping-pong baseline and an engine READ per lane setting, alternated.
    let mut ping = Acc::default();
    let mut ping_conn = baseline::Client::connect(target.baseline, baseline::Kind::Ping, SMALL, 1)?;
    let mut small: Vec<Acc> = engines.iter().map(|_| Acc::default()).collect();
    for round in 0..rounds {
        let m = ping_conn.measure(args.small_phase(), warmup)?;
        ping.add(m.ops, m.elapsed, m.samples);
        for (acc, l) in small.iter_mut().zip(&engines) {
            let verify_seed = (round == 0).then(&mut next_seed);
            let fut = small_read_case(l.clone(), verify_seed, warmup, args.small_phase());
            let (samples, elapsed) = in_task(&rt, fut)?;
            acc.add(samples.len() as u64, elapsed, samples);
        }
    }
    let ping = ping.into_row(false, "-", "PING", SMALL, 1, 0);
    print_row(&ping);
    let ping_p50 = ping.p50_us;
    rows.push(ping);
    for (acc, l) in small.into_iter().zip(&engines) {
        let mut row = acc.into_row(true, l.protocol.name(), "READ", SMALL, 1, l.lanes);
        row.latency_case = true;
        row.p50_ratio = Some(row.p50_us / ping_p50);
        print_row(&row);
        rows.push(row);
    }

    // Per size, in rounds: the baseline of each op, then the engine cases.
    const OPS: [(Op, baseline::Kind); 2] = [
        (Op::Read, baseline::Kind::Read),
        (Op::Write, baseline::Kind::Write),
    ];
    for (i, &size) in args.sizes.iter().enumerate() {
        let batch = args.batch_for(i);
        let slots = (batch * args.inflight) as u64;
        let mut base: Vec<Acc> = OPS.iter().map(|_| Acc::default()).collect();
        let mut conns = OPS
            .iter()
            .map(|&(_, kind)| baseline::Client::connect(target.baseline, kind, size, slots))
            .collect::<Result<Vec<_>, String>>()?;
        let mut eng: Vec<Vec<Acc>> = OPS
            .iter()
            .map(|_| engines.iter().map(|_| Acc::default()).collect())
            .collect();
        for round in 0..rounds {
            for (acc, conn) in base.iter_mut().zip(&mut conns) {
                let m = conn.measure(args.timed(), warmup)?;
                acc.add(m.ops, m.elapsed, m.samples);
            }
            for (accs, (op, _)) in eng.iter_mut().zip(OPS) {
                for (acc, l) in accs.iter_mut().zip(&engines) {
                    let spec = Spec {
                        op,
                        size,
                        batch,
                        inflight: args.inflight,
                        verify_seed: (round == 0).then(&mut next_seed),
                        warmup,
                        timed: args.timed(),
                        lat: args.latency_phase(),
                    };
                    let c = in_task(&rt, engine_case(l.clone(), spec))?;
                    acc.add(c.requests, c.elapsed, c.lat_samples);
                }
            }
        }
        let mut base_rows = Vec::new();
        for (acc, (op, _)) in base.into_iter().zip(OPS) {
            let row = acc.into_row(false, "-", op.name(), size, 1, 0);
            print_row(&row);
            base_rows.push((row.gbps, row.p50_us));
            rows.push(row);
        }
        for ((accs, (op, _)), (base_gbps, base_p50)) in eng.into_iter().zip(OPS).zip(base_rows) {
            for (acc, l) in accs.into_iter().zip(&engines) {
                let mut row =
                    acc.into_row(true, l.protocol.name(), op.name(), size, batch, l.lanes);
                row.thr_ratio = Some(row.gbps / base_gbps);
                row.p50_ratio = Some(row.p50_us / base_p50);
                print_row(&row);
                rows.push(row);
            }
        }
    }

    print_comparisons(&rows);
    let checks = evaluate_targets(&rows, ping_p50);
    say!("");
    say!("targets (from this run's numbers):");
    for c in &checks {
        say!(
            "  [{}] ({}) {}",
            match c.pass {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None => "----",
            },
            c.id,
            c.detail
        );
    }
    let passed = checks.iter().filter(|c| c.pass == Some(true)).count();
    let missed = checks.iter().filter(|c| c.pass == Some(false)).count();
    say!("summary: {passed} PASS, {missed} MISS");
    if args.json {
        println!("{}", json_report(args, target, &rows, &checks));
    }

    rt.block_on(async {
        for l in &engines {
            l.engine.shutdown().await;
        }
    });
    for l in &engines {
        l.engine
            .unregister_memory(local_base)
            .map_err(|e| format!("unregistering the local buffer: {e}"))?;
    }
    drop(engines);
    drop(rt);
    drop(local);
    Ok(())
}

/// Runs `fut` as a task on a worker thread of `rt` (where the transport's tasks run too) and
/// waits for it.
fn in_task<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl std::future::Future<Output = Result<T, String>> + Send + 'static,
) -> Result<T, String> {
    rt.block_on(rt.spawn(fut))
        .map_err(|e| format!("benchmark task: {e}"))?
}

/// Every engine row of another protocol with the plain TCP row of the same case (op, size,
/// batch, lanes) from this run.
fn against_tcp(rows: &[Row]) -> Vec<(&Row, &Row)> {
    rows.iter()
        .filter(|r| r.engine && r.protocol != "tcp")
        .filter_map(|r| {
            rows.iter()
                .find(|t| {
                    t.engine
                        && t.protocol == "tcp"
                        && t.latency_case == r.latency_case
                        && (t.op, t.size, t.batch, t.lanes) == (r.op, r.size, r.batch, r.lanes)
                })
                .map(|t| (r, t))
        })
        .collect()
}

fn print_comparisons(rows: &[Row]) {
    let pairs = against_tcp(rows);
    if pairs.is_empty() {
        return;
    }
    say!("");
    say!(
        "against plain TCP of this run (same op, size, batch and lanes): throughput and p50 ratios"
    );
    for (r, t) in pairs {
        say!(
            "  {:<8} {:<9} {:>7} x{:<4} lanes={}: {:>7.3} GB/s vs {:>7.3} = {:>5.2}x   p50 {:>8.1} us vs {:>8.1} = {:>5.2}x",
            r.protocol,
            if r.latency_case {
                format!("{} lat", r.op)
            } else {
                r.op.to_owned()
            },
            fmt_size(r.size),
            r.batch,
            r.lanes,
            r.gbps,
            t.gbps,
            r.gbps / t.gbps,
            r.p50_us,
            t.p50_us,
            r.p50_us / t.p50_us
        );
    }
}

/// One evaluated target; `pass` is `None` when this run did not measure it.
struct Check {
    id: u8,
    pass: Option<bool>,
    detail: String,
}

fn evaluate_targets(rows: &[Row], ping_p50: f64) -> Vec<Check> {
    let mut checks = Vec::new();
    let engine_rows = || {
        rows.iter()
            .filter(|r| r.engine && !r.latency_case && r.protocol == "tcp")
    };
    // (1) large transfers against the single-connection baseline.
    for r in engine_rows().filter(|r| r.size >= 1 << 20) {
        let need = if r.lanes == 1 { 0.9 } else { 1.5 };
        let ratio = r.thr_ratio.unwrap_or(f64::NAN);
        let base = r.gbps / ratio;
        checks.push(Check {
            id: 1,
            pass: Some(ratio >= need),
            detail: format!(
                "{} {} x{} lanes={}: {:.3} GB/s = {:.2}x baseline {:.3} GB/s (need >= {need}x)",
                r.op,
                fmt_size(r.size),
                r.batch,
                r.lanes,
                r.gbps,
                ratio,
                base
            ),
        });
    }
    if !checks.iter().any(|c| c.id == 1) {
        checks.push(Check {
            id: 1,
            pass: None,
            detail: "not measured (no size >= 1 MiB)".into(),
        });
    }
    // (2) batched 4 KiB requests per second.
    let before = checks.len();
    for r in engine_rows().filter(|r| r.size == 4 << 10 && r.batch > 1) {
        checks.push(Check {
            id: 2,
            pass: Some(r.ops >= TARGET_SMALL_OPS),
            detail: format!(
                "{} 4 KiB x{} lanes={}: {} req/s, {:.3} GB/s (need >= {} req/s)",
                r.op,
                r.batch,
                r.lanes,
                fmt_ops(r.ops),
                r.gbps,
                fmt_ops(TARGET_SMALL_OPS)
            ),
        });
    }
    if checks.len() == before {
        checks.push(Check {
            id: 2,
            pass: None,
            detail: "not measured (no 4 KiB size with batch > 1)".into(),
        });
    }
    // (3) 64-byte round trip.
    for r in rows
        .iter()
        .filter(|r| r.latency_case && r.protocol == "tcp")
    {
        let ratio = r.p50_us / ping_p50;
        checks.push(Check {
            id: 3,
            pass: Some(ratio <= 2.0),
            detail: format!(
                "64 B READ lanes={}: p50 {:.1} us = {:.2}x ping-pong p50 {:.1} us (need <= 2x; \
                 p99 {:.1} us)",
                r.lanes, r.p50_us, ratio, ping_p50, r.p99_us
            ),
        });
    }
    // (4) large QUIC transfers over several connections.
    let quic: Vec<&Row> = rows
        .iter()
        .filter(|r| r.engine && r.protocol == "quic" && r.size >= 16 << 20 && r.lanes > 1)
        .collect();
    for r in &quic {
        checks.push(Check {
            id: 4,
            pass: Some(r.gbps >= TARGET_QUIC_GBPS),
            detail: format!(
                "QUIC {} {} x{} connections={}: {:.3} GB/s (need >= {TARGET_QUIC_GBPS} GB/s)",
                r.op,
                fmt_size(r.size),
                r.batch,
                r.lanes,
                r.gbps
            ),
        });
    }
    if quic.is_empty() && rows.iter().any(|r| r.protocol == "quic") {
        checks.push(Check {
            id: 4,
            pass: None,
            detail: "not measured (no QUIC size >= 16 MiB with more than one connection)".into(),
        });
    }
    // (5) authenticated TCP against plain TCP of the same run.
    let before = checks.len();
    for (r, t) in against_tcp(rows)
        .into_iter()
        .filter(|(r, _)| r.protocol == "tcp-auth" && !r.latency_case)
    {
        let need = if r.size >= 1 << 20 { 0.95 } else { 0.9 };
        let ratio = r.gbps / t.gbps;
        checks.push(Check {
            id: 5,
            pass: Some(ratio >= need),
            detail: format!(
                "tcp-auth {} {} x{} lanes={}: {:.3} GB/s = {:.2}x plain TCP {:.3} GB/s (need >= \
                 {need}x)",
                r.op,
                fmt_size(r.size),
                r.batch,
                r.lanes,
                r.gbps,
                ratio,
                t.gbps
            ),
        });
    }
    if checks.len() == before && rows.iter().any(|r| r.protocol == "tcp-auth") {
        checks.push(Check {
            id: 5,
            pass: None,
            detail: "not measured (tcp-auth needs tcp in the same run)".into(),
        });
    }
    checks
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

fn json_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "null".into(), json_num)
}

fn json_report(args: &Args, target: &TargetInfo, rows: &[Row], checks: &[Check]) -> String {
    let list = |v: Vec<String>| format!("[{}]", v.join(","));
    let config = format!(
        "{{\"sizes\":{},\"batches\":{},\"protocols\":{},\"lanes\":{},\"seconds\":{},\"rounds\":{},\"inflight\":{},\
         \"segment\":{},\"baseline\":{}}}",
        list(args.sizes.iter().map(u64::to_string).collect()),
        list(
            (0..args.sizes.len())
                .map(|i| args.batch_for(i).to_string())
                .collect()
        ),
        list(args.protocols.iter().map(|p| json_str(p.name())).collect()),
        list(args.lanes.iter().map(usize::to_string).collect()),
        json_num(args.seconds),
        args.rounds,
        args.inflight,
        json_str(&target.segment),
        json_str(&target.baseline.to_string())
    );
    let rows = list(
        rows.iter()
            .map(|r| {
                format!(
                    "{{\"kind\":{},\"protocol\":{},\"op\":{},\"size\":{},\"batch\":{},\"lanes\":{},\
                     \"gb_per_s\":{},\"ops_per_s\":{},\"p50_us\":{},\"p99_us\":{},\
                     \"throughput_ratio\":{},\"p50_ratio\":{}}}",
                    json_str(match (r.engine, r.latency_case) {
                        (false, _) => "baseline",
                        (true, true) => "engine_latency",
                        (true, false) => "engine",
                    }),
                    json_str(r.protocol),
                    json_str(r.op),
                    r.size,
                    r.batch,
                    r.lanes,
                    json_num(r.gbps),
                    json_num(r.ops),
                    json_num(r.p50_us),
                    json_num(r.p99_us),
                    json_opt(r.thr_ratio),
                    json_opt(r.p50_ratio)
                )
            })
            .collect(),
    );
    let checks = list(
        checks
            .iter()
            .map(|c| {
                format!(
                    "{{\"target\":{},\"result\":{},\"detail\":{}}}",
                    c.id,
                    json_str(match c.pass {
                        Some(true) => "PASS",
                        Some(false) => "MISS",
                        None => "not measured",
                    }),
                    json_str(&c.detail)
                )
            })
            .collect(),
    );
    format!("{{\"config\":{config},\"rows\":{rows},\"targets\":{checks}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn protocols_parse_in_order_without_repeats() {
        let a = args(&["--protocol", "tcp,tcp-auth,quic,shm,tcp"]).unwrap();
        assert_eq!(
            a.protocols,
            vec![
                Protocol::Tcp,
                Protocol::TcpAuth,
                Protocol::Quic,
                Protocol::Shm
            ]
        );
        assert!(
            a.protocols
                .iter()
                .filter(|p| p.needs_certificates())
                .count()
                == 2
        );
        let e = args(&["--protocol", "udp"]).unwrap_err();
        assert!(e.contains("tcp, tcp-auth, quic or shm"), "{e}");
        let a = args(&["--tls-ca", "a", "--tls-cert", "b", "--tls-key", "c"]).unwrap();
        assert!(a.quic_ca.is_some() && a.quic_cert.is_some() && a.quic_key.is_some());
    }

    fn row(protocol: &'static str, op: &'static str, size: u64, gbps: f64) -> Row {
        Row {
            engine: true,
            protocol,
            op,
            size,
            batch: 4,
            lanes: 2,
            gbps,
            ops: gbps * 1e9 / size as f64,
            p50_us: 10.0,
            p99_us: 20.0,
            thr_ratio: Some(1.0),
            p50_ratio: Some(1.0),
            latency_case: false,
        }
    }

    #[test]
    fn authenticated_tcp_is_judged_against_plain_tcp_of_the_same_case() {
        let rows = vec![
            row("tcp", "READ", 4 << 10, 2.0),
            row("tcp", "WRITE", 4 << 10, 1.0),
            row("tcp-auth", "READ", 4 << 10, 1.9),
            row("tcp-auth", "WRITE", 4 << 10, 0.8),
            row("tcp", "READ", 16 << 20, 1.0),
            row("tcp-auth", "READ", 16 << 20, 0.96),
            row("shm", "READ", 16 << 20, 5.0),
        ];
        let pairs = against_tcp(&rows);
        assert_eq!(pairs.len(), 4);
        assert!(pairs
            .iter()
            .all(|(r, t)| r.op == t.op && r.size == t.size && t.protocol == "tcp"));
        let fifth: Vec<Option<bool>> = evaluate_targets(&rows, 10.0)
            .into_iter()
            .filter(|c| c.id == 5)
            .map(|c| c.pass)
            .collect();
        // 0.95x at 4 KiB passes (>= 0.9x), 0.8x does not; 0.96x at 16 MiB passes (>= 0.95x).
        assert_eq!(fifth, vec![Some(true), Some(false), Some(true)]);
    }
}
