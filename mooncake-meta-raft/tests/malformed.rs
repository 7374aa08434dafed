//! Messages no honest member sends, which raft would take at their word (a candidate stepping
//! down to term 0, a follower committing past its log, an election started from outside), are
//! refused by `RaftNode::step` and change nothing.
// raft-rs's protobuf types are built with `Default` and then filled in field by field.
#![allow(clippy::field_reassign_with_default)]

mod common;

use common::Cluster;
use mooncake_meta_raft::raft::prelude::{Entry, MessageType};
use mooncake_meta_raft::Message;

fn message(t: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(t);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

#[test]
fn messages_raft_would_take_at_their_word_are_refused() {
    let mut c = Cluster::new(3);
    let leader = c.wait_leader(&[1, 2, 3]);
    c.propose_and_wait(leader, b"a");
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let f = c.node(follower);
    let (term, commit, last) = (f.term(), f.commit_index(), f.last_index());

    let mut refused = vec![
        // No term: a candidate would step down to term 0.
        message(MessageType::MsgHeartbeat, leader, follower, 0),
        // A commit index past the follower's log.
        {
            let mut m = message(MessageType::MsgHeartbeat, leader, follower, term);
            m.commit = last + 100;
            m
        },
        // Raised inside a node only: an election, a proposal.
        message(MessageType::MsgHup, leader, follower, term),
        message(MessageType::MsgPropose, leader, follower, 0),
        // Entries out of sequence.
        {
            let mut m = message(MessageType::MsgAppend, leader, follower, term);
            m.index = last;
            m.log_term = term;
            let mut e = Entry::default();
            e.index = last + 5;
            e.term = term;
            m.entries = vec![e].into();
            m
        },
    ];
    for m in refused.drain(..) {
        let shown = format!("{:?}", m.get_msg_type());
        let r = c.node_mut(follower).step(m);
        assert!(r.is_err(), "{shown} was stepped");
        let f = c.node(follower);
        assert_eq!(
            (f.term(), f.commit_index(), f.last_index()),
            (term, commit, last),
            "{shown} changed the follower"
        );
    }
    // An acknowledgement of more than the leader's log holds.
    let l = c.node(leader).last_index();
    let mut ack = message(MessageType::MsgAppendResponse, follower, leader, term);
    ack.index = l + 1000;
    assert!(c.node_mut(leader).step(ack).is_err());
    // The group carries on.
    c.propose_and_wait(leader, b"b");
    c.check_prefix_agreement();
}
