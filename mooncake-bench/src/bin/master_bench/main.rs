//! `master_bench`: master throughput through a Raft master group against a single in-memory
//! master, in one run. See [`USAGE`].

mod cluster;
mod load;
mod stats;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cluster::Deployment;
use load::{LoadConfig, Mode, Target, Workload};
use stats::{ratio, Summary};

const USAGE: &str = "\
master_bench: put commits/s and is_exist/s through a Raft master group vs a single in-memory
master, both started here as mooncake_master processes on loopback (127.0.0.1)

USAGE:
    master_bench [FLAGS]

Both deployments run for the whole run; each measurement alternates between them (which goes
first alternates too) so both see the same machine. Every client task has its own connection
to the master(s) and its own client id; the segments are mounted by the bench (a large fake
segment per host, so metadata-only puts never run out of space) and kept alive by heartbeats.
Keys written by a put measurement are removed after it (untimed).

FLAGS:
    --quick               concurrency 8, batch 16, 0.5 s x 3 (about 20 s); flags below override
    --duration S          timed window of one measurement, seconds (default 2)
    --warmup S            untimed calls before the window, seconds (default 0.2)
    --repeats N           measurements of each configuration and deployment (default 3)
    --concurrency LIST    client tasks calling at once (default 1,8,32)
    --batch LIST          keys per batched call (default 16,128)
    --modes LIST          put,put_batch,exist,exist_batch (default all)
    --value_size N        size of each put value (default 1M; suffixes K M G T, powers of 2)
    --replicas N          replicas per put (default 1)
    --segments N          segments mounted, one per fake host (default 4)
    --segment_size N      size of each segment (default 4T)
    --exist_keys N        keys written for the lookups (default 10000)
    --preload N           objects written before measuring and kept, so the master holds a
                          realistic amount of state (default 0)
    --group_size N        members of the Raft group (default 3)
    --raft_tick_ms N      the group's Raft tick (default 100, mooncake_master's default)
    --shared_connection   all client tasks share one connection per master (one RemoteMaster)
    --client_threads N    worker threads of this process's runtime (default 2)
    --master_bin PATH     mooncake_master to run (default: next to this executable)
    --data_dir DIR        where the group's Raft logs go (default: the system temp dir)
    -h, --help            this text

Modes (ops = put commits for puts, keys answered for lookups):
    put           PutStart then PutEnd of one fresh key: one op, one call (two round trips)
    put_batch     BatchPutStart then BatchPutEnd of --batch fresh keys: --batch ops per call
    exist         ExistKey of a key that exists
    exist_batch   BatchExistKey of --batch keys that exist

Columns (medians over the repeats): ops/s; spr% = (max - min) / median of ops/s; calls/s; per-call
latency p50/p99 (us); cpu = cores used by the master processes (sum); rq = time their threads
waited for a CPU, in threads (CPU starvation); ldr = cores used by the busiest member (the
leader); raft = share of the time the leader's Raft loop thread was on a CPU (near 1: the loop
is CPU-bound; low: it waits on fsync, the network or the clients); cli = cores used by this
process; g/s = group ops/s / single ops/s.

Targets (from this run; PASS/MISS, misses do not change the exit code):
    group put commits/s, best configuration (batched or not)      >= 20000
    group / single put commits/s, batched puts, best vs best       >= 50%
";

#[derive(Clone, Debug)]
struct Args {
    load: LoadConfig,
    repeats: usize,
    concurrency: Vec<usize>,
    batches: Vec<usize>,
    modes: Vec<Mode>,
    group_size: u64,
    raft_tick_ms: u64,
    client_threads: usize,
    master_bin: PathBuf,
    data_dir: PathBuf,
}

/// A size option: [`mooncake_core::parse_size`]'s rules, and not zero.
fn positive_size(s: &str) -> Result<u64, String> {
    match mooncake_core::parse_size(s) {
        Ok(0) => Err(format!("{s:?} is not a positive size")),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_list<T: std::str::FromStr>(flag: &str, s: &str) -> Result<Vec<T>, String> {
    let v: Result<Vec<T>, _> = s.split(',').map(|x| x.trim().parse::<T>()).collect();
    match v {
        Ok(v) if !v.is_empty() => Ok(v),
        _ => Err(format!(
            "--{flag}: {s:?} is not a comma-separated list of numbers"
        )),
    }
}

fn num<T: std::str::FromStr>(flag: &str, s: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("--{flag}: {s:?} is not a valid number"))
}

fn secs(flag: &str, s: &str) -> Result<Duration, String> {
    let v: f64 = num(flag, s)?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("--{flag}: {s:?} is not a duration in seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Flags that take a value.
const VALUED: &[&str] = &[
    "duration",
    "warmup",
    "repeats",
    "concurrency",
    "batch",
    "modes",
    "value_size",
    "replicas",
    "segments",
    "segment_size",
    "exist_keys",
    "preload",
    "group_size",
    "raft_tick_ms",
    "client_threads",
    "master_bin",
    "data_dir",
];

/// Flags without a value.
const SWITCHES: &[&str] = &["quick", "shared_connection"];

/// Parses the arguments after the program name; `Ok(None)` asks for the usage.
fn parse_args(argv: &[String]) -> Result<Option<Args>, String> {
    // Split `--flag=value` and `--flag value` into pairs first, so --quick can set defaults
    // that later flags override wherever they stand.
    let mut pairs: Vec<(String, Option<String>)> = Vec::new();
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        if a == "-h" || a == "--help" {
            return Ok(None);
        }
        let Some(flag) = a.strip_prefix("--") else {
            return Err(format!("unexpected argument {a:?} (see --help)"));
        };
        let bare = flag.split_once('=').map_or(flag, |(n, _)| n);
        if !VALUED.contains(&bare) && !SWITCHES.contains(&bare) {
            return Err(format!("unknown flag --{bare} (see --help)"));
        }
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None if SWITCHES.contains(&flag) => (flag.to_owned(), None),
            None => (
                flag.to_owned(),
                Some(it.next().ok_or(format!("--{flag} needs a value"))?.clone()),
            ),
        };
        pairs.push((name, value));
    }
    let quick = pairs.iter().any(|(n, _)| n == "quick");
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_default();
    let mut a = Args {
        load: LoadConfig {
            duration: Duration::from_secs_f64(if quick { 0.5 } else { 2.0 }),
            warmup: Duration::from_secs_f64(if quick { 0.1 } else { 0.2 }),
            value_size: 1 << 20,
            replicas: 1,
            segments: 4,
            segment_size: 4 << 40,
            exist_keys: 10_000,
            preload: 0,
            shared_connection: false,
            max_concurrency: 0,
        },
        repeats: 3,
        concurrency: if quick { vec![8] } else { vec![1, 8, 32] },
        batches: if quick { vec![16] } else { vec![16, 128] },
        modes: Mode::ALL.to_vec(),
        group_size: 3,
        raft_tick_ms: 100,
        client_threads: 2,
        master_bin: exe_dir.join("mooncake_master"),
        data_dir: std::env::temp_dir(),
    };
    for (name, value) in pairs {
        let v = value.as_deref().unwrap_or("");
        let l = &mut a.load;
        match name.as_str() {
            "quick" => {}
            "shared_connection" => l.shared_connection = true,
            "duration" => l.duration = secs(&name, v)?,
            "warmup" => l.warmup = secs(&name, v)?,
            "repeats" => a.repeats = num(&name, v)?,
            "concurrency" => a.concurrency = parse_list(&name, v)?,
            "batch" => a.batches = parse_list(&name, v)?,
            "modes" => {
                a.modes = v
                    .split(',')
                    .map(|m| Mode::parse(m.trim()).ok_or(format!("--modes: unknown mode {m:?}")))
                    .collect::<Result<_, _>>()?
            }
            "value_size" => l.value_size = positive_size(v)?,
            "replicas" => l.replicas = num(&name, v)?,
            "segments" => l.segments = num(&name, v)?,
            "segment_size" => l.segment_size = positive_size(v)?,
            "exist_keys" => l.exist_keys = num(&name, v)?,
            "preload" => l.preload = num(&name, v)?,
            "group_size" => a.group_size = num(&name, v)?,
            "raft_tick_ms" => a.raft_tick_ms = num(&name, v)?,
            "client_threads" => a.client_threads = num(&name, v)?,
            "master_bin" => a.master_bin = PathBuf::from(v),
            "data_dir" => a.data_dir = PathBuf::from(v),
            other => return Err(format!("unknown flag --{other} (see --help)")),
        }
    }
    if a.load.duration.is_zero()
        || a.repeats == 0
        || a.group_size == 0
        || a.raft_tick_ms == 0
        || a.client_threads == 0
        || a.load.exist_keys == 0
        || a.load.segments == 0
        || a.load.replicas == 0
        || a.concurrency.contains(&0)
        || a.batches.contains(&0)
        || a.modes.is_empty()
    {
        return Err("durations, counts, sizes and list items must be positive".into());
    }
    a.load.max_concurrency = a.concurrency.iter().copied().max().unwrap_or(1);
    Ok(Some(a))
}

/// The configurations to measure, in order.
fn plan(a: &Args) -> Vec<Workload> {
    let mut out = Vec::new();
    for &mode in &a.modes {
        for &concurrency in &a.concurrency {
            let batches = if mode.is_batched() {
                a.batches.clone()
            } else {
                vec![1]
            };
            for batch in batches {
                out.push(Workload {
                    mode,
                    concurrency,
                    batch,
                });
            }
        }
    }
    out
}

/// The medians of one configuration on both deployments.
struct Row {
    w: Workload,
    single: Summary,
    group: Summary,
}

const HEADER: &str =
    "mode         conc batch |  single ops/s spr%  calls/s p50us p99us  cpu   rq  cli \
                      |   group ops/s spr%  calls/s p50us p99us  cpu   rq  ldr raft  cli |   g/s";

fn format_row(r: &Row) -> String {
    let side = |s: &Summary| {
        format!(
            "{:>13.0} {:>4.0} {:>8.0} {:>5.0} {:>5.0} {:>4.2} {:>4.2}",
            s.ops_per_sec,
            s.spread_pct,
            s.calls_per_sec,
            s.p50_us,
            s.p99_us,
            s.server_cores,
            s.runqueue_threads
        )
    };
    format!(
        "{:<12} {:>4} {:>5} | {} {:>4.2} | {} {:>4.2} {:>4.2} {:>4.2} | {:>5.3}",
        r.w.mode.name(),
        r.w.concurrency,
        r.w.batch,
        side(&r.single),
        r.single.client_cores,
        side(&r.group),
        r.group.busiest_cores,
        r.group.raft_loop_busy,
        r.group.client_cores,
        ratio(r.group.ops_per_sec, r.single.ops_per_sec)
    )
}

/// The target lines, from every row measured.
fn verdicts(rows: &[Row]) -> Vec<String> {
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let best = |pred: &dyn Fn(&Row) -> bool, side: fn(&Row) -> f64| {
        rows.iter()
            .filter(|r| pred(r))
            .max_by(|a, b| side(a).total_cmp(&side(b)))
    };
    let group = |r: &Row| r.group.ops_per_sec;
    let single = |r: &Row| r.single.ops_per_sec;
    let at = |r: &Row| {
        format!(
            "{} conc={} batch={}",
            r.w.mode.name(),
            r.w.concurrency,
            r.w.batch
        )
    };
    let mut out = Vec::new();
    match best(&|r| r.w.mode.is_put(), group) {
        Some(r) => out.push(format!(
            "TARGET group put commits/s >= 20000: {:.0} ({}) {}",
            group(r),
            at(r),
            verdict(group(r) >= 20_000.0)
        )),
        None => out.push("TARGET group put commits/s >= 20000: SKIP (no put measured)".into()),
    }
    let batched = |r: &Row| r.w.mode == Mode::PutBatch;
    match (best(&batched, group), best(&batched, single)) {
        (Some(g), Some(s)) => {
            let pct = 100.0 * ratio(group(g), single(s));
            out.push(format!(
                "TARGET group/single batched put commits/s >= 50%: {pct:.1}% \
                 (group {:.0} at {}, single {:.0} at {}) {}",
                group(g),
                at(g),
                single(s),
                at(s),
                verdict(pct >= 50.0)
            ));
            let same: Vec<f64> = rows
                .iter()
                .filter(|r| batched(r))
                .map(|r| 100.0 * ratio(group(r), single(r)))
                .collect();
            out.push(format!(
                "INFO group/single batched puts at the same concurrency and batch: {:.1}% to {:.1}%",
                same.iter().copied().fold(f64::MAX, f64::min),
                same.iter().copied().fold(0.0, f64::max)
            ));
        }
        _ => out.push(
            "TARGET group/single batched put commits/s >= 50%: SKIP (no put_batch measured)".into(),
        ),
    }
    let unbatched = |r: &Row| r.w.mode == Mode::Put;
    if let (Some(g), Some(s)) = (best(&unbatched, group), best(&unbatched, single)) {
        out.push(format!(
            "INFO unbatched put commits/s, best: group {:.0} ({}), single {:.0} ({})",
            group(g),
            at(g),
            single(s),
            at(s)
        ));
    }
    for (name, mode) in [("exist", Mode::Exist), ("exist_batch", Mode::ExistBatch)] {
        let m = |r: &Row| r.w.mode == mode;
        if let (Some(g), Some(s)) = (best(&m, group), best(&m, single)) {
            out.push(format!(
                "INFO {name} keys/s, best: group {:.0} ({}), single {:.0} ({})",
                group(g),
                at(g),
                single(s),
                at(s)
            ));
        }
    }
    out
}

async fn run(a: Args) -> Result<(), String> {
    if !a.master_bin.is_file() {
        return Err(format!(
            "{} not found: build it (cargo build --release -p mooncake-master-service --bin mooncake_master) or pass \
             --master_bin",
            a.master_bin.display()
        ));
    }
    cluster::kill_on_signal();
    // Declared first so that it is dropped (removed) after the deployments.
    let data = cluster::DataDir::create(
        a.data_dir
            .join(format!("mooncake-master-bench-{}", std::process::id())),
    )?;
    let dir = &data.0;
    let started = Instant::now();
    let single = Deployment::single(&a.master_bin, dir)?;
    let group = Deployment::group(&a.master_bin, dir, a.group_size, a.raft_tick_ms)?;
    single.wait_ready(Duration::from_secs(10)).await?;
    let leader = group.wait_ready(Duration::from_secs(30)).await?;
    println!(
        "masters: single, and a group of {} with member {} leading after {:.1} s; Raft logs in {}",
        a.group_size,
        leader + 1,
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    let pids: Vec<String> = single
        .pids()
        .into_iter()
        .chain(group.pids())
        .map(|p| p.to_string())
        .collect();
    println!("master pids: {}", pids.join(" "));
    let setup = Instant::now();
    let mut targets = [
        Target::setup(single, &a.load).await?,
        Target::setup(group, &a.load).await?,
    ];
    println!(
        "set-up (segments, lookup keys, preloaded objects) took {:.1} s",
        setup.elapsed().as_secs_f64()
    );
    println!(
        "load: {:.1} s windows after {:.1} s warm-up, {} repeats; value {} B x {} replica(s); \
         {} lookup keys, {} preloaded objects; {}",
        a.load.duration.as_secs_f64(),
        a.load.warmup.as_secs_f64(),
        a.repeats,
        a.load.value_size,
        a.load.replicas,
        a.load.exist_keys,
        a.load.preload,
        if a.load.shared_connection {
            "one shared connection per master"
        } else {
            "one connection per client task"
        }
    );
    println!();
    println!("{HEADER}");
    let mut rows = Vec::new();
    for w in plan(&a) {
        let mut runs = [Vec::new(), Vec::new()];
        for rep in 0..a.repeats {
            let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
            for t in order {
                runs[t].push(targets[t].measure(w, &a.load).await?);
            }
        }
        let row = Row {
            w,
            single: Summary::of(&runs[0]),
            group: Summary::of(&runs[1]),
        };
        let errors = row.single.errors + row.group.errors;
        println!(
            "{}{}",
            format_row(&row),
            if errors > 0 {
                format!("  ({errors} errors)")
            } else {
                String::new()
            }
        );
        rows.push(row);
    }
    println!();
    for line in verdicts(&rows) {
        println!("{line}");
    }
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse_args(&argv) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("master_bench: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The masters are started on this thread (their parent-death signal is tied to it), and
    // dropped, killed, when `run` returns or unwinds.
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("master_bench: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Result<Option<Args>, String> {
        parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_and_quick_defaults() {
        let a = args(&["--quick", "--duration=0.2", "--batch", "4,8"])
            .unwrap()
            .unwrap();
        assert_eq!(a.load.duration, Duration::from_millis(200));
        assert_eq!(a.concurrency, vec![8]);
        assert_eq!(a.batches, vec![4, 8]);
        assert_eq!(a.load.max_concurrency, 8);
        // put, put_batch x 2, exist, exist_batch x 2
        assert_eq!(plan(&a).len(), 6);
        let d = args(&["--value_size=4K", "--modes", "put,exist"])
            .unwrap()
            .unwrap();
        assert_eq!(d.load.value_size, 4096);
        assert_eq!(d.concurrency, vec![1, 8, 32]);
        assert_eq!(plan(&d).len(), 6);
        assert!(args(&["--help"]).unwrap().is_none());
        for bad in [
            &["--nope=1"][..],
            &["--nope"],
            &["--modes=put,get"],
            &["--batch=0"],
            &["--duration"],
            &["stray"],
            &["--value_size=1Q"],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_take_upstream_spellings() {
        assert_eq!(positive_size("16MB"), Ok(16 << 20));
        assert_eq!(positive_size("16 MiB"), Ok(16 << 20));
        assert_eq!(positive_size("4k"), Ok(4096));
        assert!(positive_size("0").is_err());
        assert!(positive_size("1Q").is_err());
        let d = args(&["--segment_size=1GB"]).unwrap().unwrap();
        assert_eq!(d.load.segment_size, 1 << 30);
    }

    #[test]
    fn verdicts_compare_best_against_best() {
        let s = |ops: f64| Summary {
            ops_per_sec: ops,
            ..Summary::default()
        };
        let row = |mode, batch, single: f64, group: f64| Row {
            w: Workload {
                mode,
                concurrency: 8,
                batch,
            },
            single: s(single),
            group: s(group),
        };
        let rows = [
            row(Mode::Put, 1, 50_000.0, 5_000.0),
            row(Mode::PutBatch, 16, 100_000.0, 30_000.0),
            row(Mode::PutBatch, 128, 200_000.0, 90_000.0),
        ];
        let v = verdicts(&rows);
        assert!(v[0].starts_with("TARGET group put commits/s >= 20000: 90000"));
        assert!(v[0].ends_with("PASS"));
        assert!(v[1].contains("45.0%") && v[1].ends_with("MISS"), "{}", v[1]);
        assert!(v[2].contains("30.0% to 45.0%"), "{}", v[2]);
        let line = format_row(&rows[1]);
        let tokens: Vec<&str> = line.split_whitespace().filter(|t| *t != "|").collect();
        assert_eq!(tokens[..3], ["put_batch", "8", "16"]);
        assert_eq!(tokens.last(), Some(&"0.300"));
    }
}
