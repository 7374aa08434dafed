//! Random sequences of proposals, ticks, message loss, partitions and restarts on a simulated
//! three-node group, checking Raft's safety invariants after every step.

mod common;

use std::collections::BTreeSet;

use common::Cluster;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// Propose on node (1-based) if it leads.
    Propose(u64),
    /// Tick every node.
    Tick,
    /// Set the random message loss percentage.
    Loss(u64),
    /// Cut a node off from the others.
    Isolate(u64),
    /// Restore every link.
    Heal,
    /// Crash and restart a node from its data directory.
    Restart(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..=3u64).prop_map(Op::Propose),
        4 => Just(Op::Tick),
        1 => prop_oneof![Just(0u64), Just(10), Just(30)].prop_map(Op::Loss),
        1 => (1..=3u64).prop_map(Op::Isolate),
        1 => Just(Op::Heal),
        1 => (1..=3u64).prop_map(Op::Restart),
    ]
}

fn check(c: &Cluster, last_applied: &mut [u64; 4]) {
    c.check_prefix_agreement();
    // Each node applies in strictly increasing log order.
    for id in 1..=3u64 {
        for a in c.applied.get(&id).into_iter().flatten() {
            assert!(
                a.index > last_applied[id as usize],
                "node {id} applied out of order"
            );
            last_applied[id as usize] = a.index;
        }
    }
}

fn run(ops: Vec<Op>) {
    let mut c = Cluster::with_config(3, |cfg| {
        cfg.snapshot_threshold = 5;
        cfg.snapshot_by_size = false;
    });
    let mut next = 0u32;
    let mut acknowledged: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut last_applied = [0u64; 4];
    for op in ops {
        match op {
            Op::Propose(id) => {
                let data = next.to_le_bytes().to_vec();
                next += 1;
                if c.node_mut(id).propose(&data).is_ok() {
                    c.settle();
                }
            }
            Op::Tick => c.tick(),
            Op::Loss(p) => c.drop_percent = p,
            Op::Isolate(id) => c.isolate(id),
            Op::Heal => c.heal(),
            Op::Restart(id) => {
                c.crash(id);
                c.start(id, false);
                // A new incarnation replays from its snapshot.
                last_applied[id as usize] = c.node(id).applied_index();
                c.applied.remove(&id);
            }
        }
        check(&c, &mut last_applied);
        for (id, applied) in &c.applied {
            let items = c.machines[id].items();
            for a in applied.iter().filter(|a| a.id.is_some()) {
                let pos = u64::from_le_bytes(a.response[..8].try_into().unwrap()) as usize;
                acknowledged.insert(items[pos].clone());
            }
        }
        for v in c.applied.values_mut() {
            v.clear();
        }
    }
    // Heal everything: the group converges and keeps every acknowledged command.
    c.heal();
    c.drop_percent = 0;
    let l = c.wait_leader(&[1, 2, 3]);
    c.propose_and_wait(l, b"final");
    c.ticks(5);
    check(&c, &mut last_applied);
    let reference = c.machines[&l].items();
    for id in 1..=3u64 {
        assert_eq!(
            c.machines[&id].items(),
            reference,
            "node {id} did not converge"
        );
    }
    let have: BTreeSet<Vec<u8>> = reference.into_iter().collect();
    for a in &acknowledged {
        assert!(have.contains(a), "acknowledged command {a:?} was lost");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, max_shrink_iters: 50, ..ProptestConfig::default() })]

    #[test]
    fn raft_invariants_hold(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
