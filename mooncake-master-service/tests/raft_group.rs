//! A Raft master group across processes: three `mooncake_master` members, two storage processes
//! and a writer here. The leader is killed with SIGKILL (and restarted) under load, then the
//! whole group is killed and restarted; every acknowledged write must survive, nothing removed
//! may come back, each failover must be short, and the members' leader lines must never show
//! two leaders in one term.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::masters::Group;
use common::{eventually, spawn_storage, store_config};
use mooncake_core::ErrorCode;
use mooncake_store::{ReplicateConfig, Store};

/// Not a test on its own: the body of the storage processes.
#[test]
#[ignore = "runs only as a child process of the multi-process tests"]
fn child_storage() {
    common::run_child_storage();
}

fn value(i: u64) -> Vec<u8> {
    (0..2000 + (i % 7) * 1000)
        .map(|j| (i * 131 + j) as u8)
        .collect()
}

#[derive(Default)]
struct Log {
    acked: BTreeSet<u64>,
    removed: BTreeSet<u64>,
    /// Longest time without a successful call, and when it ended.
    worst_gap: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kills_and_a_whole_group_restart_lose_no_acknowledged_write() {
    let mut group = Group::new("raft-group", 3);
    eventually("a first leader", Duration::from_secs(15), || async {
        group.leader().await.is_some()
    })
    .await;
    let addrs = group.addresses();
    let (_s1, _) = spawn_storage(&addrs);
    let (_s2, _) = spawn_storage(&addrs);
    let client = Arc::new(Store::setup(store_config(&addrs, 0)).await.unwrap());

    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Gaps count only while failovers are measured (not across the whole-group restart).
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let (client, log, stop) = (client.clone(), log.clone(), stop.clone());
        let measuring = measuring.clone();
        tokio::spawn(async move {
            let two = ReplicateConfig::with_replicas(2);
            let mut last_ok = Instant::now();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ok = if i % 10 == 9 {
                    // Remove an earlier acknowledged key now and then.
                    let victim = i - 5;
                    let known = log.lock().unwrap().acked.contains(&victim);
                    match client.remove(&format!("key{victim}"), true).await {
                        Ok(()) => {
                            let mut l = log.lock().unwrap();
                            l.removed.insert(victim);
                            l.acked.remove(&victim);
                            true
                        }
                        // Never acknowledged, or its removal was applied before the answer was
                        // lost: either way the key must not be readable.
                        Err(e) if e.code() == ErrorCode::OBJECT_NOT_FOUND => {
                            let mut l = log.lock().unwrap();
                            l.removed.insert(victim);
                            if known {
                                l.acked.remove(&victim);
                            }
                            true
                        }
                        Err(_) => false,
                    }
                } else {
                    match client.put(&format!("key{i}"), &value(i), &two).await {
                        Ok(()) => {
                            log.lock().unwrap().acked.insert(i);
                            true
                        }
                        Err(_) => false,
                    }
                };
                if ok {
                    let gap = last_ok.elapsed();
                    let mut l = log.lock().unwrap();
                    if measuring.load(std::sync::atomic::Ordering::Relaxed) {
                        l.worst_gap = l.worst_gap.max(gap);
                    }
                    last_ok = Instant::now();
                    i += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if i % 10 != 9 {
                        i += 1;
                    }
                }
            }
        })
    };

    // Kill the leader twice, restarting it after a pause each time.
    let mut killed_leaders = Vec::new();
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = group.leader().await.expect("a leader serves");
        killed_leaders.push(group.members[leader].id);
        group.kill(leader);
        // The others elect a leader among themselves (on a loaded machine this can take longer
        // than the usual 1-2 s), then the killed member comes back.
        eventually(
            "a new leader among the survivors",
            Duration::from_secs(15),
            || async { group.leader().await.is_some_and(|i| i != leader) },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        group.start(leader);
        let acked = log.lock().unwrap().acked.len();
        assert!(acked > 0, "round {round}: writes are acknowledged");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The whole group dies at once under load and comes back.
    let last_term = group.leaders_by_term().keys().max().copied().unwrap_or(0);
    measuring.store(false, std::sync::atomic::Ordering::Relaxed);
    for i in 0..3 {
        group.kill(i);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        group.start(i);
    }
    eventually(
        "a leader after the whole-group restart",
        Duration::from_secs(15),
        || async { group.leader().await.is_some() },
    )
    .await;
    eventually("the new leader's line", Duration::from_secs(5), || async {
        group
            .leaders_by_term()
            .keys()
            .max()
            .is_some_and(|&t| t > last_term)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();

    let (acked, removed, worst_gap) = {
        let l = log.lock().unwrap();
        (l.acked.clone(), l.removed.clone(), l.worst_gap)
    };
    assert!(acked.len() > 20, "only {} writes acknowledged", acked.len());
    for i in &acked {
        let got = client.get(&format!("key{i}")).await;
        assert_eq!(
            got.as_deref().ok(),
            Some(&value(*i)[..]),
            "acknowledged key{i}: {got:?}"
        );
    }
    for i in &removed {
        let got = client.get(&format!("key{i}")).await;
        assert_eq!(
            got.map_err(|e| e.code()).err(),
            Some(ErrorCode::OBJECT_NOT_FOUND),
            "removed key{i} came back"
        );
    }
    println!(
        "{} acknowledged writes survived, {} removals held; longest failover {:?}",
        acked.len(),
        removed.len(),
        worst_gap
    );
    // An election takes 1-2 s (10-20 ticks of 100 ms) after the leader's death is noticed;
    // the bound leaves room for a loaded 2-core machine without letting a client that waits
    // for its call timeout (or never finds the new leader) pass.
    assert!(
        worst_gap < Duration::from_secs(5),
        "a leader failover left clients without service for {worst_gap:?}"
    );
    // Two leader kills and a whole-group restart: at least four terms had a leader, and none
    // had two.
    let terms = group.assert_one_leader_per_term();
    let by_term = group.leaders_by_term();
    println!("{terms} terms had a leader, each exactly one: {by_term:?}");
    assert!(terms >= 4, "only {terms} leader terms seen: {by_term:?}");
    for id in killed_leaders {
        assert!(
            by_term.values().any(|l| l.contains(&id)),
            "member {id} served as leader but printed no leader line: {by_term:?}"
        );
    }
    client.close().await.unwrap();
}
