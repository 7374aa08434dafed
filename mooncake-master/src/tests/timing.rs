//! Takeover and reclaim of unfinished puts, and lease timing.

use super::*;

#[test]
fn unfinished_put_is_taken_over_after_30s() {
    let mut h = H::new();
    h.mount(1, "a:1", 4096);
    h.put_start(1, "k", 4096, 1).unwrap();
    h.at(29_999);
    assert_eq!(
        h.put_start(2, "k", 100, 1),
        Err(ErrorCode::OBJECT_ALREADY_EXISTS)
    );
    let upsert = h.apply(Command::UpsertStart {
        client_id: c(2),
        key: "k".into(),
        size: 100,
        config: ReplicateConfig::default(),
    });
    assert_eq!(upsert.code(), ErrorCode::OBJECT_REPLICA_BUSY);
    // The segment is full: the takeover must free the old write's space first.
    h.at(30_000);
    let r = h.put_start(2, "k", 4096, 1).unwrap();
    assert_eq!(r.replicas.len(), 1);
    assert_eq!(h.m.metrics().counters.puts_taken_over, 1);
    assert_eq!(
        h.m.object("k").unwrap().writing,
        Some((WriteKind::Put, c(2)))
    );
    // The old writer can no longer commit or revoke.
    assert_eq!(h.put_end(1, "k"), Err(ErrorCode::ILLEGAL_CLIENT));
    h.put_end(2, "k").unwrap();
    assert_eq!(h.get("k").unwrap().size, 4096);
}

#[test]
fn abandoned_put_is_reclaimed_after_600s() {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    h.put(1, "done", 100, 1);
    h.at(100);
    h.put_start(1, "k", 1000, 1).unwrap();
    h.apply(Command::UpsertStart {
        client_id: c(1),
        key: "done".into(),
        size: 200,
        config: ReplicateConfig::default(),
    })
    .into_put_start()
    .unwrap();
    // Too early: a stale or early ReclaimPut does nothing.
    let early = h.apply(Command::ReclaimPut { key: "k".into() });
    assert_eq!(early.code(), ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS);
    assert_eq!(
        h.apply(Command::ReclaimPut { key: "zz".into() }).code(),
        ErrorCode::OBJECT_NOT_FOUND
    );
    assert_eq!(
        h.apply(Command::ReclaimPut { key: "done".into() }).code(),
        ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS
    );

    // The client stays alive; the put is simply never finished.
    for t in (5_100..600_100).step_by(5_000) {
        h.at(t).heartbeat(1);
        let cmds: Vec<Command> = h.tick().into_iter().map(|(c, _)| c).collect();
        assert!(cmds.is_empty(), "at {t}: {cmds:?}");
    }
    h.at(600_100).heartbeat(1);
    let reclaimed: Vec<(Command, Response)> = h.tick();
    assert_eq!(reclaimed.len(), 2, "{reclaimed:?}");
    assert!(reclaimed.iter().all(|(_, r)| r.code() == ErrorCode::OK));
    assert!(!h.exists("k"));
    // The reclaimed upsert leaves the old value.
    assert_eq!(h.get("done").unwrap().size, 100);
    assert_eq!(h.m.metrics().used_bytes, 128);
    assert_eq!(h.m.metrics().counters.puts_reclaimed, 2);
}

#[test]
fn lease_rules() {
    let mut h = H::with(MasterConfig {
        default_kv_lease_ttl_ms: 500,
        ..Default::default()
    });
    h.mount(1, "a:1", MIB);
    h.put(1, "k", 100, 1);
    // Put grants no lease.
    assert_eq!(h.m.object("k").unwrap().lease, LeaseDeadline(Timestamp(0)));
    h.at(100);
    assert_eq!(h.get("k").unwrap().lease, LeaseDeadline(Timestamp(600)));
    h.at(200);
    assert_eq!(
        h.apply(Command::ExistKey { key: "k".into() }),
        Response::Exists(true)
    );
    assert_eq!(
        h.m.object("k").unwrap().lease,
        LeaseDeadline(Timestamp(700))
    );
    // Leases never shrink.
    let mut h2 = H::new();
    h2.mount(1, "a:1", MIB);
    h2.put(1, "k", 100, 1);
    h2.at(100).get("k").unwrap();
    h2.m.apply(Timestamp(50), Command::GetReplicaList { key: "k".into() });
    assert_eq!(
        h2.m.object("k").unwrap().lease,
        LeaseDeadline(Timestamp(10_100))
    );
    assert_eq!(h2.m.now(), Timestamp(100), "time never goes backwards");

    h.at(699);
    assert_eq!(h.remove("k", false), Err(ErrorCode::OBJECT_HAS_LEASE));
    h.at(700);
    assert_eq!(h.remove("k", false), Ok(()));
    assert_eq!(h.remove("k", false), Err(ErrorCode::OBJECT_NOT_FOUND));
    // Force ignores the lease.
    h.put(1, "k", 100, 1);
    h.get("k").unwrap();
    assert_eq!(h.remove("k", true), Ok(()));
    assert_eq!(h.m.metrics().counters.leases_granted, 3);
}

#[test]
fn next_timeout_tracks_deadlines() {
    let mut h = H::new();
    assert_eq!(h.m.next_timeout(), None);
    h.at(1_000).mount(1, "a:1", MIB);
    assert_eq!(h.m.next_timeout(), Some(Timestamp(11_000)));
    h.at(2_000).heartbeat(1);
    assert_eq!(h.m.next_timeout(), Some(Timestamp(12_000)));
    assert!(h.m.handle_timeout(Timestamp(11_999)).is_empty());
    assert_eq!(
        h.m.handle_timeout(Timestamp(12_000)),
        vec![Command::ExpireClient { client_id: c(1) }]
    );
    // A heartbeat that lands after the timeout handler looked cancels the expiry.
    h.at(12_000).heartbeat(1);
    let r = h.apply(Command::ExpireClient { client_id: c(1) });
    assert_eq!(r.code(), ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS);
    assert_eq!(h.m.segments().len(), 1);
    assert_eq!(
        h.apply(Command::ExpireClient { client_id: c(9) }).code(),
        ErrorCode::CLIENT_NOT_FOUND
    );
}

#[test]
fn timeout_commands_are_maintenance_and_metrics_render() {
    let mut h = H::new();
    h.mount(1, "a:1", 4096);
    h.put_start(1, "k", 4096, 1).unwrap();
    assert_eq!(
        h.put_start(1, "x", 10, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    let cmds = h.m.handle_timeout(Timestamp(700_000));
    assert_eq!(cmds.len(), 3, "{cmds:?}");
    assert!(cmds.iter().all(Command::is_maintenance));
    assert!(!Command::Heartbeat { client_id: c(1) }.is_maintenance());
    let text = h.m.metrics().to_prometheus();
    assert!(
        text.contains("mooncake_master_capacity_bytes 4096\n"),
        "{text}"
    );
    assert!(text.contains("mooncake_master_used_bytes 4096\n"));
    assert!(text.contains("mooncake_master_put_no_space_total 1\n"));
}
