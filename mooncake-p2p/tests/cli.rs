//! The `mooncake_p2p` command-line tool in separate processes on loopback: one publishes, others
//! list and fetch, and the fetched bytes are compared with the originals. The HTTP metadata
//! server runs in this test process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mooncake_core::MemoryMetadataStore;
use mooncake_meta_http::{serve_http, HttpEndpoints};

const BIN: &str = env!("CARGO_BIN_EXE_mooncake_p2p");

/// An HTTP metadata server on its own thread and runtime; returns its URL.
fn metadata_server() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            serve_http(
                listener,
                HttpEndpoints {
                    metadata: Some(Arc::new(MemoryMetadataStore::new())),
                    metrics: Arc::new(String::new),
                    health: Arc::new(|| true),
                },
            );
            tx.send(format!("http://{addr}/metadata")).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

/// A fresh directory under the target's temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("mooncake_p2p_cli_{tag}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills the publisher when the test ends, pass or fail.
struct Publisher(Child);

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed) ^ (i >> 9) as u8)
        .collect()
}

fn tool(url: &str, args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(["--metadata", url, "--local", "127.0.0.1"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Starts `publish NAME PATH` and waits (at most 60 s) for it to say it serves.
fn publish(url: &str, name: &str, path: &Path) -> Publisher {
    let mut child = Command::new(BIN)
        .args(["--metadata", url, "--local", "127.0.0.1", "publish", name])
        .arg(path)
        .args(["--shard-size", "1MiB"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let publisher = Publisher(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("publisher did not start");
    assert!(line.starts_with(&format!("published {name}: ")), "{line:?}");
    publisher
}

/// Every file under `dir`, by relative path.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().to_owned(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn publish_list_and_fetch_across_processes() {
    let url = metadata_server();
    let scratch = Scratch::new("dir");
    let src = scratch.0.join("src");
    std::fs::create_dir_all(src.join("layers/0")).unwrap();
    std::fs::write(src.join("config.json"), b"{\"layers\": 2}").unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    std::fs::write(src.join("layers/0/weights.bin"), bytes(3 << 20 | 12_345, 7)).unwrap();
    std::fs::write(src.join("layers/1.bin"), bytes(700_001, 13)).unwrap();
    let single = scratch.0.join("single.bin");
    std::fs::write(&single, bytes(1_500_000, 29)).unwrap();

    let _dir = publish(&url, "ckpt/dir", &src);
    let _file = publish(&url, "ckpt/file", &single);
    let listed = String::from_utf8(tool(&url, &["list", "ckpt/"]).stdout).unwrap();
    let names: Vec<&str> = listed
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(names, ["ckpt/dir", "ckpt/file"], "{listed}");

    // Two fetchers of the directory, one after the other (the second may pull from both).
    for i in 0..2 {
        let dest = scratch.0.join(format!("out{i}"));
        let out = tool(
            &url,
            &[
                "fetch",
                "ckpt/dir",
                dest.to_str().unwrap(),
                "--timeout",
                "60",
            ],
        );
        let line = String::from_utf8(out.stdout).unwrap();
        eprintln!("{line}");
        assert!(line.contains("verified: all"), "{line}");
        assert!(tree(&dest) == tree(&src), "fetched tree {i} differs");
        assert!(dest.join("empty").is_file());
    }
    let dest = scratch.0.join("single.out");
    tool(
        &url,
        &[
            "fetch",
            "ckpt/file",
            dest.to_str().unwrap(),
            "--timeout",
            "60",
        ],
    );
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&single).unwrap());

    // Refusals: an existing destination, an unknown name.
    for (name, dest) in [("ckpt/file", &dest), ("nope", &scratch.0.join("n"))] {
        let out = Command::new(BIN)
            .args(["--metadata", &url, "fetch", name])
            .arg(dest)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
    }
}
