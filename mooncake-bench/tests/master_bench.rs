//! `master_bench --quick` with tiny windows: it starts both deployments, measures every mode,
//! prints a table that parses and the target lines, and leaves no process or data behind.

use std::path::PathBuf;
use std::process::Command;

/// `mooncake_master`, which another package of the workspace builds: next to `master_bench`
/// (where `cargo test --workspace` puts it), built on demand when this package is tested alone.
fn mooncake_master() -> PathBuf {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_master_bench"));
    let bin = bench.with_file_name("mooncake_master");
    if !bin.is_file() {
        let release = bench.parent().and_then(|d| d.file_name()) == Some("release".as_ref());
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args([
            "build",
            "-p",
            "mooncake-master-service",
            "--bin",
            "mooncake_master",
        ]);
        if release {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "building mooncake_master failed");
    }
    assert!(bin.is_file(), "{} is missing", bin.display());
    bin
}

#[test]
fn quick_run_prints_a_parseable_report_and_cleans_up() {
    let data = std::env::temp_dir().join(format!("master-bench-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_master_bench"))
        .args([
            "--quick",
            "--duration=0.2",
            "--warmup=0.05",
            "--repeats=1",
            "--concurrency=2",
            "--batch=4",
            "--exist_keys=64",
            "--raft_tick_ms=20",
        ])
        .arg("--master_bin")
        .arg(mooncake_master())
        .arg("--data_dir")
        .arg(&data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");

    // mode conc batch | single: ops spr calls p50 p99 cpu rq cli | group: ops spr calls p50 p99
    // cpu rq ldr raft cli | ratio
    let mut modes = Vec::new();
    for line in stdout.lines() {
        let t: Vec<&str> = line.split_whitespace().filter(|t| *t != "|").collect();
        if t.len() != 22 || !t[0].chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            continue;
        }
        let Ok(nums) = t[1..]
            .iter()
            .map(|x| x.parse::<f64>())
            .collect::<Result<Vec<_>, _>>()
        else {
            continue;
        };
        assert_eq!(nums[0], 2.0, "{line}");
        assert!(nums[2] > 0.0 && nums[10] > 0.0, "no ops measured: {line}");
        modes.push(t[0].to_owned());
    }
    assert_eq!(
        modes,
        ["put", "put_batch", "exist", "exist_batch"],
        "rows:\n{stdout}"
    );
    for prefix in [
        "TARGET group put commits/s",
        "TARGET group/single batched put",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in\n{stdout}"));
        assert!(line.ends_with("PASS") || line.ends_with("MISS"), "{line}");
    }

    let pids: Vec<u32> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("master pids:"))
        .expect("master pids line")
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(pids.len() >= 4, "{pids:?}");
    for pid in pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || !state.contains("mooncake_master"),
            "master {pid} outlived the bench: {state}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(&data).unwrap().collect();
    assert!(left.is_empty(), "data left behind: {left:?}");
    let _ = std::fs::remove_dir_all(&data);
}
