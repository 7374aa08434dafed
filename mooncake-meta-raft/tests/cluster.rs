//! Deterministic cluster tests: sans-IO raft nodes over a simulated network, manual ticks, no
//! sleeps.

mod common;

use common::{peer, Cluster};
use mooncake_meta_raft::{Error, KvOp, KvResult, MembershipChange, PeerInfo, ProposalError};

#[test]
fn elects_one_leader_and_replicates() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    for i in 0..20u8 {
        let r = c.propose_and_wait(l, &[i]);
        assert_eq!(r, (i as u64).to_le_bytes());
    }
    c.ticks(3);
    for id in 1..=3 {
        assert_eq!(c.machines[&id].items().len(), 20, "node {id}");
    }
    c.check_prefix_agreement();
}

#[test]
fn followers_refuse_proposals_with_a_leader_hint() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    let f = (1..=3).find(|&i| i != l).unwrap();
    let err = c.node_mut(f).propose(b"x").unwrap_err();
    match err {
        Error::NotLeader { leader: Some(info) } => {
            assert_eq!(info.id, l);
            assert_eq!(info.service_addr, format!("svc:{l}"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn kv_operations_go_through_the_log() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    let pid = c
        .node_mut(l)
        .propose_kv(&KvOp::Put {
            key: "a".into(),
            value: b"1".to_vec(),
        })
        .unwrap();
    c.ticks(2);
    let a = c.applied[&l].iter().find(|a| a.id == Some(pid)).unwrap();
    let KvResult::Put(rev) = postcard::from_bytes(&a.response).unwrap() else {
        panic!()
    };
    for id in 1..=3 {
        assert_eq!(c.node(id).kv().get("a").unwrap().revision, rev);
    }
}

#[test]
fn leader_failure_elects_a_new_leader_that_serves() {
    let mut c = Cluster::new(3);
    let l1 = c.wait_leader(&[1, 2, 3]);
    c.propose_and_wait(l1, b"before");
    c.crash(l1);
    let rest: Vec<u64> = (1..=3).filter(|&i| i != l1).collect();
    let l2 = c.wait_leader(&rest);
    assert_ne!(l1, l2);
    c.propose_and_wait(l2, b"after");
    c.start(l1, false);
    c.ticks(5);
    for id in 1..=3 {
        assert_eq!(
            c.machines[&id].items(),
            vec![b"before".to_vec(), b"after".to_vec()],
            "node {id}"
        );
    }
}

#[test]
fn partitioned_leader_steps_down_and_acknowledges_nothing() {
    let mut c = Cluster::new(5);
    let old = c.wait_leader(&[1, 2, 3, 4, 5]);
    c.propose_and_wait(old, b"a");
    c.isolate(old);
    let pid = c.node_mut(old).propose(b"lost").unwrap();
    let rest: Vec<u64> = (1..=5).filter(|&i| i != old).collect();
    let new = c.wait_leader(&rest);
    // check-quorum: the isolated leader notices within an election timeout.
    c.ticks(25);
    assert!(!c.node(old).is_leader(), "old leader still leads");
    assert!(c.applied[&old].iter().all(|a| a.id != Some(pid)));
    assert!(c.failed[&old]
        .iter()
        .any(|(p, e)| *p == pid && *e == ProposalError::LeadershipLost));
    c.propose_and_wait(new, b"b");
    c.heal();
    c.ticks(10);
    for id in 1..=5 {
        assert_eq!(c.machines[&id].items(), vec![b"a".to_vec(), b"b".to_vec()]);
    }
    c.check_prefix_agreement();
}

#[test]
fn minority_partition_makes_no_progress_and_heals() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    let others: Vec<u64> = (1..=3).filter(|&i| i != l).collect();
    // Leader keeps one follower: majority stays with it.
    c.partition(&[l, others[0]], &[others[1]]);
    c.propose_and_wait(l, b"x");
    c.ticks(30);
    assert!(c.node(l).is_leader());
    assert_eq!(c.machines[&others[1]].items().len(), 0);
    c.heal();
    c.ticks(5);
    assert_eq!(c.machines[&others[1]].items(), vec![b"x".to_vec()]);
}

#[test]
fn lagging_follower_catches_up_by_snapshot() {
    let mut c = Cluster::with_config(3, |cfg| {
        cfg.snapshot_threshold = 10;
        cfg.snapshot_by_size = false;
    });
    let l = c.wait_leader(&[1, 2, 3]);
    let lag = (1..=3).find(|&i| i != l).unwrap();
    c.isolate(lag);
    for i in 0..40u8 {
        c.propose_and_wait(l, &[i]);
    }
    assert!(c.node(l).first_index() > 20, "leader compacted its log");
    c.heal();
    c.ticks(10);
    assert_eq!(c.machines[&lag].items().len(), 40);
    assert!(
        c.node(lag).snapshot_index() > 1,
        "lagging node installed a snapshot"
    );
    c.check_prefix_agreement();
    // And it restarts from that snapshot plus its log.
    c.crash(lag);
    c.start(lag, false);
    c.node_mut(lag).advance().unwrap();
    assert_eq!(c.machines[&lag].items().len(), 40);
}

#[test]
fn membership_add_learner_promote_and_remove_leader() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    c.propose_and_wait(l, b"one");
    c.start(4, true);
    let pid = c
        .node_mut(l)
        .propose_membership(&MembershipChange::AddLearner(peer(4)))
        .unwrap();
    c.ticks(5);
    assert!(c.applied[&l].iter().any(|a| a.id == Some(pid)));
    assert_eq!(c.node(l).membership().1, vec![4]);
    assert_eq!(c.machines[&4].items(), vec![b"one".to_vec()]);
    assert_eq!(c.node(4).peers()[&4].service_addr, "svc:4");
    c.node_mut(l)
        .propose_membership(&MembershipChange::Promote(4))
        .unwrap();
    c.ticks(5);
    let mut voters = c.node(4).membership().0;
    voters.sort_unstable();
    assert_eq!(voters, vec![1, 2, 3, 4]);
    // Asked to remove itself, the leader hands leadership over first and says so; the new
    // leader removes it as a follower.
    let err = c
        .node_mut(l)
        .propose_membership(&MembershipChange::Remove(l))
        .unwrap_err();
    assert!(matches!(err, Error::NotLeader { .. }), "{err:?}");
    c.ticks(5);
    let rest: Vec<u64> = (1..=4).filter(|&i| i != l).collect();
    let new = c.wait_leader(&rest);
    assert_ne!(new, l);
    assert!(!c.node(l).is_removed());
    c.node_mut(new)
        .propose_membership(&MembershipChange::Remove(l))
        .unwrap();
    c.ticks(5);
    assert!(c.node(l).is_removed());
    c.propose_and_wait(new, b"two");
    c.ticks(30);
    assert!(!c.node(l).is_leader());
    for id in rest {
        assert_eq!(
            c.machines[&id].items(),
            vec![b"one".to_vec(), b"two".to_vec()]
        );
    }
}

/// A removal proposed by one leader can be committed by the next, which may be the removed node
/// itself. It must stop leading rather than run outside its configuration (raft-rs 0.7 panics on
/// such a leader's next commit); the remaining voters go on.
#[test]
fn a_leader_that_applies_its_own_removal_steps_down() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    let mut others = (1..=3).filter(|&i| i != l);
    let (b, d) = (others.next().unwrap(), others.next().unwrap());
    c.propose_and_wait(l, b"before");
    c.ticks(2);
    c.node_mut(l)
        .propose_membership(&MembershipChange::Remove(b))
        .unwrap();
    // The removal reaches b only, and l dies before anyone else hears of it.
    let out = c.node_mut(l).advance().unwrap();
    for m in out.messages.into_iter().filter(|m| m.to == b) {
        c.node_mut(b).step(m).unwrap();
    }
    c.node_mut(b).advance().unwrap();
    c.crash(l);
    // b has the longer log, so only b can win; it commits the removal in its own term and
    // stops leading the moment it applies it.
    for _ in 0..60 {
        c.tick();
        if c.node(b).is_removed() {
            break;
        }
    }
    let led = |c: &Cluster, id| c.leaders_by_term.values().any(|&x| x == id);
    assert!(led(&c, b), "b never led: {:?}", c.leaders_by_term);
    assert!(c.node(b).is_removed(), "b did not apply its removal");
    assert!(!c.node(b).is_leader(), "a removed node still leads");
    assert!(matches!(
        c.node_mut(b).propose(b"lost"),
        Err(Error::NotLeader { .. })
    ));
    // With l back, l and d form the group of two that the removal left.
    c.start(l, false);
    let new = c.wait_leader(&[l, d]);
    c.propose_and_wait(new, b"after");
    let mut voters = c.node(new).membership().0;
    voters.sort_unstable();
    let mut want = vec![l, d];
    want.sort_unstable();
    assert_eq!(voters, want);
    c.ticks(3);
    for id in [l, d] {
        assert_eq!(
            c.machines[&id].items(),
            vec![b"before".to_vec(), b"after".to_vec()],
            "node {id}"
        );
    }
    assert!(!c.node(b).is_leader());
}

#[test]
fn membership_changes_that_make_no_sense_are_refused_at_once() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    let refuse = |c: &mut Cluster, change: MembershipChange| -> String {
        match c.node_mut(l).propose_membership(&change) {
            Err(Error::InvalidArgument(m)) => m,
            other => panic!("{change:?} was not refused as invalid: {other:?}"),
        }
    };
    let m = refuse(&mut c, MembershipChange::Remove(9));
    assert!(m.contains("node 9 is not a member"), "{m}");
    let m = refuse(&mut c, MembershipChange::Promote(9));
    assert!(m.contains("node 9 is not a learner"), "{m}");
    let m = refuse(&mut c, MembershipChange::Promote(2));
    assert!(m.contains("already a voter"), "{m}");
    let m = refuse(&mut c, MembershipChange::AddLearner(peer(2)));
    assert!(m.contains("node 2 is already a voter"), "{m}");
    let clash = PeerInfo {
        id: 5,
        raft_addr: "sim:1".into(),
        service_addr: "svc:5".into(),
    };
    let m = refuse(&mut c, MembershipChange::AddLearner(clash));
    assert!(m.contains("already used by node 1"), "{m}");

    // A learner that never started has nothing replicated: promoting it would only weaken the
    // quorum.
    c.node_mut(l)
        .propose_membership(&MembershipChange::AddLearner(peer(4)))
        .unwrap();
    c.ticks(3);
    assert_eq!(c.node(l).membership().1, vec![4]);
    let m = refuse(&mut c, MembershipChange::Promote(4));
    assert!(m.contains("learner 4 has received nothing"), "{m}");
    let m = refuse(&mut c, MembershipChange::AddLearner(peer(4)));
    assert!(m.contains("node 4 is already a learner"), "{m}");

    // One change at a time.
    c.node_mut(l)
        .propose_membership(&MembershipChange::Remove(4))
        .unwrap();
    let other = (1..=3).find(|&i| i != l).unwrap();
    match c
        .node_mut(l)
        .propose_membership(&MembershipChange::Remove(other))
    {
        Err(Error::ProposalDropped(m)) => assert!(m.contains("still being applied"), "{m}"),
        x => panic!("a second pending change was not refused: {x:?}"),
    }
    c.ticks(3);
    assert!(c.node(l).membership().1.is_empty());
    let members = c.node(l).members();
    assert_eq!(members.leader, Some(l));
    assert_eq!(
        members.voters.iter().map(|p| p.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(members.voters[0], peer(1));
    assert!(members.matched[&other] >= 1);

    // The last voter cannot leave.
    let mut one = Cluster::new(1);
    one.wait_leader(&[1]);
    let m = match one
        .node_mut(1)
        .propose_membership(&MembershipChange::Remove(1))
    {
        Err(Error::InvalidArgument(m)) => m,
        x => panic!("removing the last voter was not refused: {x:?}"),
    };
    assert!(m.contains("last voter"), "{m}");
}

#[test]
fn node_restarts_from_disk() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    for i in 0..5u8 {
        c.propose_and_wait(l, &[i]);
    }
    c.ticks(2);
    let f = (1..=3).find(|&i| i != l).unwrap();
    c.crash(f);
    c.start(f, false);
    // Replayed from its own log before hearing from anyone.
    c.node_mut(f).advance().unwrap();
    assert_eq!(c.machines[&f].items().len(), 5);
    c.propose_and_wait(l, b"x");
    c.ticks(2);
    assert_eq!(c.machines[&f].items().len(), 6);
}

#[test]
fn whole_group_restart_keeps_every_committed_entry() {
    let mut c = Cluster::with_config(3, |cfg| {
        cfg.snapshot_threshold = 7;
        cfg.snapshot_by_size = false;
    });
    let l = c.wait_leader(&[1, 2, 3]);
    for i in 0..20u8 {
        c.propose_and_wait(l, &[i]);
    }
    let committed = c.machines[&l].items();
    for id in 1..=3 {
        c.crash(id);
    }
    for id in 1..=3 {
        c.start(id, false);
    }
    let l2 = c.wait_leader(&[1, 2, 3]);
    c.propose_and_wait(l2, b"after");
    c.ticks(3);
    for id in 1..=3 {
        let items = c.machines[&id].items();
        assert_eq!(items[..20], committed[..], "node {id}");
        assert_eq!(items.len(), 21);
    }
}

fn wal_path(c: &Cluster, id: u64) -> std::path::PathBuf {
    c.dir.path().join(format!("n{id}")).join("raft.wal")
}

#[test]
fn torn_tail_past_commit_is_dropped_with_a_warning() {
    let mut c = Cluster::new(1);
    let l = c.wait_leader(&[1]);
    c.propose_and_wait(l, b"kept");
    c.crash(1);
    // Append half of a record, as a crash during a write would leave it.
    let path = wal_path(&c, 1);
    let mut bytes = std::fs::read(&path).unwrap();
    let good_len = bytes.len() as u64;
    bytes.extend_from_slice(&[200, 0, 0, 0, 1, 2, 3, 4, 5]);
    std::fs::write(&path, &bytes).unwrap();
    c.start(1, false);
    assert_eq!(c.node(1).recovery().dropped_tail, Some((good_len, 9)));
    c.node_mut(1).advance().unwrap();
    assert_eq!(c.machines[&1].items(), vec![b"kept".to_vec()]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), good_len);
}

#[test]
fn truncated_committed_entries_are_a_hard_error() {
    let mut c = Cluster::new(1);
    let l = c.wait_leader(&[1]);
    for i in 0..10u8 {
        c.propose_and_wait(l, &[i; 100]);
    }
    c.crash(1);
    let path = wal_path(&c, 1);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let err = c.try_start(1).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Corrupt { .. }), "{msg}");
    assert!(
        msg.contains("committed") && msg.contains("raft.wal"),
        "{msg}"
    );
}

#[test]
fn flipped_byte_in_the_middle_is_a_hard_error() {
    let mut c = Cluster::new(1);
    let l = c.wait_leader(&[1]);
    for i in 0..10u8 {
        c.propose_and_wait(l, &[i; 100]);
    }
    c.crash(1);
    let path = wal_path(&c, 1);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let err = c.try_start(1).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("corrupt") && msg.contains("offset"), "{msg}");
}

#[test]
fn flipped_byte_in_the_committed_last_record_is_a_hard_error() {
    let mut c = Cluster::new(1);
    let l = c.wait_leader(&[1]);
    c.propose_and_wait(l, &[7; 100]);
    c.crash(1);
    let path = wal_path(&c, 1);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let err = c.try_start(1).unwrap_err();
    assert!(err.to_string().contains("committed"), "{err}");
}

#[test]
fn snapshots_wait_for_the_log_to_weigh_as_much_as_the_last_one() {
    for by_size in [true, false] {
        let mut c = if by_size {
            Cluster::with_config(3, |cfg| cfg.snapshot_threshold = 5)
        } else {
            Cluster::with_config(3, |cfg| {
                cfg.snapshot_threshold = 5;
                cfg.snapshot_by_size = false;
            })
        };
        let l = c.wait_leader(&[1, 2, 3]);
        // A large state: the first snapshot weighs more than 8 KB.
        for i in 0..8u8 {
            c.propose_and_wait(l, &[i; 1024]);
        }
        let first = c.node(l).snapshot_index();
        assert!(first > 1, "no first snapshot");
        // Small entries: the bytes left over from the large ones may still add up to one more
        // snapshot, then, with the size rule, no more: 60 small entries are not worth
        // serializing the whole state again.
        for i in 0..60u8 {
            c.propose_and_wait(l, &[i]);
        }
        let settled = c.node(l).snapshot_index();
        assert!(settled >= first);
        for i in 0..60u8 {
            c.propose_and_wait(l, &[i]);
        }
        let after_small = c.node(l).snapshot_index();
        if by_size {
            assert_eq!(after_small, settled, "snapshot taken for 60 bytes of log");
        } else {
            assert!(after_small > settled, "entry count alone should snapshot");
        }
        // Once the log weighs as much as the state, the next snapshot comes.
        for i in 0..12u8 {
            c.propose_and_wait(l, &[i; 1024]);
        }
        assert!(
            c.node(l).snapshot_index() > after_small,
            "no snapshot after 12 KB"
        );
        c.check_prefix_agreement();
    }
}

#[test]
fn a_learner_far_behind_is_promoted_only_once_it_caught_up() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    c.start(4, true);
    c.node_mut(l)
        .propose_membership(&MembershipChange::AddLearner(peer(4)))
        .unwrap();
    c.ticks(5);
    assert_eq!(c.node(l).membership().1, vec![4]);
    c.isolate(4);
    for i in 0..=mooncake_meta_raft::node::PROMOTE_MAX_LAG + 10 {
        c.node_mut(l).propose(&i.to_le_bytes()).unwrap();
        if i % 200 == 0 {
            c.ticks(1);
        }
    }
    c.ticks(5);
    match c
        .node_mut(l)
        .propose_membership(&MembershipChange::Promote(4))
    {
        Err(Error::InvalidArgument(m)) => {
            assert!(
                m.contains("learner 4 is") && m.contains("entries behind"),
                "{m}"
            )
        }
        other => panic!("a lagging learner was not refused: {other:?}"),
    }
    c.heal();
    c.ticks(20);
    c.node_mut(l)
        .propose_membership(&MembershipChange::Promote(4))
        .unwrap();
    c.ticks(5);
    let mut voters = c.node(l).membership().0;
    voters.sort_unstable();
    assert_eq!(voters, vec![1, 2, 3, 4], "caught up, then promoted");
    c.check_prefix_agreement();
}
