//! The masters under test: a single in-memory `mooncake_master` and a Raft master group, each
//! member a child process on loopback. Children are killed and their data removed when their
//! [`Deployment`] is dropped (also while a panic unwinds), on SIGINT or SIGTERM (see
//! [`kill_on_signal`]), and by the kernel if this process dies without either (parent-death
//! signal).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mooncake_rpc::{MasterApi, MasterReply, MasterRequest, RemoteMaster};

/// Pids of the running children and data directories, for the signal handler.
static LIVE: Mutex<(Vec<u32>, Vec<PathBuf>)> = Mutex::new((Vec::new(), Vec::new()));

/// On SIGINT or SIGTERM: kills every child still running, removes the data directories and
/// exits with status 130.
pub(crate) fn kill_on_signal() {
    tokio::spawn(async {
        mooncake_master_service::cli::shutdown_signal().await;
        let (pids, dirs) = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
        for pid in pids {
            // SAFETY: kill(2) on a pid this process started and has not reaped yet.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        for d in dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        eprintln!("master_bench: interrupted; masters killed");
        std::process::exit(130);
    });
}

fn live() -> std::sync::MutexGuard<'static, (Vec<u32>, Vec<PathBuf>)> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The directory holding every deployment's data; removed with everything in it when dropped
/// (after the deployments, which must be dropped first) or on a signal.
pub(crate) struct DataDir(pub(crate) PathBuf);

impl DataDir {
    pub(crate) fn create(path: PathBuf) -> Result<DataDir, String> {
        std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        live().1.push(path.clone());
        Ok(DataDir(path))
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        live().1.retain(|d| d != &self.0);
    }
}

/// A free loopback port (bound, then released for the child to take).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One master process.
struct Member {
    child: Child,
    rpc: String,
}

impl Member {
    fn start(bin: &Path, args: Vec<String>, log: &Path) -> Result<Member, String> {
        let stderr = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        live().0.push(child.id());
        let mut member = Member {
            child,
            rpc: String::new(),
        };
        let out = member.child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(out).lines();
        for line in &mut lines {
            let line = line.map_err(|e| e.to_string())?;
            if let Some(rest) = line.strip_prefix("mooncake_master listening:") {
                let rpc = rest
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix("rpc="))
                    .ok_or_else(|| format!("no rpc address in {line:?}"))?;
                member.rpc = rpc.to_owned();
                // Keep draining stdout so the child never blocks on a full pipe.
                std::thread::spawn(move || for _ in lines {});
                return Ok(member);
            }
        }
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        Err(format!(
            "{} exited before listening; its stderr:\n{}",
            bin.display(),
            tail.lines().rev().take(20).collect::<Vec<_>>().join("\n")
        ))
    }

    /// CPU time used so far (user + system), seconds; 0 once the process is gone.
    fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(&format!("/proc/{}/stat", self.child.id()))
    }

    /// Scheduler times of the process's live threads so far.
    fn sched(&self) -> Sched {
        let mut out = Sched::default();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) else {
            return out;
        };
        for t in tasks.flatten() {
            let path = t.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
            let mut f = stat
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            let (run, wait) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
            out.wait_ns += wait;
            if comm.starts_with("raft-") {
                out.raft_run_ns += run;
            }
        }
        out
    }
}

/// Scheduler times of one master process, from `/proc/<pid>/task/*/schedstat`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sched {
    /// Time its threads spent runnable but waiting for a CPU, nanoseconds.
    pub(crate) wait_ns: u64,
    /// Time its Raft loop thread (`raft-<id>`) spent on a CPU, nanoseconds.
    pub(crate) raft_run_ns: u64,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pid = self.child.id();
        live().0.retain(|&p| p != pid);
    }
}

/// User plus system CPU seconds of the process whose `stat` file is `path`; 0 if unreadable.
pub(crate) fn process_cpu_seconds(path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at the state, field 3;
    // utime and stime are fields 14 and 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// A master deployment under test: one process, or the members of a Raft group.
pub(crate) struct Deployment {
    /// `single` or `group`.
    pub(crate) name: &'static str,
    members: Vec<Member>,
    dir: PathBuf,
}

impl Deployment {
    /// Starts one in-memory master.
    pub(crate) fn single(bin: &Path, dir: &Path) -> Result<Deployment, String> {
        let dir = dir.join("single");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        live().1.push(dir.clone());
        let port = free_port().map_err(|e| e.to_string())?;
        let member = Member::start(bin, base_args(port), &dir.join("master.log"))?;
        Ok(Deployment {
            name: "single",
            members: vec![member],
            dir,
        })
    }

    /// Starts a Raft group of `n` members, data directories under `dir`.
    pub(crate) fn group(
        bin: &Path,
        dir: &Path,
        n: u64,
        tick_ms: u64,
    ) -> Result<Deployment, String> {
        let dir = dir.join("group");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        live().1.push(dir.clone());
        let mut ports = Vec::new();
        for _ in 0..n {
            let p = (free_port(), free_port());
            ports.push((
                p.0.map_err(|e| e.to_string())?,
                p.1.map_err(|e| e.to_string())?,
            ));
        }
        let peers = (1..=n)
            .zip(&ports)
            .map(|(id, (raft, rpc))| format!("{id}=127.0.0.1:{raft}/127.0.0.1:{rpc}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (id, (_, rpc)) in (1..=n).zip(&ports) {
            let mut args = base_args(*rpc);
            args.extend([
                format!("--raft_id={id}"),
                format!("--raft_peers={peers}"),
                format!("--raft_data_dir={}", dir.join(id.to_string()).display()),
                format!("--raft_tick_ms={tick_ms}"),
            ]);
            members.push(Member::start(
                bin,
                args,
                &dir.join(format!("master-{id}.log")),
            )?);
        }
        Ok(Deployment {
            name: "group",
            members,
            dir,
        })
    }

    /// Every member's RPC address, comma-separated (what `RemoteMaster::new` takes).
    pub(crate) fn addresses(&self) -> String {
        self.members
            .iter()
            .map(|m| m.rpc.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until one member serves requests (the leader, for a group); returns its index.
    pub(crate) async fn wait_ready(&self, bound: Duration) -> Result<usize, String> {
        let start = Instant::now();
        let probes: Vec<RemoteMaster> = self
            .members
            .iter()
            .map(|m| RemoteMaster::new(m.rpc.as_str(), Default::default()))
            .collect();
        loop {
            for (i, p) in probes.iter().enumerate() {
                if let Ok(MasterReply::Metrics(_)) = p.call(MasterRequest::Metrics).await {
                    return Ok(i);
                }
            }
            if start.elapsed() > bound {
                return Err(format!("{}: no master serves after {bound:?}", self.name));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// CPU seconds used so far by each member.
    pub(crate) fn cpu_seconds(&self) -> Vec<f64> {
        self.members.iter().map(Member::cpu_seconds).collect()
    }

    /// Scheduler times of each member so far.
    pub(crate) fn sched(&self) -> Vec<Sched> {
        self.members.iter().map(Member::sched).collect()
    }

    /// The members' pids.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.members.iter().map(|m| m.child.id()).collect()
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.members.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
        live().1.retain(|d| d != &self.dir);
    }
}

fn base_args(rpc_port: u16) -> Vec<String> {
    vec![
        "--rpc_address=127.0.0.1".into(),
        format!("--rpc_port={rpc_port}"),
        // Several members on one host: each its own metrics port.
        "--metrics_port=0".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_is_readable() {
        // Spins until the kernel has accounted a tick of CPU time to this process: on a loaded
        // machine a fixed spell of wall time may not get one.
        let spin = Instant::now();
        let mut x = 0u64;
        while process_cpu_seconds("/proc/self/stat") == 0.0
            && spin.elapsed() < Duration::from_secs(20)
        {
            for _ in 0..1_000_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
        }
        assert!(x > 0);
        assert!(process_cpu_seconds("/proc/self/stat") > 0.0);
        assert_eq!(process_cpu_seconds("/proc/no-such/stat"), 0.0);
    }
}
