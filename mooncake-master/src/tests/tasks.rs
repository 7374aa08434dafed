//! Copy and move tasks.

use super::*;

fn fetch(h: &mut H, client: u128) -> Vec<TaskAssignment> {
    match h.apply(Command::FetchTasks {
        client_id: c(client),
        max: 16,
    }) {
        Response::Tasks(t) => t,
        other => panic!("{other:?}"),
    }
}

fn finish(h: &mut H, client: u128, task_id: TaskId, outcome: TaskOutcome) -> Result<(), ErrorCode> {
    h.apply(Command::FinishTask {
        client_id: c(client),
        task_id,
        outcome,
    })
    .into_unit()
}

fn copy(h: &mut H, key: &str, targets: &[&str]) -> Result<TaskId, ErrorCode> {
    h.apply(Command::CreateCopyTask {
        key: key.into(),
        targets: targets.iter().map(|s| s.to_string()).collect(),
    })
    .into_task_id()
}

fn mv(h: &mut H, key: &str, source: &str, target: &str) -> Result<TaskId, ErrorCode> {
    h.apply(Command::CreateMoveTask {
        key: key.into(),
        source: source.into(),
        target: target.into(),
    })
    .into_task_id()
}

/// Three clients with one segment each; "k" (1000 bytes) on a:1.
fn setup() -> H {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    h.mount(2, "b:1", MIB);
    h.mount(3, "c:1", 4096);
    h.put_cfg(
        1,
        "k",
        1000,
        ReplicateConfig {
            preferred_segment: "a:1".into(),
            ..Default::default()
        },
    );
    h
}

#[test]
fn task_status_table_and_values() {
    use TaskStatus::*;
    let all = [Pending, Processing, Failed, Success];
    assert_eq!(all.map(|s| s as u8), [0, 1, 2, 3]);
    assert_eq!(
        [TaskType::ReplicaCopy as u8, TaskType::ReplicaMove as u8],
        [0, 1]
    );
    let legal = [
        (Pending, Processing),
        (Pending, Failed),
        (Processing, Pending),
        (Processing, Success),
        (Processing, Failed),
    ];
    for from in all {
        for to in all {
            let ok = legal.contains(&(from, to));
            assert_eq!(from.can_transition(to), ok, "{from:?} -> {to:?}");
            assert_eq!(
                from.transition(to),
                if ok {
                    Ok(to)
                } else {
                    Err(ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS)
                }
            );
        }
        assert_eq!(from.is_terminal(), matches!(from, Failed | Success));
    }
}

#[test]
fn copy_task_is_validated() {
    let mut h = setup();
    assert_eq!(
        copy(&mut h, "nope", &["b:1"]),
        Err(ErrorCode::OBJECT_NOT_FOUND)
    );
    assert_eq!(copy(&mut h, "k", &[]), Err(ErrorCode::INVALID_PARAMS));
    assert_eq!(
        copy(&mut h, "k", &["zz:1"]),
        Err(ErrorCode::SEGMENT_NOT_FOUND)
    );
    assert_eq!(
        copy(&mut h, "k", &["a:1"]),
        Err(ErrorCode::REPLICA_ALREADY_EXISTS)
    );
    assert_eq!(
        copy(&mut h, "k", &["b:1", "b:1"]),
        Err(ErrorCode::INVALID_PARAMS)
    );
    h.put_cfg(
        1,
        "big",
        8192,
        ReplicateConfig {
            preferred_segment: "a:1".into(),
            ..Default::default()
        },
    );
    assert_eq!(
        copy(&mut h, "big", &["b:1", "c:1"]),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    assert_eq!(h.m.metrics().active_tasks, 0);
    h.put_start(1, "writing", 10, 1).unwrap();
    assert_eq!(
        copy(&mut h, "writing", &["b:1"]),
        Err(ErrorCode::REPLICA_IS_NOT_READY)
    );
    assert_eq!(
        mv(&mut h, "k", "a:1", "a:1"),
        Err(ErrorCode::INVALID_PARAMS)
    );
    assert_eq!(
        mv(&mut h, "k", "b:1", "c:1"),
        Err(ErrorCode::REPLICA_NOT_FOUND)
    );
    assert_eq!(
        mv(&mut h, "k", "zz:1", "c:1"),
        Err(ErrorCode::SEGMENT_NOT_FOUND)
    );
    let id = copy(&mut h, "k", &["b:1"]).unwrap();
    assert_ne!(id, TaskId::NIL);
    assert_eq!(id.to_string().len(), 36);
    assert_eq!(id.to_string().parse::<TaskId>(), Ok(id));
    assert_eq!(
        copy(&mut h, "k", &["c:1"]),
        Err(ErrorCode::OBJECT_HAS_REPLICATION_TASK)
    );
    assert_eq!(h.m.query_task(TaskId(42)), Err(ErrorCode::TASK_NOT_FOUND));
}

#[test]
fn copy_task_flow() {
    let mut h = setup();
    let used = h.m.metrics().used_bytes;
    let id = copy(&mut h, "k", &["b:1", "c:1"]).unwrap();
    assert_eq!(
        h.m.metrics().used_bytes,
        used + 2 * 1024,
        "destinations reserved at once"
    );
    let info = h.m.query_task(id).unwrap();
    assert_eq!(
        (info.status, info.kind, info.origin),
        (TaskStatus::Pending, TaskType::ReplicaCopy, TaskOrigin::User)
    );
    assert_eq!(
        finish(&mut h, 1, id, TaskOutcome::Success),
        Err(ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS)
    );
    assert!(fetch(&mut h, 2).is_empty(), "client 2 holds no replica");
    let got = fetch(&mut h, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].task_id, id);
    assert_eq!(got[0].key, "k");
    let mut dests = H::segment_names(&got[0].destinations);
    dests.sort();
    assert_eq!(dests, vec!["b:1".to_string(), "c:1".to_string()]);
    assert!(got[0]
        .destinations
        .iter()
        .all(|d| d.status == ReplicaStatus::Processing));
    assert!(fetch(&mut h, 1).is_empty(), "already taken");
    let info = h.m.query_task(id).unwrap();
    assert_eq!(
        (info.status, info.assigned_client),
        (TaskStatus::Processing, Some(c(1)))
    );
    // Readers still see only the complete replica while the copy runs.
    assert_eq!(h.get("k").unwrap().replicas.len(), 1);
    assert_eq!(
        finish(&mut h, 2, id, TaskOutcome::Success),
        Err(ErrorCode::ILLEGAL_CLIENT)
    );
    assert_eq!(
        finish(&mut h, 1, TaskId(1), TaskOutcome::Success),
        Err(ErrorCode::TASK_NOT_FOUND)
    );
    finish(&mut h, 1, id, TaskOutcome::Success).unwrap();
    assert_eq!(h.get("k").unwrap().replicas.len(), 3);
    assert_eq!(h.m.query_task(id).unwrap().status, TaskStatus::Success);
    assert_eq!(h.m.object("k").unwrap().task, None);
    assert_eq!(
        finish(&mut h, 1, id, TaskOutcome::Success),
        Err(ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS)
    );
}

#[test]
fn move_task_drops_the_source_after_its_lease() {
    let mut h = setup();
    let id = mv(&mut h, "k", "a:1", "b:1").unwrap();
    let got = fetch(&mut h, 1);
    assert_eq!(got[0].kind, TaskType::ReplicaMove);
    assert_eq!(got[0].source.memory().unwrap().segment_name, "a:1");
    let lease = h.get("k").unwrap().lease;
    finish(&mut h, 1, id, TaskOutcome::Success).unwrap();
    let list = h.get("k").unwrap();
    assert_eq!(H::segment_names(&list.replicas), vec!["b:1".to_string()]);
    // The source range is retired until the lease taken before the move ends.
    let a = |h: &H| {
        h.m.segments()
            .into_iter()
            .find(|s| s.name == "a:1")
            .unwrap()
    };
    assert_eq!((a(&h).used, a(&h).retired), (1024, 1024));
    h.at(lease.0 .0);
    for client in 1..=3 {
        h.heartbeat(client);
    }
    h.tick();
    assert_eq!(a(&h).used, 0);
}

#[test]
fn failures_are_retried_then_fail() {
    let mut h = setup();
    let id = copy(&mut h, "k", &["b:1"]).unwrap();
    for attempt in 1..=3 {
        assert_eq!(fetch(&mut h, 1).len(), 1);
        finish(&mut h, 1, id, TaskOutcome::Failed(ErrorCode::TRANSFER_FAIL)).unwrap();
        let info = h.m.query_task(id).unwrap();
        assert_eq!((info.status, info.attempts), (TaskStatus::Pending, attempt));
        assert_eq!(info.error, Some(ErrorCode::TRANSFER_FAIL));
    }
    assert_eq!(fetch(&mut h, 1).len(), 1);
    finish(&mut h, 1, id, TaskOutcome::Failed(ErrorCode::TRANSFER_FAIL)).unwrap();
    let info = h.m.query_task(id).unwrap();
    assert_eq!((info.status, info.attempts), (TaskStatus::Failed, 4));
    assert_eq!(h.m.metrics().used_bytes, 1024, "destination freed");
    assert_eq!(h.m.object("k").unwrap().task, None);
    // Another task may now be created.
    copy(&mut h, "k", &["b:1"]).unwrap();
}

#[test]
fn timeouts_executor_death_and_purge() {
    let mut h = setup();
    let id = copy(&mut h, "k", &["c:1"]).unwrap();
    fetch(&mut h, 1);
    let alive = |h: &mut H| {
        for client in 1..=3 {
            h.heartbeat(client);
        }
    };
    h.at(59_999);
    alive(&mut h);
    assert!(h.tick().is_empty());
    h.at(60_000);
    alive(&mut h);
    let ticked = h.tick();
    assert_eq!(
        ticked,
        vec![(Command::TaskTimeout { task_id: id }, Response::Unit(Ok(())))]
    );
    let info = h.m.query_task(id).unwrap();
    assert_eq!(
        (info.status, info.error),
        (TaskStatus::Pending, Some(ErrorCode::RPC_TIMEOUT))
    );
    assert_eq!(
        h.apply(Command::TaskTimeout { task_id: id }).code(),
        ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS
    );

    // The executor dies mid-copy: the object dies with it (its only replica), the task fails.
    fetch(&mut h, 1);
    h.at(75_000);
    h.heartbeat(2);
    h.heartbeat(3);
    let ticked = h.tick();
    assert!(ticked.contains(&(
        Command::ExpireClient { client_id: c(1) },
        Response::Unit(Ok(()))
    )));
    let info = h.m.query_task(id).unwrap();
    assert_eq!(info.status, TaskStatus::Failed);
    assert_eq!(h.m.metrics().used_bytes, 0);

    // Finished tasks are forgotten after the retention period.
    h.at(75_000 + 600_000);
    h.heartbeat(2);
    h.heartbeat(3);
    let ticked = h.tick();
    assert!(ticked.contains(&(Command::PurgeTasks, Response::Count(Ok(1)))));
    assert_eq!(h.m.query_task(id), Err(ErrorCode::TASK_NOT_FOUND));
}

#[test]
fn executor_death_requeues_when_another_holder_exists() {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    h.mount(2, "b:1", MIB);
    h.mount(3, "c:1", MIB);
    h.put_cfg(
        1,
        "k",
        1000,
        ReplicateConfig {
            replica_num: 2,
            preferred_segments: vec!["a:1".into(), "b:1".into()],
            ..Default::default()
        },
    );
    let id = copy(&mut h, "k", &["c:1"]).unwrap();
    assert_eq!(fetch(&mut h, 1).len(), 1);
    h.at(10_000);
    h.heartbeat(2);
    h.heartbeat(3);
    h.tick();
    let info = h.m.query_task(id).unwrap();
    assert_eq!((info.status, info.attempts), (TaskStatus::Pending, 1));
    let got = fetch(&mut h, 2);
    assert_eq!(got[0].source.memory().unwrap().segment_name, "b:1");
    finish(&mut h, 2, id, TaskOutcome::Success).unwrap();
    let mut names = H::segment_names(&h.get("k").unwrap().replicas);
    names.sort();
    assert_eq!(names, vec!["b:1".to_string(), "c:1".to_string()]);
}

#[test]
fn tasks_block_removal_and_eviction_and_upsert_cancels_them() {
    let mut h = setup();
    let id = copy(&mut h, "k", &["b:1"]).unwrap();
    // A queued task is cancelled by a plain remove; an executing one blocks it.
    fetch(&mut h, 1);
    assert_eq!(
        h.remove("k", false),
        Err(ErrorCode::OBJECT_HAS_REPLICATION_TASK)
    );
    assert_eq!(
        h.apply(Command::RemoveAll { force: false }).into_count(),
        Ok(0)
    );
    // Eviction skips it too.
    h.m.apply(
        h.t(),
        Command::PutStart {
            client_id: c(1),
            key: "fill".into(),
            size: 2 * MIB,
            config: ReplicateConfig::default(),
        },
    );
    h.advance(1);
    h.tick();
    assert!(h.exists("k"));
    // An upsert that commits cancels it.
    h.apply(Command::UpsertStart {
        client_id: c(1),
        key: "k".into(),
        size: 10,
        config: ReplicateConfig::default(),
    })
    .into_put_start()
    .unwrap();
    assert_eq!(h.m.query_task(id).unwrap().status, TaskStatus::Processing);
    h.put_end(1, "k").unwrap();
    let info = h.m.query_task(id).unwrap();
    assert_eq!(
        (info.status, info.error),
        (TaskStatus::Failed, Some(ErrorCode::OBJECT_REPLICA_BUSY))
    );
    assert_eq!(
        finish(&mut h, 1, id, TaskOutcome::Success),
        Err(ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS)
    );
    // Queued task + plain remove: cancelled.
    let target = free_target(&mut h, "k");
    let id = copy(&mut h, "k", &[target]).unwrap();
    h.advance(10_000); // past the lease free_target took
    h.remove("k", false).unwrap();
    assert_eq!(
        h.m.query_task(id).unwrap().error,
        Some(ErrorCode::OBJECT_NOT_FOUND)
    );
    // Executing task + forced remove.
    h.put(1, "k2", 10, 1);
    let target = free_target(&mut h, "k2");
    let id = copy(&mut h, "k2", &[target]).unwrap();
    let holder = h.get("k2").unwrap().replicas[0]
        .memory()
        .unwrap()
        .segment_name
        .clone();
    let client = match holder.as_str() {
        "a:1" => 1,
        "b:1" => 2,
        _ => 3,
    };
    assert_eq!(fetch(&mut h, client).len(), 1);
    h.remove("k2", true).unwrap();
    assert_eq!(h.m.query_task(id).unwrap().status, TaskStatus::Failed);
    // Only k2's own range is left, retired until the lease free_target took ends.
    let m = h.m.metrics();
    assert_eq!((m.used_bytes, m.retired_bytes), (64, 64));
}

/// A segment of `setup` that holds no replica of `key`.
fn free_target(h: &mut H, key: &str) -> &'static str {
    let held = H::segment_names(&h.get(key).unwrap().replicas);
    ["a:1", "b:1", "c:1"]
        .into_iter()
        .find(|s| !held.iter().any(|h| h == s))
        .unwrap()
}

#[test]
fn active_task_limit() {
    let mut h = H::with(MasterConfig {
        max_active_tasks: 1,
        ..Default::default()
    });
    h.mount(1, "a:1", MIB);
    h.mount(2, "b:1", MIB);
    h.put_cfg(
        1,
        "x",
        10,
        ReplicateConfig {
            preferred_segment: "a:1".into(),
            ..Default::default()
        },
    );
    h.put_cfg(
        1,
        "y",
        10,
        ReplicateConfig {
            preferred_segment: "a:1".into(),
            ..Default::default()
        },
    );
    copy(&mut h, "x", &["b:1"]).unwrap();
    assert_eq!(
        copy(&mut h, "y", &["b:1"]),
        Err(ErrorCode::TASK_PENDING_LIMIT_EXCEEDED)
    );
}

#[test]
fn losing_the_last_source_cancels_the_task() {
    // Found by the property test: k's only committed replica is lost while an upsert is in
    // flight; the copy task must not survive to collide with the upsert's replicas.
    let mut h = setup();
    let id = copy(&mut h, "k", &["b:1"]).unwrap();
    h.apply(Command::UpsertStart {
        client_id: c(2),
        key: "k".into(),
        size: 10,
        config: ReplicateConfig {
            replica_num: 2,
            preferred_segments: vec!["b:1".into(), "c:1".into()],
            ..Default::default()
        },
    })
    .into_put_start()
    .unwrap();
    h.apply(Command::UnmountSegment {
        client_id: c(1),
        name: "a:1".into(),
    })
    .into_unit()
    .unwrap();
    let info = h.m.query_task(id).unwrap();
    assert_eq!(
        (info.status, info.error),
        (TaskStatus::Failed, Some(ErrorCode::REPLICA_IS_GONE))
    );
    h.put_end(2, "k").unwrap();
    assert_eq!(h.get("k").unwrap().replicas.len(), 2);
}
