//! The master group of the soak: `mooncake_master` members with Raft on loopback, each killed
//! (SIGKILL), frozen (SIGSTOP) and resumed (SIGCONT) on demand. Every member's role lines
//! (`leader id=ID term=T`, `stepped_down ...`) are kept, so the run can name the current leader
//! and check that no term had two.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::procs::{free_port, log_file, signal, spawn_until};

/// The prefix of the members' role lines.
const ROLE: &str = "mooncake_master raft: ";

/// A role line: the member, whether it announced leadership (else stepping down), the term.
#[derive(Clone, Debug)]
pub(crate) struct RoleLine {
    pub(crate) member: u64,
    pub(crate) leader: bool,
    pub(crate) term: u64,
}

/// One member of the group.
struct Member {
    id: u64,
    rpc: String,
    raft: String,
    child: Option<Child>,
    frozen: bool,
}

/// A master group; dropping it kills every member.
pub(crate) struct Group {
    members: Vec<Member>,
    bin: PathBuf,
    dir: PathBuf,
    flags: Vec<String>,
    lines: Arc<Mutex<Vec<RoleLine>>>,
}

impl Group {
    /// Starts `n` members of `bin`, data and logs under `dir`, each given `flags` too.
    pub(crate) fn start(bin: &Path, dir: &Path, n: u64, flags: &[String]) -> Result<Group, String> {
        let mut g = Group {
            members: (1..=n)
                .map(|id| Member {
                    id,
                    rpc: format!("127.0.0.1:{}", free_port()),
                    raft: format!("127.0.0.1:{}", free_port()),
                    child: None,
                    frozen: false,
                })
                .collect(),
            bin: bin.to_owned(),
            dir: dir.to_owned(),
            flags: flags.to_vec(),
            lines: Arc::default(),
        };
        for i in 0..g.members.len() {
            g.restart(i)?;
        }
        Ok(g)
    }

    /// Starts member `i` (again); returns once it listens.
    pub(crate) fn restart(&mut self, i: usize) -> Result<(), String> {
        let peers = self
            .members
            .iter()
            .map(|m| format!("{}={}/{}", m.id, m.raft, m.rpc))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        let mut cmd = Command::new(&self.bin);
        cmd.args([
            "--rpc_address=127.0.0.1".to_owned(),
            format!("--rpc_port={}", m.rpc.rsplit_once(':').expect("port").1),
            format!("--raft_id={}", m.id),
            format!("--raft_peers={peers}"),
            format!(
                "--raft_data_dir={}",
                self.dir.join(format!("raft-{}", m.id)).display()
            ),
        ])
        .args(&self.flags)
        .stderr(log_file(&self.dir, &format!("master-{}.log", m.id)));
        let (id, lines) = (m.id, self.lines.clone());
        let (child, _) = spawn_until(cmd, "mooncake_master listening:", move |line| {
            let Some(rest) = line.strip_prefix(ROLE) else {
                return;
            };
            let leader = rest.starts_with("leader ");
            let term = rest
                .split_whitespace()
                .find_map(|f| f.strip_prefix("term="))
                .and_then(|t| t.parse().ok());
            if let Some(term) = term {
                lines.lock().expect("lines").push(RoleLine {
                    member: id,
                    leader,
                    term,
                });
            }
        })?;
        self.members[i].child = Some(child);
        self.members[i].frozen = false;
        Ok(())
    }

    /// The members' RPC addresses, comma-separated (what clients are given).
    pub(crate) fn addresses(&self) -> String {
        self.members
            .iter()
            .map(|m| m.rpc.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The raft id of member `i`.
    pub(crate) fn id(&self, i: usize) -> u64 {
        self.members[i].id
    }

    /// The current leader from the role lines: the member that announced the highest term's
    /// leadership, has not stepped down since, runs and is not frozen. `(index, term)`.
    pub(crate) fn leader(&self) -> Option<(usize, u64)> {
        let lines = self.lines.lock().expect("lines");
        let top = lines.iter().filter(|l| l.leader).max_by_key(|l| l.term)?;
        let stepped = lines
            .iter()
            .any(|l| !l.leader && l.member == top.member && l.term >= top.term);
        let i = self.members.iter().position(|m| m.id == top.member)?;
        let m = &self.members[i];
        (!stepped && m.child.is_some() && !m.frozen).then_some((i, top.term))
    }

    /// Waits up to `bound` for a leader of a term above `above`.
    pub(crate) async fn await_leader(&self, above: u64, bound: Duration) -> Option<(usize, u64)> {
        let started = Instant::now();
        loop {
            if let Some((i, t)) = self.leader().filter(|&(_, t)| t > above) {
                return Some((i, t));
            }
            if started.elapsed() > bound {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs member `i`.
    pub(crate) fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.members[i].frozen = false;
    }

    /// SIGSTOPs member `i`.
    pub(crate) fn freeze(&mut self, i: usize) {
        if let Some(c) = &self.members[i].child {
            signal(c, libc::SIGSTOP);
            self.members[i].frozen = true;
        }
    }

    /// SIGCONTs member `i`.
    pub(crate) fn thaw(&mut self, i: usize) {
        if let Some(c) = &self.members[i].child {
            signal(c, libc::SIGCONT);
        }
        self.members[i].frozen = false;
    }

    /// Member ids that announced leadership, per term.
    pub(crate) fn leaders_by_term(&self) -> BTreeMap<u64, BTreeSet<u64>> {
        let mut by_term: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for l in self
            .lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| l.leader)
        {
            by_term.entry(l.term).or_default().insert(l.member);
        }
        by_term
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.thaw(i);
            self.kill(i);
        }
    }
}
