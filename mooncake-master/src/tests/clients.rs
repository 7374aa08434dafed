//! Client TTL expiry, remount, and re-replication scheduling.

use super::*;

fn silence_until_expired(h: &mut H, alive: &[u128], until: u64) -> Vec<(Command, Response)> {
    let mut all = Vec::new();
    while h.now < until {
        h.advance(1_000);
        for c in alive {
            h.heartbeat(*c);
        }
        all.extend(h.tick());
    }
    all
}

#[test]
fn silent_client_expires_and_its_replicas_go() {
    let mut h = H::with(MasterConfig {
        enable_rereplication: false,
        ..Default::default()
    });
    h.mount(1, "a:1", MIB);
    h.mount(2, "b:1", MIB);
    h.put_cfg(
        1,
        "only-a",
        100,
        ReplicateConfig {
            preferred_segment: "a:1".into(),
            ..Default::default()
        },
    );
    h.put(1, "both", 100, 2);
    h.put_start_cfg(
        2,
        "writing",
        100,
        ReplicateConfig {
            replica_num: 2,
            ..Default::default()
        },
    )
    .unwrap();
    // Client 1 goes silent; client 2 keeps pinging.
    let ticked = silence_until_expired(&mut h, &[2], 9_000);
    assert!(ticked.is_empty(), "{ticked:?}");
    let ticked = silence_until_expired(&mut h, &[2], 10_000);
    assert_eq!(ticked.len(), 1);
    assert_eq!(ticked[0].0, Command::ExpireClient { client_id: c(1) });
    assert_eq!(ticked[0].1, Response::Unit(Ok(())));

    assert_eq!(h.m.segments().len(), 1);
    assert!(
        !h.exists("only-a"),
        "its only replica was on the lost segment"
    );
    let both = h.get("both").unwrap();
    assert_eq!(H::segment_names(&both.replicas), vec!["b:1".to_string()]);
    // The write in progress keeps its surviving replica and can still commit.
    assert_eq!(
        h.m.object("writing").unwrap().replica_statuses,
        vec![ReplicaStatus::Processing]
    );
    h.put_end(2, "writing").unwrap();
    assert_eq!(h.get("writing").unwrap().replicas.len(), 1);
    let m = h.m.metrics();
    assert_eq!(
        (m.counters.clients_expired, m.counters.objects_lost),
        (1, 1)
    );
    assert_eq!(m.counters.tasks_created, 0, "re-replication is off");

    // The client comes back: told to remount, and it can.
    assert_eq!(h.heartbeat(1), HeartbeatStatus::NeedRemount);
    h.mount(1, "a:1", MIB);
    assert_eq!(h.heartbeat(1), HeartbeatStatus::Ok);
    assert_eq!(h.m.segments().len(), 2);
}

#[test]
fn lost_replica_is_rereplicated_on_another_host() {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    h.mount(2, "b:1", MIB);
    h.mount(3, "c:1", MIB);
    h.mount(3, "c:2", MIB);
    // Two replicas, pinned to a:1 and b:1.
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
    silence_until_expired(&mut h, &[2, 3], 10_000);
    assert_eq!(h.m.segments().len(), 3);
    let info = h.m.object("k").unwrap();
    assert_eq!(info.replica_statuses.len(), 1);
    let task_id = info.task.expect("re-replication scheduled");
    let task = h.m.query_task(task_id).unwrap();
    assert_eq!(task.origin, TaskOrigin::Rereplication);
    assert_eq!(task.kind, TaskType::ReplicaCopy);
    assert_eq!(task.status, TaskStatus::Pending);
    assert_eq!(task.targets.len(), 1);
    assert_eq!(host_of(&task.targets[0]), "c", "a new host, not b's");
    assert_eq!(h.m.metrics().under_replicated_keys, 1);

    // Only the holder of the surviving replica can execute it.
    let fetch = |h: &mut H, client| match h.apply(Command::FetchTasks {
        client_id: c(client),
        max: 10,
    }) {
        Response::Tasks(t) => t,
        other => panic!("{other:?}"),
    };
    assert!(fetch(&mut h, 3).is_empty());
    let got = fetch(&mut h, 2);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].source.memory().unwrap().segment_name, "b:1");
    assert_eq!(
        got[0].destinations[0].memory().unwrap().segment_name,
        task.targets[0]
    );
    assert_eq!(got[0].size, 1000);
    let finish = h.apply(Command::FinishTask {
        client_id: c(2),
        task_id,
        outcome: TaskOutcome::Success,
    });
    assert_eq!(finish.code(), ErrorCode::OK);
    let list = h.get("k").unwrap();
    assert_eq!(list.replicas.len(), 2);
    assert!(list
        .replicas
        .iter()
        .all(|r| r.status == ReplicaStatus::Complete));
    let m = h.m.metrics();
    assert_eq!(
        (m.under_replicated_keys, m.counters.rereplications_scheduled),
        (0, 1)
    );
    assert_eq!(h.m.query_task(task_id).unwrap().status, TaskStatus::Success);
}

#[test]
fn rereplication_waits_for_space_then_uses_a_new_segment() {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    h.mount(2, "b:1", MIB);
    h.put(1, "k", 1000, 2);
    silence_until_expired(&mut h, &[2], 10_000);
    // Nowhere to copy to: the key waits.
    let info = h.m.object("k").unwrap();
    assert_eq!((info.replica_statuses.len(), info.task), (1, None));
    assert_eq!(h.m.metrics().under_replicated_keys, 1);
    // A new segment appears (here: the lost client comes back).
    assert_eq!(h.heartbeat(1), HeartbeatStatus::NeedRemount);
    h.mount(1, "a:1", MIB);
    let task = h.m.object("k").unwrap().task.expect("scheduled on mount");
    assert_eq!(
        h.m.query_task(task).unwrap().targets,
        vec!["a:1".to_string()]
    );
    // If the holder dies before copying, the object is gone and so is the task.
    silence_until_expired(&mut h, &[1], 21_000);
    assert!(!h.exists("k"));
    let t = h.m.query_task(task).unwrap();
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.error, Some(ErrorCode::OBJECT_NOT_FOUND));
    assert_eq!(h.m.metrics().used_bytes, 0);
}

#[test]
fn best_effort_put_is_not_rereplicated_but_lost_ones_are() {
    let mut h = H::new();
    h.mount(1, "a:1", MIB);
    // Asked for 3, got 1: nothing was lost, so nothing to restore.
    assert_eq!(h.put(1, "k", 100, 3).replicas.len(), 1);
    h.mount(2, "b:1", MIB);
    assert_eq!(h.m.object("k").unwrap().task, None);
    assert_eq!(h.m.metrics().counters.tasks_created, 0);
}
