//! Throughput of a 3-node loopback raft group against a single in-memory store.
//!
//! `cargo run --release -p mooncake-bench --bin raft_bench [seconds] [concurrency]`
//!
//! Each run keeps `concurrency` proposals of 64 bytes in flight against the leader for the given
//! time and prints committed (and applied on the leader) proposals per second. The raft loop
//! batches whatever arrived while it was fsyncing into the next log append.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{CommandLog, MemoryMetadataStore, StateMachine};
use mooncake_meta_raft::{NodeConfig, PeerInfo, RaftMetadataStore, StoreConfig};

/// Counts commands and folds their bytes into a checksum.
struct Counter {
    n: u64,
    sum: u64,
}

impl StateMachine for Counter {
    fn apply(&mut self, command: &[u8]) -> Vec<u8> {
        self.n += 1;
        self.sum = command
            .iter()
            .fold(self.sum, |s, &b| s.wrapping_mul(31).wrapping_add(b as u64));
        self.n.to_le_bytes().to_vec()
    }
    fn snapshot(&self) -> mooncake_core::Result<Vec<u8>> {
        Ok([self.n.to_le_bytes(), self.sum.to_le_bytes()].concat())
    }
    fn restore(&mut self, s: &[u8]) -> mooncake_core::Result<()> {
        let word = |i: usize| {
            s.get(i..i + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| mooncake_core::Error::Codec("bad counter snapshot".into()))
        };
        self.n = word(0)?;
        self.sum = word(8)?;
        Ok(())
    }
}

async fn drive(store: Arc<dyn CommandLog>, secs: f64, concurrency: usize) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (store, done, errors) = (store.clone(), done.clone(), errors.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let mut cmd = vec![0u8; 64];
                    cmd[..8].copy_from_slice(&(t as u64).to_le_bytes());
                    cmd[8..16].copy_from_slice(&i.to_le_bytes());
                    i += 1;
                    match store.apply_command(cmd).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        println!("  ({e} proposals failed)");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

async fn raft_group(n: u64, dir: &std::path::Path) -> Vec<Arc<RaftMetadataStore>> {
    let voters: Vec<PeerInfo> = (1..=n)
        .map(|id| {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            PeerInfo {
                id,
                raft_addr: format!("127.0.0.1:{port}"),
                service_addr: format!("127.0.0.1:{}", 50_000 + id),
            }
        })
        .collect();
    let mut stores = Vec::new();
    for p in &voters {
        let node = NodeConfig::new(p.id, dir.join(format!("n{}", p.id)), voters.clone());
        let mut cfg = StoreConfig::new(node, p.raft_addr.clone());
        cfg.tick_interval = Duration::from_millis(20);
        let s = RaftMetadataStore::start(cfg, Box::new(Counter { n: 0, sum: 0 }))
            .await
            .expect("start raft node");
        stores.push(Arc::new(s));
    }
    for _ in 0..500 {
        if stores.iter().any(|s| s.is_leader()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stores
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let concurrency: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let dir = std::env::temp_dir().join(format!("mooncake-raft-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let mem: Arc<dyn CommandLog> =
        Arc::new(MemoryMetadataStore::with_state_machine(Box::new(Counter {
            n: 0,
            sum: 0,
        })));
    let single = drive(mem, secs, concurrency).await;
    println!("in-memory MemoryMetadataStore, {concurrency} in flight: {single:>12.0} commands/s");

    for (n, conc) in [(1u64, concurrency), (3, 1), (3, concurrency)] {
        let sub = dir.join(format!("g{n}-{conc}"));
        let stores = raft_group(n, &sub).await;
        let leader = stores
            .iter()
            .find(|s| s.is_leader())
            .expect("leader")
            .clone();
        let rate = drive(leader, secs, conc).await;
        let pct = 100.0 * rate / single;
        println!(
            "raft group of {n}, {conc:>4} in flight (fsync'd, loopback): {rate:>10.0} commits/s ({pct:.2}% of in-memory)"
        );
        for s in &stores {
            s.shutdown().await;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
