//! Three real `RaftMetadataStore`s over loopback TCP: election, serving through the leader,
//! leader loss, restart from the data directory and catch-up.

mod common;

use std::time::Duration;

use common::{config, free_port, leader_of, ListMachine, TempDir};
use mooncake_core::{CommandLog, ErrorCode, Leadership, MetadataStore};
use mooncake_meta_raft::{leader_hint, Error, PeerInfo, RaftMetadataStore, StateRole};

async fn wait_len(m: &ListMachine, n: usize) {
    for _ in 0..500 {
        if m.items().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("machine has {} items, wanted {n}", m.items().len());
}

async fn wait_value(store: &RaftMetadataStore, key: &str, want: &[u8]) {
    let mut seen = None;
    for _ in 0..500 {
        seen = store.get(key).await.unwrap().map(|v| v.value);
        if seen.as_deref() == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{key} is {seen:?}, wanted {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_tcp_survive_leader_loss() {
    tokio::time::timeout(Duration::from_secs(60), scenario())
        .await
        .expect("socket test timed out");
}

async fn scenario() {
    let dir = TempDir::new("tcp");
    let voters: Vec<PeerInfo> = (1..=3)
        .map(|id| PeerInfo {
            id,
            raft_addr: format!("127.0.0.1:{}", free_port()),
            service_addr: format!("127.0.0.1:{}", 50_000 + id),
        })
        .collect();
    let machines: Vec<ListMachine> = (0..3).map(|_| ListMachine::default()).collect();
    let mut stores: Vec<Option<RaftMetadataStore>> = Vec::new();
    for id in 1..=3u64 {
        let m = machines[(id - 1) as usize].clone();
        stores.push(Some(
            RaftMetadataStore::start(config(&dir, id, &voters), Box::new(m))
                .await
                .unwrap(),
        ));
    }
    let l = leader_of(&stores).await;
    let leader = stores[l].as_ref().unwrap();
    for i in 0..10u64 {
        let r = leader.apply_command(vec![i as u8]).await.unwrap();
        assert_eq!(r, i.to_le_bytes());
    }
    let rev = leader.put("k/a", b"1".to_vec()).await.unwrap();
    assert_eq!(leader.get("k/a").await.unwrap().unwrap().revision, rev);
    assert_eq!(
        leader
            .compare_and_swap("k/a", rev, Some(b"2".to_vec()))
            .await
            .unwrap(),
        Some(rev + 1)
    );
    assert_eq!(leader.list("k/").await.unwrap().len(), 1);

    // A follower refuses with the leader's service address.
    let f = (0..3).find(|&i| i != l).unwrap();
    let follower = stores[f].as_ref().unwrap();
    for _ in 0..100 {
        if follower.leader().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let err = follower.apply_command(vec![99]).await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS);
    assert_eq!(
        leader_hint(&err),
        Some(Some(voters[l].service_addr.clone()))
    );
    // The same through the CommandLog and LogGroup traits the master service uses.
    let hint = Some(voters[l].service_addr.clone());
    assert_eq!(
        leader.leadership(),
        Leadership::Leader {
            term: leader.status().term
        }
    );
    assert_eq!(
        follower.leadership(),
        Leadership::Follower {
            leader_hint: hint.clone()
        }
    );
    assert_eq!(follower.not_leader_hint(&err), Some(hint));
    assert_eq!(
        follower.not_leader_hint(&mooncake_core::Error::Shutdown),
        None
    );
    let members = follower.group().unwrap().members().await.unwrap();
    assert_eq!(members.answered_by, voters[f].id);
    assert_eq!(members.leader, Some(voters[l].id));
    assert_eq!(members.members.len(), 3);
    assert!(members.members.iter().all(|m| m.voter));
    wait_len(&machines[f], 10).await;
    // Follower reads are served from its applied state, which may trail the leader's commit.
    wait_value(follower, "k/a", b"2").await;

    // Kill the leader: a new one is elected and serves.
    let old = stores[l].take().unwrap();
    let mut watch = stores[f].as_ref().unwrap().subscribe();
    old.shutdown().await;
    drop(old);
    let l2 = leader_of(&stores).await;
    assert_ne!(l2, l);
    watch
        .wait_for(|s| s.leader.as_ref().is_some_and(|x| x.id == (l2 + 1) as u64))
        .await
        .unwrap();
    for i in 10..20u64 {
        let r = stores[l2]
            .as_ref()
            .unwrap()
            .apply_command(vec![i as u8])
            .await
            .unwrap();
        assert_eq!(r, i.to_le_bytes());
    }

    // Restart the old leader from its data directory: it catches up.
    let m = ListMachine::default();
    stores[l] = Some(
        RaftMetadataStore::start(config(&dir, (l + 1) as u64, &voters), Box::new(m.clone()))
            .await
            .unwrap(),
    );
    wait_len(&m, 20).await;
    assert_eq!(m.items(), machines[l2].items());
    for s in stores.iter().flatten() {
        s.shutdown().await;
    }
}

/// A fourth node started in join mode over real sockets: added as a learner, caught up by
/// snapshot, promoted; then the leader is removed (handing over first) and the remaining three
/// keep committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_is_added_promoted_and_the_leader_removed_over_tcp() {
    tokio::time::timeout(Duration::from_secs(60), join_scenario())
        .await
        .expect("socket join test timed out");
}

async fn join_scenario() {
    let dir = TempDir::new("tcp-join");
    let book: Vec<PeerInfo> = (1..=4)
        .map(|id| PeerInfo {
            id,
            raft_addr: format!("127.0.0.1:{}", free_port()),
            service_addr: format!("127.0.0.1:{}", 50_000 + id),
        })
        .collect();
    let voters = &book[..3];
    let machines: Vec<ListMachine> = (0..4).map(|_| ListMachine::default()).collect();
    let mut stores: Vec<Option<RaftMetadataStore>> = Vec::new();
    for id in 1..=3u64 {
        let m = machines[(id - 1) as usize].clone();
        stores.push(Some(
            RaftMetadataStore::start(config(&dir, id, voters), Box::new(m))
                .await
                .unwrap(),
        ));
    }
    let l = leader_of(&stores).await;
    for i in 0..10u8 {
        stores[l]
            .as_ref()
            .unwrap()
            .apply_command(vec![i])
            .await
            .unwrap();
    }

    // The joining node knows the members' addresses (and its own) but is not a voter: it
    // bootstraps nothing and waits.
    let mut join = config(&dir, 4, &book);
    join.node.join = true;
    let joiner = RaftMetadataStore::start(join, Box::new(machines[3].clone()))
        .await
        .unwrap();
    stores.push(Some(joiner));
    let leader = stores[l].as_ref().unwrap();
    leader.add_learner(book[3].clone()).await.unwrap();
    wait_len(&machines[3], 10).await;
    let mut members = leader.members().await.unwrap();
    assert_eq!(members.learners, vec![book[3].clone()]);
    for _ in 0..500 {
        if members.matched[&4] > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        members = leader.members().await.unwrap();
    }
    assert!(
        members.matched[&4] > 0,
        "the leader never heard from 4: {members:?}"
    );
    leader.promote(4).await.unwrap();
    let members = leader.members().await.unwrap();
    assert_eq!(members.voters.len(), 4, "{members:?}");
    // The new voter applies its promotion too.
    let joined = stores[3].as_ref().unwrap();
    for _ in 0..500 {
        if joined.members().await.unwrap().voters.len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(joined.members().await.unwrap().voters, book);
    let err = leader.promote(4).await.unwrap_err();
    assert!(err.to_string().contains("already a voter"), "{err}");

    // Asked to remove itself, the leader hands leadership over and names the new leader, which
    // removes it.
    let old = (l + 1) as u64;
    let mut new = match leader.remove_node(old).await {
        Err(Error::NotLeader { leader: Some(info) }) => (info.id - 1) as usize,
        other => panic!("the leader did not hand over before its removal: {other:?}"),
    };
    assert_ne!(new, l);
    assert!(!leader.is_leader());
    // The named successor may still be winning its election (or lose it to another member on
    // a slow machine): follow NotLeader answers, within a bound.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match stores[new].as_ref().unwrap().remove_node(old).await {
            Ok(()) => break,
            Err(Error::NotLeader { leader }) if std::time::Instant::now() < deadline => {
                if let Some(info) = leader.filter(|i| i.id != old) {
                    new = (info.id - 1) as usize;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("removing {old} at the new leader: {e}"),
        }
    }
    let members = stores[new].as_ref().unwrap().members().await.unwrap();
    let ids: Vec<u64> = members.voters.iter().map(|p| p.id).collect();
    assert!(!ids.contains(&old) && ids.len() == 3, "{members:?}");
    // The removed node is gone for good: stop it, and the three left still commit.
    let removed = stores[l].take().unwrap();
    for _ in 0..500 {
        if removed.members().await.unwrap().voters.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = removed.status();
    assert_ne!(status.role, StateRole::Leader, "{status:?}");
    removed.shutdown().await;
    for i in 10..20u8 {
        stores[new]
            .as_ref()
            .unwrap()
            .apply_command(vec![i])
            .await
            .unwrap();
    }
    for (i, m) in machines.iter().enumerate() {
        if i != l {
            wait_len(m, 20).await;
            assert_eq!(m.items(), machines[new].items(), "node {}", i + 1);
        }
    }
    for s in stores.iter().flatten() {
        s.shutdown().await;
    }
}
