//! The workloads: client tasks calling one master deployment over RPC for a fixed time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mooncake_master::SegmentSpec;
use mooncake_master::{ClientId, Command, HeartbeatStatus, PutItem, ReplicateConfig, Response};
use mooncake_rpc::RpcClientConfig;
use mooncake_rpc::{apply_via, MasterApi, MasterRequest, RemoteMaster};

use crate::cluster::{process_cpu_seconds, Deployment};
use crate::stats::{quantile, Run};

/// What each client task does in a loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// PutStart then PutEnd of one fresh key (one put commit per pair).
    Put,
    /// BatchPutStart then BatchPutEnd of `batch` fresh keys.
    PutBatch,
    /// ExistKey of one existing key.
    Exist,
    /// BatchExistKey of `batch` existing keys.
    ExistBatch,
}

impl Mode {
    pub(crate) const ALL: [Mode; 4] = [Mode::Put, Mode::PutBatch, Mode::Exist, Mode::ExistBatch];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Put => "put",
            Mode::PutBatch => "put_batch",
            Mode::Exist => "exist",
            Mode::ExistBatch => "exist_batch",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }

    pub(crate) fn is_put(self) -> bool {
        matches!(self, Mode::Put | Mode::PutBatch)
    }

    pub(crate) fn is_batched(self) -> bool {
        matches!(self, Mode::PutBatch | Mode::ExistBatch)
    }
}

/// One measured configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Workload {
    pub(crate) mode: Mode,
    /// Client tasks calling at once.
    pub(crate) concurrency: usize,
    /// Keys per call (1 for the unbatched modes).
    pub(crate) batch: usize,
}

/// Settings shared by every measurement.
#[derive(Clone, Debug)]
pub(crate) struct LoadConfig {
    pub(crate) duration: Duration,
    pub(crate) warmup: Duration,
    pub(crate) value_size: u64,
    pub(crate) replicas: u32,
    pub(crate) segments: u64,
    pub(crate) segment_size: u64,
    pub(crate) exist_keys: usize,
    pub(crate) preload: usize,
    pub(crate) shared_connection: bool,
    pub(crate) max_concurrency: usize,
}

/// A deployment ready for load: segments mounted, keys for the lookups written, one RPC client
/// (own connection) per client task unless the connection is shared.
pub(crate) struct Target {
    pub(crate) deployment: Deployment,
    clients: Vec<Arc<RemoteMaster>>,
    owner: ClientId,
    heartbeat: tokio::task::JoinHandle<()>,
    measurements: u64,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

fn rpc_config() -> RpcClientConfig {
    RpcClientConfig {
        call_timeout: Duration::from_secs(15),
        connect_timeout: Duration::from_secs(2),
    }
}

fn exist_key(i: usize) -> String {
    format!("exist-{i:08}")
}

fn bad(what: &str, r: impl std::fmt::Debug) -> String {
    format!("{what}: unexpected answer {r:?}")
}

/// Runs `command`, turning transport errors into strings.
async fn apply(master: &dyn MasterApi, command: Command) -> Result<Response, String> {
    apply_via(master, command)
        .await
        .map(|(_, r)| r)
        .map_err(|e| e.to_string())
}

impl Target {
    /// Mounts the segments (owned by a bench client that keeps heartbeating), writes the keys
    /// the lookups ask for, and connects every client.
    pub(crate) async fn setup(deployment: Deployment, cfg: &LoadConfig) -> Result<Target, String> {
        let addresses = deployment.addresses();
        let n = if cfg.shared_connection {
            1
        } else {
            cfg.max_concurrency.max(1)
        };
        let clients: Vec<Arc<RemoteMaster>> = (0..n)
            .map(|_| Arc::new(RemoteMaster::new(addresses.clone(), rpc_config())))
            .collect();
        for c in &clients {
            // Connects and finds the leader before anything is timed.
            c.call(MasterRequest::Metrics)
                .await
                .map_err(|e| format!("{}: {e}", deployment.name))?;
        }
        let owner = ClientId::from_parts(0xbe9c_0000 ^ std::process::id() as u64, 1);
        let master = clients[0].clone();
        for s in 0..cfg.segments {
            // Distinct hosts, so several replicas can be placed; addresses far apart.
            let spec = SegmentSpec::new(
                format!("bench-host-{s}:17000"),
                (s + 1) << 44,
                cfg.segment_size,
            );
            let r = apply(
                &*master,
                Command::MountSegment {
                    client_id: owner,
                    segment: spec,
                },
            )
            .await?;
            if r != Response::Unit(Ok(())) {
                return Err(bad("MountSegment", r));
            }
        }
        let heartbeat = {
            let master = master.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let r = apply(&*master, Command::Heartbeat { client_id: owner }).await;
                    if let Ok(Response::Heartbeat(HeartbeatStatus::NeedRemount)) = r {
                        eprintln!("master_bench: the master forgot the bench's segments");
                    }
                }
            })
        };
        let target = Target {
            deployment,
            clients,
            owner,
            heartbeat,
            measurements: 0,
        };
        let keys = (0..cfg.exist_keys)
            .map(exist_key)
            .chain((0..cfg.preload).map(|i| format!("preload-{i:09}")));
        let mut chunk = Vec::with_capacity(1024);
        for key in keys {
            chunk.push(key);
            if chunk.len() == 1024 {
                target
                    .write(&*master, std::mem::take(&mut chunk), cfg)
                    .await?;
            }
        }
        if !chunk.is_empty() {
            target.write(&*master, chunk, cfg).await?;
        }
        Ok(target)
    }

    /// Writes `keys` (untimed set-up), failing on any error.
    async fn write(
        &self,
        master: &dyn MasterApi,
        keys: Vec<String>,
        cfg: &LoadConfig,
    ) -> Result<(), String> {
        let done = put_batch(master, self.owner, keys, cfg).await;
        if done.errors > 0 {
            return Err(format!(
                "{}: writing the set-up keys failed: {}",
                self.deployment.name,
                done.first_error.unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Runs `w` for the configured time and returns what it measured; the keys it wrote are
    /// removed afterwards (not timed).
    pub(crate) async fn measure(&mut self, w: Workload, cfg: &LoadConfig) -> Result<Run, String> {
        self.measurements += 1;
        let prefix = format!("m{}-", self.measurements);
        let begin = Instant::now();
        let window_start = begin + cfg.warmup;
        let window_end = window_start + cfg.duration;
        let first_error = Arc::new(Mutex::new(None::<String>));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..w.concurrency)
            .map(|t| {
                let master = self.clients[t % self.clients.len()].clone();
                let client_id = ClientId::from_parts(self.owner.parts().0, 1000 + t as u64);
                let prefix = format!("{prefix}{t}-");
                let cfg = cfg.clone();
                let (first_error, stop) = (first_error.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut task = TaskStats::default();
                    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1).wrapping_mul(7919);
                    let mut next_key = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        if started >= window_end {
                            break;
                        }
                        let done = match w.mode {
                            Mode::Put | Mode::PutBatch => {
                                let keys: Vec<String> = (0..w.batch)
                                    .map(|_| {
                                        next_key += 1;
                                        format!("{prefix}{next_key}")
                                    })
                                    .collect();
                                if w.mode == Mode::Put {
                                    put_one(&*master, client_id, keys, &cfg).await
                                } else {
                                    put_batch(&*master, client_id, keys, &cfg).await
                                }
                            }
                            Mode::Exist | Mode::ExistBatch => {
                                let keys: Vec<String> = (0..w.batch)
                                    .map(|_| {
                                        rng ^= rng << 13;
                                        rng ^= rng >> 7;
                                        rng ^= rng << 17;
                                        exist_key((rng % cfg.exist_keys as u64) as usize)
                                    })
                                    .collect();
                                exist(&*master, keys, w.mode == Mode::ExistBatch).await
                            }
                        };
                        let ended = Instant::now();
                        if let Some(e) = done.first_error {
                            first_error.lock().expect("error slot").get_or_insert(e);
                        }
                        if ended >= window_start && ended < window_end {
                            task.ops += done.ops;
                            task.errors += done.errors;
                            task.calls += 1;
                            task.latencies_us
                                .push((ended - started).as_micros().min(u32::MAX as u128) as u32);
                        }
                    }
                    task
                })
            })
            .collect();

        // CPU of the masters and of this process across the window.
        tokio::time::sleep_until(window_start.into()).await;
        let cpu0 = self.deployment.cpu_seconds();
        let sched0 = self.deployment.sched();
        let own0 = process_cpu_seconds("/proc/self/stat");
        let t0 = Instant::now();
        tokio::time::sleep_until(window_end.into()).await;
        let cpu1 = self.deployment.cpu_seconds();
        let sched1 = self.deployment.sched();
        let own1 = process_cpu_seconds("/proc/self/stat");
        let wall = t0.elapsed().as_secs_f64().max(1e-9);
        stop.store(true, Ordering::Relaxed);

        let mut total = TaskStats::default();
        for t in tasks {
            let s = t.await.map_err(|e| format!("client task failed: {e}"))?;
            total.ops += s.ops;
            total.errors += s.errors;
            total.calls += s.calls;
            total.latencies_us.extend(s.latencies_us);
        }
        if w.mode.is_put() {
            let r = apply(
                &*self.clients[0],
                Command::RemoveByRegex {
                    pattern: format!("^{prefix}"),
                    force: true,
                },
            )
            .await?;
            if r.code() != mooncake_core::ErrorCode::OK {
                return Err(bad("RemoveByRegex", r));
            }
        }
        if total.errors > 0 {
            if let Some(e) = first_error.lock().expect("error slot").take() {
                eprintln!(
                    "master_bench: {} {} errors, first: {e}",
                    self.deployment.name, total.errors
                );
            }
        }
        total.latencies_us.sort_unstable();
        let secs = cfg.duration.as_secs_f64();
        let cores: Vec<f64> = cpu0
            .iter()
            .zip(&cpu1)
            .map(|(a, b)| (b - a).max(0.0) / wall)
            .collect();
        let ns = wall * 1e9;
        let waited: u64 = sched0
            .iter()
            .zip(&sched1)
            .map(|(a, b)| b.wait_ns.saturating_sub(a.wait_ns))
            .sum();
        let raft_busiest = sched0
            .iter()
            .zip(&sched1)
            .map(|(a, b)| b.raft_run_ns.saturating_sub(a.raft_run_ns))
            .max()
            .unwrap_or(0);
        Ok(Run {
            ops_per_sec: total.ops as f64 / secs,
            calls_per_sec: total.calls as f64 / secs,
            p50_us: quantile(&total.latencies_us, 0.50),
            p99_us: quantile(&total.latencies_us, 0.99),
            server_cores: cores.iter().sum(),
            busiest_cores: cores.iter().copied().fold(0.0, f64::max),
            client_cores: (own1 - own0).max(0.0) / wall,
            runqueue_threads: waited as f64 / ns,
            raft_loop_busy: raft_busiest as f64 / ns,
            errors: total.errors,
        })
    }
}

#[derive(Default)]
struct TaskStats {
    ops: u64,
    errors: u64,
    calls: u64,
    latencies_us: Vec<u32>,
}

/// What one call did.
#[derive(Default)]
struct Done {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Done {
    fn failed(n: usize, e: String) -> Done {
        Done {
            ops: 0,
            errors: n as u64,
            first_error: Some(e),
        }
    }
}

fn replicate(cfg: &LoadConfig) -> ReplicateConfig {
    ReplicateConfig {
        replica_num: cfg.replicas,
        ..ReplicateConfig::default()
    }
}

/// PutStart + PutEnd of the one key in `keys`.
async fn put_one(
    master: &dyn MasterApi,
    client_id: ClientId,
    mut keys: Vec<String>,
    cfg: &LoadConfig,
) -> Done {
    let key = keys.pop().expect("one key");
    let start = Command::PutStart {
        client_id,
        key: key.clone(),
        size: cfg.value_size,
        config: replicate(cfg),
    };
    match apply(master, start).await {
        Ok(Response::PutStart(Ok(_))) => {}
        Ok(r) => return Done::failed(1, bad("PutStart", r)),
        Err(e) => return Done::failed(1, e),
    }
    match apply(master, Command::PutEnd { client_id, key }).await {
        Ok(Response::Unit(Ok(()))) => Done {
            ops: 1,
            ..Done::default()
        },
        Ok(r) => Done::failed(1, bad("PutEnd", r)),
        Err(e) => Done::failed(1, e),
    }
}

/// BatchPutStart + BatchPutEnd of `keys` (the end lists the keys whose start succeeded).
async fn put_batch(
    master: &dyn MasterApi,
    client_id: ClientId,
    keys: Vec<String>,
    cfg: &LoadConfig,
) -> Done {
    let n = keys.len();
    let start = Command::BatchPutStart {
        client_id,
        items: keys
            .iter()
            .map(|k| PutItem {
                key: k.clone(),
                size: cfg.value_size,
            })
            .collect(),
        config: replicate(cfg),
    };
    let started = match apply(master, start).await {
        Ok(Response::PutStartBatch(rs)) if rs.len() == n => rs,
        Ok(r) => return Done::failed(n, bad("BatchPutStart", r)),
        Err(e) => return Done::failed(n, e),
    };
    let mut first_error = None;
    let ok: Vec<String> = keys
        .into_iter()
        .zip(started)
        .filter_map(|(k, r)| match r {
            Ok(_) => Some(k),
            Err(c) => {
                first_error.get_or_insert_with(|| format!("BatchPutStart item: {c:?}"));
                None
            }
        })
        .collect();
    let mut done = Done {
        ops: 0,
        errors: (n - ok.len()) as u64,
        first_error,
    };
    if ok.is_empty() {
        return done;
    }
    let m = ok.len();
    match apply(
        master,
        Command::BatchPutEnd {
            client_id,
            keys: ok,
        },
    )
    .await
    {
        Ok(Response::UnitBatch(rs)) if rs.len() == m => {
            for r in rs {
                match r {
                    Ok(()) => done.ops += 1,
                    Err(c) => {
                        done.errors += 1;
                        done.first_error
                            .get_or_insert_with(|| format!("BatchPutEnd item: {c:?}"));
                    }
                }
            }
            done
        }
        Ok(r) => Done::failed(n, bad("BatchPutEnd", r)),
        Err(e) => Done::failed(n, e),
    }
}

/// ExistKey (or BatchExistKey when `batched`) of keys that exist: a miss is an error.
async fn exist(master: &dyn MasterApi, mut keys: Vec<String>, batched: bool) -> Done {
    let n = keys.len();
    let found = if batched {
        match apply(master, Command::BatchExistKey { keys }).await {
            Ok(Response::ExistsBatch(v)) if v.len() == n => v,
            Ok(r) => return Done::failed(n, bad("BatchExistKey", r)),
            Err(e) => return Done::failed(n, e),
        }
    } else {
        let key = keys.pop().expect("one key");
        match apply(master, Command::ExistKey { key }).await {
            Ok(Response::Exists(b)) => vec![b],
            Ok(r) => return Done::failed(n, bad("ExistKey", r)),
            Err(e) => return Done::failed(n, e),
        }
    };
    let hits = found.iter().filter(|&&b| b).count();
    Done {
        ops: hits as u64,
        errors: (n - hits) as u64,
        first_error: (hits < n).then(|| "a key written for the lookups is missing".into()),
    }
}
