//! Changing a Raft master group's members at run time, across processes and under load: three
//! `mooncake_master` members, a storage process and a writer; a fourth member started in join
//! mode is added as a learner and promoted with `mooncake_master admin`, then the leader is
//! removed. Writes go on throughout; the removed member announces its removal and exits, and the
//! three left still commit; every acknowledged write must read back with its bytes, bad admin
//! requests must be refused with a reason, and no term may ever have had two leaders.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::masters::Group;
use common::{eventually, spawn_storage, store_config};
use mooncake_rpc::admin::{AdminRequest, Members};
use mooncake_rpc::call_admin;
use mooncake_store::{ReplicateConfig, Store};

/// Not a test on its own: the body of the storage process.
#[test]
#[ignore = "runs only as a child process of the multi-process tests"]
fn child_storage() {
    common::run_child_storage();
}

fn value(i: u64) -> Vec<u8> {
    (0..1500 + (i % 5) * 700)
        .map(|j| (i * 37 + j * 11) as u8)
        .collect()
}

/// What `mooncake_master admin ARGS` did.
struct Admin {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `mooncake_master admin` with `args`, off the async workers.
async fn admin_cli(args: Vec<String>) -> Admin {
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_mooncake_master"))
            .arg("admin")
            .args(&args)
            .output()
            .expect("run mooncake_master admin")
    })
    .await
    .unwrap();
    Admin {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `admin ARGS --master_server_addr=MASTERS`, which must succeed.
async fn admin_ok(masters: &str, args: &[&str]) -> String {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.push(format!("--master_server_addr={masters}"));
    let r = admin_cli(all).await;
    assert_eq!(r.code, 0, "admin {args:?} failed: {}{}", r.stdout, r.stderr);
    r.stdout
}

/// `admin ARGS`, which must fail with exit code `code` and a message containing `why`.
async fn admin_refused(args: &[String], code: i32, why: &str) {
    let r = admin_cli(args.to_vec()).await;
    assert_eq!(r.code, code, "admin {args:?}: {}{}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains(why),
        "admin {args:?}: wanted {why:?} in {:?}",
        r.stderr
    );
}

async fn members(masters: &str) -> Members {
    call_admin(masters, AdminRequest::Members)
        .await
        .expect("members")
}

#[derive(Default)]
struct Log {
    acked: Vec<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_member_is_promoted_and_the_leader_removed_under_load() {
    tokio::time::timeout(Duration::from_secs(60), scenario())
        .await
        .expect("the membership scenario took over 60 s");
}

async fn scenario() {
    let t0 = Instant::now();
    let mut group = Group::new("raft-membership", 3);
    let new = group.add_member(false);
    let masters = group.addresses();
    eventually("a first leader", Duration::from_secs(15), || async {
        group.leader().await.is_some()
    })
    .await;
    let (_storage, _) = spawn_storage(&masters);
    let client = Arc::new(Store::setup(store_config(&masters, 0)).await.unwrap());

    let log = Arc::new(Mutex::new(Log::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, log, stop) = (client.clone(), log.clone(), stop.clone());
        tokio::spawn(async move {
            let one = ReplicateConfig::with_replicas(1);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if client
                    .put(&format!("key{i}"), &value(i), &one)
                    .await
                    .is_ok()
                {
                    log.lock().unwrap().acked.push(i);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let acked = || log.lock().unwrap().acked.len();
    eventually("first writes", Duration::from_secs(10), || async {
        acked() > 0
    })
    .await;

    // Requests that make no sense are refused with a reason, and change nothing.
    let m = format!("--master_server_addr={masters}");
    let args = |a: &[&str]| -> Vec<String> {
        a.iter().map(|s| s.to_string()).chain([m.clone()]).collect()
    };
    admin_refused(&args(&["promote", "4"]), 1, "node 4 is not a learner").await;
    admin_refused(&args(&["remove", "9"]), 1, "node 9 is not a member").await;
    let clash = format!("5={}/127.0.0.1:1", group.members[0].raft);
    admin_refused(&args(&["add-learner", &clash]), 1, "already used by node 1").await;
    let again = group.members[1].spec();
    admin_refused(
        &args(&["add-learner", &again]),
        1,
        "node 2 is already a voter",
    )
    .await;
    admin_refused(&args(&["grow"]), 2, "unknown command").await;
    admin_refused(
        &["members".to_string()],
        2,
        "--master_server_addr is required",
    )
    .await;
    admin_refused(&args(&["promote", "x"]), 2, "not a non-zero member id").await;
    assert_eq!(members(&masters).await.voters(), vec![1, 2, 3]);

    // A fourth member starts in join mode, is added as a learner, catches up, is promoted.
    let t_join = Instant::now();
    group.start(new);
    let spec = group.members[new].spec();
    let out = admin_ok(&masters, &["add-learner", &spec]).await;
    assert!(out.contains("learner"), "{out}");
    let m4 = members(&masters).await;
    assert_eq!((m4.voters(), m4.learners()), (vec![1, 2, 3], vec![4]));
    eventually(
        "the learner catching up",
        Duration::from_secs(10),
        || async {
            let m = members(&masters).await;
            m.members.iter().any(|x| x.id == 4 && x.matched > Some(0))
        },
    )
    .await;
    let out = admin_ok(&masters, &["promote", "4"]).await;
    assert!(!out.contains("learner"), "{out}");
    assert_eq!(members(&masters).await.voters(), vec![1, 2, 3, 4]);
    let join_time = t_join.elapsed();

    // The leader is removed: it hands over to another voter and stops serving.
    let before = members(&masters).await;
    let old = before.leader.expect("a leader");
    let t_remove = Instant::now();
    let out = admin_ok(&masters, &["remove", &old.to_string()]).await;
    let expected: Vec<u64> = (1..=4).filter(|&id| id != old).collect();
    assert!(
        !out.contains(&group.members[group.index_of(old)].raft),
        "{out}"
    );
    eventually("a new leader", Duration::from_secs(10), || async {
        let m = members(&masters).await;
        m.leader.is_some_and(|l| l != old) && m.voters() == expected
    })
    .await;
    let handover = t_remove.elapsed();
    // The removed member says so and exits cleanly.
    let status = group
        .wait_exit(group.index_of(old), Duration::from_secs(10))
        .expect("the removed member did not exit");
    assert!(status.success(), "removed member exited with {status}");
    assert!(
        group
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|(id, l)| *id == old && l.contains("removed from its group")),
        "the removed member did not say why it stopped"
    );
    admin_refused(
        &args(&["remove", &old.to_string()]),
        1,
        &format!("node {old} is not a member"),
    )
    .await;

    // The removed member no longer counts: with it gone, the three left still commit.
    let at_removal = acked();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let at_kill = acked();
    assert!(at_kill > at_removal, "no write committed after the removal");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let after_kill = acked();
    assert!(
        after_kill > at_kill + 10,
        "the three remaining members commit only {} writes in 1.2 s",
        after_kill - at_kill
    );
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();

    let acked: Vec<u64> = log.lock().unwrap().acked.clone();
    for &i in &acked {
        let got = client.get(&format!("key{i}")).await;
        assert_eq!(
            got.as_deref().ok(),
            Some(&value(i)[..]),
            "acknowledged key{i}: {got:?}"
        );
    }

    // Down to one voter, which cannot be removed.
    let leader = members(&masters).await.leader.expect("a leader");
    for id in expected.iter().copied().filter(|&id| id != leader) {
        admin_ok(&masters, &["remove", &id.to_string()]).await;
    }
    assert_eq!(members(&masters).await.voters(), vec![leader]);
    admin_refused(
        &args(&["remove", &leader.to_string()]),
        1,
        "is the last voter",
    )
    .await;
    client
        .put(
            "after-shrink",
            &value(7),
            &ReplicateConfig::with_replicas(1),
        )
        .await
        .expect("a group of one still commits");

    let terms = group.assert_one_leader_per_term();
    assert!(terms >= 2, "{:?}", group.leaders_by_term());
    println!(
        "{} acknowledged writes read back; join+promote {join_time:?}, leader removal to new \
         leader {handover:?}, {terms} leader terms each with one leader, total {:?}",
        acked.len(),
        t0.elapsed()
    );
    client.close().await.unwrap();
}

/// A member started without `--raft_join` next to a running group that does not include it
/// would bootstrap a second group under the same addresses: it is refused, says how to join, and
/// writes no group state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_member_started_without_join_is_refused_while_the_group_runs() {
    let mut g = Group::new("nojoin", 3);
    eventually("a first leader", Duration::from_secs(15), || async {
        g.leader().await.is_some()
    })
    .await;
    let i = g.add_member(true);
    let m = &g.members[i];
    let peers: Vec<String> = g.members.iter().map(|m| m.spec()).collect();
    let data_dir = g.dir.join(format!("{}-refused", m.id));
    let args = vec![
        "--rpc_address=127.0.0.1".to_string(),
        format!("--rpc_port={}", m.rpc.rsplit_once(':').unwrap().1),
        "--metrics_port=0".to_string(),
        format!("--raft_id={}", m.id),
        format!("--raft_data_dir={}", data_dir.display()),
        format!("--raft_peers={}", peers.join(",")),
    ];
    // Bounded: a member that wrongly starts is killed after 15 s and the test fails.
    let (status, stderr) = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut child = Command::new(env!("CARGO_BIN_EXE_mooncake_master"))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run mooncake_master");
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        (status, err)
    })
    .await
    .unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "it started ({status:?}): {stderr}"
    );
    assert!(
        stderr.contains("already running") && stderr.contains("--raft_join"),
        "{stderr}"
    );
    assert!(
        !data_dir.join("snapshot").exists(),
        "no group state was written"
    );
    // The group itself is untouched.
    let left = members(&g.addresses()).await;
    assert_eq!(left.voters(), vec![1, 2, 3]);
}
