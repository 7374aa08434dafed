//! A leader frozen with SIGSTOP (its connections stay open, nothing answers): clients leave it
//! for the new leader within about an election timeout instead of waiting out their 5 s call
//! timeout. Three `mooncake_master` processes, a storage process and a writer here.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::masters::Group;
use common::{eventually, spawn_storage, store_config};
use mooncake_rpc::{RemoteMaster, RpcClientConfig};
use mooncake_store::{ReplicateConfig, Store, StoreConfig};

/// Not a test on its own: the body of the storage processes.
#[test]
#[ignore = "runs only as a child process of the multi-process tests"]
fn child_storage() {
    common::run_child_storage();
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// A client of the group with the default 5 s call timeout.
fn config(addrs: &str) -> StoreConfig {
    StoreConfig {
        rpc: RpcClientConfig::default(),
        ..store_config(addrs, 0)
    }
}

/// Freezes the leader, then writes until a write succeeds; returns how long writes were
/// unavailable (from the freeze to the first acknowledged write). The leader is resumed
/// afterwards, and the group has a leader again on return.
async fn freeze_leader_and_write(group: &Group, client: &Store, round: u32) -> Duration {
    let rc = ReplicateConfig::default();
    // The client's calls go to the current leader.
    client
        .put(&format!("warm{round}"), b"warm", &rc)
        .await
        .unwrap();
    let leader = group.leader().await.expect("a leader serves");
    let pid = group.members[leader].proc.as_ref().unwrap().0.id();
    signal(pid, "STOP");
    let frozen = Instant::now();
    let mut i = 0;
    while let Err(e) = client
        .put(&format!("frozen{round}-{i}"), &[7u8; 4096], &rc)
        .await
    {
        assert!(
            frozen.elapsed() < Duration::from_secs(60),
            "no write succeeded for a minute after the leader froze: {e}"
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gap = frozen.elapsed();
    signal(pid, "CONT");
    // The resumed member hears of the new term and follows; a leader serves.
    eventually(
        "a leader after the resume",
        Duration::from_secs(15),
        || async { group.leader().await.is_some() },
    )
    .await;
    gap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaves_a_frozen_leader_within_an_election_timeout() {
    let group = Group::new("raft-freeze", 3);
    eventually("a first leader", Duration::from_secs(15), || async {
        group.leader().await.is_some()
    })
    .await;
    let addrs = group.addresses();
    let (_storage, _) = spawn_storage(&addrs);
    let client = Store::setup(config(&addrs)).await.unwrap();
    let gap = freeze_leader_and_write(&group, &client, 0).await;
    println!("writes unavailable for {gap:?} after the leader froze");
    // An election takes 1-2 s (10-20 ticks of 100 ms) after the leader falls silent; a
    // client that waited for its call timeout would take 5 s. The bound leaves room for a
    // loaded machine.
    assert!(
        gap < Duration::from_secs(4),
        "a frozen leader held writes for {gap:?}"
    );
    // The frozen member came back as a follower: no term had two leaders.
    group.assert_one_leader_per_term();
    client.close().await.unwrap();
}

/// Measures writes unavailable after the leader freezes, with one attempt bounded by the
/// election timeout (now) and by the whole call timeout (as before): the median of a few
/// freezes each. `cargo test -p mooncake-master-service --test raft_freeze -- --ignored
/// --nocapture measure`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement of several freezes (about a minute), run by hand"]
async fn measure_writes_unavailable_after_a_leader_freeze() {
    let group = Group::new("raft-freeze-measure", 3);
    eventually("a first leader", Duration::from_secs(15), || async {
        group.leader().await.is_some()
    })
    .await;
    let addrs = group.addresses();
    let (_storage, _) = spawn_storage(&addrs);
    let runs = 5;
    let mut round = 0;
    for (label, attempt) in [
        (
            "attempt bounded by the call timeout (before)",
            Duration::from_secs(5),
        ),
        (
            "attempt bounded by the election timeout",
            RemoteMaster::ATTEMPT_TIMEOUT,
        ),
    ] {
        let master = Arc::new(
            RemoteMaster::new(addrs.as_str(), RpcClientConfig::default())
                .with_attempt_timeout(attempt),
        );
        let client = Store::setup_with_master(config(&addrs), master)
            .await
            .unwrap();
        let mut gaps = Vec::new();
        for _ in 0..runs {
            gaps.push(freeze_leader_and_write(&group, &client, round).await);
            round += 1;
        }
        gaps.sort();
        println!("{label}: median {:?}, all {gaps:?}", gaps[gaps.len() / 2]);
        client.close().await.unwrap();
    }
    group.assert_one_leader_per_term();
}
