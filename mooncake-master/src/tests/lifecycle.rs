//! Segments, puts, gets, upserts and removal.

use super::*;

#[test]
fn a_mount_aliasing_mounted_memory_is_refused() {
    let mut h = H::new();
    let at = |name: &str, base: u64| {
        let mut spec = SegmentSpec::new(name, base, MIB);
        spec.transport_endpoint = "10.0.0.1:7000".into();
        spec
    };
    let mount = |h: &mut H, client, spec: SegmentSpec| {
        h.apply(Command::MountSegment {
            client_id: c(client),
            segment: spec,
        })
        .code()
    };
    assert_eq!(mount(&mut h, 1, at("node-a", 0x10_0000)), ErrorCode::OK);
    // Another name for the same memory of the same endpoint, by anyone: refused.
    for (client, base) in [
        (2, 0x10_0000),
        (2, 0x18_0000),
        (1, 0x8_0001),
        (3, 0x10_0000 + MIB - 1),
    ] {
        assert_eq!(
            mount(&mut h, client, at("alias", base)),
            ErrorCode::INVALID_PARAMS,
            "client {client} at {base:#x}"
        );
    }
    assert_eq!(h.m.segments().len(), 1);
    // Memory next to it, or the same addresses of another endpoint, is fine.
    assert_eq!(mount(&mut h, 2, at("next", 0x10_0000 + MIB)), ErrorCode::OK);
    let mut elsewhere = at("other-host", 0x10_0000);
    elsewhere.transport_endpoint = "10.0.0.2:7000".into();
    assert_eq!(mount(&mut h, 3, elsewhere), ErrorCode::OK);
    assert_eq!(h.m.segments().len(), 3);
}

#[test]
fn mount_is_validated_and_idempotent() {
    let mut h = H::new();
    assert_eq!(h.try_mount(1, "", MIB), Err(ErrorCode::INVALID_PARAMS));
    assert_eq!(h.try_mount(1, "a:1", 0), Err(ErrorCode::INVALID_PARAMS));
    assert_eq!(
        h.try_mount(1, "a:1", 10),
        Err(ErrorCode::INVALID_PARAMS),
        "rounds to 0"
    );
    let overflow = h.apply(Command::MountSegment {
        client_id: c(1),
        segment: SegmentSpec::new("a:1", u64::MAX - 10, MIB),
    });
    assert_eq!(overflow.code(), ErrorCode::INVALID_PARAMS);

    let spec = SegmentSpec::new("a:1", 0x1000, MIB);
    let mount = |client| Command::MountSegment {
        client_id: c(client),
        segment: spec.clone(),
    };
    assert_eq!(h.apply(mount(1)).code(), ErrorCode::OK);
    assert_eq!(
        h.apply(mount(1)).code(),
        ErrorCode::OK,
        "same client, same geometry"
    );
    assert_eq!(h.apply(mount(2)).code(), ErrorCode::SEGMENT_ALREADY_EXISTS);
    let moved = h.apply(Command::MountSegment {
        client_id: c(1),
        segment: SegmentSpec::new("a:1", 0x2000, MIB),
    });
    assert_eq!(moved.code(), ErrorCode::SEGMENT_ALREADY_EXISTS);
    assert_eq!(h.m.segments().len(), 1);
    assert_eq!(h.m.segments()[0].capacity, MIB);

    let remount = h.apply(Command::RemountSegments {
        client_id: c(1),
        segments: vec![spec.clone(), SegmentSpec::new("a:2", 0x9000_0000, MIB)],
    });
    assert_eq!(remount, Response::UnitBatch(vec![Ok(()), Ok(())]));
    assert_eq!(h.m.segments().len(), 2);

    let unmount = |h: &mut H, client, name: &str| {
        h.apply(Command::UnmountSegment {
            client_id: c(client),
            name: name.into(),
        })
        .into_unit()
    };
    assert_eq!(unmount(&mut h, 2, "a:1"), Err(ErrorCode::ILLEGAL_CLIENT));
    assert_eq!(
        unmount(&mut h, 1, "zz:1"),
        Err(ErrorCode::SEGMENT_NOT_FOUND)
    );
    assert_eq!(unmount(&mut h, 1, "a:1"), Ok(()));
    assert_eq!(unmount(&mut h, 1, "a:1"), Err(ErrorCode::SEGMENT_NOT_FOUND));
    assert_eq!(h.m.segments().len(), 1);
    // A client that unmounted on purpose stays known.
    assert_eq!(h.heartbeat(1), HeartbeatStatus::Ok);
}

#[test]
fn put_validates_parameters() {
    let mut h = H::new();
    assert_eq!(
        h.put_start(1, "k", 100, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    h.mount(1, "a:1", MIB);
    assert_eq!(h.put_start(1, "", 100, 1), Err(ErrorCode::INVALID_PARAMS));
    assert_eq!(h.put_start(1, "k", 0, 1), Err(ErrorCode::INVALID_PARAMS));
    assert_eq!(h.put_start(1, "k", 100, 0), Err(ErrorCode::INVALID_PARAMS));
    assert_eq!(h.put_start(1, "k", 100, 17), Err(ErrorCode::INVALID_PARAMS));
    assert_eq!(
        h.put_start(1, "k", 2 * MIB, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    assert!(!h.exists("k"), "a failed put leaves nothing behind");
    assert_eq!(h.m.metrics().counters.put_no_space, 2);
}

#[test]
fn put_lifecycle_and_get() {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    let base = h.m.segments()[0].base;
    let started = h.put_start(1, "k", 1000, 1).unwrap();
    assert_eq!(started.replicas.len(), 1);
    let d = &started.replicas[0];
    assert_eq!(d.status, ReplicaStatus::Processing);
    let mem = d.memory().unwrap();
    assert_eq!(
        (mem.segment_name.as_str(), mem.transport_endpoint.as_str()),
        ("a:1", "a:1")
    );
    assert_eq!(mem.size, 1000);
    assert!(mem.buffer_address >= base && mem.buffer_address + 1000 <= base + MIB);
    assert_eq!(h.m.object("k").unwrap().state, ObjectState::Writing);
    assert_eq!(
        h.m.metrics().used_bytes,
        1024,
        "rounded to the 64-byte granularity"
    );

    // Not readable, not existing, not removable while being written.
    assert_eq!(h.get("k"), Err(ErrorCode::REPLICA_IS_NOT_READY));
    assert_eq!(
        h.apply(Command::ExistKey { key: "k".into() }),
        Response::Exists(false)
    );
    assert_eq!(h.remove("k", false), Err(ErrorCode::REPLICA_IS_NOT_READY));
    assert_eq!(
        h.put_start(2, "k", 1000, 1),
        Err(ErrorCode::OBJECT_ALREADY_EXISTS)
    );

    assert_eq!(h.put_end(2, "k"), Err(ErrorCode::ILLEGAL_CLIENT));
    assert_eq!(h.put_end(1, "nope"), Err(ErrorCode::OBJECT_NOT_FOUND));
    h.at(5).put_end(1, "k").unwrap();
    // A retried PutEnd of the committing client succeeds (its first answer may have been lost
    // in a failover); anyone else's is refused.
    assert_eq!(h.put_end(1, "k"), Ok(()));
    assert_eq!(h.put_end(2, "k"), Err(ErrorCode::INVALID_WRITE));
    assert_eq!(h.m.object("k").unwrap().state, ObjectState::Complete);
    // A put never grants a lease: the object can be removed at once ...
    assert!(!h.m.object("k").unwrap().lease.is_active(h.t()));

    h.at(1000);
    let got = h.get("k").unwrap();
    assert_eq!(got.size, 1000);
    assert_eq!(got.replicas.len(), 1);
    assert_eq!(got.replicas[0].status, ReplicaStatus::Complete);
    assert_eq!(
        got.replicas[0].memory().unwrap().buffer_address,
        mem.buffer_address
    );
    assert_eq!(got.lease, LeaseDeadline(Timestamp(11_000)));
    assert!(got.lease.check(Timestamp(10_999)).is_ok());
    assert_eq!(
        got.lease.check(Timestamp(11_000)),
        Err(ErrorCode::LEASE_EXPIRED)
    );
    // ... but a read does.
    assert_eq!(h.remove("k", false), Err(ErrorCode::OBJECT_HAS_LEASE));
    assert_eq!(
        h.put_start(1, "k", 10, 1),
        Err(ErrorCode::OBJECT_ALREADY_EXISTS)
    );
    assert_eq!(h.get("missing"), Err(ErrorCode::OBJECT_NOT_FOUND));
    let m = h.m.metrics();
    assert_eq!((m.counters.get_hits, m.counters.get_misses), (1, 2));
    assert_eq!((m.key_count, m.complete_key_count), (1, 1));
}

#[test]
fn revoke_frees_and_removes() {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    h.put_start(1, "k", 1000, 1).unwrap();
    let revoke = |h: &mut H, client| {
        h.apply(Command::PutRevoke {
            client_id: c(client),
            key: "k".into(),
        })
        .into_unit()
    };
    assert_eq!(revoke(&mut h, 2), Err(ErrorCode::ILLEGAL_CLIENT));
    assert_eq!(revoke(&mut h, 1), Ok(()));
    assert_eq!(revoke(&mut h, 1), Err(ErrorCode::OBJECT_NOT_FOUND));
    assert!(!h.exists("k"));
    assert_eq!(h.m.metrics().used_bytes, 0);
    // A revoked upsert leaves the old value alone.
    h.put(1, "k", 1000, 1);
    h.apply(Command::UpsertStart {
        client_id: c(1),
        key: "k".into(),
        size: 500,
        config: ReplicateConfig::default(),
    })
    .into_put_start()
    .unwrap();
    assert_eq!(h.m.object("k").unwrap().state, ObjectState::Updating);
    assert_eq!(revoke(&mut h, 1), Ok(()));
    assert_eq!(h.get("k").unwrap().size, 1000);
    assert_eq!(h.m.metrics().used_bytes, 1024);
}

#[test]
fn replicas_go_to_distinct_segments_and_hosts() {
    let mut h = H::new();
    for (client, name) in [(1, "a:1"), (1, "a:2"), (2, "b:1"), (2, "b:2")] {
        h.mount(client, name, MIB);
    }
    for i in 0..20 {
        let r = h.put(1, &format!("k{i}"), 100, 2);
        let names = H::segment_names(&r.replicas);
        assert_eq!(names.len(), 2);
        assert_ne!(host_of(&names[0]), host_of(&names[1]), "{names:?}");
    }
    let r = h.put(1, "three", 100, 3);
    let mut names = H::segment_names(&r.replicas);
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 3);
    // Best effort: more replicas than segments gives one per segment.
    let r = h.put(1, "five", 100, 5);
    assert_eq!(r.replicas.len(), 4);
    assert_eq!(h.get("five").unwrap().replicas.len(), 4);
}

#[test]
fn placement_strategies() {
    // local_first: the requester's own segment.
    let mut h = H::with(MasterConfig {
        allocation_strategy: AllocationStrategy::LocalFirst,
        ..Default::default()
    });
    for i in 1..=4u128 {
        h.mount(i, &format!("h{i}:1"), MIB);
    }
    for i in 1..=4u128 {
        let r = h.put(i, &format!("k{i}"), 100, 1);
        assert_eq!(H::segment_names(&r.replicas), vec![format!("h{i}:1")]);
    }
    // An unknown requester still gets space.
    assert_eq!(h.put(9, "other", 100, 1).replicas.len(), 1);

    // preferred segments win over the strategy, in order; unmounted ones are ignored.
    let cfg = ReplicateConfig {
        replica_num: 2,
        preferred_segment: "nope:1".into(),
        preferred_segments: vec!["h3:1".into(), "h2:1".into()],
        ..Default::default()
    };
    h.put_start_cfg(1, "pref", 100, cfg).unwrap();
    let r = h.m.object("pref").unwrap();
    assert_eq!(r.replica_statuses.len(), 2);
    let got = {
        h.put_end(1, "pref").unwrap();
        H::segment_names(&h.get("pref").unwrap().replicas)
    };
    assert_eq!(got, vec!["h3:1".to_string(), "h2:1".to_string()]);

    // free_ratio_first: the emptiest segment.
    let mut h = H::with(MasterConfig {
        allocation_strategy: AllocationStrategy::FreeRatioFirst,
        ..Default::default()
    });
    h.mount(1, "a:1", MIB);
    h.mount(2, "b:1", MIB);
    h.put(1, "big", MIB / 2, 1);
    let big_on = H::segment_names(&h.get("big").unwrap().replicas)[0].clone();
    let r = h.put(1, "small", 100, 1);
    assert_ne!(H::segment_names(&r.replicas)[0], big_on);

    // prefer_alloc_in_same_node: both replicas on the preferred segment's host.
    let mut h = H::new();
    for name in ["a:1", "a:2", "b:1", "c:1"] {
        h.mount(1, name, MIB);
    }
    let cfg = ReplicateConfig {
        replica_num: 2,
        preferred_segment: "a:2".into(),
        prefer_alloc_in_same_node: true,
        ..Default::default()
    };
    h.put_cfg(1, "same", 100, cfg);
    let mut names = H::segment_names(&h.get("same").unwrap().replicas);
    names.sort();
    assert_eq!(names, vec!["a:1".to_string(), "a:2".to_string()]);
}

#[test]
fn batch_forms_give_per_key_results() {
    let mut h = H::new();
    h.mount(1, "a:1", 4096);
    h.put(1, "old", 100, 1);
    let r = h.apply(Command::BatchPutStart {
        client_id: c(1),
        items: vec![
            PutItem {
                key: "x".into(),
                size: 100,
            },
            PutItem {
                key: "old".into(),
                size: 100,
            },
            PutItem {
                key: "".into(),
                size: 100,
            },
            PutItem {
                key: "huge".into(),
                size: MIB,
            },
            PutItem {
                key: "x".into(),
                size: 100,
            },
        ],
        config: ReplicateConfig::default(),
    });
    let Response::PutStartBatch(results) = r else {
        panic!()
    };
    let codes: Vec<ErrorCode> = results
        .iter()
        .map(|r| r.as_ref().err().copied().unwrap_or(ErrorCode::OK))
        .collect();
    assert_eq!(
        codes,
        vec![
            ErrorCode::OK,
            ErrorCode::OBJECT_ALREADY_EXISTS,
            ErrorCode::INVALID_PARAMS,
            ErrorCode::NO_AVAILABLE_HANDLE,
            ErrorCode::OBJECT_ALREADY_EXISTS,
        ]
    );
    let r = h.apply(Command::BatchPutEnd {
        client_id: c(1),
        keys: vec!["x".into(), "old".into()],
    });
    // "old" was committed by client 1 itself: ending it again is a harmless retry.
    assert_eq!(r, Response::UnitBatch(vec![Ok(()), Ok(())]));
    let r = h.apply(Command::BatchPutEnd {
        client_id: c(2),
        keys: vec!["old".into()],
    });
    assert_eq!(r, Response::UnitBatch(vec![Err(ErrorCode::INVALID_WRITE)]));
    h.put_start(1, "y", 100, 1).unwrap();
    let r = h.apply(Command::BatchPutRevoke {
        client_id: c(1),
        keys: vec!["y".into(), "zz".into()],
    });
    assert_eq!(
        r,
        Response::UnitBatch(vec![Ok(()), Err(ErrorCode::OBJECT_NOT_FOUND)])
    );

    let r = h.apply(Command::BatchGetReplicaList {
        keys: vec!["x".into(), "nope".into()],
    });
    let Response::ReplicasBatch(results) = r else {
        panic!()
    };
    assert!(results[0].is_ok());
    assert_eq!(results[1], Err(ErrorCode::OBJECT_NOT_FOUND));
    let r = h.apply(Command::BatchExistKey {
        keys: vec!["old".into(), "nope".into()],
    });
    assert_eq!(r, Response::ExistsBatch(vec![true, false]));
    assert!(
        h.m.object("old").unwrap().lease.is_active(h.t()),
        "exist grants a lease"
    );

    let r = h.apply(Command::BatchRemove {
        keys: vec!["x".into(), "old".into(), "nope".into()],
        force: false,
    });
    assert_eq!(
        r,
        Response::UnitBatch(vec![
            Err(ErrorCode::OBJECT_HAS_LEASE),
            Err(ErrorCode::OBJECT_HAS_LEASE),
            Err(ErrorCode::OBJECT_NOT_FOUND)
        ])
    );
    h.advance(10_000);
    let r = h.apply(Command::BatchRemove {
        keys: vec!["x".into(), "old".into()],
        force: false,
    });
    assert_eq!(r, Response::UnitBatch(vec![Ok(()), Ok(())]));
    assert_eq!(h.m.metrics().used_bytes, 0);
}

#[test]
fn upsert_replaces_and_respects_leases() {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    let upsert = |h: &mut H, client, size| {
        h.apply(Command::UpsertStart {
            client_id: c(client),
            key: "k".into(),
            size,
            config: ReplicateConfig::default(),
        })
        .into_put_start()
    };
    // Upsert of a missing key is a put.
    upsert(&mut h, 1, 1000).unwrap();
    h.put_end(1, "k").unwrap();
    assert_eq!(h.get("k").unwrap().size, 1000);

    // Leased: the new value is written next to the old one, which stays readable.
    let lease = h.get("k").unwrap().lease;
    upsert(&mut h, 2, 3000).unwrap();
    assert_eq!(
        h.put_start(3, "k", 10, 1),
        Err(ErrorCode::OBJECT_ALREADY_EXISTS)
    );
    assert_eq!(upsert(&mut h, 3, 10), Err(ErrorCode::OBJECT_REPLICA_BUSY));
    assert_eq!(h.get("k").unwrap().size, 1000);
    assert_eq!(h.m.metrics().used_bytes, 1024 + 3008);
    h.put_end(2, "k").unwrap();
    assert_eq!(h.get("k").unwrap().size, 3000);
    // The old range is retired until the lease ends, then freed.
    let m = h.m.metrics();
    assert_eq!((m.used_bytes, m.retired_bytes), (1024 + 3008, 1024));
    assert!(h.tick().iter().all(|(c, _)| *c != Command::ReleaseRetired));
    assert_eq!(h.m.next_timeout(), Some(lease.0));
    h.at(lease.0 .0).heartbeat(1);
    let ticked = h.tick();
    assert!(ticked.contains(&(Command::ReleaseRetired, Response::Count(Ok(1)))));
    assert_eq!(h.m.metrics().used_bytes, 3008);

    // Not leased: the old range is freed at once.
    h.advance(20_000);
    upsert(&mut h, 1, 64).unwrap();
    h.put_end(1, "k").unwrap();
    assert_eq!(h.m.metrics().used_bytes, 64);
}

#[test]
fn pins_follow_the_write() {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    h.put_cfg(
        1,
        "soft",
        100,
        ReplicateConfig {
            with_soft_pin: true,
            ..Default::default()
        },
    );
    assert_eq!(
        h.m.object("soft").unwrap().pin,
        Pin::Soft {
            until: Timestamp(30 * 60 * 1000),
            ttl_ms: 30 * 60 * 1000
        }
    );
    // A read refreshes the soft pin.
    h.at(60_000).get("soft").unwrap();
    assert!(
        matches!(h.m.object("soft").unwrap().pin, Pin::Soft { until, .. } if until == Timestamp(60_000 + 30 * 60 * 1000))
    );
    h.put_cfg(
        1,
        "hard",
        100,
        ReplicateConfig {
            with_hard_pin: true,
            with_soft_pin: true,
            ..Default::default()
        },
    );
    assert_eq!(h.m.object("hard").unwrap().pin, Pin::Hard);
    let upsert = |h: &mut H, action, soft| {
        h.apply(Command::UpsertStart {
            client_id: c(1),
            key: "soft".into(),
            size: 100,
            config: ReplicateConfig {
                soft_pin_action: action,
                with_soft_pin: soft,
                soft_pin_ttl_ms: 5,
                ..Default::default()
            },
        })
        .into_put_start()
        .unwrap();
        h.put_end(1, "soft").unwrap();
        h.m.object("soft").unwrap().pin
    };
    assert!(matches!(
        upsert(&mut h, SoftPinAction::Preserve, false),
        Pin::Soft { .. }
    ));
    assert_eq!(upsert(&mut h, SoftPinAction::Disable, true), Pin::None);
    assert_eq!(upsert(&mut h, SoftPinAction::Preserve, false), Pin::None);
    assert_eq!(
        upsert(&mut h, SoftPinAction::Enable, false),
        Pin::Soft {
            until: Timestamp(60_005),
            ttl_ms: 5
        }
    );
}

#[test]
fn remove_all_and_by_regex_skip_leased() {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    for k in ["user/1", "user/2", "sys/1", "sys/2"] {
        h.put(1, k, 100, 1);
    }
    h.put_start(1, "user/writing", 100, 1).unwrap();
    h.get("user/2").unwrap();
    let by_regex = |h: &mut H, pattern: &str, force| {
        h.apply(Command::RemoveByRegex {
            pattern: pattern.into(),
            force,
        })
        .into_count()
    };
    assert_eq!(
        by_regex(&mut h, "user/(", false),
        Err(ErrorCode::INVALID_PARAMS)
    );
    assert_eq!(by_regex(&mut h, "^user/", false), Ok(1));
    assert!(h.exists("user/2") && h.exists("user/writing") && !h.exists("user/1"));
    assert_eq!(by_regex(&mut h, "^user/", true), Ok(2));
    h.get("sys/1").unwrap();
    let all = h.apply(Command::RemoveAll { force: false }).into_count();
    assert_eq!(all, Ok(1));
    assert_eq!(h.keys_left(), vec!["sys/1"]);
    assert_eq!(h.remove("sys/1", true), Ok(()));
    assert_eq!(h.remove("sys/1", true), Err(ErrorCode::OBJECT_NOT_FOUND));
    // The force-removed objects were leased: their ranges are freed when the leases end.
    assert_eq!(h.m.metrics().retired_bytes, 2 * 128);
    h.advance(10_000).heartbeat(1);
    h.tick();
    assert_eq!(h.m.metrics().used_bytes, 0);
    assert_eq!(h.m.segments().len(), 1);
    assert_eq!(h.m.metrics().counters.removes, 5);
}

impl H {
    fn keys_left(&self) -> Vec<&str> {
        self.m.keys().collect()
    }
}

#[test]
fn commands_and_responses_round_trip_through_postcard() {
    let cmds = vec![
        Command::MountSegment {
            client_id: c(7),
            segment: SegmentSpec::new("a:1", 1, 2),
        },
        Command::PutStart {
            client_id: c(7),
            key: "k".into(),
            size: 3,
            config: ReplicateConfig {
                preferred_segments: vec!["x:1".into()],
                ..ReplicateConfig::with_replicas(2)
            },
        },
        Command::FinishTask {
            client_id: c(1),
            task_id: TaskId(5),
            outcome: TaskOutcome::Failed(ErrorCode::TRANSFER_FAIL),
        },
        Command::Evict,
    ];
    for cmd in cmds {
        let bytes = postcard::to_allocvec(&cmd).unwrap();
        assert_eq!(postcard::from_bytes::<Command>(&bytes).unwrap(), cmd);
    }
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    let r = h.apply(Command::PutStart {
        client_id: c(1),
        key: "k".into(),
        size: 10,
        config: ReplicateConfig::default(),
    });
    let bytes = postcard::to_allocvec(&r).unwrap();
    assert_eq!(postcard::from_bytes::<Response>(&bytes).unwrap(), r);
}

#[test]
fn apply_is_deterministic() {
    let run = || {
        let mut h = H::new();
        let mut out = Vec::new();
        for i in 0..6u128 {
            h.mount(i % 3, &format!("h{i}:{i}"), MIB);
        }
        for i in 0..40 {
            h.advance(100);
            out.push(h.apply(Command::PutStart {
                client_id: c(i % 3),
                key: format!("k{i}"),
                size: 1000 + i as u64,
                config: ReplicateConfig::with_replicas(2),
            }));
            out.push(h.apply(Command::CreateCopyTask {
                key: format!("k{}", i / 2),
                targets: vec!["h1:1".into()],
            }));
            out.push(h.apply(Command::PutEnd {
                client_id: c(i % 3),
                key: format!("k{i}"),
            }));
        }
        (out, h.m.metrics())
    };
    assert_eq!(run(), run());
}

#[test]
fn retried_put_start_and_put_end_are_idempotent_for_their_writer() {
    let mut h = H::new();
    h.mount(1, "a:1", 1 << 20);
    let first = h.put_start(1, "k", 1000, 1).unwrap();
    // The same writer asks again (lost answer): same reservation, nothing new allocated.
    let used = h.m.metrics().used_bytes;
    assert_eq!(h.put_start(1, "k", 1000, 1).unwrap(), first);
    assert_eq!(h.m.metrics().used_bytes, used);
    // Another client, or another size, is not a retry.
    assert_eq!(
        h.put_start(2, "k", 1000, 1),
        Err(ErrorCode::OBJECT_ALREADY_EXISTS)
    );
    assert_eq!(
        h.put_start(1, "k", 999, 1),
        Err(ErrorCode::OBJECT_ALREADY_EXISTS)
    );
    h.put_end(1, "k").unwrap();
    h.put_end(1, "k").unwrap();
    assert_eq!(h.m.object("k").unwrap().state, ObjectState::Complete);
    assert_eq!(h.m.metrics().complete_key_count, 1);
}

fn replace(
    h: &mut H,
    client: u128,
    keys: &[&str],
    failed: &[&str],
) -> Vec<Result<PutStartResponse, ErrorCode>> {
    match h.apply(Command::ReplaceReplicas {
        client_id: c(client),
        keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        failed: failed.iter().map(|k| (*k).to_owned()).collect(),
    }) {
        Response::PutStartBatch(rs) => rs,
        other => panic!("ReplaceReplicas answered {other:?}"),
    }
}

/// A WRITE to one replica's segment failed: that replica is freed and placed again on a segment
/// the write does not use yet; the write then commits with the replica it still has plus the new one.
#[test]
fn a_replica_whose_write_failed_is_placed_again_elsewhere() {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    h.mount(2, "b:1", MIB);
    h.mount(3, "c:1", MIB);
    let used = |h: &H| h.m.metrics().used_bytes;
    let first = h.put_start(9, "k", 4096, 2).unwrap();
    let names = H::segment_names(&first.replicas);
    let (dead, kept) = (names[0].clone(), names[1].clone());
    let before = used(&h);
    let rs = replace(&mut h, 9, &["k"], &[&dead]);
    let fresh = rs[0].clone().unwrap();
    let fresh_names = H::segment_names(&fresh.replicas);
    assert_eq!(fresh_names.len(), 1);
    assert!(
        fresh_names[0] != dead && fresh_names[0] != kept,
        "{fresh_names:?}"
    );
    assert_eq!(used(&h), before, "the failed range was given back");
    // Another writer may not touch the write; a key with no write in progress is refused.
    assert_eq!(
        replace(&mut h, 8, &["k"], &[&kept])[0],
        Err(ErrorCode::ILLEGAL_CLIENT)
    );
    assert!(replace(&mut h, 9, &["nothing"], &[&kept])[0].is_err());
    // Not readable before PutEnd; then it has the kept replica and the new one.
    assert!(h.get("k").is_err());
    h.put_end(9, "k").unwrap();
    let mut got = H::segment_names(&h.get("k").unwrap().replicas);
    got.sort();
    let mut want = vec![kept, fresh_names[0].clone()];
    want.sort();
    assert_eq!(got, want);
}

/// With no other segment to go to, the write keeps the replicas it has (and commits with fewer,
/// as a PutStart finding fewer segments does); with none left it is revoked and its space freed.
#[test]
fn a_replica_with_nowhere_else_to_go_leaves_fewer_or_none() {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    h.mount(2, "b:1", MIB);
    let empty = h.m.metrics().used_bytes;
    h.put_start(9, "two", 4096, 2).unwrap();
    let rs = replace(&mut h, 9, &["two"], &["a:1"]);
    assert_eq!(rs[0].as_ref().unwrap().replicas, Vec::new());
    h.put_end(9, "two").unwrap();
    assert_eq!(
        H::segment_names(&h.get("two").unwrap().replicas),
        vec!["b:1".to_owned()]
    );
    h.remove("two", true).unwrap();
    // The read's lease keeps the range until it ends.
    h.advance(MasterConfig::default().default_kv_lease_ttl_ms + 1);
    h.heartbeat(1);
    h.heartbeat(2);
    h.tick();
    assert_eq!(h.m.metrics().used_bytes, empty);

    h.put_start(9, "one", 4096, 1).unwrap();
    h.put_start(9, "other", 4096, 1).unwrap();
    // Both segments fail: nothing is left of either write.
    let rs = replace(&mut h, 9, &["one", "other"], &["a:1", "b:1"]);
    assert_eq!(rs, vec![Err(ErrorCode::NO_AVAILABLE_HANDLE); 2]);
    assert!(!h.exists("one") && !h.exists("other"));
    assert_eq!(
        h.m.metrics().used_bytes,
        empty,
        "no half-written write keeps space"
    );
    assert!(h.put_end(9, "one").is_err(), "nothing to commit");
}
