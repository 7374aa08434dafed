//! Upstream's flags on a real `mooncake_master` process: a deployment's flag file with
//! no-effect flags and glog's `--log_dir` starts and serves, and a flag asking for a missing
//! feature stops the start with a message naming it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{eventually, wait_line, Proc};

fn dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mooncake-flags-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn refused_flags_stop_the_start_with_their_name() {
    for (flag, named) in [
        ("--enable_ha=true", "--enable_ha"),
        ("--enable_offload=true", "--enable_offload"),
        ("--root_fs_dir=/mnt/nfs", "--root_fs_dir"),
        ("--allocation_strategy=cxl", "--allocation_strategy"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mooncake_master"))
            .args([
                "--rpc_address=127.0.0.1",
                "--rpc_port=0",
                "--metrics_port=0",
                flag,
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{flag}: {stderr}");
        assert!(out.stdout.is_empty(), "{flag}: started anyway");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_file_with_upstream_flags_starts_a_master_that_logs_to_log_dir() {
    let d = dir("file");
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let flags = d.join("master.flags");
    std::fs::write(
        &flags,
        format!(
            "# as an upstream deployment writes them\n\
             --rpc_address=127.0.0.1\n--rpc_port=0\n--metrics_port=0\n\
             --max_threads=16\n--rpc_thread_num=8\n--memory_allocator=offset\n\
             --enable_ha=false\n--eviction_high_watermark_ratio=0.95\n\
             --default_kv_lease_ttl=5000\n--log_dir={}\n--v=1\n",
            logs.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mooncake_master"))
        .arg(format!("--flagfile={}", flags.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rest = wait_line(&mut child, "mooncake_master listening: rpc=");
    let _master = Proc(child);
    let metrics = rest
        .split_whitespace()
        .find_map(|w| w.strip_prefix("metrics="))
        .unwrap()
        .to_owned();
    let mut s = TcpStream::connect(&metrics).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /get_all_segments HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    // The no-effect flags are named in the log file under --log_dir.
    let log = logs.join("mooncake_master.INFO");
    eventually("the log file", Duration::from_secs(5), || {
        let log = log.clone();
        async move {
            std::fs::read_to_string(&log)
                .is_ok_and(|t| t.contains("--max_threads=16") && t.contains("no effect"))
        }
    })
    .await;
    std::fs::remove_dir_all(&d).unwrap();
}
