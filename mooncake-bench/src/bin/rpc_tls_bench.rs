//! `rpc_tls_bench`: the cost of mutual TLS on the master's RPC, in one run. See [`USAGE`].

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use mooncake_master::{Command as MasterCommand, Response};
use mooncake_rpc::{apply_via, tls_connector, RemoteMaster, RpcClientConfig};
use mooncake_store::{ReplicateConfig, Store, StoreConfig};
use mooncake_tls::{certs, Role, TlsIdentity};

const USAGE: &str = "\
rpc_tls_bench: latency of store puts and gets and of bare master calls through a mooncake_master
without TLS and one with mutual TLS, both started here on loopback (127.0.0.1) as processes

USAGE:
    rpc_tls_bench [FLAGS]

Each repetition runs every measurement against both masters, alternating which goes first. The
store clients are set so that every put and get asks the master (no location cache, no
reserved space): a put is PutStart, the write into the segment and PutEnd; a get is
GetReplicaList and the read. `exist` is one bare ExistKey call. Printed: the median over the
repetitions of each repetition's p50 and p99, in microseconds, and TLS / plain of the p50s.

FLAGS:
    --ops N           timed operations per measurement (default 2000)
    --warmup N        untimed operations before each measurement (default 200)
    --reps N          repetitions (default 5)
    --value_size N    bytes per value (default 4096)
    --master_bin PATH mooncake_master to run (default: next to this executable)
    -h, --help        this text
";

struct Args {
    ops: usize,
    warmup: usize,
    reps: usize,
    value_size: usize,
    master_bin: PathBuf,
}

fn parse_args() -> Result<Option<Args>, String> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let mut a = Args {
        ops: 2000,
        warmup: 200,
        reps: 5,
        value_size: 4096,
        master_bin: exe_dir.join("mooncake_master"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => (
                flag.clone(),
                it.next().ok_or_else(|| format!("{flag} needs a value"))?,
            ),
        };
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{name}: {v:?} is not a number"))
        };
        match name.as_str() {
            "--ops" => a.ops = num(&value)?.max(1),
            "--warmup" => a.warmup = num(&value)?,
            "--reps" => a.reps = num(&value)?.max(1),
            "--value_size" => a.value_size = num(&value)?.max(1),
            "--master_bin" => a.master_bin = PathBuf::from(value),
            other => return Err(format!("unknown flag {other} (see --help)")),
        }
    }
    Ok(Some(a))
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `mooncake_master` with `extra` flags; its process and RPC address.
fn start_master(bin: &Path, extra: &[String]) -> Result<(Proc, String), String> {
    let mut child = Command::new(bin)
        .args([
            "--rpc_address=127.0.0.1",
            "--rpc_port=0",
            "--metrics_port=0",
            "--noenable_metric_reporting",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let out = child.stdout.take().expect("piped");
    let proc = Proc(child);
    let mut lines = BufReader::new(out).lines();
    for line in &mut lines {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(rest) = line.strip_prefix("mooncake_master listening: rpc=") {
            let addr = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            std::thread::spawn(move || for _ in lines {});
            return Ok((proc, addr));
        }
    }
    Err("mooncake_master exited before listening".into())
}

/// One deployment: a master process, a store client of it and a bare RPC client.
struct Target {
    name: &'static str,
    _master: Proc,
    store: Arc<Store>,
    rpc: RemoteMaster,
}

fn store_config(master: &str) -> StoreConfig {
    StoreConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: master.into(),
        global_segment_size: 512 << 20,
        local_buffer_size: 64 << 20,
        // Every put and get asks the master.
        location_cache_entries: 0,
        reservation_bytes: 0,
        ..StoreConfig::default()
    }
}

impl Target {
    async fn start(
        name: &'static str,
        bin: &Path,
        flags: &[String],
        tls: Option<&TlsIdentity>,
    ) -> Result<Target, String> {
        let (master, addr) = start_master(bin, flags)?;
        let store = Store::setup_with_tls(store_config(&addr), tls)
            .await
            .map_err(|e| format!("{name}: store setup: {e}"))?;
        let connector = tls
            .map(tls_connector)
            .transpose()
            .map_err(|e| e.to_string())?;
        let rpc = RemoteMaster::with_tls(addr, RpcClientConfig::default(), connector);
        Ok(Target {
            name,
            _master: master,
            store,
            rpc,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Get,
    Exist,
}

impl Op {
    const ALL: [Op; 3] = [Op::Put, Op::Get, Op::Exist];

    fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Exist => "exist (bare RPC)",
        }
    }
}

/// Runs `op` on keys `prefix0..prefixN`; latencies in µs of the timed ones.
async fn measure(
    t: &Target,
    op: Op,
    prefix: &str,
    a: &Args,
    value: &[u8],
) -> Result<Vec<u64>, String> {
    let one = ReplicateConfig::with_replicas(1);
    let mut took = Vec::with_capacity(a.ops);
    for i in 0..a.warmup + a.ops {
        let key = format!("{prefix}{i}");
        let started = Instant::now();
        match op {
            Op::Put => t
                .store
                .put(&key, value, &one)
                .await
                .map_err(|e| e.to_string())?,
            Op::Get => {
                let got = t.store.get(&key).await.map_err(|e| e.to_string())?;
                if got.len() != value.len() {
                    return Err(format!("{}: {key}: got {} bytes", t.name, got.len()));
                }
            }
            Op::Exist => {
                let r = apply_via(&t.rpc, MasterCommand::ExistKey { key })
                    .await
                    .map_err(|e| e.to_string())?;
                if !matches!(r.1, Response::Exists(true)) {
                    return Err(format!("{}: ExistKey answered {:?}", t.name, r.1));
                }
            }
        }
        if i >= a.warmup {
            took.push(started.elapsed().as_micros() as u64);
        }
    }
    Ok(took)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

async fn run(a: Args) -> Result<(), String> {
    if !a.master_bin.is_file() {
        return Err(format!(
            "{} not found: build mooncake_master (cargo build --release -p \
             mooncake-master-service) or pass --master_bin",
            a.master_bin.display()
        ));
    }
    let dir = std::env::temp_dir().join(format!("rpc_tls_bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = async {
        let ca = certs::new_ca("rpc_tls_bench CA").map_err(|e| e.to_string())?;
        let master_id = certs::issue_role_cert(&ca, "master", &["127.0.0.1"], &[Role::Master])
            .map_err(|e| e.to_string())?
            .identity(&ca);
        let client_id = certs::issue_role_cert(&ca, "client", &["127.0.0.1"], &[Role::Client])
            .map_err(|e| e.to_string())?
            .identity(&ca);
        let file = |name: &str, text: &str| -> Result<String, String> {
            let p = dir.join(name);
            std::fs::write(&p, text).map_err(|e| e.to_string())?;
            Ok(p.display().to_string())
        };
        let flags = vec![
            format!("--tls_ca={}", file("ca.pem", &master_id.ca_pem)?),
            format!("--tls_cert={}", file("master.pem", &master_id.cert_pem)?),
            format!("--tls_key={}", file("master-key.pem", &master_id.key_pem)?),
        ];
        let targets = [
            Target::start("plain", &a.master_bin, &[], None).await?,
            Target::start("tls", &a.master_bin, &flags, Some(&client_id)).await?,
        ];
        let value: Vec<u8> = (0..a.value_size).map(|i| (i * 7 + 1) as u8).collect();
        // [target][op] -> per-repetition (p50, p99)
        let mut results = vec![vec![Vec::<(u64, u64)>::new(); Op::ALL.len()]; 2];
        for rep in 0..a.reps {
            let order: [usize; 2] = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
            for (o, op) in Op::ALL.iter().enumerate() {
                for &ti in &order {
                    let t = &targets[ti];
                    // Gets and lookups read what this repetition's puts wrote.
                    let prefix = format!("r{rep}-");
                    let mut took = measure(t, *op, &prefix, &a, &value).await?;
                    took.sort_unstable();
                    results[ti][o].push((percentile(&took, 0.5), percentile(&took, 0.99)));
                }
            }
        }
        println!(
            "rpc_tls_bench: {} B values, {} ops x {} repetitions (medians of per-repetition \
             percentiles, us)",
            a.value_size, a.ops, a.reps
        );
        println!(
            "{:<18} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "op", "plain p50", "plain p99", "tls p50", "tls p99", "tls/plain"
        );
        for (o, op) in Op::ALL.iter().enumerate() {
            let m = |ti: usize, which: fn(&(u64, u64)) -> u64| {
                median(results[ti][o].iter().map(which).collect())
            };
            let (pp50, pp99) = (m(0, |r| r.0), m(0, |r| r.1));
            let (tp50, tp99) = (m(1, |r| r.0), m(1, |r| r.1));
            println!(
                "{:<18} {:>10} {:>10} {:>10} {:>10} {:>9.2}x",
                op.name(),
                pp50,
                pp99,
                tp50,
                tp99,
                tp50 as f64 / pp50.max(1) as f64
            );
        }
        for t in &targets {
            let _ = t.store.close().await;
        }
        Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn main() {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("rpc_tls_bench: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("rpc_tls_bench: {e}");
        std::process::exit(1);
    }
}
