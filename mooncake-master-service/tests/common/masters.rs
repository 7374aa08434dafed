//! A Raft group of `mooncake_master` processes on loopback for the multi-process tests: members
//! started as initial voters or in join mode, killed with SIGKILL and restarted, with every line
//! they print on stdout kept, so a test can check from their leader lines that no term ever had
//! two leaders.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use mooncake_master_service::master_cli::ROLE_LINE_PREFIX;
use mooncake_rpc::{MasterApi, MasterReply, MasterRequest, RemoteMaster};

use super::{free_port, Proc};

/// Where a member's log goes: into `logs` when given (a test that reads it), else
/// `$MOONCAKE_TEST_MASTER_LOGS/master-<pid>-<id>.log` when that variable names a directory (to
/// look into a failure), else nowhere.
fn stderr_for(id: u64, logs: Option<&PathBuf>) -> Stdio {
    let dir = match logs {
        Some(d) => d.clone().into_os_string(),
        None => match std::env::var_os("MOONCAKE_TEST_MASTER_LOGS") {
            Some(d) => d,
            None => return Stdio::null(),
        },
    };
    let path = PathBuf::from(dir).join(format!("master-{}-{id}.log", std::process::id()));
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => Stdio::from(f),
        Err(e) => panic!("opening {}: {e}", path.display()),
    }
}

/// One member: its addresses and, while it runs, its process.
pub struct Member {
    pub id: u64,
    pub rpc: String,
    pub raft: String,
    pub proc: Option<Proc>,
    /// Started as an initial voter (`false`: joins a running group).
    pub initial: bool,
}

impl Member {
    /// `id=raft/rpc`, as `--raft_peers` and `admin add-learner` take it.
    pub fn spec(&self) -> String {
        format!("{}={}/{}", self.id, self.raft, self.rpc)
    }
}

/// See the module docs. Dropping it kills every member and removes the data directories.
pub struct Group {
    pub members: Vec<Member>,
    pub dir: PathBuf,
    /// Every stdout line of every member process, with the member's id, in arrival order.
    pub lines: Arc<Mutex<Vec<(u64, String)>>>,
    /// Where members' logs go when a test reads them (see [`Group::with_logs`]).
    pub logs: Option<PathBuf>,
}

impl Group {
    /// `n` initial voters (ids 1..=n), started.
    pub fn new(tag: &str, n: u64) -> Group {
        Self::build(tag, n, false)
    }

    /// [`new`](Self::new), with each member's log kept in a file [`log_of`](Self::log_of)
    /// reads.
    pub fn with_logs(tag: &str, n: u64) -> Group {
        Self::build(tag, n, true)
    }

    fn build(tag: &str, n: u64, logs: bool) -> Group {
        let dir = std::env::temp_dir().join(format!("mooncake-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let logs = logs.then(|| dir.join("logs"));
        if let Some(l) = &logs {
            std::fs::create_dir_all(l).unwrap();
        }
        let mut g = Group {
            members: Vec::new(),
            dir,
            lines: Arc::new(Mutex::new(Vec::new())),
            logs,
        };
        for _ in 0..n {
            g.add_member(true);
        }
        for i in 0..g.members.len() {
            g.start(i);
        }
        g
    }

    /// Reserves addresses for one more member (the next id), not started; returns its index.
    pub fn add_member(&mut self, initial: bool) -> usize {
        let id = self.members.len() as u64 + 1;
        self.members.push(Member {
            id,
            rpc: format!("127.0.0.1:{}", free_port()),
            raft: format!("127.0.0.1:{}", free_port()),
            proc: None,
            initial,
        });
        self.members.len() - 1
    }

    fn peers(&self, members: impl Iterator<Item = usize>) -> String {
        members
            .map(|i| self.members[i].spec())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts) member `i`: an initial voter with the initial members as
    /// `--raft_peers`, a joining member with `--raft_join` and every member as its address book.
    /// Returns once it listens.
    pub fn start(&mut self, i: usize) {
        let m = &self.members[i];
        let initial: Vec<usize> = (0..self.members.len())
            .filter(|&j| self.members[j].initial)
            .collect();
        let mut args = vec![
            "--rpc_address=127.0.0.1".to_string(),
            format!("--rpc_port={}", m.rpc.rsplit_once(':').unwrap().1),
            "--metrics_port=0".to_string(),
            format!("--raft_id={}", m.id),
            format!(
                "--raft_data_dir={}",
                self.dir.join(m.id.to_string()).display()
            ),
        ];
        if m.initial {
            args.push(format!("--raft_peers={}", self.peers(initial.into_iter())));
        } else {
            args.push(format!(
                "--raft_peers={}",
                self.peers(0..self.members.len())
            ));
            args.push("--raft_join".to_string());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_mooncake_master"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(stderr_for(m.id, self.logs.as_ref()))
            .spawn()
            .expect("start mooncake_master");
        // Keep every line (leader lines may come before or after the listening line) and keep
        // draining, so the child never blocks on a full pipe.
        let out = child.stdout.take().expect("piped stdout");
        let (listening, up) = mpsc::channel();
        let (id, lines) = (m.id, self.lines.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("mooncake_master listening:") {
                    let _ = listening.send(());
                }
                lines.lock().unwrap().push((id, line));
            }
        });
        let proc = Proc(child);
        match up.recv_timeout(Duration::from_secs(20)) {
            Ok(()) => {}
            Err(e) => panic!("member {id} did not start listening: {e}"),
        }
        self.members[i].proc = Some(proc);
    }

    /// What member `i` has logged so far (with [`with_logs`](Self::with_logs); empty otherwise).
    pub fn log_of(&self, i: usize) -> String {
        let Some(dir) = &self.logs else {
            return String::new();
        };
        let path = dir.join(format!(
            "master-{}-{}.log",
            std::process::id(),
            self.members[i].id
        ));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The process id of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].proc.as_ref().map(|p| p.0.id())
    }

    /// Waits up to `timeout` for member `i` to exit on its own; its exit status.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let p = self.members[i].proc.as_mut()?;
            if let Some(status) = p.0.try_wait().unwrap() {
                self.members[i].proc = None;
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs member `i`, if it runs.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.0.kill().unwrap();
            p.0.wait().unwrap();
        }
    }

    /// Every member's RPC address, comma-separated (what clients are given).
    pub fn addresses(&self) -> String {
        self.members
            .iter()
            .map(|m| m.rpc.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of a running member that serves requests now, if one does.
    pub async fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.proc.is_none() {
                continue;
            }
            let probe = RemoteMaster::new(m.rpc.as_str(), Default::default());
            if let Ok(MasterReply::Metrics(_)) = probe.call(MasterRequest::Metrics).await {
                return Some(i);
            }
        }
        None
    }

    /// The index of the member with raft id `id`.
    pub fn index_of(&self, id: u64) -> usize {
        self.members
            .iter()
            .position(|m| m.id == id)
            .unwrap_or_else(|| panic!("no member {id}"))
    }

    /// The leaders each term had, from the members' `leader id=ID term=TERM` lines.
    pub fn leaders_by_term(&self) -> BTreeMap<u64, BTreeSet<u64>> {
        let mut by_term: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for (member, line) in self.lines.lock().unwrap().iter() {
            let Some(rest) = line.strip_prefix(ROLE_LINE_PREFIX) else {
                continue;
            };
            let Some(fields) = rest.strip_prefix("leader ") else {
                continue;
            };
            let field = |name: &str| -> u64 {
                fields
                    .split_whitespace()
                    .find_map(|f| f.strip_prefix(name))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("unparsable leader line {line:?}"))
            };
            let (id, term) = (field("id="), field("term="));
            assert_eq!(id, *member, "member {member} printed {line:?}");
            by_term.entry(term).or_default().insert(id);
        }
        by_term
    }

    /// Asserts that no term had two different leaders; returns how many terms had one.
    pub fn assert_one_leader_per_term(&self) -> usize {
        let by_term = self.leaders_by_term();
        for (term, leaders) in &by_term {
            assert_eq!(leaders.len(), 1, "term {term} had leaders {leaders:?}");
        }
        by_term.len()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
