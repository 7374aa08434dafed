//! Hostile clients of a real `mooncake_master` process, over loopback.

mod common;

use std::time::{Duration, Instant};

use common::{spawn_master, store_config};
use mooncake_rpc::rpc::RPC_VERSION;
use mooncake_rpc::MAX_FRAME;
use mooncake_store::{ReplicateConfig, Store};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Resident memory of process `pid`, in KiB.
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/PID/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The median of `samples`.
fn p50(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// 4 KiB puts and gets of fresh keys, each timed: (put p50, get p50).
async fn timed_calls(store: &Store, tag: &str, n: usize) -> (Duration, Duration) {
    let value = vec![7u8; 4096];
    let (mut puts, mut gets) = (Vec::new(), Vec::new());
    for i in 0..n {
        let key = format!("{tag}-{i}");
        let t = Instant::now();
        store
            .put(&key, &value, &ReplicateConfig::default())
            .await
            .unwrap();
        puts.push(t.elapsed());
        let t = Instant::now();
        assert_eq!(store.get(&key).await.unwrap(), value);
        gets.push(t.elapsed());
    }
    (p50(puts), p50(gets))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_announced_bodies_costs_the_master_little_and_clients_are_served() {
    let (master, addr) = spawn_master(0, 10);
    let pid = master.0.id();
    let store = Store::setup(store_config(&addr, 64 << 20)).await.unwrap();
    let (put_before, get_before) = timed_calls(&store, "before", 200).await;
    let rss_before = resident_kib(pid);

    // 1,000 connections, each announcing a 64 MiB request body and sending 1 KiB of it.
    let mut header = vec![0u8; 14];
    header[..4].copy_from_slice(&(MAX_FRAME as u32).to_le_bytes());
    header[4] = RPC_VERSION;
    header[5] = 1; // a request
    let mut flood = Vec::new();
    let mut refused = 0;
    for _ in 0..1000 {
        let Ok(mut s) = TcpStream::connect(&addr).await else {
            refused += 1;
            continue;
        };
        if s.write_all(&header).await.is_err() || s.write_all(&[0u8; 1024]).await.is_err() {
            refused += 1;
        }
        flood.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_flood = resident_kib(pid);
    let (put_during, get_during) = timed_calls(&store, "during", 200).await;
    let rss_after_calls = resident_kib(pid);
    println!(
        "master resident memory: {rss_before} KiB before, {rss_flood} KiB with 1,000 announced \
         64 MiB bodies, {rss_after_calls} KiB after 200 more calls; 4 KiB put p50 {put_before:?} \
         -> {put_during:?}, get p50 {get_before:?} -> {get_during:?} during the flood \
         ({refused} flood connections failed to send)"
    );
    assert!(
        rss_flood.max(rss_after_calls) < 100 * 1024,
        "the master holds {rss_flood} KiB under the flood"
    );
    drop(flood);
    store.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_only_the_master_issues_are_refused_from_clients() {
    use mooncake_core::ErrorCode;
    use mooncake_master::{Command, Timestamp};
    use mooncake_rpc::{MasterApi, MasterReply, MasterRequest, RemoteMaster, RpcClientConfig};

    let (_master, addr) = spawn_master(0, 10);
    let store = Store::setup(store_config(&addr, 64 << 20)).await.unwrap();
    store
        .put("kept", b"value", &ReplicateConfig::default())
        .await
        .unwrap();
    let hostile = RemoteMaster::new(addr.clone(), RpcClientConfig::default());
    let segments = || async {
        match hostile.call(MasterRequest::Segments).await.unwrap() {
            MasterReply::Segments(s) => s.len(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(segments().await, 1);
    for command in [
        Command::ExpireClient {
            client_id: store.client_id(),
        },
        Command::LeaseAll {
            read_at: Timestamp(u64::MAX / 2),
        },
        Command::Evict,
        Command::PurgeTasks,
        Command::ExpireReservations,
    ] {
        let shown = format!("{command:?}");
        match hostile.call(MasterRequest::Apply(command)).await.unwrap() {
            MasterReply::Failed { code, message } => {
                assert_eq!(code, ErrorCode::INVALID_PARAMS, "{shown}");
                assert!(message.contains("maintenance"), "{message}");
            }
            other => panic!("{shown} was not refused: {other:?}"),
        }
    }
    // Nothing changed: the storage node is still mounted and its object, never read, is
    // removable at once (no lease was granted until the end of time); it still serves.
    assert_eq!(segments().await, 1);
    store.remove("kept", false).await.unwrap();
    store
        .put("again", b"value", &ReplicateConfig::default())
        .await
        .unwrap();
    assert_eq!(store.get("again").await.unwrap(), b"value");
    store.close().await.unwrap();
}

/// A client reporting another writer's reserved range as landed is refused, and the commit
/// waiting on that range does not apply: it fails after its wait. The segment's owner reports
/// the same range and the next commit applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_party_cannot_report_anothers_writes_landed() {
    use mooncake_core::ErrorCode;
    use mooncake_master::{Command, ReservedPut, Response};
    use mooncake_rpc::{MasterApi, MasterReply, MasterRequest, RemoteMaster, RpcClientConfig};

    let (_master, addr) = spawn_master(0, 10);
    let storage = Store::setup(store_config(&addr, 64 << 20)).await.unwrap();
    let writer = Store::setup(store_config(&addr, 0)).await.unwrap();
    let third = Store::setup(store_config(&addr, 0)).await.unwrap();
    let rpc = RemoteMaster::new(addr.clone(), RpcClientConfig::default());
    let grant = match rpc
        .call(MasterRequest::Apply(Command::Reserve {
            client_id: writer.client_id(),
            size: 1 << 20,
            min_size: 0,
        }))
        .await
        .unwrap()
    {
        MasterReply::Applied {
            response: Response::Reserved(Ok(grant)),
            ..
        } => grant,
        other => panic!("no reservation: {other:?}"),
    };
    let range = (grant.buffer_address, 4096);
    let commit = |wait_ms| MasterRequest::CommitWhenLanded {
        command: Command::CommitReserved {
            client_id: writer.client_id(),
            reservation: grant.id,
            items: vec![ReservedPut {
                key: "waited".into(),
                offset: 0,
                size: 4096,
            }],
            config: ReplicateConfig::default(),
        },
        segment: grant.segment_name.clone(),
        ranges: vec![range],
        wait_ms,
    };
    let landed = |client_id| MasterRequest::Landed {
        client_id,
        segment: grant.segment_name.clone(),
        ranges: vec![range],
    };
    let started = Instant::now();
    let (committed, reported) = tokio::join!(rpc.call(commit(300)), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        rpc.call(landed(third.client_id())).await.unwrap()
    });
    match reported {
        MasterReply::Failed { code, message } => {
            assert_eq!(code, ErrorCode::ILLEGAL_CLIENT, "{message}");
            assert!(message.contains("reserved by another client"), "{message}");
        }
        other => panic!("a third party's landing report was taken: {other:?}"),
    }
    match committed.unwrap() {
        MasterReply::Failed { code, .. } => assert_eq!(code, ErrorCode::TRANSFER_FAIL),
        other => panic!("committed on a forged report: {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(!third.is_exist("waited").await.unwrap());
    // The segment's owner may report it.
    assert!(matches!(
        rpc.call(landed(storage.client_id())).await.unwrap(),
        MasterReply::Noted
    ));
    assert!(matches!(
        rpc.call(commit(1000)).await.unwrap(),
        MasterReply::Applied { .. }
    ));
    assert!(third.is_exist("waited").await.unwrap());
    for s in [third, writer, storage] {
        s.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_cannot_install_a_snapshot_exits_and_the_group_carries_on() {
    use common::masters::Group;
    use mooncake_master::{ClientId, Command, SegmentSpec};
    use mooncake_meta_raft::network::frame_message;
    use mooncake_meta_raft::raft::prelude::{ConfState, Message, MessageType, Snapshot};
    use mooncake_rpc::{MasterApi, MasterReply, MasterRequest, RemoteMaster, RpcClientConfig};

    let mut g = Group::new("badsnap", 3);
    let mut leader = None;
    for _ in 0..200 {
        leader = g.leader().await;
        if leader.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let l = leader.expect("a leader");
    let f = (0..3).find(|&i| i != l).unwrap();
    // A snapshot "from the leader" at a later term whose data is not a snapshot.
    let mut snap = Snapshot::default();
    snap.mut_metadata().index = 1_000_000;
    snap.mut_metadata().term = 1_000;
    snap.mut_metadata().set_conf_state(ConfState {
        voters: g.members.iter().map(|m| m.id).collect(),
        ..ConfState::default()
    });
    snap.data = b"not a snapshot".to_vec().into();
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgSnapshot);
    m.from = g.members[l].id;
    m.to = g.members[f].id;
    m.term = 1_000;
    m.set_snapshot(snap);
    let mut stream = TcpStream::connect(&g.members[f].raft).await.unwrap();
    stream.write_all(&frame_message(&m).unwrap()).await.unwrap();
    let status = tokio::task::block_in_place(|| g.wait_exit(f, Duration::from_secs(15)))
        .expect("the member exits");
    assert_eq!(status.code(), Some(1), "{status:?}");
    // The two others still commit through the log.
    let client = RemoteMaster::new(g.addresses(), RpcClientConfig::default());
    let mount = Command::MountSegment {
        client_id: ClientId(7),
        segment: SegmentSpec::new("127.0.0.1:9", 0x10_0000, 64 << 20),
    };
    match client.call(MasterRequest::Apply(mount)).await.unwrap() {
        MasterReply::Applied { .. } => {}
        other => panic!("the group did not commit: {other:?}"),
    }
}
