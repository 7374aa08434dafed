//! A member whose data directory was wiped comes back under the same id: it is refused (it
//! neither votes nor counts in a quorum) until it is removed and added again.

mod common;

use common::{peer, Cluster};
use mooncake_meta_raft::MembershipChange;

/// Runs until the membership change `change` proposed on `leader` is applied there.
fn change(c: &mut Cluster, leader: u64, change: MembershipChange) {
    let pid = c.node_mut(leader).propose_membership(&change).unwrap();
    for _ in 0..100 {
        c.tick();
        if c.applied[&leader].iter().any(|a| a.id == Some(pid)) {
            return;
        }
    }
    panic!("{change:?} was not applied");
}

fn wipe(c: &mut Cluster, id: u64) {
    c.crash(id);
    std::fs::remove_dir_all(c.dir.path().join(format!("n{id}"))).unwrap();
}

#[test]
fn a_wiped_member_is_refused_until_removed_and_added_again() {
    let mut c = Cluster::new(3);
    let l = c.wait_leader(&[1, 2, 3]);
    c.propose_and_wait(l, b"one");
    c.ticks(3);
    // Every member knows every member's incarnation.
    for a in [1, 2, 3] {
        for b in [1, 2, 3] {
            assert_eq!(
                c.node(a).known_incarnation(b),
                Some(c.incarnations[&b]),
                "node {a} about node {b}"
            );
        }
    }
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|&n| n != l).collect();
    let (wiped, m) = (others[0], others[1]);
    let before = c.incarnations[&wiped];
    wipe(&mut c, wiped);
    c.start(wiped, false);
    assert_ne!(c.incarnations[&wiped], before);
    c.ticks(20);
    assert!(
        c.refused
            .iter()
            .any(|(from, _, why)| *from == wiped && why.contains("admin remove")),
        "the wiped member was not refused"
    );
    // With the leader gone, the remaining member and the wiped one elect no one: the wiped one's
    // vote does not count, and it gets none.
    c.crash(l);
    for _ in 0..60 {
        c.tick();
        assert_eq!(
            c.leader(),
            None,
            "a leader was elected with a wiped member's vote"
        );
    }
    // The old leader returns; the group goes on with the two members that kept their logs.
    c.start(l, false);
    let l = c.wait_leader(&[l, m]);
    c.propose_and_wait(l, b"two");
    // Removed, then added again as a joining learner, the member is a member again.
    change(&mut c, l, MembershipChange::Remove(wiped));
    assert_eq!(c.node(l).known_incarnation(wiped), None);
    wipe(&mut c, wiped);
    c.start(wiped, true);
    c.refused.clear();
    change(&mut c, l, MembershipChange::AddLearner(peer(wiped)));
    c.ticks(10);
    change(&mut c, l, MembershipChange::Promote(wiped));
    c.ticks(5);
    assert!(c.refused.is_empty(), "{:?}", c.refused);
    assert_eq!(
        c.node(l).known_incarnation(wiped),
        Some(c.incarnations[&wiped])
    );
    assert_eq!(
        c.machines[&wiped].items(),
        c.machines[&l].items(),
        "the re-added member caught up"
    );
    c.check_prefix_agreement();
}
