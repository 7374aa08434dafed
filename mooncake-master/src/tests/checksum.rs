//! Per-object checksums: recorded at commit, handed out with the replicas, kept by snapshots;
//! old logs and snapshots (without checksums) still load, their objects unverified.

use super::*;
use mooncake_core::metadata::StateMachine;

impl H {
    fn put_end_checked(&mut self, client: u128, key: &str, checksum: u32) -> Result<(), ErrorCode> {
        self.apply(Command::PutEndChecked {
            client_id: c(client),
            key: key.into(),
            checksum,
        })
        .into_unit()
    }
}

#[test]
fn a_commit_records_the_checksum_and_reads_return_it() {
    let mut h = H::new();
    h.mount(1, "a:1", 64 * MIB);
    h.mount(2, "b:1", 64 * MIB);
    h.put_start(1, "k", 4096, 2).unwrap();
    h.put_end_checked(1, "k", 0xdead_beef).unwrap();
    let got = h.get("k").unwrap();
    assert_eq!(got.checksum, Some(0xdead_beef));
    assert_eq!(got.replicas.len(), 2);
    // A retried commit (its answer lost) succeeds and keeps the checksum.
    h.put_end_checked(1, "k", 0xdead_beef).unwrap();
    assert_eq!(h.get("k").unwrap().checksum, Some(0xdead_beef));
    // An upsert's commit replaces it; one without a checksum leaves the value unverified.
    h.apply(Command::UpsertStart {
        client_id: c(1),
        key: "k".into(),
        size: 100,
        config: ReplicateConfig::default(),
    })
    .into_put_start()
    .unwrap();
    // Still the old value's until the commit.
    assert_eq!(h.get("k").unwrap().checksum, Some(0xdead_beef));
    h.put_end_checked(1, "k", 7).unwrap();
    assert_eq!(h.get("k").unwrap().checksum, Some(7));
    h.apply(Command::UpsertStart {
        client_id: c(1),
        key: "k".into(),
        size: 100,
        config: ReplicateConfig::default(),
    })
    .into_put_start()
    .unwrap();
    h.put_end(1, "k").unwrap();
    assert_eq!(h.get("k").unwrap().checksum, None);
    // A plain put: none.
    h.put(1, "plain", 4096, 1);
    assert_eq!(h.get("plain").unwrap().checksum, None);
}

#[test]
fn batch_commits_carry_one_checksum_per_key() {
    let mut h = H::new();
    h.mount(1, "a:1", 64 * MIB);
    for k in ["x", "y"] {
        h.put_start(1, k, 4096, 1).unwrap();
    }
    let short = h.apply(Command::BatchPutEndChecked {
        client_id: c(1),
        keys: vec!["x".into(), "y".into()],
        checksums: vec![1],
    });
    assert_eq!(
        short,
        Response::UnitBatch(vec![Err(ErrorCode::INVALID_PARAMS); 2])
    );
    assert_eq!(h.get("x"), Err(ErrorCode::REPLICA_IS_NOT_READY));
    let ok = h.apply(Command::BatchPutEndChecked {
        client_id: c(1),
        keys: vec!["x".into(), "y".into()],
        checksums: vec![1, 2],
    });
    assert_eq!(ok, Response::UnitBatch(vec![Ok(()), Ok(())]));
    assert_eq!(h.get("x").unwrap().checksum, Some(1));
    assert_eq!(h.get("y").unwrap().checksum, Some(2));
    // The leader's read path (outside the log) answers the same.
    assert_eq!(h.m.replica_list_at(h.t(), "y").unwrap().checksum, Some(2));
}

#[test]
fn reserved_commits_record_checksums() {
    let mut h = H::new();
    h.mount(1, "a:1", 64 * MIB);
    let grant = match h.apply(Command::Reserve {
        client_id: c(1),
        size: MIB,
        min_size: 4096,
    }) {
        Response::Reserved(r) => r.unwrap(),
        other => panic!("unexpected {other:?}"),
    };
    let item = |k: &str, offset| ReservedPut {
        key: k.into(),
        offset,
        size: 4096,
    };
    let mismatched = h.apply(Command::CommitReservedChecked {
        client_id: c(1),
        reservation: grant.id,
        items: vec![item("r1", 0)],
        config: ReplicateConfig::default(),
        checksums: vec![],
    });
    assert_eq!(
        mismatched,
        Response::UnitBatch(vec![Err(ErrorCode::INVALID_PARAMS)])
    );
    let r = h.apply(Command::CommitReservedChecked {
        client_id: c(1),
        reservation: grant.id,
        items: vec![item("r1", 0), item("r2", 4096)],
        config: ReplicateConfig::default(),
        checksums: vec![11, 22],
    });
    assert_eq!(r, Response::UnitBatch(vec![Ok(()), Ok(())]));
    assert_eq!(h.get("r1").unwrap().checksum, Some(11));
    assert_eq!(h.get("r2").unwrap().checksum, Some(22));
}

#[test]
fn a_copy_keeps_the_checksum() {
    let mut h = H::new();
    h.mount(1, "a:1", 64 * MIB);
    h.mount(2, "b:1", 64 * MIB);
    h.put_start(1, "k", 4096, 1).unwrap();
    h.put_end_checked(1, "k", 99).unwrap();
    let seg = h.get("k").unwrap().replicas[0]
        .memory()
        .unwrap()
        .segment_name
        .clone();
    let other = if seg == "a:1" { "b:1" } else { "a:1" };
    let task = h
        .apply(Command::CreateCopyTask {
            key: "k".into(),
            targets: vec![other.into()],
        })
        .into_task_id()
        .unwrap();
    for client in [1, 2] {
        let tasks = match h.apply(Command::FetchTasks {
            client_id: c(client),
            max: 8,
        }) {
            Response::Tasks(t) => t,
            other => panic!("unexpected {other:?}"),
        };
        for t in tasks {
            assert_eq!(t.task_id, task);
            h.apply(Command::FinishTask {
                client_id: c(client),
                task_id: t.task_id,
                outcome: TaskOutcome::Success,
            })
            .into_unit()
            .unwrap();
        }
    }
    let got = h.get("k").unwrap();
    assert_eq!(got.replicas.len(), 2, "copied");
    assert_eq!(got.checksum, Some(99));
}

#[test]
fn snapshots_keep_checksums_and_older_snapshots_restore_without_them() {
    let mut h = H::new();
    h.mount(1, "a:1", 64 * MIB);
    h.put_start(1, "sum", 4096, 1).unwrap();
    h.put_end_checked(1, "sum", 5).unwrap();
    h.put(1, "none", 4096, 1);
    let snap = StateMachine::snapshot(&h.m).unwrap();
    let mut copy = Master::new(MasterConfig::default()).unwrap();
    StateMachine::restore(&mut copy, &snap).unwrap();
    let now = h.t();
    assert_eq!(copy.replica_list_at(now, "sum").unwrap().checksum, Some(5));
    assert_eq!(copy.replica_list_at(now, "none").unwrap().checksum, None);

    // Made before checksums: the master, then the remembered request outcomes.
    let mut before = postcard::to_allocvec(&h.m).unwrap();
    before.extend_from_slice(&postcard::to_allocvec(&h.m.requests).unwrap());
    // Made before request ids: the master alone.
    let oldest = postcard::to_allocvec(&h.m).unwrap();
    for old in [before, oldest] {
        let mut copy = Master::new(MasterConfig::default()).unwrap();
        StateMachine::restore(&mut copy, &old).unwrap();
        let list = copy.replica_list_at(now, "sum").unwrap();
        assert_eq!(list.checksum, None, "served unverified");
        assert_eq!(
            list.replicas,
            h.m.replica_list_at(now, "sum").unwrap().replicas
        );
    }
}

#[test]
fn log_entries_written_before_checksums_still_decode() {
    // LogEntry { now: 5, reads: [], PutEnd { client_id: 1, key: "k" } } as logs have carried
    // it since PutEnd existed: new commands were added after the earlier ones, whose tags stay.
    let old: &[u8] = &[5, 0, 9, 1, 1, b'k'];
    let entry: LogEntry = postcard::from_bytes(old).unwrap();
    assert_eq!(
        entry,
        LogEntry::new(
            Timestamp(5),
            Command::PutEnd {
                client_id: c(1),
                key: "k".into()
            }
        )
    );
    assert_eq!(entry.encode(), old);
    let mut h = H::new();
    h.mount(1, "a:1", 64 * MIB);
    h.put_start(1, "k", 4096, 1).unwrap();
    let out = StateMachine::apply(&mut h.m, old);
    assert_eq!(decode_response(&out), Ok(Response::Unit(Ok(()))));
    assert_eq!(h.get("k").unwrap().checksum, None, "served unverified");
}
