//! Processes of the soaks: children that die with the soak (SIGKILL when the thread that started
//! them ends), started until they print their ready line, and `mooncake_client` storage nodes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A free loopback port (bound and released).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Spawns `cmd` with its stdout piped and a thread handing each line to `on_line`; returns the
/// child once a line starting with `ready` arrived (that line's rest), or an error after 30 s.
pub(crate) fn spawn_until(
    mut cmd: Command,
    ready: &'static str,
    on_line: impl Fn(&str) + Send + 'static,
) -> Result<(Child, String), String> {
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets a flag of the new process; it is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {cmd:?}: {e}"))?;
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix(ready) {
                let _ = tx.send(rest.trim().to_owned());
            }
            on_line(&line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(rest) => Ok((child, rest)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!("{cmd:?} did not print {ready:?} within 30 s"))
        }
    }
}

pub(crate) fn log_file(dir: &Path, name: &str) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

pub(crate) fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child this process has not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// A `mooncake_client` storage node; dropping it kills the process.
pub(crate) struct StorageNode {
    child: Option<Child>,
    /// Its segment name (`host:port`).
    pub(crate) segment: String,
}

impl StorageNode {
    /// Starts `bin` offering `segment_size` bytes to the masters at `masters`.
    pub(crate) fn start(
        bin: &Path,
        dir: &Path,
        name: &str,
        masters: &str,
        segment_size: &str,
    ) -> Result<StorageNode, String> {
        // A free port can be taken by another process before the node binds it: the node then
        // exits at once, and is started again on another port.
        let mut attempt = 0;
        let (child, rest) = loop {
            let mut cmd = Command::new(bin);
            cmd.args([
                format!("--master_server_address={masters}"),
                "--host=127.0.0.1".to_owned(),
                format!("--port={}", free_port()),
                format!("--global_segment_size={segment_size}"),
                "--local_buffer_size=16MB".to_owned(),
            ])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stderr(log_file(dir, &format!("{name}.log")));
            attempt += 1;
            match spawn_until(cmd, "mooncake_client listening:", |_| {}) {
                Err(_) if attempt < 3 => continue,
                started => break started?,
            }
        };
        let segment = rest
            .split_whitespace()
            .find_map(|f| f.strip_prefix("segment="))
            .unwrap_or_default()
            .to_owned();
        Ok(StorageNode {
            child: Some(child),
            segment,
        })
    }

    /// Its PID while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Asks the node to stop (SIGTERM: it unmounts its segment) and waits up to 10 s for it,
    /// killing it after that.
    pub(crate) fn stop(&mut self) {
        if let Some(c) = &self.child {
            signal(c, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Some(c) = self.child.as_mut() {
            if matches!(c.try_wait(), Ok(Some(_))) || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// SIGKILLs the node.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for StorageNode {
    fn drop(&mut self) {
        self.kill();
    }
}
