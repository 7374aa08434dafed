//! The leader's read lease, in virtual time over the simulated network: a leader in touch with
//! a quorum always holds one; a frozen leader's lease runs out before a successor is elected and
//! is not renewed once it resumes; no node ever holds a lease while another leads a later term.

mod common;

use common::{Cluster, Rng, TICK};

#[test]
fn a_leader_in_touch_with_a_quorum_always_holds_its_lease() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    c.ticks(3);
    for _ in 0..100 {
        c.tick();
        assert!(c.holds_lease(l), "the leader lost its lease");
        for f in [1, 2, 3].into_iter().filter(|&f| f != l) {
            assert!(c.lease_until(f).is_none(), "follower {f} holds a lease");
        }
    }
}

#[test]
fn a_frozen_leader_has_no_lease_once_a_successor_leads_and_gets_none_after_resuming() {
    let mut c = Cluster::new(3);
    let old = c.wait_leader(&[1, 2, 3]);
    c.ticks(3);
    c.propose_and_wait(old, b"before");
    assert!(c.holds_lease(old));
    let frozen_until = c.lease_until(old).unwrap();
    c.freeze(old);
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|&n| n != old).collect();
    let new = c.wait_leader(&others);
    // The lease ran out before the successor was elected: whatever the old leader answered
    // while it held one, no other leader existed then.
    assert!(
        frozen_until <= c.now,
        "the old lease outlived the election by {:?}",
        frozen_until - c.now
    );
    c.propose_and_wait(new, b"after");
    c.ticks(5);
    // Resumed, the old leader still believes it leads until it hears of the new term, but its
    // lease is over, and asking for a renewal at once does not bring one back.
    c.thaw(old);
    assert!(c.node(old).is_leader());
    assert!(!c.holds_lease(old));
    let now = c.now;
    c.node_mut(old).maintain_lease(now, TICK, true);
    assert!(!c.holds_lease(old));
    c.settle();
    assert!(
        !c.node(old).is_leader(),
        "the old leader heard of the new term"
    );
    assert!(c.lease_until(old).is_none());
    assert!(
        c.holds_lease(new) || {
            c.tick();
            c.holds_lease(new)
        }
    );
}

#[test]
fn a_leader_starting_a_transfer_gives_up_its_lease() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    c.ticks(3);
    assert!(c.holds_lease(l));
    let to = if l == 1 { 2 } else { 1 };
    c.node_mut(l).transfer_leader(to);
    assert!(c.lease_until(l).is_none());
    c.settle();
    c.ticks(2);
    assert!(c.node(to).is_leader());
    assert!(!c.holds_lease(l));
}

/// Random freezes, partitions, crashes and restarts: at every step, a node holding a lease
/// leads the latest term any node leads.
#[test]
fn no_lease_ever_overlaps_a_later_leader() {
    for seed in 1..=6u64 {
        let mut c = Cluster::new(3);
        c.rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        c.wait_leader(&[1, 2, 3]);
        let mut rng = Rng(seed);
        let mut leases = 0;
        for step in 0..400 {
            let n = 1 + rng.next() % 3;
            match rng.next() % 40 {
                0 if c.frozen.is_empty() => c.freeze(n),
                1 => {
                    for f in c.frozen.clone() {
                        c.thaw(f);
                    }
                }
                2 => c.isolate(n),
                3 | 4 => c.heal(),
                5 if c.live().len() == 3 && !c.frozen.contains(&n) => c.crash(n),
                6 => {
                    for id in [1, 2, 3] {
                        if c.nodes[&id].is_none() {
                            c.start(id, false);
                        }
                    }
                }
                7 => {
                    if let Some(l) = c.leader() {
                        if !c.frozen.contains(&l) {
                            let _ = c.node_mut(l).propose(format!("{seed}-{step}").as_bytes());
                        }
                    }
                }
                _ => {}
            }
            c.tick();
            let latest = c
                .live()
                .into_iter()
                .filter(|&id| c.node(id).is_leader())
                .map(|id| c.node(id).term())
                .max();
            for id in c.live() {
                if c.holds_lease(id) {
                    leases += 1;
                    let term = c.node(id).term();
                    assert_eq!(
                        Some(term),
                        latest,
                        "seed {seed} step {step}: node {id} holds a lease in term {term} while \
                         a leader of term {latest:?} exists"
                    );
                }
            }
        }
        assert!(
            leases > 100,
            "seed {seed}: leases were held only {leases} times"
        );
    }
}

/// A voter that restarts has forgotten the leader it acknowledged: were it to vote at once, a
/// successor could be elected while the old leader's lease still runs.
#[test]
fn a_restarted_voter_elects_no_one_while_a_lease_it_acknowledged_may_run() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    c.ticks(3);
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|&n| n != l).collect();
    let (f1, f2) = (others[0], others[1]);
    // f2 no longer hears from the leader; f1's acknowledgements keep the lease.
    c.partition(&[l], &[f2]);
    c.ticks(2);
    assert!(c.holds_lease(l));
    // f1 restarts, and the leader's messages to it are late.
    c.crash(f1);
    c.start(f1, false);
    c.isolate(l);
    c.node_mut(f2).campaign().unwrap();
    c.settle();
    assert!(c.holds_lease(l));
    assert!(
        !c.node(f2).is_leader(),
        "elected while the old leader's lease runs"
    );
    // Once that lease is over, the two elect a leader.
    let new = c.wait_leader(&[f1, f2]);
    assert!(!c.holds_lease(l));
    assert!(c.node(new).term() > c.node(l).term());
}
