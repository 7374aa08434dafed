//! Failover, lease, client and reservation timeouts of a whole cluster in one process, in
//! virtual time: master services over an in-memory replicated log, store clients on the
//! in-memory transport (see `sim/mod.rs`). Deterministic and fast: paused tokio time moves only
//! when every task waits on a timer, so a ten-second TTL passes in no real time.

mod sim;

use std::time::Duration;

use mooncake_master::{Command, MasterConfig, ReservedPut, Response};
use mooncake_master_service::MasterGroup;
use mooncake_master_service::{MasterService, ServiceConfig};
use mooncake_rpc::admin::AdminRequest;
use mooncake_rpc::{apply_via, MasterApi, MasterReply, MasterRequest};

use mooncake_core::ErrorCode;
use mooncake_store::ReplicateConfig;

use sim::{value, Cluster, Link};

const SEGMENT: u64 = 16 << 20;

fn sleep(ms: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_millis(ms))
}

#[tokio::test(start_paused = true)]
async fn failover_follows_the_new_leader_and_loses_nothing_acknowledged() {
    let cluster = Cluster::start(3, MasterConfig::default(), Duration::from_secs(1));
    let group_a = cluster.group();
    let a = cluster.client("node-a", group_a.clone(), SEGMENT).await;
    let b = cluster.client("node-b", cluster.group(), SEGMENT).await;
    let rc = ReplicateConfig::default();
    for i in 0..20 {
        a.put(&format!("k{i}"), &value(i, 4096 + i as usize), &rc)
            .await
            .unwrap();
    }
    assert_eq!(group_a.current(), "master-0");

    // Master 1 wins term 2: master 0 redirects, every acknowledged put is readable there.
    cluster.log.elect(1);
    let session = group_a.session();
    for i in 0..20 {
        assert_eq!(
            b.get(&format!("k{i}")).await.unwrap(),
            value(i, 4096 + i as usize)
        );
    }
    for i in 20..30 {
        a.put(&format!("k{i}"), &value(i, 1000), &rc).await.unwrap();
    }
    assert_eq!(
        group_a.current(),
        "master-1",
        "the client followed the hint"
    );
    assert_ne!(
        group_a.session(),
        session,
        "answers now come from another master"
    );
    for m in &cluster.masters {
        assert_eq!(
            m.metrics().key_count,
            30,
            "every member applied every entry"
        );
    }

    // No leader for a while: calls wait for the election instead of failing.
    cluster.log.depose();
    let reader = {
        let a = a.clone();
        tokio::spawn(async move { a.get("k25").await })
    };
    sleep(2_000).await;
    assert!(!reader.is_finished(), "nobody leads yet");
    cluster.log.elect(2);
    assert_eq!(reader.await.unwrap().unwrap(), value(25, 1000));
    assert_eq!(group_a.current(), "master-2");

    // Back to master 0 (term 5): clients keep working, heartbeats keep both segments mounted.
    cluster.log.elect(0);
    sleep(30_000).await;
    let m = cluster.masters[0].metrics();
    assert_eq!(m.segment_count, 2, "no client expired across the failovers");
    assert_eq!(m.counters.clients_expired, 0);
    for i in 0..30 {
        assert!(b.is_exist(&format!("k{i}")).await.unwrap(), "k{i}");
    }
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_read_lease_expires_after_its_ttl() {
    let config = MasterConfig {
        default_kv_lease_ttl_ms: 5_000,
        ..MasterConfig::default()
    };
    let cluster = Cluster::start(1, config, Duration::ZERO);
    let a = cluster.client("node-a", cluster.group(), SEGMENT).await;
    a.put("leased", &value(7, 8192), &ReplicateConfig::default())
        .await
        .unwrap();
    assert_eq!(a.get("leased").await.unwrap(), value(7, 8192));
    assert_eq!(
        a.remove("leased", false).await.unwrap_err().code(),
        ErrorCode::OBJECT_HAS_LEASE
    );
    sleep(4_900).await;
    assert_eq!(
        a.remove("leased", false).await.unwrap_err().code(),
        ErrorCode::OBJECT_HAS_LEASE,
        "still leased just before the TTL"
    );
    sleep(200).await;
    a.remove("leased", false).await.unwrap();
    assert!(!a.is_exist("leased").await.unwrap());
    a.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_new_leader_honours_leases_its_predecessor_granted_outside_the_log() {
    let config = MasterConfig {
        default_kv_lease_ttl_ms: 5_000,
        ..MasterConfig::default()
    };
    let cluster = Cluster::start(2, config, Duration::from_secs(1));
    let a = cluster.client("node-a", cluster.group(), SEGMENT).await;
    a.put("read", &value(3, 4096), &ReplicateConfig::default())
        .await
        .unwrap();
    let entries = cluster.log.entries();
    // The leader serves the read from its applied state: the lease is not in the log.
    assert_eq!(a.get("read").await.unwrap(), value(3, 4096));
    assert_eq!(cluster.log.entries(), entries, "a read appends nothing");

    // Master 1 never saw that read; taking over, it leases everything for grace + TTL.
    cluster.log.elect(1);
    assert_eq!(
        a.remove("read", false).await.unwrap_err().code(),
        ErrorCode::OBJECT_HAS_LEASE
    );
    sleep(5_900).await;
    assert_eq!(
        a.remove("read", false).await.unwrap_err().code(),
        ErrorCode::OBJECT_HAS_LEASE,
        "the predecessor may have served a read up to the grace after the election"
    );
    sleep(200).await;
    a.remove("read", false).await.unwrap();
    a.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_expired_after_client_ttl_and_remounts_when_back() {
    let config = MasterConfig {
        client_ttl_ms: 10_000,
        ..MasterConfig::default()
    };
    let cluster = Cluster::start(2, config, Duration::ZERO);
    let link = Link::new(cluster.group());
    let a = cluster.client("node-a", link.clone(), SEGMENT).await;
    let b = cluster.client("node-b", cluster.group(), SEGMENT).await;
    let on_a = ReplicateConfig {
        preferred_segment: a.hostname().to_owned(),
        ..ReplicateConfig::default()
    };
    b.put("on-a", &value(1, 4096), &on_a).await.unwrap();
    let replicas = b.get_replica_desc("on-a").await.unwrap();
    assert!(replicas
        .iter()
        .all(|r| r.memory().is_some_and(|m| m.segment_name == a.hostname())));
    let leader = &cluster.masters[0];
    assert_eq!(leader.metrics().segment_count, 2);

    // A's heartbeats stop reaching the masters.
    link.cut();
    sleep(9_000).await;
    assert_eq!(leader.metrics().segment_count, 2, "not yet: TTL is 10 s");
    sleep(2_000).await;
    let m = leader.metrics();
    assert_eq!(m.counters.clients_expired, 1);
    assert_eq!(m.segment_count, 1, "its segment was unmounted");
    assert!(
        !b.is_exist("on-a").await.unwrap(),
        "its only replica went with it"
    );
    assert_eq!(
        cluster.masters[1].metrics().segment_count,
        1,
        "the follower applied the expiry too"
    );

    // Back: the next heartbeat learns the master forgot it and remounts.
    link.heal();
    sleep(2_000).await;
    assert_eq!(leader.metrics().segment_count, 2);
    a.put("again", &value(2, 4096), &ReplicateConfig::default())
        .await
        .unwrap();
    assert_eq!(b.get("again").await.unwrap(), value(2, 4096));
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_unclaimed_reservation_is_freed_after_twice_its_ttl() {
    let config = MasterConfig {
        reservation_ttl_ms: 500,
        ..MasterConfig::default()
    };
    let cluster = Cluster::start(1, config, Duration::ZERO);
    let group = cluster.group();
    let a = cluster.client("node-a", group.clone(), SEGMENT).await;
    // Let the mount's restart fence (2 × TTL after the state's first command) pass.
    sleep(1_100).await;
    let grant = match apply_via(
        &*group,
        Command::Reserve {
            client_id: a.client_id(),
            size: 1 << 20,
            min_size: 4096,
        },
    )
    .await
    .unwrap()
    .1
    {
        Response::Reserved(Ok(g)) => g,
        other => panic!("reserve answered {other:?}"),
    };
    assert_eq!(grant.ttl_ms, 500);
    let reserved = cluster.masters[0].metrics().reserved_bytes;
    assert!(reserved >= grant.size, "{reserved} < {}", grant.size);

    sleep(1_100).await;
    assert_eq!(
        cluster.masters[0].metrics().reserved_bytes,
        0,
        "freed by the timeout handler"
    );
    let commit = Command::CommitReserved {
        client_id: a.client_id(),
        reservation: grant.id,
        items: vec![ReservedPut {
            key: "late".into(),
            offset: 0,
            size: 4096,
        }],
        config: ReplicateConfig::default(),
    };
    match apply_via(&*group, commit).await.unwrap().1 {
        Response::UnitBatch(rs) => assert_eq!(rs, vec![Err(ErrorCode::INVALID_WRITE)]),
        other => panic!("commit answered {other:?}"),
    }
    assert!(!a.is_exist("late").await.unwrap());
    a.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_a_leader_calls_fail_after_the_failover_window() {
    let cluster = Cluster::start(2, MasterConfig::default(), Duration::ZERO);
    let group = cluster.group();
    cluster.log.depose();
    let started = tokio::time::Instant::now();
    let e = apply_via(&*group, Command::ExistKey { key: "k".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::RPC_FAIL);
    assert!(e.to_string().contains("no leader among 2 masters"), "{e}");
    let waited = started.elapsed();
    assert!(
        waited >= MasterGroup::FAILOVER_WINDOW && waited < MasterGroup::FAILOVER_WINDOW * 2,
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn admin_requests_need_a_log_with_a_group() {
    // Neither the in-memory log of a single master nor this simulated one offers membership
    // changes: the answer says so instead of pretending.
    let single = MasterService::new(MasterConfig::default(), ServiceConfig::default()).unwrap();
    let cluster = Cluster::start(2, MasterConfig::default(), Duration::ZERO);
    for master in [single, cluster.masters[0].clone()] {
        match master
            .call(MasterRequest::Admin(AdminRequest::Members))
            .await
            .unwrap()
        {
            MasterReply::Failed { code, message } => {
                assert_eq!(code, ErrorCode::NOT_SUPPORTED);
                assert!(
                    message.contains("not a member of a Raft group"),
                    "{message}"
                );
            }
            other => panic!("admin answered {other:?}"),
        }
    }
    // A follower redirects admin requests like any other.
    match cluster.masters[1]
        .call(MasterRequest::Admin(AdminRequest::Members))
        .await
        .unwrap()
    {
        MasterReply::NotLeader { leader } => assert_eq!(leader.as_deref(), Some("master-0")),
        other => panic!("follower answered {other:?}"),
    }
}

/// Leaders change every 3 s, more often than half the 10 s client TTL. A storage node that
/// stops heartbeating is still expired within a quarter TTL (and a timer tick) of its TTL,
/// decided from what the leaders heard and carried across the changes; a node that keeps
/// heartbeating, whoever leads, is never expired. (Each new leader used to give every client
/// half a TTL from its takeover, so with leaders this frequent the dead node stayed forever.)
#[tokio::test(start_paused = true)]
async fn a_dead_node_is_expired_on_time_however_often_leaders_change() {
    let config = MasterConfig {
        client_ttl_ms: 10_000,
        ..MasterConfig::default()
    };
    let cluster = Cluster::start(3, config, Duration::ZERO);
    let link = Link::new(cluster.group());
    let a = cluster.client("node-a", link.clone(), SEGMENT).await;
    let b = cluster.client("node-b", cluster.group(), SEGMENT).await;
    let on_b = ReplicateConfig {
        preferred_segment: b.hostname().to_owned(),
        ..ReplicateConfig::default()
    };
    b.put("k", &value(1, 4096), &on_b).await.unwrap();
    sleep(2_000).await;
    link.cut();
    let cut_at = tokio::time::Instant::now();
    let mut expired_after = None;
    for i in 1..=20usize {
        sleep(1_000).await;
        if i % 3 == 0 {
            // Masters 1, 2, 0, 1, ... lead in turn, a new term every 3 s.
            cluster.log.elect((i / 3) % 3);
        }
        let expired: u64 = (cluster.masters.iter())
            .map(|m| m.metrics().counters.clients_expired)
            .max()
            .unwrap();
        if expired > 0 && expired_after.is_none() {
            expired_after = Some(cut_at.elapsed());
        }
    }
    let after = expired_after.expect("the dead node was never expired while leaders changed");
    assert!(
        after <= Duration::from_millis(10_000 + 2_500 + 1_500),
        "expired {after:?} after its last heartbeat"
    );
    for m in &cluster.masters {
        let metrics = m.metrics();
        assert_eq!(metrics.counters.clients_expired, 1, "only the dead node");
        assert_eq!(metrics.segment_count, 1);
    }
    assert_eq!(b.get("k").await.unwrap(), value(1, 4096));
    b.close().await.unwrap();
    drop(a);
}
