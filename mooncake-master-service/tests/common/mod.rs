//! Helpers of the multi-process tests: the shared ones, and Raft master groups run as
//! `mooncake_master` processes.
#![allow(dead_code, unused_imports, unreachable_pub)]

pub mod masters;

pub use mooncake_testkit::*;

use std::process::{Command, Stdio};

/// Starts the `mooncake_master` binary on loopback (`port` 0: any) with clients expiring after
/// `client_ttl_s`; returns it and its RPC address.
pub fn spawn_master(port: u16, client_ttl_s: u64) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mooncake_master"))
        .args([
            "--rpc_address=127.0.0.1".to_string(),
            format!("--rpc_port={port}"),
            "--metrics_port=0".to_string(),
            format!("--client_ttl={client_ttl_s}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mooncake_master");
    let rest = wait_line(&mut child, "mooncake_master listening: rpc=");
    let addr = rest.split_whitespace().next().expect("address").to_owned();
    (Proc(child), addr)
}
