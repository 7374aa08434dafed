//! A leak soak: connection churn against one `mooncake_master` and two long-lived
//! `mooncake_client` storage nodes, while their open file descriptors and heap are sampled.
//!
//! `scripts/leak_soak.sh [--minutes N]` builds and runs it (`leak_soak --help` for the knobs).
//!
//! For the whole run, clients come and go (each sets up a store, upserts, reads and removes keys
//! of a fixed set, then closes, or every other one is dropped without closing) and storage
//! nodes come and go (each mounts a segment, serves for a few seconds, then stops with SIGTERM or
//! dies with SIGKILL, in turn). Every 2 s the soak samples `/proc/PID/fd` (count) and
//! `/proc/PID/status` (`RssAnon` + `RssFile`: resident memory without the shared-memory segment,
//! whose pages are touched as space is first used) of the master and the two long-lived nodes,
//! and the descriptors and live heap bytes (counted by this binary's allocator) of the soak's own
//! process, where the clients live (sampled between lives, with no store alive). The clients'
//! resident memory is printed but not judged: thousands of lives of 4-64 KiB values on several
//! threads leave the allocator's arenas fragmented, which moves resident memory by several
//! percent in a short run without a byte leaking; the live heap has no such noise.
//! After the warm-up (a quarter of the run, and at least 70 s: the master remembers request
//! outcomes for 60 s, so its state fills for that long), the median of the last fifth of the
//! samples is compared with the median of the first fifth (a median, so one sample taken while a
//! pooled connection and its buffers were briefly gone does not set the baseline): growth of more
//! than `--max-growth` percent (5 by default; for descriptors, and at least 2 of them; for the
//! clients' heap, and at least 64 KiB, since one connection's buffers alone are several percent
//! of a heap of about 130 KiB) fails the run.

#[allow(dead_code)] // shared with chaos_soak
#[path = "../chaos_soak/procs.rs"]
mod procs;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mooncake_store::{ReplicateConfig, Store, StoreConfig};
use procs::{free_port, log_file, spawn_until, StorageNode};

#[derive(Parser, Debug)]
#[command(about = "Leak soak of mooncake_master and storage nodes under connection churn")]
struct Args {
    /// Length of the run in minutes (at least 100 s: the warm-up alone takes 70 s).
    #[arg(long, default_value_t = 2.0)]
    minutes: f64,
    /// Allowed growth after the warm-up, in percent.
    #[arg(long, default_value_t = 5.0)]
    max_growth: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 2.0)]
    sample_every: f64,
    /// `mooncake_master` (default: beside this binary).
    #[arg(long)]
    master_bin: Option<PathBuf>,
    /// `mooncake_client` (default: beside this binary).
    #[arg(long)]
    client_bin: Option<PathBuf>,
    /// How a client's life ends: `close` (Store::close), `drop` (dropped without closing) or
    /// `both` (in turn).
    #[arg(long, default_value = "both")]
    end: String,
    /// Directory for the processes' logs (default: a temporary one, removed after a pass).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The system allocator, counting the bytes this process holds.
struct CountingAlloc;

/// Bytes allocated and not yet freed in this process.
static HEAP_LIVE: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the counter is only
// arithmetic on the sizes of the layouts the caller passes, which `GlobalAlloc` requires to be
// the ones the memory was allocated with.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HEAP_LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            HEAP_LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        HEAP_LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HEAP_LIVE.fetch_add(new_size as u64, Ordering::Relaxed);
            HEAP_LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// The processes watched: the master, the clients' process and the two long-lived nodes.
const WATCHED: usize = 4;

/// One sample of every watched process: open descriptors and memory in KiB.
type Row = [(u64, u64); WATCHED];

fn beside_me(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Open descriptors and resident memory without shared memory (`RssAnon` + `RssFile`, KiB) of
/// `pid`.
fn sample(pid: u32) -> Option<(u64, u64)> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((fds, field("RssAnon:")? + field("RssFile:")?))
}

fn store_config(master: &str, segment: u64) -> StoreConfig {
    StoreConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: master.into(),
        global_segment_size: segment,
        local_buffer_size: 8 << 20,
        ..StoreConfig::default()
    }
}

/// One client's life: set up, write, read, remove, close (or be dropped). Errors are counted,
/// not fatal: storage nodes vanish under it by design.
async fn client_life(master: &str, n: u64, errors: &AtomicU64, end: &str) {
    let Ok(store) = Store::setup(store_config(master, 0)).await else {
        errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let rc = ReplicateConfig::default();
    for i in 0..10u64 {
        let key = format!("leak-{}", (n * 7 + i) % 100);
        let value = vec![(n + i) as u8; 4096 + ((n * 31 + i * 977) % 60_000) as usize];
        if store.upsert(&key, &value, &rc).await.is_err() {
            errors.fetch_add(1, Ordering::Relaxed);
        }
        match store.get(&key).await {
            Ok(_) => {}
            Err(e) if e.code() == mooncake_core::ErrorCode::OBJECT_NOT_FOUND => {}
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if i % 3 == 0 {
            let _ = store.remove(&key, true).await;
        }
    }
    let close = match end {
        "close" => true,
        "drop" => false,
        _ => n % 2 == 0,
    };
    if close {
        let _ = store.close().await;
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // Processes are started from this thread (they die with the thread that started them).
    let temp = args.dir.is_none();
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("mooncake-leak-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).expect("run directory");
    let code = match rt.block_on(soak(&args, &dir)) {
        Ok(true) => {
            if temp {
                let _ = std::fs::remove_dir_all(&dir);
            }
            println!("leak_soak: PASS");
            0
        }
        Ok(false) => {
            println!("leak_soak: FAIL (logs in {})", dir.display());
            1
        }
        Err(e) => {
            println!("leak_soak: ERROR {e} (logs in {})", dir.display());
            2
        }
    };
    rt.shutdown_timeout(Duration::from_secs(5));
    std::process::exit(code);
}

async fn soak(args: &Args, dir: &Path) -> Result<bool, String> {
    let master_bin = args
        .master_bin
        .clone()
        .unwrap_or_else(|| beside_me("mooncake_master"));
    let client_bin = args
        .client_bin
        .clone()
        .unwrap_or_else(|| beside_me("mooncake_client"));
    let mut cmd = std::process::Command::new(&master_bin);
    cmd.args([
        "--rpc_address=127.0.0.1".to_owned(),
        format!("--rpc_port={}", free_port()),
        "--metrics_port=0".to_owned(),
        // Dead nodes are forgotten within 3 s, so the master's state stays bounded.
        "--client_ttl=3".to_owned(),
    ])
    .stderr(log_file(dir, "master.log"));
    let (mut master, rest) = spawn_until(cmd, "mooncake_master listening: rpc=", |_| {})?;
    let addr = rest
        .split_whitespace()
        .next()
        .ok_or("no master address")?
        .to_owned();
    let long_lived = [
        StorageNode::start(&client_bin, dir, "storage-a", &addr, "128MB")?,
        StorageNode::start(&client_bin, dir, "storage-b", &addr, "128MB")?,
    ];
    let mut watched: Vec<(String, u32)> = vec![
        ("master".into(), master.id()),
        ("clients".into(), std::process::id()),
    ];
    for (name, node) in ["storage-a", "storage-b"].iter().zip(&long_lived) {
        watched.push(((*name).into(), node.pid().ok_or("storage node gone")?));
    }
    if watched.len() != WATCHED {
        return Err(format!(
            "{} processes watched, rows hold {WATCHED}",
            watched.len()
        ));
    }

    let secs = (args.minutes * 60.0).max(100.0);
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let lives = Arc::new(AtomicU64::new(0));
    // Samples are taken between clients' lives (no store alive in this process), so the
    // clients' process is measured at rest rather than with whatever its live stores hold.
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    // Two clients' lives at a time, one after another.
    let churners: Vec<_> = (0..2u64)
        .map(|w| {
            let (addr, stop, errors, lives) =
                (addr.clone(), stop.clone(), errors.clone(), lives.clone());
            let (end, gate) = (args.end.clone(), gate.clone());
            tokio::spawn(async move {
                let mut n = w;
                while !stop.load(Ordering::Relaxed) {
                    let life = gate.read().await;
                    client_life(&addr, n, &errors, &end).await;
                    drop(life);
                    lives.fetch_add(1, Ordering::Relaxed);
                    n += 2;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();

    // Storage nodes coming and going (from this thread), and the samples.
    // Room for every sample from the start: the soak's own bookkeeping must not count as the
    // clients' heap growing.
    let room = (secs / args.sample_every.max(0.1)) as usize + 2;
    let mut samples: Vec<(f64, Row)> = Vec::with_capacity(room);
    // The clients' resident memory, printed only (see the module's documentation).
    let mut own_rss: Vec<u64> = Vec::with_capacity(room);
    let mut next_sample = 0.0;
    let mut nodes = 0u64;
    let mut transient: Option<(StorageNode, f64)> = None;
    while t0.elapsed().as_secs_f64() < secs {
        let now = t0.elapsed().as_secs_f64();
        if now >= next_sample {
            let rest = gate.write().await;
            // Dropped stores finish shutting down on the runtime.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut row: Row = [(0, 0); WATCHED];
            for ((name, pid), slot) in watched.iter().zip(&mut row) {
                let (fds, rss) =
                    sample(*pid).ok_or_else(|| format!("{name} (pid {pid}) is gone"))?;
                *slot = if *pid == std::process::id() {
                    if own_rss.len() < own_rss.capacity() {
                        own_rss.push(rss);
                    }
                    (fds, HEAP_LIVE.load(Ordering::Relaxed) / 1024)
                } else {
                    (fds, rss)
                };
            }
            drop(rest);
            if samples.len() < samples.capacity() {
                samples.push((now, row));
            }
            next_sample += args.sample_every;
        }
        match transient.take() {
            None => {
                nodes += 1;
                let node = StorageNode::start(
                    &client_bin,
                    dir,
                    &format!("storage-t{}", nodes % 4),
                    &addr,
                    "16MB",
                )?;
                transient = Some((node, now + 3.0));
            }
            Some((mut node, until)) if now >= until => {
                if nodes % 2 == 0 {
                    node.stop();
                } else {
                    node.kill();
                }
            }
            Some(t) => transient = Some(t),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in churners {
        let _ = c.await;
    }
    drop(transient);
    let _ = master.kill();
    let _ = master.wait();

    println!(
        "leak_soak: {:.0} s, {} client lives, {} storage nodes came and went, {} call errors",
        secs,
        lives.load(Ordering::Relaxed),
        nodes,
        errors.load(Ordering::Relaxed)
    );
    // The master's remembered request outcomes fill for `REQUEST_MEMORY_MS` (60 s).
    let warmup = (secs / 4.0).max(70.0);
    let after: Vec<&(f64, Row)> = samples.iter().filter(|s| s.0 >= warmup).collect();
    let fifth = (after.len() / 5).max(1);
    if after.len() < 2 * fifth {
        return Err(format!("only {} samples after the warm-up", after.len()));
    }
    let (first, last) = (&after[..fifth], &after[after.len() - fifth..]);
    let level = |rows: &[&(f64, Row)], i: usize, fd: bool| -> u64 {
        let mut v: Vec<u64> = (rows.iter())
            .map(|r| if fd { r.1[i].0 } else { r.1[i].1 })
            .collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let mut passed = true;
    for (i, (name, pid)) in watched.iter().enumerate() {
        let heap = *pid == std::process::id();
        let memory = if heap { "heap KiB" } else { "RSS KiB" };
        for (what, fd) in [("fds", true), (memory, false)] {
            let (a, b) = (level(first, i, fd), level(last, i, fd));
            let growth = if a == 0 {
                0.0
            } else {
                (b as f64 - a as f64) * 100.0 / a as f64
            };
            let start = if fd {
                samples[0].1[i].0
            } else {
                samples[0].1[i].1
            };
            let least = match (fd, heap) {
                (true, _) => 2,
                (false, true) => 64,
                (false, false) => 0,
            };
            let over = growth > args.max_growth && b >= a + least;
            println!(
                "{name:10} {what:12} at start {start:8}, after warm-up {a:8}, at the end {b:8} \
                 ({growth:+.1}%){}",
                if over { "  TOO MUCH GROWTH" } else { "" }
            );
            passed &= !over;
        }
    }
    if let (Some(a), Some(b)) = (own_rss.first(), own_rss.last()) {
        println!("clients    RSS KiB      at start {a:8}, at the end {b:8} (not judged)");
    }
    drop(long_lived);
    Ok(passed)
}
