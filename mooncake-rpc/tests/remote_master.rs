//! [`RemoteMaster`] over a group whose leader stops answering: it leaves that leader after one
//! attempt bound, ignores hints that still name it, follows the new leader, and still takes a
//! late answer from a leader that was only slow. Loopback servers that play the members.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_master::{Command, Response, Timestamp};
use mooncake_rpc::rpc::{bind, serve, Handler};
use mooncake_rpc::{MasterApi, MasterReply, MasterRequest, RemoteMaster, RpcClientConfig};

/// A member: answers `NotLeader` naming `hint` for its first `follows_for` requests, then
/// `Applied` with `Count(Ok(mark))`, each after `delay`.
struct Member {
    hint: std::sync::Mutex<Option<String>>,
    follows_for: usize,
    delay: Duration,
    mark: u64,
    seen: AtomicUsize,
}

#[async_trait::async_trait]
impl Handler<MasterRequest, MasterReply> for Member {
    async fn handle(&self, _request: MasterRequest) -> MasterReply {
        let n = self.seen.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        if n < self.follows_for {
            MasterReply::NotLeader {
                leader: self.hint.lock().unwrap().clone(),
            }
        } else {
            MasterReply::Applied {
                now: Timestamp(1),
                response: Response::Count(Ok(self.mark)),
            }
        }
    }
}

async fn start(
    follows_for: usize,
    delay: Duration,
    mark: u64,
) -> (Arc<Member>, String, tokio::task::JoinHandle<()>) {
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let member = Arc::new(Member {
        hint: std::sync::Mutex::new(None),
        follows_for,
        delay,
        mark,
        seen: AtomicUsize::new(0),
    });
    let server = serve(listener, member.clone());
    (member, addr, server)
}

fn remove() -> MasterRequest {
    MasterRequest::Apply(Command::Remove {
        key: "k".into(),
        force: false,
    })
}

/// A call timeout far longer than anything the tests wait for: a call that waited it out
/// would stand out.
fn config() -> RpcClientConfig {
    RpcClientConfig {
        call_timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_left_for_the_next_one() {
    // The old leader never answers (within the test); one follower goes on naming it, the
    // other names it once, then leads.
    let (frozen, frozen_addr, s0) = start(0, Duration::from_secs(3600), 0).await;
    let (stale, stale_addr, s1) = start(usize::MAX, Duration::ZERO, 1).await;
    let (next, next_addr, s2) = start(1, Duration::ZERO, 2).await;
    *stale.hint.lock().unwrap() = Some(frozen_addr.clone());
    *next.hint.lock().unwrap() = Some(frozen_addr.clone());
    let master = RemoteMaster::new(format!("{frozen_addr},{stale_addr},{next_addr}"), config())
        .with_attempt_timeout(Duration::from_millis(500));
    let started = Instant::now();
    let reply = master.call(remove()).await.unwrap();
    assert!(
        matches!(
            reply,
            MasterReply::Applied {
                response: Response::Count(Ok(2)),
                ..
            }
        ),
        "{reply:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the call waited out its timeout on the frozen leader: {:?}",
        started.elapsed()
    );
    assert_eq!(
        master.address(),
        next_addr,
        "calls now go to the new leader"
    );
    assert_eq!(
        frozen.seen.load(Ordering::SeqCst),
        1,
        "the frozen leader had one attempt"
    );
    // The next call goes straight to the new leader.
    let seen = next.seen.load(Ordering::SeqCst);
    master.call(remove()).await.unwrap();
    assert_eq!(next.seen.load(Ordering::SeqCst), seen + 1);
    assert_eq!(frozen.seen.load(Ordering::SeqCst), 1);
    for s in [s0, s1, s2] {
        s.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_is_only_slow_still_gets_its_answer_through() {
    // The leader answers after several attempt bounds; the followers keep naming it.
    let (slow, slow_addr, s0) = start(0, Duration::from_millis(800), 7).await;
    let (f1, f1_addr, s1) = start(usize::MAX, Duration::ZERO, 1).await;
    let (f2, f2_addr, s2) = start(usize::MAX, Duration::ZERO, 1).await;
    *f1.hint.lock().unwrap() = Some(slow_addr.clone());
    *f2.hint.lock().unwrap() = Some(slow_addr.clone());
    let master = RemoteMaster::new(format!("{slow_addr},{f1_addr},{f2_addr}"), config())
        .with_attempt_timeout(Duration::from_millis(100));
    let reply = master.call(remove()).await.unwrap();
    assert!(
        matches!(
            reply,
            MasterReply::Applied {
                response: Response::Count(Ok(7)),
                ..
            }
        ),
        "{reply:?}"
    );
    assert_eq!(master.address(), slow_addr);
    assert!(slow.seen.load(Ordering::SeqCst) >= 1);
    for s in [s0, s1, s2] {
        s.abort();
    }
}
