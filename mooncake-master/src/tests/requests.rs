//! Requests named with an id: a retry gets the first attempt's outcome.

use super::*;
use mooncake_core::metadata::StateMachine;

fn id(client: u128, seq: u64) -> RequestId {
    RequestId {
        client: c(client),
        seq,
    }
}

fn once(client: u128, seq: u64, command: Command) -> Command {
    Command::Once {
        id: id(client, seq),
        done_below: 0,
        command: Box::new(command),
    }
}

fn remove(key: &str) -> Command {
    Command::Remove {
        key: key.into(),
        force: false,
    }
}

/// Two hosts with a segment each, and a committed `k`.
fn setup() -> H {
    let mut h = H::new();
    h.mount(1, "h1:1", 64 * MIB);
    h.mount(2, "h2:1", 64 * MIB);
    h.put(1, "k", 4096, 1);
    h
}

#[test]
fn a_retried_remove_answers_its_first_outcome() {
    let mut h = setup();
    let first = h.apply(once(9, 1, remove("k")));
    assert_eq!(first, Response::Unit(Ok(())));
    assert!(!h.exists("k"));
    // The answer was lost; the client sends the same request again.
    assert_eq!(h.apply(once(9, 1, remove("k"))), first);
    assert_eq!(h.m.metrics().counters.requests_answered_again, 1);
    assert_eq!(h.m.metrics().counters.removes, 1);
    // A new request (a new id) is applied: the key is gone.
    assert_eq!(
        h.apply(once(9, 2, remove("k"))),
        Response::Unit(Err(ErrorCode::OBJECT_NOT_FOUND))
    );
    // Without an id, as old clients send it, a remove is applied again.
    assert_eq!(
        h.apply(remove("k")),
        Response::Unit(Err(ErrorCode::OBJECT_NOT_FOUND))
    );
    // The same sequence number of another client is another request.
    h.put(1, "k", 4096, 1);
    assert_eq!(h.apply(once(8, 1, remove("k"))), Response::Unit(Ok(())));
}

#[test]
fn a_retried_remove_does_not_remove_a_value_written_since() {
    let mut h = setup();
    assert_eq!(h.apply(once(9, 1, remove("k"))), Response::Unit(Ok(())));
    // Another client writes the key again before the retry arrives.
    h.put(2, "k", 8192, 1);
    assert_eq!(h.apply(once(9, 1, remove("k"))), Response::Unit(Ok(())));
    assert_eq!(h.m.object("k").unwrap().size, 8192, "the new value stays");
}

#[test]
fn retried_batch_and_pattern_removes_answer_their_first_outcomes() {
    let mut h = setup();
    h.put(1, "a1", 4096, 1);
    h.put(1, "a2", 4096, 1);
    h.put(1, "b1", 4096, 1);
    let batch = Command::BatchRemove {
        keys: vec!["k".into(), "nope".into()],
        force: false,
    };
    let first = h.apply(once(9, 1, batch.clone()));
    assert_eq!(
        first,
        Response::UnitBatch(vec![Ok(()), Err(ErrorCode::OBJECT_NOT_FOUND)])
    );
    assert_eq!(h.apply(once(9, 1, batch)), first);
    let regex = Command::RemoveByRegex {
        pattern: "^a".into(),
        force: false,
    };
    assert_eq!(h.apply(once(9, 2, regex.clone())), Response::Count(Ok(2)));
    assert_eq!(h.apply(once(9, 2, regex)), Response::Count(Ok(2)));
    let all = Command::RemoveAll { force: false };
    assert_eq!(h.apply(once(9, 3, all.clone())), Response::Count(Ok(1)));
    assert_eq!(h.apply(once(9, 3, all)), Response::Count(Ok(1)));
    assert_eq!(h.m.metrics().counters.removes, 4);
}

#[test]
fn retried_upserts_answer_their_first_outcome() {
    let mut h = setup();
    let upsert = Command::UpsertStart {
        client_id: c(1),
        key: "k".into(),
        size: 8192,
        config: ReplicateConfig::with_replicas(1),
    };
    let first = h.apply(once(1, 1, upsert.clone()));
    assert!(matches!(first, Response::PutStart(Ok(_))), "{first:?}");
    assert_eq!(h.apply(once(1, 1, upsert.clone())), first);
    let end = Command::PutEnd {
        client_id: c(1),
        key: "k".into(),
    };
    assert_eq!(h.apply(once(1, 2, end.clone())), Response::Unit(Ok(())));
    // Another writer starts the next upsert before the first writer's retries arrive: without
    // an id, the PutEnd retry would be refused as another client's write (ILLEGAL_CLIENT).
    h.apply(Command::UpsertStart {
        client_id: c(2),
        key: "k".into(),
        size: 100,
        config: ReplicateConfig::with_replicas(1),
    })
    .into_put_start()
    .unwrap();
    assert_eq!(
        h.apply(end.clone()),
        Response::Unit(Err(ErrorCode::ILLEGAL_CLIENT))
    );
    assert_eq!(h.apply(once(1, 2, end)), Response::Unit(Ok(())));
    // The first UpsertStart's ranges are no longer a write in progress: a (late) repeat is
    // applied again rather than handed them.
    assert_eq!(
        h.apply(once(1, 1, upsert)),
        Response::PutStart(Err(ErrorCode::OBJECT_REPLICA_BUSY))
    );
    // Batch forms.
    let batch = Command::BatchUpsertStart {
        client_id: c(1),
        items: vec![
            PutItem {
                key: "x".into(),
                size: 10,
            },
            PutItem {
                key: "k".into(),
                size: 10,
            },
        ],
        config: ReplicateConfig::with_replicas(1),
    };
    let first = h.apply(once(1, 3, batch.clone()));
    let Response::PutStartBatch(items) = &first else {
        panic!("{first:?}")
    };
    assert!(items[0].is_ok());
    assert_eq!(items[1], Err(ErrorCode::OBJECT_REPLICA_BUSY));
    assert_eq!(h.apply(once(1, 3, batch)), first);
    let end = Command::BatchPutEnd {
        client_id: c(1),
        keys: vec!["x".into()],
    };
    assert_eq!(
        h.apply(once(1, 4, end.clone())),
        Response::UnitBatch(vec![Ok(())])
    );
    h.remove("x", true).unwrap();
    assert_eq!(h.apply(once(1, 4, end)), Response::UnitBatch(vec![Ok(())]));
}

#[test]
fn retried_copy_and_move_submissions_create_one_task() {
    let mut h = setup();
    h.mount(3, "h3:1", 64 * MIB);
    let copy = Command::CreateCopyTask {
        key: "k".into(),
        targets: vec!["h2:1".into()],
    };
    let first = h.apply(once(9, 1, copy.clone()));
    let task = first.clone().into_task_id().unwrap();
    assert_eq!(h.apply(once(9, 1, copy.clone())), first);
    // Applied again, the same copy is refused: the object already has a task.
    assert_eq!(
        h.apply(copy).into_task_id(),
        Err(ErrorCode::OBJECT_HAS_REPLICATION_TASK)
    );
    assert_eq!(h.m.metrics().counters.tasks_created, 1);
    assert!(h.m.query_task(task).is_ok());

    let mut h = setup();
    let mv = Command::CreateMoveTask {
        key: "k".into(),
        source: "h1:1".into(),
        target: "h2:1".into(),
    };
    let first = h.apply(once(9, 1, mv.clone()));
    assert!(first.clone().into_task_id().is_ok(), "{first:?}");
    assert_eq!(h.apply(once(9, 1, mv)), first);
    assert_eq!(h.m.metrics().counters.tasks_created, 1);
}

#[test]
fn a_once_inside_a_once_is_refused() {
    let mut h = setup();
    let nested = Command::Once {
        id: id(9, 1),
        done_below: 0,
        command: Box::new(once(9, 2, remove("k"))),
    };
    assert_eq!(
        h.apply(nested.clone()),
        Response::Unit(Err(ErrorCode::INVALID_PARAMS))
    );
    assert!(h.exists("k"));
    // And it does not even decode from bytes.
    let bytes = postcard::to_allocvec(&nested).unwrap();
    assert!(postcard::from_bytes::<Command>(&bytes).is_err());
    let flat = postcard::to_allocvec(&once(9, 2, remove("k"))).unwrap();
    assert_eq!(
        postcard::from_bytes::<Command>(&flat).unwrap(),
        once(9, 2, remove("k"))
    );
}

#[test]
fn deeply_nested_bytes_are_refused_without_exhausting_the_stack() {
    // Each level: the `Once` tag, an id and `done_below`, then the next command.
    let level = postcard::to_allocvec(&once(1, 1, Command::PurgeTasks)).unwrap();
    let tail = postcard::to_allocvec(&Command::PurgeTasks).unwrap();
    let prefix = &level[..level.len() - tail.len()];
    let mut bytes = Vec::new();
    for _ in 0..200_000 {
        bytes.extend_from_slice(prefix);
    }
    bytes.extend_from_slice(&tail);
    assert!(postcard::from_bytes::<Command>(&bytes).is_err());
}

#[test]
fn memory_is_bounded_per_client_by_age_and_by_what_the_client_has_seen() {
    let mut h = setup();
    // Past the per-client bound the lowest sequence numbers go first.
    for seq in 1..=(REQUESTS_PER_CLIENT as u64 + 10) {
        h.apply(once(9, seq, remove("nope")));
    }
    assert_eq!(h.m.remembered_requests().0, REQUESTS_PER_CLIENT);
    assert_eq!(
        h.m.metrics().remembered_requests,
        REQUESTS_PER_CLIENT as u64
    );
    // Forgotten: applied as new.
    h.put(1, "nope", 4096, 1);
    assert_eq!(h.apply(once(9, 1, remove("nope"))), Response::Unit(Ok(())));
    // Still remembered: its first answer.
    h.put(1, "nope", 4096, 1);
    assert_eq!(
        h.apply(once(9, 100, remove("nope"))),
        Response::Unit(Err(ErrorCode::OBJECT_NOT_FOUND))
    );
    // A client that says it has its answers up to a sequence number frees them.
    h.apply(Command::Once {
        id: id(9, 5000),
        done_below: 4000,
        command: Box::new(remove("zzz")),
    });
    assert_eq!(h.m.remembered_requests().0, 1);
    // Outcomes age out.
    h.apply(once(7, 1, remove("zzz")));
    h.advance(REQUEST_MEMORY_MS);
    h.apply(once(6, 1, remove("zzz")));
    assert_eq!(h.m.remembered_requests().0, 1);
}

#[test]
fn memory_is_bounded_in_total_weight_and_forgotten_with_its_client() {
    let mut h = setup();
    let keys: Vec<String> = (0..10_000).map(|i| format!("k{i}")).collect();
    let per = 1 + keys.len() as u64;
    let fits = REQUEST_MEMORY_WEIGHT / per;
    for seq in 1..=fits + 5 {
        h.apply(once(
            u128::from(seq % 7) + 10,
            seq,
            Command::BatchRemove {
                keys: keys.clone(),
                force: false,
            },
        ));
    }
    let (count, weight) = h.m.remembered_requests();
    assert_eq!(count as u64, fits);
    assert!(weight <= REQUEST_MEMORY_WEIGHT);
    // An expired client's outcomes go with it.
    h.apply(once(1, 1, remove("k")));
    let before = h.m.remembered_requests().0;
    h.advance(MasterConfig::default().client_ttl_ms + 1);
    h.heartbeat(2);
    h.tick();
    assert!(h.m.object("k").is_none());
    assert_eq!(h.m.remembered_requests().0, before - 1);
}

#[test]
fn remembered_outcomes_survive_a_snapshot_and_restore() {
    let mut h = setup();
    h.put(1, "j", 4096, 1);
    let first = h.apply(once(9, 1, remove("k")));
    let snap = StateMachine::snapshot(&h.m).unwrap();
    let mut copy = Master::new(MasterConfig::default()).unwrap();
    StateMachine::restore(&mut copy, &snap).unwrap();
    copy.check_invariants().unwrap();
    assert_eq!(copy.remembered_requests(), h.m.remembered_requests());
    // The retry reaches the restored master (a follower that became leader from a snapshot).
    assert_eq!(copy.apply(h.t(), once(9, 1, remove("k"))), first);
    // And it goes on in step with the original.
    for seq in 2..20 {
        let cmd = once(9, seq, remove(if seq % 2 == 0 { "j" } else { "k" }));
        assert_eq!(copy.apply(h.t(), cmd.clone()), h.apply(cmd));
    }
    copy.check_invariants().unwrap();
}

#[test]
fn put_start_and_put_end_stay_idempotent_with_and_without_ids() {
    let mut h = setup();
    let start = Command::PutStart {
        client_id: c(1),
        key: "p".into(),
        size: 4096,
        config: ReplicateConfig::with_replicas(1),
    };
    let a = h.apply(start.clone());
    // Without an id, the writer's own retry gets its reservation back.
    assert_eq!(h.apply(start.clone()), a);
    // With one, too (from memory this time).
    let b = h.apply(once(1, 1, start.clone()));
    assert_eq!(b, a);
    assert_eq!(h.apply(once(1, 1, start)), a);
    let end = Command::PutEnd {
        client_id: c(1),
        key: "p".into(),
    };
    assert_eq!(h.apply(once(1, 2, end.clone())), Response::Unit(Ok(())));
    assert_eq!(h.apply(end.clone()), Response::Unit(Ok(())));
    assert_eq!(h.apply(once(1, 2, end)), Response::Unit(Ok(())));
}

#[test]
fn which_commands_want_ids_and_what_a_once_counts_as() {
    assert!(remove("k").wants_request_id());
    assert!(Command::FetchTasks {
        client_id: c(1),
        max: 1
    }
    .wants_request_id());
    assert!(!Command::GetReplicaList { key: "k".into() }.wants_request_id());
    assert!(!Command::Heartbeat { client_id: c(1) }.wants_request_id());
    assert!(!Command::Evict.wants_request_id());
    assert!(!once(1, 1, remove("k")).wants_request_id());
    // A maintenance command stays one inside a Once (the service refuses it from clients).
    assert!(once(1, 1, Command::ExpireClient { client_id: c(2) }).is_maintenance());
    assert!(!once(1, 1, remove("k")).is_maintenance());
    assert_eq!(once(1, 1, remove("k")).inner(), &remove("k"));
}

#[test]
fn the_leader_view_bars_and_carries_reads_for_a_once_as_for_its_command() {
    let mut h = setup();
    let mut view = LeaderView::default();
    // A read served outside the log leases k.
    let Route::Local(r) = view.route(&h.m, h.t(), Command::GetReplicaList { key: "k".into() })
    else {
        panic!("a read is served locally")
    };
    assert!(matches!(r, Response::Replicas(Ok(_))));
    let Route::Log(p) = view.route(&h.m, h.t(), once(9, 1, remove("k"))) else {
        panic!("a remove goes through the log")
    };
    assert_eq!(
        p.entry.reads.len(),
        1,
        "the read of k rides with the remove"
    );
    // While it is in flight, reads of k go through the log too.
    assert!(matches!(
        view.route(&h.m, h.t(), Command::GetReplicaList { key: "k".into() }),
        Route::Log(_)
    ));
    let r = StateMachine::apply(&mut h.m, &p.entry.encode());
    view.finish(p.ticket);
    assert_eq!(
        decode_response(&r),
        Ok(Response::Unit(Err(ErrorCode::OBJECT_HAS_LEASE))),
        "the lease the leader granted is known to every replica"
    );
}

#[test]
fn a_retried_put_start_never_hands_out_space_that_is_no_longer_its_own() {
    let mut h = setup();
    let start = |key: &str| Command::PutStart {
        client_id: c(1),
        key: key.into(),
        size: 4096,
        config: ReplicateConfig::with_replicas(1),
    };
    let first = h.apply(once(1, 1, start("p")));
    let granted = first.clone().into_put_start().unwrap();
    // Still writing: the retry gets the same ranges.
    assert_eq!(h.apply(once(1, 1, start("p"))), first);
    // The write is removed (with k) before the retry arrives, and its space goes to another
    // object.
    assert_eq!(
        h.apply(Command::RemoveAll { force: true }),
        Response::Count(Ok(2))
    );
    h.put(2, "other", 4096, 1);
    let again = h.apply(once(1, 1, start("p"))).into_put_start().unwrap();
    let other = h.get("other").unwrap();
    assert_ne!(
        again.replicas, granted.replicas,
        "not the ranges that were freed"
    );
    assert_ne!(again.replicas[0].memory(), other.replicas[0].memory());
    assert_eq!(h.m.object("p").unwrap().state, ObjectState::Writing);
    // The answer to the retry is what a later retry gets.
    assert_eq!(
        h.apply(once(1, 1, start("p"))).into_put_start().unwrap(),
        again
    );
    // A batch whose grants all still hold is answered again; one whose grant died is applied
    // again, the live items keeping their ranges.
    let batch = Command::BatchPutStart {
        client_id: c(1),
        items: vec![
            PutItem {
                key: "b1".into(),
                size: 4096,
            },
            PutItem {
                key: "b2".into(),
                size: 4096,
            },
        ],
        config: ReplicateConfig::with_replicas(1),
    };
    let first = h.apply(once(1, 2, batch.clone()));
    assert_eq!(h.apply(once(1, 2, batch.clone())), first);
    h.apply(Command::PutRevoke {
        client_id: c(1),
        key: "b2".into(),
    })
    .into_unit()
    .unwrap();
    let Response::PutStartBatch(again) = h.apply(once(1, 2, batch)) else {
        panic!()
    };
    let Response::PutStartBatch(first) = first else {
        panic!()
    };
    assert_eq!(
        again[0], first[0],
        "b1 is still being written on its ranges"
    );
    assert!(again[1].is_ok());
}

#[test]
fn a_retried_reserve_or_fetch_hands_out_only_what_is_still_held() {
    let mut h = setup();
    let reserve = Command::Reserve {
        client_id: c(1),
        size: MIB,
        min_size: 4096,
    };
    let first = h.apply(once(1, 1, reserve.clone()));
    let Response::Reserved(Ok(grant)) = &first else {
        panic!("{first:?}")
    };
    assert_eq!(h.apply(once(1, 1, reserve.clone())), first);
    // Past its expiry the reservation is freed: a retry then reserves anew.
    h.advance(2 * MasterConfig::default().reservation_ttl_ms + 1);
    h.heartbeat(1);
    h.heartbeat(2);
    h.tick();
    let Response::Reserved(Ok(again)) = h.apply(once(1, 1, reserve)) else {
        panic!()
    };
    assert_ne!(again.id, grant.id);

    // A fetch answered again lists only the tasks still assigned to the client.
    h.put(1, "t1", 4096, 2);
    h.put(1, "t2", 4096, 2);
    h.mount(3, "h3:1", 64 * MIB);
    for key in ["t1", "t2"] {
        h.apply(Command::CreateCopyTask {
            key: key.into(),
            targets: vec!["h3:1".into()],
        })
        .into_task_id()
        .unwrap();
    }
    let fetch = Command::FetchTasks {
        client_id: c(1),
        max: 8,
    };
    let Response::Tasks(first) = h.apply(once(1, 2, fetch.clone())) else {
        panic!()
    };
    assert_eq!(first.len(), 2);
    assert_eq!(
        h.apply(once(1, 2, fetch.clone())),
        Response::Tasks(first.clone())
    );
    // One task's object goes away (its task ends, its destination is freed).
    h.remove(&first[0].key, true).unwrap();
    assert_eq!(
        h.apply(once(1, 2, fetch)),
        Response::Tasks(vec![first[1].clone()])
    );
}

#[test]
fn an_id_repeated_with_another_command_is_refused() {
    let mut h = setup();
    assert_eq!(
        h.apply(once(9, 1, remove("nope"))),
        Response::Unit(Err(ErrorCode::OBJECT_NOT_FOUND))
    );
    assert_eq!(
        h.apply(once(9, 1, remove("k"))),
        Response::Unit(Err(ErrorCode::INVALID_PARAMS))
    );
    assert!(h.exists("k"), "nothing applied");
}
