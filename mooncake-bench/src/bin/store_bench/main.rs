//! `store_bench`: throughput and latency of the Mooncake store client between two processes on
//! loopback TCP, next to same-run baselines (a 64-byte plain-socket ping-pong and the raw transfer
//! engine).
//!
//! Process A (the default role, `all`) runs the master in-process (`master_cli::start`, RPC on
//! 127.0.0.1) and a storage node `Store` with a large segment, plus a tiny echo server and a
//! scratch buffer on its transfer engine. It then starts itself again as process B
//! (`--role client`): a `Store` with no segment, so every object byte crosses processes. B runs
//! every case, prints the report and exits; A serves until B exits and returns B's exit code.
//! B exits on its own when its stdin (a pipe from A) closes. Run `store_bench --help` for flags.
//!
//! Every case first checks its data (the first call's bytes are compared); a failed call or wrong
//! bytes is an error (exit code 1). Missed performance targets are reported, not errors.

mod client;
mod profile;
mod stats;
mod util;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::Location;
use mooncake_master::{Command as MasterCommand, PutItem, Response};
use mooncake_master_service::master_cli::{self, MasterOptions};
use mooncake_master_service::MasterService;
use mooncake_rpc::apply_via;
use mooncake_store::{ReplicateConfig, Store, StoreConfig};

const USAGE: &str = "\
store_bench: Mooncake store client vs raw transfer engine vs plain sockets, two processes on
loopback (127.0.0.1)

USAGE:
    store_bench [FLAGS]

Process A (this one) runs the master and a storage node; it re-executes itself as the client
process B (--role client, a Store with global_segment_size = 0), which measures and reports.

FLAGS:
    --sizes LIST        object sizes (default 4K,64K,1M,16M; suffixes K, M, G = KiB, MiB, GiB)
    --batch N           objects per batch call (default 32)
    --seconds S         timed phase of each case, seconds (default 0.5)
    --min-calls N       at least this many timed calls per case (default 3)
    --ping-seconds S    each of the two 64-byte ping-pong baselines, seconds (default 0.5)
    --cases LIST        only these cases (default all): put,get,put_batch,get_batch,put_from,
                        get_into,batch_put_from,batch_get_into,get_cold,get_batch_cold,
                        get_into_cold,batch_get_into_cold,te_write,te_read,te_write_batch,
                        te_read_batch
    --no-profile        skip the 4 KiB latency breakdown (profile section)
    --profile-seconds S time per step kind of the breakdown, seconds (default 0.6)
    --client-rt RT      client runtime: multi (2 workers, default) | current (current_thread);
                        the measuring loop runs as a task on it
    --reservation-bytes N  the client's StoreConfig::reservation_bytes (default 16M; 0: every
                        put goes through PutStart and PutEnd)
    --commit-after-write  reserved puts commit after the WRITE's acknowledgement
                        (StoreConfig::commit_on_landing = Some(false))
    --commit-on-landing   reserved puts always send the commit with the WRITE (Some(true));
                        by default the master advises (with its segment in A: yes)
    --master-addr ADDR  use the master at ADDR (e.g. a `mooncake_master` process) instead of one
                        inside A; no in-process master probe then
    --server-threads N  worker threads of A's runtime (default 2)
    --segment-size N    A's segment (default max(1G, 4 x batch x largest size))
    --no-prefault       A's segment is not touched at setup (as a storage node set up with
                        defaults, the Python one included): first writes pay its page faults
    --role ROLE         all (default) | server (A only: serve until stdin closes) | client
    -h, --help          this text

Environment: MC_SAME_HOST_SHM=0 makes both processes use TCP alone (by default B reaches A's
segment through shared memory, the raw engine cases included).

Client-role flags (passed by A): --master ADDR --segment NAME --scratch ADDR --scratch-len N
    --echo ADDR [--server-apply NAME=P50NS/P99NS,...]

Cases (B against A; keys are fresh for every put; batches have --batch objects; gets read a
working set of --batch keys over and over, so from the second round on each read is sent ahead
of the master's answer, from B's location cache):
    put / get                   bytes API, one object per call
    put_batch / get_batch       bytes API, one batch per call
    put_from / get_into         zero-copy, registered buffers (AlignedBuffer + register_buffer)
    batch_put_from / batch_get_into
    get*_cold                   the gets again from a second client of B with the location cache
                                off (location_cache_entries = 0): every read waits for the
                                master's answer before its transfer, as a first read of a key does
    te_write / te_read          B's transfer engine WRITE/READ to/from A's scratch buffer, 1 request
    te_write_batch / te_read_batch   the same, --batch requests per transfer call

Columns: calls/s and objects/s over the time spent inside timed calls; GB/s = 1e9 payload bytes/s;
p50/p99 per call (per batch for batch cases).

Targets (evaluated from this run, printed as PASS/MISS; misses do not change the exit code):
    4 KiB get p50 <= 3x and put p50 <= 5x the 64-byte ping-pong p50 (gets warm and cold)
    batched 4 KiB >= 100k objects/s (put_batch, get_batch, batch_put_from, batch_get_into, and
    the cold gets)
    sizes >= 1 MiB: zero-copy get/put >= 0.8x the raw transfer engine's throughput (same size
    and batch shape); and again with single put_from/get_into calls alternated with single raw
    engine calls (interleaved section), comparing p50s measured under the same conditions
";

/// Which process this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    All,
    Server,
    Client,
}

/// The measured cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Case {
    Put,
    Get,
    PutBatch,
    GetBatch,
    PutFrom,
    GetInto,
    BatchPutFrom,
    BatchGetInto,
    GetCold,
    GetBatchCold,
    GetIntoCold,
    BatchGetIntoCold,
    TeWrite,
    TeRead,
    TeWriteBatch,
    TeReadBatch,
}

impl Case {
    pub(crate) const ALL: [Case; 16] = [
        Case::Put,
        Case::Get,
        Case::PutBatch,
        Case::GetBatch,
        Case::PutFrom,
        Case::GetInto,
        Case::BatchPutFrom,
        Case::BatchGetInto,
        Case::GetCold,
        Case::GetBatchCold,
        Case::GetIntoCold,
        Case::BatchGetIntoCold,
        Case::TeWrite,
        Case::TeRead,
        Case::TeWriteBatch,
        Case::TeReadBatch,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Case::Put => "put",
            Case::Get => "get",
            Case::PutBatch => "put_batch",
            Case::GetBatch => "get_batch",
            Case::PutFrom => "put_from",
            Case::GetInto => "get_into",
            Case::BatchPutFrom => "batch_put_from",
            Case::BatchGetInto => "batch_get_into",
            Case::GetCold => "get_cold",
            Case::GetBatchCold => "get_batch_cold",
            Case::GetIntoCold => "get_into_cold",
            Case::BatchGetIntoCold => "batch_get_into_cold",
            Case::TeWrite => "te_write",
            Case::TeRead => "te_read",
            Case::TeWriteBatch => "te_write_batch",
            Case::TeReadBatch => "te_read_batch",
        }
    }

    fn parse(s: &str) -> Result<Case, String> {
        Case::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("unknown case {s:?} (see --help)"))
    }
}

/// Client runtime flavour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClientRt {
    Multi,
    Current,
}

#[derive(Clone, Debug)]
pub(crate) struct Args {
    pub(crate) role: Role,
    pub(crate) sizes: Vec<u64>,
    pub(crate) batch: usize,
    pub(crate) seconds: f64,
    pub(crate) min_calls: usize,
    pub(crate) ping_seconds: f64,
    pub(crate) cases: Vec<Case>,
    pub(crate) profile: bool,
    pub(crate) profile_seconds: f64,
    pub(crate) client_rt: ClientRt,
    pub(crate) reservation_bytes: Option<u64>,
    pub(crate) commit_on_landing: Option<bool>,
    pub(crate) master_addr: Option<String>,
    pub(crate) server_threads: usize,
    pub(crate) segment_size: Option<u64>,
    pub(crate) prefault: bool,
    // Client role: what A tells B.
    pub(crate) master: Option<String>,
    pub(crate) segment: Option<String>,
    pub(crate) scratch: Option<u64>,
    pub(crate) scratch_len: Option<u64>,
    pub(crate) echo: Option<SocketAddr>,
    pub(crate) server_apply: Vec<(String, u64, u64)>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            role: Role::All,
            sizes: vec![4 << 10, 64 << 10, 1 << 20, 16 << 20],
            batch: 32,
            seconds: 0.5,
            min_calls: 3,
            ping_seconds: 0.5,
            cases: Case::ALL.to_vec(),
            profile: true,
            profile_seconds: 0.6,
            client_rt: ClientRt::Multi,
            reservation_bytes: None,
            commit_on_landing: None,
            master_addr: None,
            server_threads: 2,
            segment_size: None,
            prefault: true,
            master: None,
            segment: None,
            scratch: None,
            scratch_len: None,
            echo: None,
            server_apply: Vec::new(),
        }
    }
}

impl Args {
    pub(crate) fn max_size(&self) -> u64 {
        self.sizes.iter().copied().max().unwrap_or(4096)
    }

    /// Bytes of one batch of the largest size (the scratch buffer, B's staging need).
    pub(crate) fn batch_bytes(&self) -> u64 {
        self.max_size() * self.batch as u64
    }

    fn segment_bytes(&self) -> u64 {
        self.segment_size
            .unwrap_or_else(|| (4 * self.batch_bytes()).max(1 << 30))
    }

    pub(crate) fn runs(&self, c: Case) -> bool {
        self.cases.contains(&c)
    }
}

/// A size flag: [`mooncake_core::parse_size`]'s rules, and not zero.
pub(crate) fn positive_size(s: &str) -> Result<u64, String> {
    match mooncake_core::parse_size(s) {
        Ok(0) => Err(format!("bad size {s:?}: must be positive")),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("bad size: {e}")),
    }
}

fn parse_secs(flag: &str, v: &str) -> Result<f64, String> {
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 3600.0)
        .ok_or_else(|| format!("bad {flag} {v:?}"))
}

fn parse_count(flag: &str, v: &str) -> Result<usize, String> {
    v.parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("bad {flag} {v:?}"))
}

fn parse_hex(v: &str) -> Result<u64, String> {
    u64::from_str_radix(v.trim_start_matches("0x"), 16).map_err(|_| format!("bad address {v:?}"))
}

pub(crate) fn parse_args(argv: impl IntoIterator<Item = String>) -> Result<Args, String> {
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
            "--role" => {
                a.role = match value()?.as_str() {
                    "all" => Role::All,
                    "server" => Role::Server,
                    "client" => Role::Client,
                    other => return Err(format!("unknown role {other:?}")),
                }
            }
            "--sizes" => {
                a.sizes = value()?
                    .split(',')
                    .filter(|p| !p.trim().is_empty())
                    .map(positive_size)
                    .collect::<Result<_, _>>()?;
                if a.sizes.is_empty() {
                    return Err("--sizes is empty".into());
                }
            }
            "--batch" => a.batch = parse_count(&flag, &value()?)?,
            "--seconds" => a.seconds = parse_secs(&flag, &value()?)?,
            "--min-calls" => a.min_calls = parse_count(&flag, &value()?)?,
            "--ping-seconds" => a.ping_seconds = parse_secs(&flag, &value()?)?,
            "--profile-seconds" => a.profile_seconds = parse_secs(&flag, &value()?)?,
            "--cases" => {
                a.cases = value()?
                    .split(',')
                    .filter(|p| !p.trim().is_empty())
                    .map(|p| Case::parse(p.trim()))
                    .collect::<Result<_, _>>()?;
            }
            "--no-profile" => a.profile = false,
            "--client-rt" => {
                a.client_rt = match value()?.as_str() {
                    "multi" => ClientRt::Multi,
                    "current" => ClientRt::Current,
                    other => return Err(format!("unknown runtime {other:?}")),
                }
            }
            "--reservation-bytes" => {
                let v = value()?;
                a.reservation_bytes = Some(if v.trim() == "0" {
                    0
                } else {
                    positive_size(&v)?
                });
            }
            "--commit-after-write" => a.commit_on_landing = Some(false),
            "--commit-on-landing" => a.commit_on_landing = Some(true),
            "--master-addr" => a.master_addr = Some(value()?),
            "--server-threads" => a.server_threads = parse_count(&flag, &value()?)?,
            "--segment-size" => a.segment_size = Some(positive_size(&value()?)?),
            "--no-prefault" => a.prefault = false,
            "--master" => a.master = Some(value()?),
            "--segment" => a.segment = Some(value()?),
            "--scratch" => a.scratch = Some(parse_hex(&value()?)?),
            "--scratch-len" => a.scratch_len = Some(positive_size(&value()?)?),
            "--echo" => {
                let v = value()?;
                a.echo = Some(v.parse().map_err(|_| format!("bad --echo {v:?}"))?);
            }
            "--server-apply" => a.server_apply = decode_probe(&value()?)?,
            _ => return Err(format!("unknown argument {arg:?} (try --help)")),
        }
    }
    Ok(a)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let code = match parse_args(raw.clone()) {
        Err(e) => {
            eprintln!("store_bench: {e}");
            2
        }
        Ok(args) => match args.role {
            Role::Client => client::main(args),
            Role::All | Role::Server => match run_server(&args, &raw) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("store_bench: error: {e}");
                    1
                }
            },
        },
    };
    std::process::exit(code);
}

/// Process A's pieces, kept alive while B runs.
struct Server {
    /// The master, unless A uses one in another process (`--master-addr`).
    service: Option<Arc<MasterService>>,
    store: Arc<Store>,
    rpc: String,
    scratch: u64,
    scratch_len: u64,
    segment_bytes: u64,
}

async fn start_server(args: &Args) -> Result<Server, String> {
    let (service, rpc) = match &args.master_addr {
        Some(addr) => (None, addr.clone()),
        None => {
            let options = MasterOptions {
                rpc_address: "127.0.0.1".into(),
                rpc_port: 0,
                enable_metrics: false,
                ..MasterOptions::default()
            };
            let (service, listening) = master_cli::start(&options)
                .await
                .map_err(|e| format!("starting the master: {e}"))?;
            (Some(service), listening.rpc.to_string())
        }
    };
    let segment_bytes = args.segment_bytes();
    let config = StoreConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: rpc.clone(),
        global_segment_size: segment_bytes,
        // A issues no byte-oriented calls beyond the probe below.
        local_buffer_size: 1 << 20,
        // Every case then writes into memory that is already there, as the raw-engine cases
        // write into the scratch buffer touched below: page faults of fresh memory are not
        // what the comparison is about (and would land on whichever case comes first).
        prefault_segment: args.prefault,
        ..StoreConfig::default()
    };
    let store = match &service {
        Some(service) => Store::setup_embedded(config, service.clone()).await,
        None => Store::setup(config).await,
    }
    .map_err(|e| format!("starting the storage node: {e}"))?;
    let scratch_len = args.batch_bytes();
    let scratch = store
        .engine()
        .allocate_buffer(scratch_len as usize, Location::cpu(0))
        .map_err(|e| format!("allocating the {scratch_len}-byte scratch buffer: {e}"))?;
    store
        .engine()
        .memory()
        .resolve(scratch, scratch_len)
        .map_err(|e| format!("resolving the scratch buffer: {e}"))?
        .prefault();
    Ok(Server {
        service,
        store,
        rpc,
        scratch,
        scratch_len,
        segment_bytes,
    })
}

/// Times `f` (one master call) until `n` samples or `dur`; p50 and p99 in ns.
async fn time_calls<F, Fut>(n: usize, dur: Duration, mut f: F) -> Result<(u64, u64), String>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Duration, String>>,
{
    let mut samples = Vec::with_capacity(n);
    let start = Instant::now();
    while samples.len() < n && start.elapsed() < dur {
        samples.push(f(samples.len()).await?.as_nanos() as u64);
    }
    Ok(stats::percentiles(&mut samples))
}

/// The in-process cost of master calls (through the command log, no socket), for the profile:
/// `(name, p50 ns, p99 ns)`.
async fn server_apply_probe(s: &Server, batch: usize) -> Result<Vec<(String, u64, u64)>, String> {
    let Some(svc) = s.service.as_deref() else {
        return Ok(Vec::new());
    };
    let key = "store_bench/probe";
    s.store
        .put(key, &[7u8; 4096], &ReplicateConfig::default())
        .await
        .map_err(|e| format!("probe put: {e}"))?;
    let get = time_calls(20_000, Duration::from_millis(200), |_| async {
        let t = Instant::now();
        let r = apply_via(svc, MasterCommand::GetReplicaList { key: key.into() })
            .await
            .map_err(|e| format!("probe GetReplicaList: {e}"))?;
        let took = t.elapsed();
        match r.1 {
            Response::Replicas(Ok(_)) => Ok(took),
            other => Err(format!("probe GetReplicaList answered {other:?}")),
        }
    })
    .await?;
    s.store
        .remove(key, true)
        .await
        .map_err(|e| format!("probe remove: {e}"))?;
    // Batches: BatchPutStart, BatchPutEnd and BatchGetReplicaList of `batch` 4 KiB objects.
    let client_id = s.store.client_id();
    let rc = ReplicateConfig::default();
    let mut t_start = Vec::new();
    let mut t_end = Vec::new();
    let mut t_get = Vec::new();
    let begun = Instant::now();
    for round in 0..2_000 {
        if begun.elapsed() > Duration::from_millis(300) {
            break;
        }
        let keys: Vec<String> = (0..batch)
            .map(|j| format!("store_bench/probe/{round}/{j}"))
            .collect();
        let items = keys
            .iter()
            .map(|k| PutItem {
                key: k.clone(),
                size: 4096,
            })
            .collect();
        let t = Instant::now();
        let r = apply_via(
            svc,
            MasterCommand::BatchPutStart {
                client_id,
                items,
                config: rc.clone(),
            },
        )
        .await;
        t_start.push(t.elapsed().as_nanos() as u64);
        match r {
            Ok((_, Response::PutStartBatch(v))) if v.iter().all(Result::is_ok) => {}
            other => return Err(format!("probe BatchPutStart answered {other:?}")),
        }
        let t = Instant::now();
        let r = apply_via(
            svc,
            MasterCommand::BatchPutEnd {
                client_id,
                keys: keys.clone(),
            },
        )
        .await;
        t_end.push(t.elapsed().as_nanos() as u64);
        match r {
            Ok((_, Response::UnitBatch(v))) if v.iter().all(Result::is_ok) => {}
            other => return Err(format!("probe BatchPutEnd answered {other:?}")),
        }
        let t = Instant::now();
        let r = apply_via(
            svc,
            MasterCommand::BatchGetReplicaList { keys: keys.clone() },
        )
        .await;
        t_get.push(t.elapsed().as_nanos() as u64);
        match r {
            Ok((_, Response::ReplicasBatch(v))) if v.iter().all(Result::is_ok) => {}
            other => return Err(format!("probe BatchGetReplicaList answered {other:?}")),
        }
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let removed = s
            .store
            .batch_remove(&refs, true)
            .await
            .map_err(|e| format!("probe batch_remove: {e}"))?;
        if let Some(e) = removed.into_iter().find_map(Result::err) {
            return Err(format!("probe batch_remove: {e}"));
        }
    }
    let mut out = vec![("GetReplicaList".to_owned(), get.0, get.1)];
    for (name, v) in [
        ("BatchPutStart", &mut t_start),
        ("BatchPutEnd", &mut t_end),
        ("BatchGetReplicaList", &mut t_get),
    ] {
        let (p50, p99) = stats::percentiles(v);
        out.push((format!("{name}x{batch}"), p50, p99));
    }
    Ok(out)
}

/// `name=p50/p99,...` (ns).
fn encode_probe(p: &[(String, u64, u64)]) -> String {
    p.iter()
        .map(|(n, a, b)| format!("{n}={a}/{b}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn decode_probe(v: &str) -> Result<Vec<(String, u64, u64)>, String> {
    if v.is_empty() {
        return Ok(Vec::new());
    }
    v.split(',')
        .map(|item| {
            let (name, rest) = item.split_once('=')?;
            let (a, b) = rest.split_once('/')?;
            Some((name.to_owned(), a.parse().ok()?, b.parse().ok()?))
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| format!("bad --server-apply {v:?}"))
}

/// `raw` without its `--role` flag (the client gets `--role client`).
fn without_role(raw: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = raw.iter();
    while let Some(a) = it.next() {
        if a == "--role" {
            it.next();
        } else if !a.starts_with("--role=") {
            out.push(a.clone());
        }
    }
    out
}

/// Kills the client if A stops before it exits.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run_server(args: &Args, raw: &[String]) -> Result<i32, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.server_threads)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    let server = rt.block_on(start_server(args))?;
    let echo = util::start_echo_server().map_err(|e| format!("starting the echo server: {e}"))?;
    let apply = encode_probe(&rt.block_on(server_apply_probe(&server, args.batch))?);
    let segment = server.store.hostname().to_owned();
    eprintln!(
        "store_bench[A pid {}]: master rpc {}, storage segment {segment} ({}), scratch {:#x}+{}, \
         echo {echo}",
        std::process::id(),
        server.rpc,
        util::fmt_bytes(server.segment_bytes),
        server.scratch,
        util::fmt_bytes(server.scratch_len),
    );
    let code = if args.role == Role::Server {
        println!(
            "READY --master {} --segment {segment} --scratch {:#x} --scratch-len {} --echo {echo} \
             --server-apply {apply}",
            server.rpc, server.scratch, server.scratch_len
        );
        let _ = std::io::stdout().flush();
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin().lock();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        0
    } else {
        let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.args(without_role(raw))
            .args(["--role", "client", "--master", &server.rpc])
            .args(["--segment", &segment])
            .args(["--scratch", &format!("{:#x}", server.scratch)])
            .args(["--scratch-len", &server.scratch_len.to_string()])
            .args(["--echo", &echo.to_string()])
            .args(["--server-apply", &apply])
            .stdin(Stdio::piped())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting the client process: {e}"))?;
        // Held open while B runs (`Child::wait` would close it): B exits when it closes.
        let stdin = child.stdin.take();
        let mut guard = ChildGuard(Some(child));
        let status = guard
            .0
            .as_mut()
            .expect("child")
            .wait()
            .map_err(|e| format!("waiting for the client: {e}"))?;
        guard.0 = None;
        drop(stdin);
        status.code().unwrap_or(1)
    };
    rt.block_on(async {
        let _ = server.store.close().await;
    });
    if let Some(service) = &server.service {
        service.shutdown();
    }
    drop(server);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::positive_size;

    #[test]
    fn sizes_take_upstream_spellings() {
        assert_eq!(positive_size("16MB"), Ok(16 << 20));
        assert_eq!(positive_size("1GiB"), Ok(1 << 30));
        assert_eq!(positive_size("64K"), Ok(64 << 10));
        assert!(positive_size("0").is_err());
        assert!(positive_size("-1M").is_err());
    }
}
