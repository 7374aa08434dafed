//! A chaos soak of the replicated store: a 3-member `mooncake_master` group (Raft), two
//! `mooncake_client` storage nodes and clients writing with `replica_num=2`, while the leader is
//! killed (SIGKILL, then restarted) or frozen (SIGSTOP for 5 s, then SIGCONT) in turn every
//! 10 s, and one storage node is killed (and a fresh one started) once per run.
//!
//! `scripts/chaos_soak.sh [--seconds N]` builds and runs it (`chaos_soak --help` for the knobs).
//!
//! Every operation is recorded (start, end, result, value) and the history is checked afterwards
//! (see the `check` module): no acknowledged write lost, no read of a value never written or
//! already replaced when the read started, and, from the members' role lines, no term with two
//! leaders. Per failover it reports how long writes were unavailable (the longest gap between
//! acknowledged writes from just before the kill or freeze to the next event). It exits non-zero on
//! any violation, on a failover after which no leader or no write came back, and (with
//! `--strict`) on wrong outcomes reported to a caller.

mod check;
mod cluster;
#[allow(dead_code)] // shared with leak_soak
mod procs;
mod workload;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mooncake_store::{Store, StoreConfig};

use check::{Checker, Kind, Op, Res};
use cluster::Group;
use procs::StorageNode;
use workload::{run_op, secs, worker};

#[derive(Parser, Debug)]
#[command(about = "Chaos soak of a replicated mooncake store (see the module docs)")]
struct Args {
    /// How long the clients run, in seconds (the checks and final reads come after).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds between leader kills/freezes.
    #[arg(long, default_value_t = 10)]
    interval: u64,
    /// How long a frozen leader stays frozen, in seconds.
    #[arg(long, default_value_t = 5)]
    freeze: u64,
    /// Keys the clients choose from.
    #[arg(long, default_value_t = 200)]
    keys: u32,
    /// Client workers.
    #[arg(long, default_value_t = 3)]
    clients: u32,
    /// Seed of the workload (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds after its caller saw it fail that an unknown-outcome write may still take effect.
    #[arg(long, default_value_t = 20.0)]
    grace: f64,
    /// `mooncake_master` (default: beside this binary).
    #[arg(long)]
    master_bin: Option<PathBuf>,
    /// `mooncake_client` (default: beside this binary).
    #[arg(long)]
    client_bin: Option<PathBuf>,
    /// Directory for the members' data and every process's log (default: a fresh temporary
    /// one, removed after a passing run).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Writes the history (one operation a line, tab-separated) to this file.
    #[arg(long)]
    history: Option<PathBuf>,
    /// Checks the history in this file (as `--history` writes it) and exits: no processes.
    #[arg(long)]
    check: Option<PathBuf>,
    /// Also fail on wrong outcomes reported to callers (a remove answered OBJECT_NOT_FOUND on a
    /// key holding a value, a write reported failed that was applied).
    #[arg(long)]
    strict: bool,
}

/// A kill or freeze of the leader.
struct Failover {
    at: f64,
    kind: &'static str,
    member: u64,
    term: u64,
    /// Seconds until a new leader announced itself.
    election: Option<f64>,
}

fn beside_me(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn store_config(masters: &str) -> StoreConfig {
    StoreConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: masters.into(),
        global_segment_size: 0,
        local_buffer_size: 16 << 20,
        ..StoreConfig::default()
    }
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[i.clamp(1, v.len()) - 1]
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
    if let Some(path) = &args.check {
        std::process::exit(check_file(path, &args));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The controller runs on this thread, so the processes it starts (which die with the
    // thread that started them) live as long as the run.
    let code = rt.block_on(run(args));
    rt.shutdown_timeout(Duration::from_secs(5));
    std::process::exit(code);
}

/// `--check FILE`: the checks of a recorded history.
fn check_file(path: &Path, args: &Args) -> i32 {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            println!("chaos_soak: reading {}: {e}", path.display());
            return 2;
        }
    };
    let mut history = Vec::new();
    for (n, line) in text.lines().enumerate() {
        match check::parse_line(line) {
            Some(op) => history.push(op),
            None => {
                println!("chaos_soak: {}:{}: unparsable line", path.display(), n + 1);
                return 2;
            }
        }
    }
    let report = Checker {
        grace: args.grace,
        takeover: 30.0,
    }
    .check(&history);
    print_violations(&report);
    let wrong_outcomes = report.remove_not_found_on_present.len() + report.failed_but_applied.len();
    if report.violations() == 0 && (!args.strict || wrong_outcomes == 0) {
        println!("chaos_soak: history of {} operations PASSES", history.len());
        0
    } else {
        println!("chaos_soak: history of {} operations FAILS", history.len());
        1
    }
}

/// Prints the violations and wrong outcomes of `report` (up to 20 of each kind).
fn print_violations(report: &check::Report) {
    let show = |title: &str, v: &[check::Violation]| {
        println!("{title}: {}", v.len());
        for x in v.iter().take(20) {
            println!("  {}: {}", x.what, x.detail);
        }
    };
    show("LOST acknowledged writes", &report.lost_writes);
    show("WRONG reads (stale)", &report.stale_reads);
    show("WRONG reads (bad values)", &report.bad_values);
    show(
        "wrong outcomes: remove answered -704 on a key holding a value",
        &report.remove_not_found_on_present,
    );
    println!(
        "  (removes answered -704 in all: {}, treated as unknown outcome)",
        report.remove_not_found
    );
    show(
        "wrong outcomes: writes reported failed (not a timeout) but applied",
        &report.failed_but_applied,
    );
}

async fn run(args: Args) -> i32 {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let temp = args.dir.is_none();
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("mooncake-chaos-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(dir.join("raft-1"));
    let _ = std::fs::remove_dir_all(dir.join("raft-2"));
    let _ = std::fs::remove_dir_all(dir.join("raft-3"));
    std::fs::create_dir_all(&dir).expect("run directory");
    println!(
        "chaos_soak: {} s, {} clients, {} keys, seed {seed}, logs in {}",
        args.seconds,
        args.clients,
        args.keys,
        dir.display()
    );
    match soak(&args, seed, &dir).await {
        Ok(true) => {
            if temp {
                let _ = std::fs::remove_dir_all(&dir);
            }
            println!("chaos_soak: PASS");
            0
        }
        Ok(false) => {
            println!(
                "chaos_soak: FAIL (seed {seed}; logs kept in {})",
                dir.display()
            );
            1
        }
        Err(e) => {
            println!(
                "chaos_soak: ERROR {e} (seed {seed}; logs in {})",
                dir.display()
            );
            2
        }
    }
}

/// The whole run; `Ok(passed)`.
async fn soak(args: &Args, seed: u64, dir: &Path) -> Result<bool, String> {
    let master_bin = args
        .master_bin
        .clone()
        .unwrap_or_else(|| beside_me("mooncake_master"));
    let client_bin = args
        .client_bin
        .clone()
        .unwrap_or_else(|| beside_me("mooncake_client"));
    let flags = [
        "--metrics_port=0".to_owned(),
        // Reads lease a key for this long; removes of a leased key are refused (-706).
        "--default_kv_lease_ttl=1000".to_owned(),
    ];
    let mut group = Group::start(&master_bin, dir, 3, &flags)?;
    let masters = group.addresses();
    group
        .await_leader(0, Duration::from_secs(30))
        .await
        .ok_or("no first leader within 30 s")?;
    let mut storage = [
        StorageNode::start(&client_bin, dir, "storage-1", &masters, "64MB")?,
        StorageNode::start(&client_bin, dir, "storage-2", &masters, "64MB")?,
    ];
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        clients.push(
            Store::setup(store_config(&masters))
                .await
                .map_err(|e| format!("client setup: {e}"))?,
        );
    }
    let started = Instant::now();
    loop {
        if let Ok(m) = clients[0].master_metrics().await {
            if m.segment_count >= 2 {
                break;
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            return Err("the storage nodes did not mount within 30 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(worker(
                c.clone(),
                i as u32 + 1,
                args.keys,
                seed,
                t0,
                stop.clone(),
            ))
        })
        .collect();

    // The chaos: leader events every `interval` seconds, kills and freezes in turn, and one
    // storage node killed half an interval after the kill nearest the middle of the run.
    let interval = args.interval.max(2) as f64;
    let events = ((args.seconds as f64 - 2.0) / interval).floor().max(0.0) as usize;
    let mut storage_event = (events.saturating_sub(1)) / 2;
    if storage_event % 2 == 1 {
        storage_event -= 1;
    }
    let mut failovers: Vec<Failover> = Vec::new();
    let mut findings: Vec<String> = Vec::new();
    let mut storage_kill: Option<f64> = None;
    let mut storage_seq = 2;
    let sleep_until = |t: f64| async move {
        let now = secs(t0);
        if t > now {
            tokio::time::sleep(Duration::from_secs_f64(t - now)).await;
        }
    };
    for e in 0..events {
        sleep_until((e + 1) as f64 * interval).await;
        let Some((leader, term)) = group.await_leader(0, Duration::from_secs(10)).await else {
            findings.push(format!("t={:.1}: no leader to strike", secs(t0)));
            continue;
        };
        let id = group.id(leader);
        let at = secs(t0);
        if e % 2 == 0 {
            group.kill(leader);
            let next = group.await_leader(term, Duration::from_secs(30)).await;
            let election = next.map(|_| secs(t0) - at);
            println!(
                "t={at:7.2}: SIGKILL leader {id} (term {term}); new leader after {}",
                election.map_or("(none within 30 s)".into(), |s| format!("{s:.2} s"))
            );
            failovers.push(Failover {
                at,
                kind: "kill",
                member: id,
                term,
                election,
            });
            tokio::time::sleep(Duration::from_secs(1)).await;
            group.restart(leader)?;
        } else {
            group.freeze(leader);
            let next = group.await_leader(term, Duration::from_secs(30)).await;
            let election = next.map(|_| secs(t0) - at);
            println!(
                "t={at:7.2}: SIGSTOP leader {id} (term {term}) for {} s; new leader after {}",
                args.freeze,
                election.map_or("(none within 30 s)".into(), |s| format!("{s:.2} s"))
            );
            failovers.push(Failover {
                at,
                kind: "freeze",
                member: id,
                term,
                election,
            });
            sleep_until(at + args.freeze as f64).await;
            group.thaw(leader);
        }
        if e == storage_event {
            sleep_until((e + 1) as f64 * interval + interval / 2.0).await;
            let at = secs(t0);
            println!(
                "t={at:7.2}: SIGKILL storage node {} ({})",
                storage_seq - 1,
                storage[0].segment
            );
            storage[0].kill();
            storage_kill = Some(at);
            tokio::time::sleep(Duration::from_secs(2)).await;
            storage_seq += 1;
            storage[0] = StorageNode::start(
                &client_bin,
                dir,
                &format!("storage-{storage_seq}"),
                &masters,
                "64MB",
            )?;
            println!(
                "t={:7.2}: started storage node {storage_seq} ({})",
                secs(t0),
                storage[0].segment
            );
        }
    }
    sleep_until(args.seconds as f64).await;
    stop.store(true, Ordering::Relaxed);
    let mut history: Vec<Op> = Vec::new();
    for w in workers {
        history.extend(w.await.map_err(|e| format!("worker: {e}"))?);
    }
    let stopped = secs(t0);

    // Final reads, once the group has a leader again: every key, retried until the answer is
    // definite (a value or not found).
    group
        .await_leader(0, Duration::from_secs(30))
        .await
        .ok_or("no leader after the chaos stopped")?;
    let reader = Store::setup(store_config(&masters))
        .await
        .map_err(|e| format!("final reader setup: {e}"))?;
    let mut unreadable = Vec::new();
    for key in 0..args.keys {
        let started = Instant::now();
        loop {
            let op = run_op(&reader, t0, key, Kind::Get, (0, key as u64), true).await;
            match op.res {
                Res::ReadErr(_) if started.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Res::ReadErr(code) => {
                    unreadable.push(format!("key {key}: still failing with {code} after 30 s"));
                    break;
                }
                _ => {
                    history.push(op);
                    break;
                }
            }
        }
    }
    let metrics = reader.master_metrics().await.ok();
    let _ = reader.close().await;
    for c in &clients {
        let _ = c.close().await;
    }

    if let Some(path) = &args.history {
        let out: String = history.iter().map(check::history_line).collect();
        std::fs::write(path, out).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }

    // --- The checks.
    let report = Checker {
        grace: args.grace,
        takeover: 30.0,
    }
    .check(&history);
    let by_term = group.leaders_by_term();
    let two_leaders: Vec<String> = by_term
        .iter()
        .filter(|(_, l)| l.len() > 1)
        .map(|(t, l)| format!("term {t}: leaders {l:?}"))
        .collect();

    // Write unavailability per failover: the longest gap between consecutive acknowledged
    // writes (puts, upserts, removes) from the last one before the kill or freeze to the last
    // one before the next event.
    let mut acks: Vec<f64> = history
        .iter()
        .filter(|o| o.kind != Kind::Get && o.res == Res::Ok && !o.last)
        .map(|o| o.end)
        .collect();
    acks.sort_by(f64::total_cmp);
    let gap_at = |t: f64, window: f64| -> Option<f64> {
        let i = acks.partition_point(|&a| a <= t);
        let mut prev = if i > 0 { acks[i - 1] } else { 0.0 };
        let mut worst = None;
        for (n, &a) in acks[i..].iter().enumerate() {
            // Gaps ending after the window belong to the next event, unless nothing was
            // acknowledged inside it.
            if a > t + window && n > 0 {
                break;
            }
            worst = Some(worst.unwrap_or(0.0f64).max(a - prev));
            prev = a;
        }
        worst
    };
    println!(
        "--- failovers (writes unavailable: the longest gap between acknowledged writes from \
         just before it to the next event)"
    );
    let (mut kill_gaps, mut freeze_gaps) = (Vec::new(), Vec::new());
    for f in &failovers {
        let gap = gap_at(f.at, interval);
        println!(
            "t={:7.2} {:6} leader {} (term {}): election {}, writes unavailable {}",
            f.at,
            f.kind,
            f.member,
            f.term,
            f.election.map_or("none".into(), |s| format!("{s:.2} s")),
            gap.map_or("(no write after it)".into(), |g| format!("{g:.2} s"))
        );
        match gap {
            Some(g) if f.kind == "kill" => kill_gaps.push(g),
            Some(g) => freeze_gaps.push(g),
            None => findings.push(format!(
                "no write acknowledged after the {} at t={:.1}",
                f.kind, f.at
            )),
        }
        if f.election.is_none() {
            findings.push(format!(
                "no new leader within 30 s of the {} at t={:.1}",
                f.kind, f.at
            ));
        }
    }
    let mut all_gaps: Vec<f64> = kill_gaps.iter().chain(&freeze_gaps).copied().collect();
    for v in [&mut kill_gaps, &mut freeze_gaps, &mut all_gaps] {
        v.sort_by(f64::total_cmp);
    }
    let fmt = |v: &[f64]| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "p50 {:.2} s, max {:.2} s (n={})",
                pct(v, 50.0),
                v[v.len() - 1],
                v.len()
            )
        }
    };
    println!("unavailable per kill:     {}", fmt(&kill_gaps));
    println!("unavailable per freeze:   {}", fmt(&freeze_gaps));
    println!("unavailable per failover: {}", fmt(&all_gaps));
    if let Some(at) = storage_kill {
        let writes_after: Vec<&Op> = history
            .iter()
            .filter(|o| matches!(o.kind, Kind::Put | Kind::Upsert) && o.start >= at && !o.last)
            .collect();
        let failed: Vec<&&Op> = writes_after
            .iter()
            .filter(|o| matches!(o.res, Res::Unknown(-800)))
            .collect();
        let last_fail = failed.iter().map(|o| o.end).fold(f64::NAN, f64::max);
        println!(
            "storage node killed at t={at:.1}: {} of {} later writes failed with -800{}; \
             longest write gap after it {}",
            failed.len(),
            writes_after.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(", the last {:.1} s after the kill", last_fail - at)
            },
            gap_at(at, interval / 2.0).map_or("-".into(), |g| format!("{g:.2} s"))
        );
    }

    println!("--- history: {} operations ({stopped:.1} s)", history.len());
    let counts: Vec<String> = report
        .counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!("{}", counts.join(", "));
    println!(
        "outcome unknown by code: {:?}; read errors by code: {:?}; puts counted as definite \
         writes: {}; reads checked: {}",
        report.unknown_by_code,
        report.read_errors_by_code,
        report.definite_puts,
        report.reads_checked
    );
    if let Some(m) = &metrics {
        println!(
            "master at the end: {} keys, {} segments, {} objects evicted",
            m.key_count, m.segment_count, m.counters.evicted_objects
        );
        if m.counters.evicted_objects > 0 {
            findings.push(format!(
                "{} objects were evicted (segments too small for the run): lost writes may be evictions",
                m.counters.evicted_objects
            ));
        }
    }
    println!(
        "terms with a leader: {}; terms with two leaders: {}",
        by_term.len(),
        two_leaders.len()
    );
    print_violations(&report);
    for t in &two_leaders {
        println!("  TWO LEADERS {t}");
    }
    for u in &unreadable {
        println!("  UNREADABLE {u}");
    }
    if acks.is_empty() {
        findings.push("no write was acknowledged".into());
    }
    for f in &findings {
        println!("  FINDING {f}");
    }
    let wrong_outcomes = report.remove_not_found_on_present.len() + report.failed_but_applied.len();
    let evicted = metrics.is_some_and(|m| m.counters.evicted_objects > 0);
    let failed_liveness = findings.iter().any(|f| !f.contains("evicted")) || !unreadable.is_empty();
    let passed = report.violations() == 0
        && two_leaders.is_empty()
        && !failed_liveness
        && !evicted
        && (!args.strict || wrong_outcomes == 0);
    println!(
        "summary: lost writes {}, wrong reads {}, wrong outcomes {} (+{} removes answered -704), \
         two-leader terms {}, unavailable per failover {}",
        report.lost_writes.len(),
        report.stale_reads.len() + report.bad_values.len(),
        wrong_outcomes,
        report.remove_not_found,
        two_leaders.len(),
        fmt(&all_gaps)
    );
    Ok(passed)
}
