//! Helpers shared by the multi-process tests: child processes that die with the test, storage
//! nodes run by re-executing the test binary, and polling with a bound.

#![deny(unsafe_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use mooncake_master::MasterConfig;
use mooncake_master_service::service::{MasterService, ServiceConfig};
use mooncake_rpc::RpcClientConfig;
use mooncake_store::{Store, StoreConfig};

/// A child process killed when dropped, so a failing test leaves nothing behind.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the child's stdout until a line starting with `prefix`; returns the rest of it.
pub fn wait_line(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(out).lines();
    for line in &mut lines {
        let line = line.expect("utf-8 line");
        if let Some(rest) = line.strip_prefix(prefix) {
            // Keep draining stdout so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return rest.trim().to_owned();
        }
    }
    panic!("child exited before printing {prefix:?}");
}

/// A master service on a loopback port: the service and its RPC address.
pub async fn serve_master(config: MasterConfig) -> (Arc<MasterService>, String) {
    let svc = MasterService::new(config, ServiceConfig::default()).unwrap();
    let addr = svc.serve_rpc("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (svc, addr.to_string())
}

/// A store config for a client of `master` offering a `segment`-byte global segment.
pub fn store_config(master: &str, segment: u64) -> StoreConfig {
    StoreConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: master.into(),
        global_segment_size: segment,
        local_buffer_size: 32 << 20,
        rpc: RpcClientConfig {
            call_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        },
        heartbeat_interval: Duration::from_millis(200),
        ..StoreConfig::default()
    }
}

/// Spawns this test binary as a storage node (see `child_storage`); returns it and its segment.
pub fn spawn_storage(master: &str) -> (Proc, String) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_storage",
            "--nocapture",
            "--include-ignored",
        ])
        .env("MOONCAKE_TEST_STORAGE_MASTER", master)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let segment = wait_line(&mut child, "STORAGE ");
    (Proc(child), segment)
}

/// The body of a storage process: runs when `MOONCAKE_TEST_STORAGE_MASTER` is set (by
/// [`spawn_storage`]), serving until its stdin closes.
pub fn run_child_storage() {
    let Ok(master) = std::env::var("MOONCAKE_TEST_STORAGE_MASTER") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::setup(store_config(&master, 64 << 20)).await.unwrap();
        println!("STORAGE {}", store.hostname());
        tokio::task::spawn_blocking(|| {
            let mut b = [0u8; 1];
            let _ = std::io::stdin().read(&mut b);
        })
        .await
        .unwrap();
        store.close().await.unwrap();
    });
}

/// Polls `check` every 100 ms until it holds, failing the test after `bound`.
pub async fn eventually<F, Fut>(what: &str, bound: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < bound,
            "{what} did not happen within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A free loopback port (bound and released: good enough for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
