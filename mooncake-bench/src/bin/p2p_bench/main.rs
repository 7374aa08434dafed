//! The P2P store's benchmark on a shaped network of namespaces (run as root).
//!
//! `cargo build --release -p mooncake-bench --bin p2p_bench && sudo target/release/p2p_bench`
//!
//! Builds a bridge and one network namespace per peer, with `tbf` on both ends of each veth
//! (upload and download caps; addresses in 198.18.0.0/15; namespaces named with a unique prefix
//! and always deleted at the end, on errors and Ctrl-C too), plus an unshaped namespace for the
//! HTTP metadata server that holds the catalog. It calibrates the shaping (one flow must reach
//! 90% of its rate and all links at once 85% each), then for each repeat and each mode starts
//! the origin and N receivers as separate processes (`ip netns exec`), lets every receiver start
//! `get_replica` at once, and reports T_all (first start to last verified copy), per-peer
//! completion p50/p99/max, efficiency T_lb/T_all, speedup T_cs/T_all, origin egress / S and
//! bytes received / (N·S) from the veths' counters, a BLAKE3 check of every copy against the
//! origin's, and CPU seconds (of every process of the run) per GB delivered. `--modes` runs
//! upstream Mooncake's behaviour (`PullMode::Upstream`) on the same network in the same run.
//!
//! Where `ip netns add` is not permitted it says so and exits 0. It exits 1 when a copy is
//! missing or differs from the origin, or on any other failure.
//!
//! Shapes: the default (256 MiB, origin + 8 receivers, 200 Mbit/s each way); `--slow-origin`
//! (origin 100 Mbit/s, peers 400 Mbit/s); `--kill-at-half` (a serving receiver SIGKILLed once it
//! holds half; the others must complete and verify); `--quick` (64 MiB, 4 receivers, 1 repeat,
//! both modes: about 20 s here). Node 0 (`n0`) is the origin, `n1`.. the receivers.

mod net;
mod worker;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use mooncake_core::parse_size;

use net::{Net, Node, Setup};
use worker::Fallible;

#[derive(Parser, Debug)]
#[command(about = "The P2P store's benchmark on a shaped network of namespaces (run as root)")]
struct Cli {
    /// Payload size.
    #[arg(long, default_value = "256MiB")]
    size: String,
    /// Receivers (besides the origin).
    #[arg(long, default_value_t = 8)]
    receivers: usize,
    /// Every peer's link, each way, in Mbit/s.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// The origin's link, each way, in Mbit/s (default: `--rate`).
    #[arg(long)]
    origin_rate: Option<f64>,
    /// Shorthand for `--origin-rate 100 --rate 400`.
    #[arg(long)]
    slow_origin: bool,
    /// Runs per mode; the summary gives the median and min-max.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Pull modes to run, each on the same network, alternating per repeat.
    #[arg(long, value_delimiter = ',', default_value = "swarm,upstream")]
    modes: Vec<String>,
    /// SIGKILL the first receiver once it holds half the payload (it serves pieces meanwhile);
    /// the others must complete and verify.
    #[arg(long)]
    kill_at_half: bool,
    /// CI-sized: 64 MiB, 4 receivers, 1 repeat (overrides those flags), short calibration.
    #[arg(long)]
    quick: bool,
    /// Shard size of the payload (pieces subdivide it).
    #[arg(long, default_value = "64MiB")]
    shard_size: String,
    /// Piece size (default: the store's automatic choice, about 512 pieces per payload).
    #[arg(long)]
    piece_size: Option<String>,
    /// Set up the network, calibrate it and stop.
    #[arg(long)]
    calibrate_only: bool,
    /// Namespace prefix (default: `mcb` and this process's id).
    #[arg(long)]
    prefix: Option<String>,
    #[command(subcommand)]
    role: Option<Role>,
}

/// The processes the driver starts inside the namespaces.
#[derive(Subcommand, Debug)]
enum Role {
    #[command(hide = true)]
    Meta { listen: String },
    #[command(hide = true)]
    Origin {
        url: String,
        local: String,
        name: String,
        size: u64,
        shard: u64,
        /// 0: automatic.
        piece_size: u64,
        seed: u64,
    },
    #[command(hide = true)]
    Receiver {
        url: String,
        local: String,
        name: String,
        size: u64,
        #[arg(long)]
        upstream: bool,
        #[arg(long)]
        report_half: bool,
    },
    #[command(hide = true)]
    Sink { listen: String, conns: usize },
    #[command(hide = true)]
    Source { to: String, secs: f64 },
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(role) = cli.role {
        return run_role(role);
    }
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, handler) };
    }
    match drive(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("p2p_bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_role(role: Role) -> ExitCode {
    let result = match role {
        Role::Sink { listen, conns } => worker::sink(&listen, conns),
        Role::Source { to, secs } => worker::source(&to, secs),
        role => tokio::runtime::Runtime::new()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(async move {
                    match role {
                        Role::Meta { listen } => worker::meta(&listen).await,
                        Role::Origin {
                            url,
                            local,
                            name,
                            size,
                            shard,
                            piece_size,
                            seed,
                        } => {
                            worker::origin(&url, &local, &name, size, shard, piece_size, seed).await
                        }
                        Role::Receiver {
                            url,
                            local,
                            name,
                            size,
                            upstream,
                            report_half,
                        } => {
                            worker::receiver(&url, &local, &name, size, upstream, report_half).await
                        }
                        _ => unreachable!("handled above"),
                    }
                })
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("error {e}");
            ExitCode::FAILURE
        }
    }
}

/// What one process printed, or its end of output.
enum Event {
    Line(usize, String),
    Eof(usize),
}

/// Processes started inside the namespaces; all killed and reaped on drop.
struct Procs {
    children: Vec<(String, Child, Option<ChildStdin>)>,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    queues: Vec<VecDeque<String>>,
    eof: Vec<bool>,
}

impl Procs {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        Procs {
            children: Vec::new(),
            tx,
            rx,
            queues: Vec::new(),
            eof: Vec::new(),
        }
    }

    /// Starts `p2p_bench ARGS` in `node`'s namespace; returns its index.
    fn spawn(&mut self, label: &str, node: &Node, args: &[String]) -> Fallible<usize> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.ns])
            .arg(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting {label}: {e}"))?;
        let i = self.children.len();
        let stdout = child.stdout.take().expect("piped");
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(Event::Line(i, line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Event::Eof(i));
        });
        let stdin = child.stdin.take();
        self.children.push((label.to_owned(), child, stdin));
        self.queues.push(VecDeque::new());
        self.eof.push(false);
        Ok(i)
    }

    /// The next event, `None` at `deadline`; fails once interrupted.
    fn pump(&mut self, deadline: Instant) -> Fallible<Option<Event>> {
        loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Err("interrupted".into());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            match self.rx.recv_timeout(wait) {
                Ok(ev) => return Ok(Some(ev)),
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("we hold a sender"),
            }
        }
    }

    fn note(&mut self, ev: Event) {
        match ev {
            Event::Line(i, l) => self.queues[i].push_back(l),
            Event::Eof(i) => self.eof[i] = true,
        }
    }

    /// Waits (at most `timeout`) for a line of process `who` that starts with `prefix`; lines
    /// before it are dropped, an `error` line or the process's exit fails.
    fn wait_line(&mut self, who: usize, prefix: &str, timeout: Duration) -> Fallible<String> {
        let deadline = Instant::now() + timeout;
        let label = self.children[who].0.clone();
        loop {
            while let Some(line) = self.queues[who].pop_front() {
                if let Some(e) = line.strip_prefix("error ") {
                    return Err(format!("{label}: {e}"));
                }
                if line.starts_with(prefix) {
                    return Ok(line);
                }
            }
            if self.eof[who] {
                return Err(format!("{label} exited before printing {prefix:?}"));
            }
            match self.pump(deadline)? {
                Some(ev) => self.note(ev),
                None => return Err(format!("{label}: no {prefix:?} within {timeout:?}")),
            }
        }
    }

    fn send(&mut self, who: usize, line: &str) -> Fallible {
        let (label, _, stdin) = &mut self.children[who];
        let stdin = stdin
            .as_mut()
            .ok_or_else(|| format!("{label}: stdin closed"))?;
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("{label}: {e}"))
    }

    fn kill(&mut self, who: usize) {
        let _ = self.children[who].1.kill();
    }

    /// Closes every stdin (the processes close their stores and exit) and reaps them, killing
    /// those still running after `grace`.
    fn finish(&mut self, grace: Duration) {
        for (_, _, stdin) in &mut self.children {
            stdin.take();
        }
        let deadline = Instant::now() + grace;
        for (_, child, _) in &mut self.children {
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child, stdin) in &mut self.children {
            stdin.take();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The shape of the network and the payload.
struct Shape {
    size: u64,
    shard: u64,
    /// 0: the store's automatic choice.
    piece: u64,
    n: usize,
    /// bit/s
    rate: f64,
    origin_rate: f64,
    repeats: usize,
    modes: Vec<bool>,
    kill: bool,
    calib_secs: f64,
}

impl Shape {
    fn bits(&self) -> f64 {
        self.size as f64 * 8.0
    }
    /// Kumar and Ross: max(S/u0, S/min d, N·S/(u0 + Σu)).
    fn t_lb(&self) -> f64 {
        let n = self.n as f64;
        let s = self.bits();
        (s / self.origin_rate)
            .max(s / self.rate)
            .max(n * s / (self.origin_rate + n * self.rate))
    }
    /// Client-server: max(N·S/u0, S/min d).
    fn t_cs(&self) -> f64 {
        (self.n as f64 * self.bits() / self.origin_rate).max(self.bits() / self.rate)
    }
}

fn mode_name(upstream: bool) -> &'static str {
    if upstream {
        "upstream"
    } else {
        "swarm"
    }
}

fn drive(cli: &Cli) -> Fallible<bool> {
    let mut shape = Shape {
        size: parse_size(&cli.size).map_err(|e| format!("--size: {e}"))?,
        shard: parse_size(&cli.shard_size).map_err(|e| format!("--shard-size: {e}"))?,
        piece: match &cli.piece_size {
            Some(p) => parse_size(p)
                .map_err(|e| format!("--piece-size: {e}"))?
                .max(1),
            None => 0,
        },
        n: cli.receivers,
        rate: cli.rate * 1e6,
        origin_rate: cli.origin_rate.unwrap_or(cli.rate) * 1e6,
        repeats: cli.repeats.max(1),
        modes: Vec::new(),
        kill: cli.kill_at_half,
        calib_secs: 3.0,
    };
    for m in &cli.modes {
        match m.as_str() {
            "swarm" => shape.modes.push(false),
            "upstream" => shape.modes.push(true),
            other => return Err(format!("--modes: unknown mode {other:?} (swarm, upstream)")),
        }
    }
    if cli.slow_origin {
        shape.origin_rate = 100e6;
        shape.rate = 400e6;
    }
    if cli.quick {
        shape.size = 64 << 20;
        shape.n = 4;
        shape.repeats = 1;
        shape.calib_secs = 1.5;
    }
    if shape.n == 0 || shape.n > 200 || shape.size == 0 || shape.size % 8 != 0 {
        return Err("need 1-200 receivers and a size that is a positive multiple of 8".into());
    }
    if shape.kill && shape.n < 2 {
        return Err("--kill-at-half needs at least 2 receivers".into());
    }
    let prefix = cli
        .prefix
        .clone()
        .unwrap_or_else(|| format!("mcb{}", std::process::id() % 100_000));

    let mut net = match Net::create(&prefix) {
        Setup::Ready(net) => net,
        Setup::NotPermitted(why) => {
            println!("p2p_bench: skipped: network namespaces are not permitted here ({why})");
            return Ok(true);
        }
    };
    for i in 0..=shape.n {
        let rate = if i == 0 {
            shape.origin_rate
        } else {
            shape.rate
        };
        net.add_node(i, (i + 1) as u8, Some(rate as u64))?;
    }
    net.add_node(shape.n + 1, 250, None)?;
    let mbit = |r: f64| r / 1e6;
    println!(
        "p2p_bench: S = {} MiB in pieces of {} KiB, origin + {} receivers, origin {} Mbit/s, \
         peers {} Mbit/s each way (tbf on both ends of each veth, namespaces {prefix}_*); \
         T_lb = {:.2} s, T_cs = {:.2} s",
        shape.size >> 20,
        match shape.piece {
            0 => mooncake_p2p::piece::auto_piece_size(shape.size),
            p => p,
        }
        .min(shape.shard)
            >> 10,
        shape.n,
        mbit(shape.origin_rate),
        mbit(shape.rate),
        shape.t_lb(),
        shape.t_cs()
    );
    calibrate(&net, &shape)?;
    if cli.calibrate_only {
        net.cleanup();
        return Ok(true);
    }

    let mut results: Vec<(bool, RunResult)> = Vec::new();
    let mut all_ok = true;
    for rep in 0..shape.repeats {
        for &upstream in &shape.modes {
            let r = run_once(&net, &shape, upstream, rep)?;
            println!(
                "run {} {}/{}: {}",
                mode_name(upstream),
                rep + 1,
                shape.repeats,
                r.line(&shape)
            );
            all_ok &= r.copies_ok == r.copies;
            results.push((upstream, r));
        }
    }
    summarize(&shape, &results);
    net.cleanup();
    if !all_ok {
        println!("p2p_bench: FAILED: a copy is missing or differs from the origin");
    }
    Ok(all_ok)
}

/// One flow per (from, to) pair at once; goodput of each as a fraction of min(up, down).
fn flows(net: &Net, shape: &Shape, pairs: &[(usize, usize)]) -> Fallible<Vec<f64>> {
    let mut procs = Procs::new();
    let mut sinks = Vec::new();
    for &(_, to) in pairs {
        let node = &net.nodes[to];
        let s = procs.spawn(
            &format!("sink {to}"),
            node,
            &["sink".into(), format!("{}:5201", node.addr), "1".into()],
        )?;
        sinks.push(s);
    }
    for &s in &sinks {
        procs.wait_line(s, "ready", Duration::from_secs(10))?;
    }
    for &(from, to) in pairs {
        procs.spawn(
            &format!("source {from}"),
            &net.nodes[from],
            &[
                "source".into(),
                format!("{}:5201", net.nodes[to].addr),
                shape.calib_secs.to_string(),
            ],
        )?;
    }
    let mut out = Vec::new();
    for (k, &s) in sinks.iter().enumerate() {
        let line = procs.wait_line(s, "flow", Duration::from_secs_f64(shape.calib_secs + 20.0))?;
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|w| w.parse().ok())
            .collect();
        let (from, to) = pairs[k];
        let cap = net.nodes[from]
            .rate
            .unwrap_or(0)
            .min(net.nodes[to].rate.unwrap_or(0)) as f64;
        out.push(match v[..] {
            [bytes, secs] if secs > 0.0 => bytes * 8.0 / secs / cap,
            _ => 0.0,
        });
    }
    procs.finish(Duration::from_secs(5));
    Ok(out)
}

fn calibrate(net: &Net, shape: &Shape) -> Fallible {
    let one = flows(net, shape, &[(1, 0)])?[0];
    let peers = shape.n + 1;
    let ring: Vec<_> = (0..peers).map(|i| (i, (i + 1) % peers)).collect();
    let all = flows(net, shape, &ring)?;
    let (worst, _) = (all.iter().enumerate())
        .min_by(|a, b| a.1.total_cmp(b.1))
        .expect("at least two flows");
    let mut sorted = all.clone();
    sorted.sort_by(f64::total_cmp);
    let ok1 = one >= 0.90;
    let ok_all = sorted[0] >= 0.85;
    println!(
        "calibration: one shaped flow {:.1}% of its rate ({}); {} simultaneous flows (every \
         link up and down at once) min {:.1}% (n{} -> n{}), median {:.1}% of their rates ({})",
        one * 100.0,
        if ok1 { "ok, >= 90%" } else { "BELOW 90%" },
        all.len(),
        sorted[0] * 100.0,
        ring[worst].0,
        ring[worst].1,
        sorted[sorted.len() / 2] * 100.0,
        if ok_all {
            "ok, >= 85% each"
        } else {
            "BELOW 85%"
        },
    );
    if !(ok1 && ok_all) {
        println!(
            "calibration: the shaped network does not deliver its rate on this machine; \
             the figures below are limited by it (lower --rate)"
        );
    }
    Ok(())
}

struct RunResult {
    t_all: f64,
    /// Completion time of each surviving receiver, from the first start.
    per_peer: Vec<f64>,
    egress: f64,
    received: f64,
    copies: usize,
    copies_ok: usize,
    cpu: f64,
    delivered: u64,
    duplicates: u64,
    failed_requests: u64,
    meta_bytes: u64,
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let k = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[k - 1]
}

impl RunResult {
    fn cpu_per_gb(&self) -> f64 {
        self.cpu / (self.delivered as f64 / 1e9)
    }
    fn line(&self, shape: &Shape) -> String {
        let p = &self.per_peer;
        format!(
            "T_all {:.2} s ({:.2} x T_lb); per peer p50 {:.2} p99 {:.2} max {:.2} s; efficiency \
             {:.2}; speedup {:.2}; origin egress {:.2} x S; received {:.3} x N·S; copies \
             verified {}/{}; CPU {:.2} s/GB; endgame duplicates {}, failed requests {}, \
             catalog traffic {:.1} MB",
            self.t_all,
            self.t_all / shape.t_lb(),
            pct(p, 0.5),
            pct(p, 0.99),
            pct(p, 1.0),
            shape.t_lb() / self.t_all,
            shape.t_cs() / self.t_all,
            self.egress,
            self.received,
            self.copies_ok,
            self.copies,
            self.cpu_per_gb(),
            self.duplicates,
            self.failed_requests,
            self.meta_bytes as f64 / 1e6,
        )
    }
}

fn counters(nodes: &[Node]) -> Fallible<Vec<(u64, u64)>> {
    nodes.iter().map(Net::counters).collect()
}

fn run_once(net: &Net, shape: &Shape, upstream: bool, rep: usize) -> Fallible<RunResult> {
    let cpu_before = worker::cpu_seconds(libc::RUSAGE_CHILDREN);
    let n = shape.n;
    let meta_node = &net.nodes[n + 1];
    let url = format!("http://{}:8080/metadata", meta_node.addr);
    let name = format!("bench/{}-{rep}", mode_name(upstream));
    let mut procs = Procs::new();
    let meta = procs.spawn(
        "metadata server",
        meta_node,
        &["meta".into(), format!("{}:8080", meta_node.addr)],
    )?;
    procs.wait_line(meta, "ready", Duration::from_secs(20))?;
    let origin = procs.spawn(
        "origin",
        &net.nodes[0],
        &[
            "origin".into(),
            url.clone(),
            net.nodes[0].addr.clone(),
            name.clone(),
            shape.size.to_string(),
            shape.shard.to_string(),
            shape.piece.to_string(),
            (rep as u64 * 2 + u64::from(upstream) + 1).to_string(),
        ],
    )?;
    let origin_hash = procs.wait_line(origin, "ready", Duration::from_secs(120))?[6..].to_owned();
    let victim = shape.kill.then_some(1);
    let mut recv = Vec::new();
    for i in 1..=n {
        let mut args = vec![
            "receiver".into(),
            url.clone(),
            net.nodes[i].addr.clone(),
            name.clone(),
            shape.size.to_string(),
        ];
        if upstream {
            args.push("--upstream".into());
        }
        if victim == Some(i) {
            args.push("--report-half".into());
        }
        recv.push(procs.spawn(&format!("receiver {i}"), &net.nodes[i], &args)?);
    }
    for &r in &recv {
        procs.wait_line(r, "ready", Duration::from_secs(60))?;
    }
    let before = counters(&net.nodes)?;
    for &r in &recv {
        procs.send(r, "go")?;
    }
    // Completion of every receiver (the victim excepted), killing the victim at half.
    let limit = Duration::from_secs_f64(shape.t_cs() * 4.0 + 120.0);
    let deadline = Instant::now() + limit;
    let mut done: Vec<Option<Vec<u128>>> = vec![None; n];
    let mut killed = false;
    let survivors = n - usize::from(victim.is_some());
    while done.iter().flatten().count() < survivors {
        let Some(ev) = procs.pump(deadline)? else {
            return Err(format!(
                "{} run: not complete within {limit:?}",
                mode_name(upstream)
            ));
        };
        let (i, line) = match ev {
            Event::Line(i, line) => (i, line),
            Event::Eof(i) => {
                if killed && Some(i) == victim.map(|v| recv[v - 1]) {
                    continue;
                }
                return Err(format!("{} exited during the run", procs.children[i].0));
            }
        };
        let Some(k) = recv.iter().position(|&r| r == i) else {
            continue;
        };
        if let Some(e) = line.strip_prefix("error ") {
            return Err(format!("receiver {}: {e}", k + 1));
        }
        if line.starts_with("half ") && victim == Some(k + 1) && !killed {
            procs.kill(i);
            killed = true;
            println!("  receiver {} SIGKILLed holding half the payload", k + 1);
        } else if let Some(rest) = line.strip_prefix("done ") {
            if victim == Some(k + 1) {
                // Finished before the kill: a run that tested nothing.
                return Err("the receiver to kill completed before it was killed".into());
            }
            done[k] = Some(
                rest.split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect(),
            );
        }
    }
    let after = counters(&net.nodes)?;
    let delta = |i: usize| {
        (
            after[i].0.saturating_sub(before[i].0),
            after[i].1.saturating_sub(before[i].1),
        )
    };
    let mut copies_ok = 0;
    for (k, &r) in recv.iter().enumerate() {
        if done[k].is_some() {
            procs.send(r, "verify")?;
            let h = procs.wait_line(r, "hash ", Duration::from_secs(60))?;
            if h[5..] == origin_hash {
                copies_ok += 1;
            } else {
                println!("  receiver {}: copy differs from the origin", k + 1);
            }
        }
    }
    let done: Vec<&Vec<u128>> = done.iter().flatten().collect();
    let first = done.iter().map(|d| d[0]).min().unwrap_or(0);
    let mut per_peer: Vec<f64> = done
        .iter()
        .map(|d| (d[1].saturating_sub(first)) as f64 / 1e9)
        .collect();
    per_peer.sort_by(f64::total_cmp);
    let sum_col = |c: usize| done.iter().map(|d| d[c] as u64).sum::<u64>();
    procs.finish(Duration::from_secs(20));
    drop(procs);
    let cpu = worker::cpu_seconds(libc::RUSAGE_CHILDREN) - cpu_before;
    let received: u64 = (1..=n).map(|i| delta(i).0).sum();
    Ok(RunResult {
        t_all: *per_peer.last().unwrap_or(&0.0),
        egress: delta(0).1 as f64 / shape.size as f64,
        received: received as f64 / (n as f64 * shape.size as f64),
        copies: survivors,
        copies_ok,
        cpu,
        delivered: done.len() as u64 * shape.size,
        duplicates: sum_col(4),
        failed_requests: sum_col(5),
        meta_bytes: {
            let (rx, tx) = delta(n + 1);
            rx + tx
        },
        per_peer,
    })
}

/// Median of a metric over runs (sorts `v`).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    }
}

/// Median and min-max of a metric over runs.
fn spread(v: &mut [f64]) -> String {
    let med = median(v);
    format!("{med:.2} [{:.2}-{:.2}]", v[0], v[v.len() - 1])
}

fn summarize(shape: &Shape, results: &[(bool, RunResult)]) {
    for &upstream in &shape.modes {
        let runs: Vec<&RunResult> = results
            .iter()
            .filter(|(u, _)| *u == upstream)
            .map(|(_, r)| r)
            .collect();
        let col = |f: &dyn Fn(&RunResult) -> f64| {
            let mut v: Vec<f64> = runs.iter().map(|r| f(r)).collect();
            spread(&mut v)
        };
        println!(
            "summary {} ({} run(s), median [min-max]): T_all {} s = {} x T_lb; per-peer p50 {} \
             p99 {} max {} s; efficiency {}; speedup {}; origin egress {} x S; received {} x \
             N·S; CPU {} s/GB; copies verified {}/{}",
            mode_name(upstream),
            runs.len(),
            col(&|r| r.t_all),
            col(&|r| r.t_all / shape.t_lb()),
            col(&|r| pct(&r.per_peer, 0.5)),
            col(&|r| pct(&r.per_peer, 0.99)),
            col(&|r| pct(&r.per_peer, 1.0)),
            col(&|r| shape.t_lb() / r.t_all),
            col(&|r| shape.t_cs() / r.t_all),
            col(&|r| r.egress),
            col(&|r| r.received),
            col(&|r| r.cpu_per_gb()),
            runs.iter().map(|r| r.copies_ok).sum::<usize>(),
            runs.iter().map(|r| r.copies).sum::<usize>(),
        );
        if !upstream {
            let mut t: Vec<f64> = runs.iter().map(|r| r.t_all / shape.t_lb()).collect();
            let mut e: Vec<f64> = runs.iter().map(|r| r.egress).collect();
            let mut rc: Vec<f64> = runs.iter().map(|r| r.received).collect();
            let verdict = |x: f64, target: f64| {
                if x <= target {
                    "met".to_owned()
                } else {
                    format!("MISSED by {:.0}%", (x / target - 1.0) * 100.0)
                }
            };
            let (t, e, rc) = (median(&mut t), median(&mut e), median(&mut rc));
            println!(
                "targets (swarm, median): T_all <= 1.3 x T_lb: {:.2} x, {}; origin egress <= \
                 1.5 x S: {:.2} x, {}; received <= 1.1 x N·S: {:.3} x, {}",
                t,
                verdict(t, 1.3),
                e,
                verdict(e, 1.5),
                rc,
                verdict(rc, 1.1)
            );
        }
    }
}
