//! Property test: random command sequences keep the master's invariants.

use proptest::prelude::*;

use super::*;

const KEYS: usize = 8;

/// A test operation: a command template, resolved against the run's state (task ids).
#[derive(Clone, Debug)]
pub(super) enum Op {
    Mount {
        client: u8,
        idx: u8,
        size: u64,
    },
    Unmount {
        client: u8,
        idx: u8,
    },
    Heartbeat {
        client: u8,
    },
    Put {
        client: u8,
        key: u8,
        size: u64,
        n: u32,
        pin: u8,
        upsert: bool,
        commit: bool,
    },
    BatchPut {
        client: u8,
        keys: Vec<u8>,
        size: u64,
    },
    End {
        client: u8,
        key: u8,
    },
    Revoke {
        client: u8,
        key: u8,
    },
    BatchEnd {
        client: u8,
        keys: Vec<u8>,
    },
    Get {
        key: u8,
    },
    Exist {
        keys: Vec<u8>,
    },
    Remove {
        key: u8,
        force: bool,
    },
    BatchRemove {
        keys: Vec<u8>,
        force: bool,
    },
    RemoveAll {
        force: bool,
    },
    RemoveRegex {
        force: bool,
    },
    Copy {
        key: u8,
        client: u8,
        idx: u8,
    },
    Move {
        key: u8,
        from: (u8, u8),
        to: (u8, u8),
    },
    Fetch {
        client: u8,
    },
    Finish {
        client: u8,
        task: u8,
        ok: bool,
        as_assignee: bool,
    },
    StaleMaintenance {
        which: u8,
        client: u8,
        key: u8,
        task: u8,
    },
    Advance {
        ms: u64,
        keepalive: bool,
    },
    Remount {
        client: u8,
        idx: u8,
        size: u64,
    },
    Reserve {
        client: u8,
        size: u64,
    },
    /// Commits `(key, granule offset, size)` items into one of the client's reservations.
    CommitReserved {
        client: u8,
        pick: u8,
        items: Vec<(u8, u16, u64)>,
    },
    /// A client's WRITEs to some segments failed: place those replicas of its writes again.
    Replace {
        client: u8,
        keys: Vec<u8>,
        failed: Vec<(u8, u8)>,
    },
    /// `op` named with a request id from a small range, so that ids repeat (a retry, or a
    /// client reusing an id for another command): its one command when it wants an id.
    Once {
        op: Box<Op>,
        client: u8,
        seq: u8,
    },
}

fn seg_name(client: u8, idx: u8) -> String {
    // Hosts are shared by pairs of clients, so host spreading matters.
    format!(
        "h{}:{}",
        client / 2,
        u32::from(client) * 10 + u32::from(idx)
    )
}

pub(super) fn key(k: u8) -> String {
    format!("k{}", k as usize % KEYS)
}

pub(super) fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => plain_op(),
        1 => (plain_op(), 0u8..2, 0u8..6)
            .prop_map(|(op, client, seq)| Op::Once { op: Box::new(op), client, seq }),
    ]
}

fn plain_op() -> impl Strategy<Value = Op> {
    let client = 0u8..4;
    let k = 0u8..KEYS as u8;
    let keys = proptest::collection::vec(0u8..KEYS as u8, 0..4);
    prop_oneof![
        3 => (client.clone(), 0u8..2, prop_oneof![Just(4096u64), Just(65536), Just(262_144)])
            .prop_map(|(client, idx, size)| Op::Mount { client, idx, size }),
        1 => (client.clone(), 0u8..2).prop_map(|(client, idx)| Op::Unmount { client, idx }),
        2 => client.clone().prop_map(|client| Op::Heartbeat { client }),
        10 => (client.clone(), k.clone(), prop_oneof![1u64..200, 200u64..5000, 5000u64..40000], 1u32..4, 0u8..4, any::<bool>(), proptest::bool::weighted(0.7))
            .prop_map(|(client, key, size, n, pin, upsert, commit)| Op::Put { client, key, size, n, pin, upsert, commit }),
        2 => (client.clone(), keys.clone(), 1u64..3000)
            .prop_map(|(client, keys, size)| Op::BatchPut { client, keys, size }),
        6 => (client.clone(), k.clone()).prop_map(|(client, key)| Op::End { client, key }),
        2 => (client.clone(), k.clone()).prop_map(|(client, key)| Op::Revoke { client, key }),
        2 => (client.clone(), keys.clone(), proptest::collection::vec((0u8..4, 0u8..2), 0..3))
            .prop_map(|(client, keys, failed)| Op::Replace { client, keys, failed }),
        1 => (client.clone(), keys.clone()).prop_map(|(client, keys)| Op::BatchEnd { client, keys }),
        4 => k.clone().prop_map(|key| Op::Get { key }),
        2 => keys.clone().prop_map(|keys| Op::Exist { keys }),
        3 => (k.clone(), any::<bool>()).prop_map(|(key, force)| Op::Remove { key, force }),
        1 => (keys, any::<bool>()).prop_map(|(keys, force)| Op::BatchRemove { keys, force }),
        1 => any::<bool>().prop_map(|force| Op::RemoveAll { force }),
        1 => any::<bool>().prop_map(|force| Op::RemoveRegex { force }),
        5 => (k.clone(), client.clone(), 0u8..2).prop_map(|(key, client, idx)| Op::Copy { key, client, idx }),
        2 => (k, (0u8..4, 0u8..2), (0u8..4, 0u8..2)).prop_map(|(key, from, to)| Op::Move { key, from, to }),
        4 => client.clone().prop_map(|client| Op::Fetch { client }),
        4 => (client.clone(), any::<u8>(), proptest::bool::weighted(0.7), proptest::bool::weighted(0.8))
            .prop_map(|(client, task, ok, as_assignee)| Op::Finish { client, task, ok, as_assignee }),
        1 => (0u8..4, client, 0u8..KEYS as u8, any::<u8>())
            .prop_map(|(which, client, key, task)| Op::StaleMaintenance { which, client, key, task }),
        4 => (
            prop_oneof![4 => Just(0u64), 4 => Just(100), 4 => Just(3_000), 2 => Just(11_000), 1 => Just(31_000), 1 => Just(61_000), 1 => Just(601_000)],
            proptest::bool::weighted(0.8),
        )
            .prop_map(|(ms, keepalive)| Op::Advance { ms, keepalive }),
        1 => (0u8..4, 0u8..2, prop_oneof![Just(4096u64), Just(65536), Just(262_144)])
            .prop_map(|(client, idx, size)| Op::Remount { client, idx, size }),
        3 => (0u8..4, prop_oneof![1u64..5000, 5000u64..40000])
            .prop_map(|(client, size)| Op::Reserve { client, size }),
        8 => (0u8..4, any::<u8>(), proptest::collection::vec((0u8..KEYS as u8, 0u16..300, 1u64..3000), 1..4))
            .prop_map(|(client, pick, items)| Op::CommitReserved { client, pick, items }),
    ]
}

/// Turns an op into commands (an Advance becomes the timeout handler's commands).
pub(super) fn commands(op: &Op, m: &Master, now: Timestamp, tasks: &[TaskId]) -> Vec<Command> {
    let cid = |c: u8| ClientId(u128::from(c) + 1);
    let task = |t: u8| {
        if tasks.is_empty() {
            TaskId(u128::from(t))
        } else {
            tasks[t as usize % tasks.len()]
        }
    };
    let one = |c| vec![c];
    match op.clone() {
        Op::Mount { client, idx, size } => one(Command::MountSegment {
            client_id: cid(client),
            segment: SegmentSpec::new(
                seg_name(client, idx),
                (u64::from(client) + 1) << 40 | u64::from(idx) << 32,
                size,
            ),
        }),
        Op::Unmount { client, idx } => one(Command::UnmountSegment {
            client_id: cid(client),
            name: seg_name(client, idx),
        }),
        Op::Heartbeat { client } => one(Command::Heartbeat {
            client_id: cid(client),
        }),
        Op::Put {
            client,
            key: k,
            size,
            n,
            pin,
            upsert,
            commit,
        } => {
            let config = ReplicateConfig {
                replica_num: n,
                with_soft_pin: pin == 1,
                with_hard_pin: pin == 2,
                soft_pin_ttl_ms: if pin == 1 { 20_000 } else { 0 },
                ..Default::default()
            };
            let (client_id, key) = (cid(client), key(k));
            let end = Command::PutEnd {
                client_id,
                key: key.clone(),
            };
            let mut out = vec![if upsert {
                Command::UpsertStart {
                    client_id,
                    key,
                    size,
                    config,
                }
            } else {
                Command::PutStart {
                    client_id,
                    key,
                    size,
                    config,
                }
            }];
            if commit {
                out.push(end);
            }
            out
        }
        Op::BatchPut { client, keys, size } => one(Command::BatchPutStart {
            client_id: cid(client),
            items: keys
                .into_iter()
                .map(|k| PutItem { key: key(k), size })
                .collect(),
            config: ReplicateConfig::with_replicas(2),
        }),
        Op::End { client, key: k } => one(Command::PutEnd {
            client_id: cid(client),
            key: key(k),
        }),
        Op::Revoke { client, key: k } => one(Command::PutRevoke {
            client_id: cid(client),
            key: key(k),
        }),
        Op::Replace {
            client,
            keys,
            failed,
        } => one(Command::ReplaceReplicas {
            client_id: cid(client),
            keys: keys.into_iter().map(key).collect(),
            failed: (failed.into_iter()).map(|(c, i)| seg_name(c, i)).collect(),
        }),
        Op::BatchEnd { client, keys } => one(Command::BatchPutEnd {
            client_id: cid(client),
            keys: keys.into_iter().map(key).collect(),
        }),
        Op::Get { key: k } => one(Command::GetReplicaList { key: key(k) }),
        Op::Exist { keys } => one(Command::BatchExistKey {
            keys: keys.into_iter().map(key).collect(),
        }),
        Op::Remove { key: k, force } => one(Command::Remove { key: key(k), force }),
        Op::BatchRemove { keys, force } => one(Command::BatchRemove {
            keys: keys.into_iter().map(key).collect(),
            force,
        }),
        Op::RemoveAll { force } => one(Command::RemoveAll { force }),
        Op::RemoveRegex { force } => one(Command::RemoveByRegex {
            pattern: "^k[0-3]$".into(),
            force,
        }),
        // Tasks mostly pick a readable key and mounted segments, to get past validation.
        Op::Copy {
            key: k,
            client,
            idx,
        } => one(Command::CreateCopyTask {
            key: readable(m, k).unwrap_or_else(|| key(k)),
            targets: vec![mounted(m, client + idx).unwrap_or_else(|| seg_name(client, idx))],
        }),
        Op::Move { key: k, from, to } => one(Command::CreateMoveTask {
            key: readable(m, k).unwrap_or_else(|| key(k)),
            source: mounted(m, from.0 + from.1).unwrap_or_else(|| seg_name(from.0, from.1)),
            target: mounted(m, to.0 * 2 + to.1).unwrap_or_else(|| seg_name(to.0, to.1)),
        }),
        Op::Fetch { client } => one(Command::FetchTasks {
            client_id: cid(client),
            max: 2,
        }),
        Op::Finish {
            client,
            task: t,
            ok,
            as_assignee,
        } => one(Command::FinishTask {
            client_id: m
                .query_task(task(t))
                .ok()
                .and_then(|i| i.assigned_client)
                .filter(|_| as_assignee)
                .unwrap_or(cid(client)),
            task_id: task(t),
            outcome: if ok {
                TaskOutcome::Success
            } else {
                TaskOutcome::Failed(ErrorCode::TRANSFER_FAIL)
            },
        }),
        Op::StaleMaintenance {
            which,
            client,
            key: k,
            task: t,
        } => one(match which {
            0 => Command::ExpireClient {
                client_id: cid(client),
            },
            1 => Command::ReclaimPut { key: key(k) },
            2 => Command::TaskTimeout { task_id: task(t) },
            _ => Command::Evict,
        }),
        Op::Advance { .. } => m.handle_timeout(now),
        Op::Once { op, client, seq } => {
            let mut inner = commands(&op, m, now, tasks);
            if inner.len() == 1 && inner[0].wants_request_id() {
                inner = vec![Command::Once {
                    // Not the clients that mount: their expiry would forget the ids.
                    id: RequestId {
                        client: ClientId(100 + u128::from(client)),
                        seq: u64::from(seq),
                    },
                    done_below: 0,
                    command: Box::new(inner.remove(0)),
                }];
            }
            inner
        }
        Op::Remount { client, idx, size } => one(Command::RemountSegments {
            client_id: cid(client),
            segments: vec![SegmentSpec::new(
                seg_name(client, idx),
                (u64::from(client) + 1) << 40 | u64::from(idx) << 32,
                size,
            )],
        }),
        Op::Reserve { client, size } => one(Command::Reserve {
            client_id: cid(client),
            size,
            min_size: size / 2,
        }),
        Op::CommitReserved {
            client,
            pick,
            items,
        } => {
            // Mostly one of the client's own reservations; sometimes any id at all.
            let own: Vec<u64> = m
                .reservations
                .iter()
                .filter(|(_, r)| r.client == cid(client))
                .map(|(id, _)| *id)
                .collect();
            let reservation = if own.is_empty() || pick % 8 == 0 {
                u64::from(pick % 8)
            } else {
                own[pick as usize % own.len()]
            };
            one(Command::CommitReserved {
                client_id: cid(client),
                reservation,
                items: items
                    .into_iter()
                    .map(|(k, g, size)| ReservedPut {
                        key: key(k),
                        offset: u64::from(g) * 64,
                        size,
                    })
                    .collect(),
                config: ReplicateConfig::default(),
            })
        }
    }
}

/// The `i`-th readable key, if any.
fn readable(m: &Master, i: u8) -> Option<String> {
    let keys: Vec<&str> = m
        .keys()
        .filter(|k| m.object(k).unwrap().state != ObjectState::Writing)
        .collect();
    (!keys.is_empty()).then(|| keys[i as usize % keys.len()].to_owned())
}

/// The `i`-th mounted segment's name, if any.
fn mounted(m: &Master, i: u8) -> Option<String> {
    let segs = m.segments();
    (!segs.is_empty()).then(|| segs[i as usize % segs.len()].name.clone())
}

/// Whether a command may legitimately remove a leased object.
pub(super) fn may_drop_leased(cmd: &Command) -> bool {
    match cmd.inner() {
        Command::UnmountSegment { .. } | Command::ExpireClient { .. } => true,
        Command::Remove { force, .. }
        | Command::BatchRemove { force, .. }
        | Command::RemoveAll { force }
        | Command::RemoveByRegex { force, .. } => *force,
        _ => false,
    }
}

/// Runs `ops`, checking invariants after every command; returns every response.
fn run(
    ops: &[Op],
    strategy: AllocationStrategy,
) -> Result<(Vec<Response>, MasterMetrics), TestCaseError> {
    let mut m = Master::new(MasterConfig {
        allocation_strategy: strategy,
        task_max_retries: 1,
        ..Default::default()
    })
    .unwrap();
    let mut now = 0u64;
    let mut tasks: Vec<TaskId> = Vec::new();
    let mut responses = Vec::new();
    let mut firsts: std::collections::HashMap<RequestId, (Command, Response, Timestamp)> =
        std::collections::HashMap::new();
    for op in ops {
        if let Op::Advance { ms, keepalive } = op {
            now += ms;
            if *keepalive {
                for c in 1..=4 {
                    m.apply(
                        Timestamp(now),
                        Command::Heartbeat {
                            client_id: ClientId(c),
                        },
                    );
                }
            }
        }
        let t = Timestamp(now);
        for cmd in commands(op, &m, t, &tasks) {
            let leased: Vec<String> = m
                .keys()
                .filter(|k| m.object(k).unwrap().lease.is_active(t))
                .map(str::to_owned)
                .collect();
            let r = m.apply(t, cmd.clone());
            if let Err(e) = m.check_invariants() {
                return Err(TestCaseError::fail(format!("after {cmd:?}: {e}")));
            }
            if let Command::Once { id, command, .. } = &cmd {
                // What hands out space or tasks is given again only while it still holds (the
                // lease checks above see that nothing else's space is handed out).
                let grants = |r: &Response| {
                    matches!(
                        r,
                        Response::PutStart(Ok(_))
                            | Response::PutStartBatch(_)
                            | Response::Reserved(Ok(_))
                            | Response::Tasks(_)
                    )
                };
                match firsts.get(id) {
                    Some((c, _, at)) if at.plus(REQUEST_MEMORY_MS) > t && **command != *c => {
                        prop_assert_eq!(&r, &Response::Unit(Err(ErrorCode::INVALID_PARAMS)));
                    }
                    Some((_, first, at)) if at.plus(REQUEST_MEMORY_MS) > t => {
                        if !grants(first) {
                            prop_assert_eq!(&r, first, "a repeat of {:?} answered anew", id);
                        } else if r != *first {
                            // Applied again (what it handed out was gone), or what is left.
                            firsts.insert(*id, ((**command).clone(), r.clone(), t));
                        }
                    }
                    _ => {
                        firsts.insert(*id, ((**command).clone(), r.clone(), t));
                    }
                }
            }
            if !may_drop_leased(&cmd) {
                for k in &leased {
                    prop_assert!(m.object(k).is_some(), "leased {} dropped by {:?}", k, cmd);
                }
            }
            match &r {
                Response::TaskCreated(Ok(id)) => tasks.push(*id),
                Response::Replicas(Ok(list)) => {
                    prop_assert!(!list.replicas.is_empty());
                    prop_assert!(list
                        .replicas
                        .iter()
                        .all(|d| d.status == ReplicaStatus::Complete));
                    prop_assert!(list.lease.is_active(t));
                }
                Response::PutStart(Ok(p)) => {
                    let mut names = H::segment_names(&p.replicas);
                    let n = names.len();
                    names.sort();
                    names.dedup();
                    prop_assert_eq!(names.len(), n, "replicas on distinct segments");
                }
                _ => {}
            }
            responses.push(r);
        }
    }
    Ok((responses, m.metrics()))
}

proptest! {
    #[test]
    fn random_command_sequences_keep_invariants(ops in proptest::collection::vec(op(), 1..150)) {
        run(&ops, AllocationStrategy::Random)?;
    }

    #[test]
    fn other_strategies_keep_invariants_and_replay_identically(
        ops in proptest::collection::vec(op(), 1..100),
        local in any::<bool>(),
    ) {
        let strategy = if local { AllocationStrategy::LocalFirst } else { AllocationStrategy::FreeRatioFirst };
        let a = run(&ops, strategy)?;
        let b = run(&ops, strategy)?;
        prop_assert_eq!(a, b);
    }
}

/// The random sequences reach what they are meant to test: reservations are granted and
/// values are committed from them, among the other operations.
#[test]
fn random_sequences_commit_from_reservations() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut granted, mut committed) = (0, 0);
    for _ in 0..64 {
        let ops = proptest::collection::vec(op(), 100..150)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let (_, metrics) = run(&ops, AllocationStrategy::Random).unwrap();
        granted += metrics.counters.reservations_granted;
        committed += metrics.counters.reserved_puts;
    }
    assert!(
        granted > 20 && committed > 10,
        "granted {granted}, committed {committed}"
    );
}
