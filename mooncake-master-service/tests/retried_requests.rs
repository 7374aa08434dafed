//! A state change whose answer is lost with its leader: the client's retry at the next leader
//! is answered with the first attempt's outcome. In virtual time, over the in-memory group of
//! `sim/mod.rs`: the leader applies the command (the log replicated it to every member), then
//! loses leadership before its answer leaves, and the client's group view sends the same
//! request to the new leader.

mod sim;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use mooncake_core::{Error, ErrorCode, Result};
use mooncake_master::{Command, MasterConfig};
use mooncake_master_service::MasterGroup;
use mooncake_rpc::{apply_via, MasterApi, MasterReply, MasterRequest};
use mooncake_store::ReplicateConfig;

use sim::{value, Cluster, SimLog};

const SEGMENT: u64 = 16 << 20;

/// A member whose answer to the first command `matches` accepts is lost: the command is
/// applied, then the member loses leadership to `successor` and the caller sees `RPC_FAIL`, as
/// from a leader that died before replying.
struct DiesBeforeReplying {
    inner: Arc<dyn MasterApi>,
    log: Arc<SimLog>,
    successor: usize,
    matches: fn(&Command) -> bool,
    /// What the lost answer was.
    lost: Mutex<Option<MasterReply>>,
    armed: AtomicUsize,
}

impl std::fmt::Debug for DiesBeforeReplying {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiesBeforeReplying")
    }
}

#[async_trait]
impl MasterApi for DiesBeforeReplying {
    async fn call(&self, request: MasterRequest) -> Result<MasterReply> {
        let target = matches!(&request, MasterRequest::Apply(c) if (self.matches)(c.inner()));
        if !target || self.armed.load(Ordering::SeqCst) == 0 {
            return self.inner.call(request).await;
        }
        self.armed.fetch_sub(1, Ordering::SeqCst);
        let reply = self.inner.call(request).await?;
        *self.lost.lock().unwrap() = Some(reply);
        self.log.elect(self.successor);
        Err(Error::with_code(
            ErrorCode::RPC_FAIL,
            "the leader died before its answer left",
        ))
    }
    fn session(&self) -> u64 {
        self.inner.session()
    }
    fn note_landed(
        &self,
        reporter: mooncake_master::ClientId,
        segment: &str,
        ranges: &[(u64, u64)],
    ) -> bool {
        self.inner.note_landed(reporter, segment, ranges)
    }
}

/// A group view whose member 0 (the first leader) dies before answering the first command
/// `matches` accepts; member 1 takes over.
fn group_dying_on(
    cluster: &Cluster,
    matches: fn(&Command) -> bool,
) -> (Arc<MasterGroup>, Arc<DiesBeforeReplying>) {
    let first = Arc::new(DiesBeforeReplying {
        inner: cluster.masters[0].clone(),
        log: cluster.log.clone(),
        successor: 1,
        matches,
        lost: Mutex::new(None),
        armed: AtomicUsize::new(1),
    });
    let mut members: Vec<(String, Arc<dyn MasterApi>)> =
        vec![(cluster.addrs[0].clone(), first.clone())];
    for i in 1..cluster.masters.len() {
        members.push((cluster.addrs[i].clone(), cluster.masters[i].clone()));
    }
    (Arc::new(MasterGroup::new(members).unwrap()), first)
}

#[tokio::test(start_paused = true)]
async fn a_remove_applied_before_its_leader_died_reports_success_on_the_next_leader() {
    let cluster = Cluster::start(3, MasterConfig::default(), Duration::from_secs(1));
    let (group, first) = group_dying_on(&cluster, |c| matches!(c, Command::Remove { .. }));
    let a = cluster.client("node-a", group.clone(), SEGMENT).await;
    let rc = ReplicateConfig::default();
    a.put("k", &value(1, 4096), &rc).await.unwrap();
    a.put("j", &value(2, 4096), &rc).await.unwrap();

    a.remove("k", true).await.unwrap();
    match first.lost.lock().unwrap().as_ref() {
        Some(MasterReply::Applied { response, .. }) => assert_eq!(
            *response,
            mooncake_master::Response::Unit(Ok(())),
            "the first attempt was applied"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        group.current(),
        "master-1",
        "the retry went to the new leader"
    );
    assert!(!a.is_exist("k").await.unwrap());
    assert_eq!(
        cluster.masters[1]
            .metrics()
            .counters
            .requests_answered_again,
        1,
        "the new leader answered the retry from memory"
    );
    assert_eq!(cluster.masters[1].metrics().counters.removes, 1);

    // The same loss for a command sent without an id (as an older client sends it): applied
    // again on the new leader, it answers "not found" although the remove succeeded.
    first.armed.store(1, Ordering::SeqCst);
    cluster.log.elect(0);
    let old_client = apply_via(
        &*group,
        Command::Remove {
            key: "j".into(),
            force: true,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        old_client.1,
        mooncake_master::Response::Unit(Err(ErrorCode::OBJECT_NOT_FOUND))
    );
    a.close().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn retried_batch_removes_upserts_and_copies_report_their_first_outcome() {
    let cluster = Cluster::start(3, MasterConfig::default(), Duration::from_secs(1));
    let rc = ReplicateConfig::default();

    let (group, _) = group_dying_on(&cluster, |c| matches!(c, Command::BatchRemove { .. }));
    let a = cluster.client("node-a", group.clone(), SEGMENT).await;
    let b = cluster.client("node-b", cluster.group(), SEGMENT).await;
    a.put("x", &value(1, 4096), &rc).await.unwrap();
    a.put("y", &value(2, 4096), &rc).await.unwrap();
    let out = a.batch_remove(&["x", "y", "none"], true).await.unwrap();
    let codes: Vec<_> = out
        .iter()
        .map(|r| r.as_ref().err().map(Error::code))
        .collect();
    assert_eq!(codes, [None, None, Some(ErrorCode::OBJECT_NOT_FOUND)]);
    assert_eq!(group.current(), "master-1");

    // An upsert whose commit (PutEnd) answer is lost: the retry reports the commit.
    cluster.log.elect(0);
    let (group, first) = group_dying_on(&cluster, |c| {
        matches!(c, Command::PutEnd { .. } | Command::PutEndChecked { .. })
    });
    let c = cluster.client("node-c", group.clone(), SEGMENT).await;
    c.upsert("u", &value(3, 4096), &rc).await.unwrap();
    assert!(
        first.lost.lock().unwrap().is_some(),
        "the commit's answer was lost"
    );
    assert_eq!(group.current(), "master-1");
    assert_eq!(b.get("u").await.unwrap(), value(3, 4096));

    // A copy task submitted once though its answer was lost.
    cluster.log.elect(0);
    let (group, first) = group_dying_on(&cluster, |c| matches!(c, Command::CreateCopyTask { .. }));
    let d = cluster.client("node-d", group.clone(), SEGMENT).await;
    d.put("v", &value(5, 4096), &rc).await.unwrap();
    // To a segment that does not hold the value.
    let holder = d.get_replica_desc("v").await.unwrap()[0]
        .memory()
        .unwrap()
        .segment_name
        .clone();
    let target = [&b, &d]
        .iter()
        .map(|s| s.hostname().to_owned())
        .find(|h| *h != holder)
        .unwrap();
    let task = d.create_copy_task("v", &[target]).await;
    let created = match first.lost.lock().unwrap().as_ref() {
        Some(MasterReply::Applied { response, .. }) => response.clone().into_task_id(),
        other => panic!("{other:?}"),
    };
    assert!(created.is_ok(), "{created:?}");
    assert_eq!(
        task.map_err(|e| e.code()),
        created,
        "the retry reports the task created first"
    );
    assert_eq!(cluster.masters[1].metrics().counters.tasks_created, 1);
    for s in [a, b, c, d] {
        s.close().await.unwrap();
    }
}
