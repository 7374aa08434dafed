//! [`MasterGroup`]: the members of a master group in this process, as one [`MasterApi`] that
//! follows the leader, the in-process counterpart of [`RemoteMaster`](mooncake_rpc::RemoteMaster)
//! over several addresses.
//!
//! A store client handed a `MasterGroup` (with `Store::setup_with_master` or
//! `Store::setup_with_engine` of `mooncake-store`) talks to the members' [`MasterService`]s by function calls: a
//! follower's [`MasterReply::NotLeader`] names the leader, and the call goes there. With the
//! in-memory transport and a virtual clock this runs a whole cluster in one test, without
//! sockets or real sleeps.
//!
//! [`MasterService`]: crate::service::MasterService

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use mooncake_core::{Error, ErrorCode, Result};

use mooncake_rpc::{MasterApi, MasterReply, MasterRequest};

/// See the module docs.
#[derive(Debug)]
pub struct MasterGroup {
    /// Each member's service address (what `NotLeader` hints name) and the member.
    members: Vec<(String, Arc<dyn MasterApi>)>,
    /// The member calls go to first: the last that answered.
    current: AtomicUsize,
    /// Bumped whenever `current` changes: answers of two sessions may come from two states.
    session: AtomicU64,
}

impl MasterGroup {
    /// How long a call keeps looking for a leader before it fails (as for a remote group).
    pub const FAILOVER_WINDOW: Duration = Duration::from_secs(10);

    /// A group of `members`, each under the service address its peers hint at. Calls go to the
    /// first member until it redirects them.
    pub fn new(members: Vec<(String, Arc<dyn MasterApi>)>) -> Result<Self> {
        if members.is_empty() {
            return Err(Error::InvalidArgument(
                "a master group needs at least one member".into(),
            ));
        }
        Ok(MasterGroup {
            members,
            current: AtomicUsize::new(0),
            session: AtomicU64::new(1),
        })
    }

    /// The address of the member calls go to first.
    pub fn current(&self) -> &str {
        &self.members[self.current.load(Ordering::Relaxed)].0
    }

    fn index_of(&self, address: &str) -> Option<usize> {
        self.members.iter().position(|(a, _)| a == address)
    }

    fn settle_on(&self, i: usize) {
        if self.current.swap(i, Ordering::Relaxed) != i {
            self.session.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl MasterApi for MasterGroup {
    async fn call(&self, request: MasterRequest) -> Result<MasterReply> {
        let n = self.members.len();
        let mut i = self.current.load(Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + Self::FAILOVER_WINDOW;
        let mut tried = 0;
        loop {
            let next = match self.members[i].1.call(request.clone()).await {
                Ok(MasterReply::NotLeader { leader }) => leader
                    .as_deref()
                    .and_then(|l| self.index_of(l))
                    .filter(|&l| l != i)
                    .unwrap_or((i + 1) % n),
                Ok(reply) => {
                    self.settle_on(i);
                    return Ok(reply);
                }
                Err(e)
                    if matches!(e.code(), ErrorCode::RPC_FAIL | ErrorCode::RPC_TIMEOUT)
                        && n > 1 =>
                {
                    tracing::debug!("master {} unavailable: {e}", self.members[i].0);
                    (i + 1) % n
                }
                Err(e) => return Err(e),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::with_code(
                    ErrorCode::RPC_FAIL,
                    format!(
                        "no leader among {n} masters within {:?}",
                        Self::FAILOVER_WINDOW
                    ),
                ));
            }
            tried += 1;
            if tried % n == 0 {
                // A whole round without a leader: an election is probably under way.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            i = next;
        }
    }

    fn session(&self) -> u64 {
        self.session.load(Ordering::Relaxed)
    }

    fn note_landed(
        &self,
        reporter: mooncake_master::ClientId,
        segment: &str,
        ranges: &[(u64, u64)],
    ) -> bool {
        self.members[self.current.load(Ordering::Relaxed)]
            .1
            .note_landed(reporter, segment, ranges)
    }
}
