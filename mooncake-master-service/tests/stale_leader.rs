//! A leader that cannot go stale, with real `mooncake_master` processes on loopback: a leader
//! frozen with SIGSTOP while the others elect a successor and change a key answers no read from
//! its frozen state once resumed (it answers `NotLeader`), and a member whose Raft loop dies
//! exits non-zero with the reason instead of serving.

mod common;

use std::time::{Duration, Instant};

use common::eventually;
use common::masters::Group;
use mooncake_master::{ClientId, Command, ReplicateConfig, Response, SegmentSpec};
use mooncake_rpc::{MasterApi, MasterReply, MasterRequest, RemoteMaster, RpcClientConfig};

/// The tests here run one at a time: each starts a group on ports it picked free, which a group
/// started meanwhile by another test could pick too, and a member that finds another group at
/// a peer's address refuses to start.
static ONE_GROUP_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn client(addr: &str) -> RemoteMaster {
    RemoteMaster::new(
        addr,
        RpcClientConfig {
            call_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
        },
    )
}

async fn apply(m: &RemoteMaster, c: Command) -> MasterReply {
    m.call(MasterRequest::Apply(c)).await.expect("an answer")
}

fn applied(reply: MasterReply) -> Response {
    match reply {
        MasterReply::Applied { response, .. } => response,
        other => panic!("expected an applied command, got {other:?}"),
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// The index of a member of `among` that answers as leader.
async fn leader_among(group: &Group, among: &[usize]) -> Option<usize> {
    for &i in among {
        let probe = client(&group.members[i].rpc);
        if let Ok(MasterReply::Metrics(_)) = probe.call(MasterRequest::Metrics).await {
            return Some(i);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_resumed_answers_not_leader_instead_of_its_frozen_state() {
    let _one = ONE_GROUP_AT_A_TIME.lock().await;
    let group = Group::new("stale-leader", 3);
    let all: Vec<usize> = (0..3).collect();
    eventually("a first leader", Duration::from_secs(15), || async {
        leader_among(&group, &all).await.is_some()
    })
    .await;
    let old = leader_among(&group, &all).await.unwrap();
    // A client connected to the leader before it froze, as clients are.
    let at_old = client(&group.members[old].rpc);
    let owner = ClientId::from_parts(7, 1);
    let mount = Command::MountSegment {
        client_id: owner,
        segment: SegmentSpec::new("stale-test-host:17000", 1 << 40, 1 << 30),
    };
    assert_eq!(applied(apply(&at_old, mount).await), Response::Unit(Ok(())));
    let put = |key: &str| Command::PutStart {
        client_id: owner,
        key: key.into(),
        size: 4096,
        config: ReplicateConfig::default(),
    };
    let end = |key: &str| Command::PutEnd {
        client_id: owner,
        key: key.into(),
    };
    applied(apply(&at_old, put("k")).await)
        .into_put_start()
        .unwrap();
    assert_eq!(
        applied(apply(&at_old, end("k")).await),
        Response::Unit(Ok(()))
    );
    let exists = |key: &str| Command::ExistKey { key: key.into() };
    assert_eq!(
        applied(apply(&at_old, exists("k")).await),
        Response::Exists(true)
    );

    let pid = group.pid(old).unwrap();
    signal(pid, "-STOP");
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != old).collect();
    let frozen_at = Instant::now();
    eventually("a new leader", Duration::from_secs(20), || async {
        leader_among(&group, &others).await.is_some()
    })
    .await;
    let elected_after = frozen_at.elapsed();
    let new = leader_among(&group, &others).await.unwrap();
    let at_new = client(&group.members[new].rpc);
    // The new leader changes the key the old one would still show: "k" is removed and "k2"
    // written.
    let remove = Command::Remove {
        key: "k".into(),
        force: true,
    };
    assert_eq!(
        applied(apply(&at_new, remove).await),
        Response::Unit(Ok(()))
    );
    applied(apply(&at_new, put("k2")).await)
        .into_put_start()
        .unwrap();
    assert_eq!(
        applied(apply(&at_new, end("k2")).await),
        Response::Unit(Ok(()))
    );
    assert_eq!(
        applied(apply(&at_new, exists("k")).await),
        Response::Exists(false)
    );

    signal(pid, "-CONT");
    let resumed = Instant::now();
    // Read straight from the old leader, over the connection it had: whatever it answers, it
    // is never its frozen state.
    let mut first_refusal = None;
    for read in [
        exists("k"),
        exists("k2"),
        Command::GetReplicaList { key: "k".into() },
    ] {
        match apply(&at_old, read.clone()).await {
            MasterReply::NotLeader { .. } => {
                first_refusal.get_or_insert(resumed.elapsed());
            }
            MasterReply::Applied { response, .. } => {
                // Only possible once it has caught up as a follower... which answers
                // NotLeader; an answer here must at least be the new state.
                panic!("the resumed old leader answered {read:?} with {response:?}");
            }
            other => panic!("unexpected answer to {read:?}: {other:?}"),
        }
    }
    // A heartbeat is refused too, so the client moves to the new leader.
    assert!(matches!(
        apply(&at_old, Command::Heartbeat { client_id: owner }).await,
        MasterReply::NotLeader { .. }
    ));
    // Soon it names the new leader.
    let new_rpc = group.members[new].rpc.clone();
    eventually(
        "the old leader names the new one",
        Duration::from_secs(10),
        || async {
            matches!(
                apply(&at_old, exists("k")).await,
                MasterReply::NotLeader { leader: Some(l) } if l == new_rpc
            )
        },
    )
    .await;
    let named_after = resumed.elapsed();
    eprintln!(
        "stale_leader: new leader elected {elected_after:?} after the freeze; the resumed old \
         leader refused its first read after {:?} and named the new leader within \
         {named_after:?}",
        first_refusal.unwrap()
    );
    group.assert_one_leader_per_term();
}

/// A Raft message claiming to come from a member (over loopback, where every member lives) and
/// carrying a snapshot the leader cannot install: its Raft loop stops on that error.
async fn send_bad_snapshot(to_raft: &str, to: u64, from: u64, term: u64, voters: Vec<u64>) {
    use mooncake_meta_raft::network::frame_message;
    use mooncake_meta_raft::raft::prelude::{ConfState, Message, MessageType, Snapshot};
    use tokio::io::AsyncWriteExt;
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = 1_000_000;
    snap.mut_metadata().term = term;
    snap.mut_metadata().set_conf_state(ConfState {
        voters,
        ..ConfState::default()
    });
    snap.data = b"not a snapshot".to_vec().into();
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgSnapshot);
    m.from = from;
    m.to = to;
    m.term = term;
    m.set_snapshot(snap);
    let mut stream = tokio::net::TcpStream::connect(to_raft).await.unwrap();
    stream.write_all(&frame_message(&m).unwrap()).await.unwrap();
    stream.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_raft_loop_dies_exits_with_the_reason_and_the_group_goes_on() {
    let _one = ONE_GROUP_AT_A_TIME.lock().await;
    let mut group = Group::with_logs("dead-loop", 3);
    let all: Vec<usize> = (0..3).collect();
    eventually("a first leader", Duration::from_secs(15), || async {
        leader_among(&group, &all).await.is_some()
    })
    .await;
    let l = leader_among(&group, &all).await.unwrap();
    let term = *group.leaders_by_term().keys().max().unwrap();
    let from = group.members[(l + 1) % 3].id;
    let ids: Vec<u64> = group.members.iter().map(|m| m.id).collect();
    let at_leader = client(&group.members[l].rpc);
    send_bad_snapshot(
        &group.members[l].raft,
        group.members[l].id,
        from,
        term + 1,
        ids,
    )
    .await;
    // Once its loop has stopped, and until the process is gone, it answers nothing from its
    // state: a read gets NotLeader (or the connection fails as the process exits).
    eventually("the loop stops", Duration::from_secs(15), || async {
        group
            .log_of(l)
            .contains("raft loop stopped on a fatal error")
    })
    .await;
    let answer = at_leader
        .call(MasterRequest::Apply(Command::ExistKey { key: "x".into() }))
        .await;
    assert!(
        !matches!(answer, Ok(MasterReply::Applied { .. })),
        "served a read after its loop died: {answer:?}"
    );
    let status = group
        .wait_exit(l, Duration::from_secs(15))
        .expect("the member exits");
    assert!(!status.success(), "exit status {status:?}");
    let log = group.log_of(l);
    assert!(
        log.contains("replicated log stopped") && log.contains("snapshot"),
        "the reason is not in the log: {log}"
    );
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != l).collect();
    eventually(
        "a leader among the others",
        Duration::from_secs(20),
        || async { leader_among(&group, &others).await.is_some() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_with_a_wiped_data_directory_is_refused_and_elects_no_one() {
    let _one = ONE_GROUP_AT_A_TIME.lock().await;
    let mut group = Group::with_logs("wiped-member", 3);
    let all: Vec<usize> = (0..3).collect();
    eventually("a first leader", Duration::from_secs(15), || async {
        leader_among(&group, &all).await.is_some()
    })
    .await;
    let l = leader_among(&group, &all).await.unwrap();
    let at_leader = client(&group.members[l].rpc);
    let owner = ClientId::from_parts(9, 1);
    let mount = Command::MountSegment {
        client_id: owner,
        segment: SegmentSpec::new("wiped-test-host:17000", 1 << 40, 1 << 30),
    };
    assert_eq!(
        applied(apply(&at_leader, mount).await),
        Response::Unit(Ok(()))
    );
    let put = Command::PutStart {
        client_id: owner,
        key: "kept".into(),
        size: 4096,
        config: ReplicateConfig::default(),
    };
    applied(apply(&at_leader, put).await)
        .into_put_start()
        .unwrap();
    let end = Command::PutEnd {
        client_id: owner,
        key: "kept".into(),
    };
    assert_eq!(
        applied(apply(&at_leader, end).await),
        Response::Unit(Ok(()))
    );

    // A follower loses its data directory and is started again under the same id.
    let (w, m) = {
        let others: Vec<usize> = all.iter().copied().filter(|&i| i != l).collect();
        (others[0], others[1])
    };
    group.kill(w);
    let wid = group.members[w].id;
    std::fs::remove_dir_all(group.dir.join(wid.to_string())).unwrap();
    group.start(w);
    eventually(
        "the wiped member is refused",
        Duration::from_secs(15),
        || async {
            group.log_of(w).contains("wiped or replaced")
                && group.log_of(l).contains("wiped or replaced")
        },
    )
    .await;
    // With the leader gone, the wiped member's vote does not count: the remaining member and
    // it elect no one.
    group.kill(l);
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        assert_eq!(
            leader_among(&group, &[w, m]).await,
            None,
            "a leader was elected with the wiped member's vote"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The old leader returns: the group goes on, with what it acknowledged.
    group.start(l);
    eventually(
        "a leader among the intact members",
        Duration::from_secs(20),
        || async { leader_among(&group, &[l, m]).await.is_some() },
    )
    .await;
    let at = client(&group.members[leader_among(&group, &[l, m]).await.unwrap()].rpc);
    assert_eq!(
        applied(apply(&at, Command::ExistKey { key: "kept".into() }).await),
        Response::Exists(true)
    );
    group.assert_one_leader_per_term();
}
