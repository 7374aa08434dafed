//! Where cluster metadata lives: two traits, often implemented by one store.
//!
//! - [`MetadataStore`]: keys and values with a revision number per key (transfer-engine segment
//!   descriptors under [`segment_key`], the P2P store's catalog with compare-and-swap), so
//!   callers can do optimistic concurrency without a lock service;
//! - [`CommandLog`]: a command log driving a [`StateMachine`] (the store master): every state
//!   change is a command the log orders and applies, so a replicated log (Raft) replicates the
//!   master without the master knowing. The log also says who may append to it
//!   ([`Leadership`]), and a replicated one may let its membership be changed ([`LogGroup`]).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::Result;

/// A deterministic state machine whose commands a [`CommandLog`] orders and applies.
///
/// `apply` must depend only on the state and the command bytes (time and randomness travel
/// inside the command or the state), so every replica of a replicated store ends in the same
/// state.
pub trait StateMachine: Send + 'static {
    /// Applies one encoded command and returns the encoded response.
    fn apply(&mut self, command: &[u8]) -> Vec<u8>;

    /// The whole state, encoded, for log compaction and for catching up lagging replicas.
    fn snapshot(&self) -> Result<Vec<u8>>;

    /// Replaces the state with a snapshot taken by [`snapshot`](Self::snapshot). On error the
    /// state is unchanged.
    fn restore(&mut self, snapshot: &[u8]) -> Result<()>;
}

/// A value and the revision at which it was last written. Revisions grow across the whole store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    /// The bytes.
    pub value: Vec<u8>,
    /// Store-wide revision of the last write of this key (never 0).
    pub revision: u64,
}

/// A key-value store for cluster metadata with per-key revisions.
#[async_trait]
pub trait MetadataStore: Send + Sync + std::fmt::Debug {
    /// Reads a key.
    async fn get(&self, key: &str) -> Result<Option<Versioned>>;

    /// Writes a key unconditionally and returns its new revision.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64>;

    /// Deletes a key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool>;

    /// Writes `value` (or deletes the key when `value` is `None`) only if the key's revision is
    /// `expected` (`0`: the key must not exist). Returns the new revision, or `None` when the
    /// revision did not match and nothing was written.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Option<Vec<u8>>,
    ) -> Result<Option<u64>>;

    /// All keys starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>>;
}

/// Who may append to a [`CommandLog`], as this member sees it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Leadership {
    /// The log is not replicated: this member always appends, and there are no terms.
    Standalone,
    /// This member leads its group in `term`: it appends, and its state is the group's.
    Leader {
        /// The leader's term; a new term means a new leader took over (possibly this one again).
        term: u64,
    },
    /// Another member leads (or none is elected yet): appending fails, callers should go to
    /// the leader.
    Follower {
        /// The leader's client-facing service address, when this member knows it.
        leader_hint: Option<String>,
    },
}

/// An ordered log of opaque commands applied to an attached [`StateMachine`]: an in-memory log
/// for a single master, a replicated one (Raft) for a group. The log never decodes commands.
#[async_trait]
pub trait CommandLog: Send + Sync + std::fmt::Debug {
    /// Orders `command`, applies it to the attached [`StateMachine`] and returns the response.
    /// On a member that does not lead, fails without applying anything (see
    /// [`not_leader_hint`](Self::not_leader_hint)).
    async fn apply_command(&self, command: Vec<u8>) -> Result<Vec<u8>>;

    /// Who may append now. Cheap: callers ask on every request.
    fn leadership(&self) -> Leadership;

    /// When `error` (from [`apply_command`](Self::apply_command) or a [`LogGroup`] call) says
    /// this member does not lead and nothing was applied: `Some` with the leader's service
    /// address if known, so the caller can redirect its client. `None` for any other error.
    fn not_leader_hint(&self, error: &crate::Error) -> Option<Option<String>> {
        let _ = error;
        None
    }

    /// Whether this member may answer a read from its applied state right now, without a log
    /// round trip. Cheap (callers ask on every read). Check it *after* reading the state: a
    /// `true` then means no other member could have committed anything meanwhile.
    ///
    /// A log that is not replicated always may (the default). A replicated log says `true` only
    /// while this member leads under a lease that no successor can be elected within, measured
    /// on a monotonic clock from a quorum's acknowledgement, so a leader that was paused
    /// (`SIGSTOP`, a stall) or whose log stopped answers no read from its frozen state.
    fn holds_read_lease(&self) -> bool {
        true
    }

    /// Waits until [`holds_read_lease`](Self::holds_read_lease) is `true`, asking the group to
    /// acknowledge this member's leadership, or fails with an error that
    /// [`not_leader_hint`](Self::not_leader_hint) recognises when this member does not lead or
    /// got no acknowledgement within an election timeout (its clients should look elsewhere).
    async fn acquire_read_lease(&self) -> Result<()> {
        Ok(())
    }

    /// How long past its election a new leader must assume its predecessor may still be
    /// serving (it has not noticed it was deposed yet). Zero for a log that is not replicated.
    fn takeover_grace(&self) -> Duration {
        Duration::ZERO
    }

    /// The membership of the log's group, when it has one and lets it be changed at run time.
    /// `None` (the default): not replicated, or membership is fixed.
    fn group(&self) -> Option<&dyn LogGroup> {
        None
    }

    /// Stops the log's own machinery (loops, transports). Idempotent; a no-op by default.
    async fn shutdown(&self) {}
}

/// One member of a [`LogGroup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    /// Member id (never 0).
    pub id: u64,
    /// Whether it votes (counts for elections and commits) or only learns the log.
    pub voter: bool,
    /// Where its log replication listens.
    pub log_addr: String,
    /// Its client-facing service address (what clients are redirected to when it leads).
    pub service_addr: String,
    /// On the leader: the highest log index known to be replicated on it.
    pub matched: Option<u64>,
}

/// A group's membership as the member that answered has applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMembers {
    /// The member that answered.
    pub answered_by: u64,
    /// The leader it knows.
    pub leader: Option<u64>,
    /// Its term.
    pub term: u64,
    /// Its commit index.
    pub commit_index: u64,
    /// Voters, then learners.
    pub members: Vec<GroupMember>,
}

/// Run-time membership changes of a replicated [`CommandLog`] (see [`CommandLog::group`]).
/// Changes are applied through the log one at a time; only the leader accepts them (others fail
/// with an error [`CommandLog::not_leader_hint`] recognises).
#[async_trait]
pub trait LogGroup: Send + Sync {
    /// The membership this member has applied; served by any member.
    async fn members(&self) -> Result<GroupMembers>;

    /// Adds a non-voting member, which catches up before it may be promoted.
    async fn add_learner(&self, id: u64, log_addr: String, service_addr: String) -> Result<()>;

    /// Makes a learner a voter.
    async fn promote(&self, id: u64) -> Result<()>;

    /// Removes a member; asked to remove itself, the leader hands leadership over first.
    async fn remove(&self, id: u64) -> Result<()>;

    /// Resolves once the group has removed this member (never while it is a member).
    async fn removed(&self);

    /// Resolves, with the reason, once this member's log stopped on an error it cannot recover
    /// from in this process (a snapshot it cannot install, a log it cannot write); a process
    /// should then exit so that its supervisor restarts it. Never for a healthy member.
    async fn failed(&self) -> String {
        std::future::pending().await
    }

    /// Stops this member's part in the group on an error found outside the log that it cannot
    /// recover from (the state machine's state was left half-changed by a panic): it leads
    /// nothing from then on, so the others elect a leader, and [`failed`](Self::failed)
    /// resolves with `reason`. A no-op by default.
    fn abandon(&self, reason: String) {
        let _ = reason;
    }
}

/// The key under which a segment's descriptor is published.
pub fn segment_key(name: &str) -> String {
    format!("mooncake/segments/{name}")
}

/// An in-process [`MetadataStore`] and [`CommandLog`]: for embedded single-process deployments
/// and tests. Its command log is the order of calls: each command is applied at once, and it is
/// always [`Leadership::Standalone`].
#[derive(Default)]
pub struct MemoryMetadataStore {
    inner: Mutex<MemState>,
    machine: Mutex<Option<Box<dyn StateMachine>>>,
}

impl std::fmt::Debug for MemoryMetadataStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryMetadataStore")
            .field("keys", &self.inner.lock().map(|s| s.map.len()).unwrap_or(0))
            .finish()
    }
}

#[derive(Debug, Default)]
struct MemState {
    revision: u64,
    map: BTreeMap<String, Versioned>,
}

impl MemoryMetadataStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose command log drives `machine`.
    pub fn with_state_machine(machine: Box<dyn StateMachine>) -> Self {
        MemoryMetadataStore {
            inner: Mutex::default(),
            machine: Mutex::new(Some(machine)),
        }
    }
}

#[async_trait]
impl MetadataStore for MemoryMetadataStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        Ok(self
            .inner
            .lock()
            .expect("metadata lock")
            .map
            .get(key)
            .cloned())
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64> {
        let mut s = self.inner.lock().expect("metadata lock");
        s.revision += 1;
        let revision = s.revision;
        s.map.insert(key.to_owned(), Versioned { value, revision });
        Ok(revision)
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        let mut s = self.inner.lock().expect("metadata lock");
        let existed = s.map.remove(key).is_some();
        if existed {
            s.revision += 1;
        }
        Ok(existed)
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Option<Vec<u8>>,
    ) -> Result<Option<u64>> {
        let mut s = self.inner.lock().expect("metadata lock");
        let current = s.map.get(key).map_or(0, |v| v.revision);
        if current != expected {
            return Ok(None);
        }
        s.revision += 1;
        let revision = s.revision;
        match value {
            Some(value) => {
                s.map.insert(key.to_owned(), Versioned { value, revision });
            }
            None => {
                s.map.remove(key);
            }
        }
        Ok(Some(revision))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        let s = self.inner.lock().expect("metadata lock");
        Ok(s.map
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[async_trait]
impl CommandLog for MemoryMetadataStore {
    async fn apply_command(&self, command: Vec<u8>) -> Result<Vec<u8>> {
        match self.machine.lock().expect("state machine lock").as_mut() {
            Some(m) => Ok(m.apply(&command)),
            None => Err(crate::Error::NotSupported(
                "no state machine is attached to this metadata store".into(),
            )),
        }
    }

    fn leadership(&self) -> Leadership {
        Leadership::Standalone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn revisions_and_cas() {
        let s = MemoryMetadataStore::new();
        assert_eq!(s.get("a").await.unwrap(), None);
        assert_eq!(
            s.compare_and_swap("a", 5, Some(vec![1])).await.unwrap(),
            None
        );
        let r1 = s
            .compare_and_swap("a", 0, Some(vec![1]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            s.compare_and_swap("a", 0, Some(vec![2])).await.unwrap(),
            None
        );
        let r2 = s.put("a", vec![3]).await.unwrap();
        assert!(r2 > r1);
        assert_eq!(s.get("a").await.unwrap().unwrap().value, vec![3]);
        assert!(s.compare_and_swap("a", r2, None).await.unwrap().is_some());
        assert_eq!(s.get("a").await.unwrap(), None);
        assert!(!s.delete("a").await.unwrap());
    }

    struct Counter(u64);

    impl StateMachine for Counter {
        fn apply(&mut self, command: &[u8]) -> Vec<u8> {
            self.0 += command.len() as u64;
            self.0.to_le_bytes().to_vec()
        }
        fn snapshot(&self) -> Result<Vec<u8>> {
            Ok(self.0.to_le_bytes().to_vec())
        }
        fn restore(&mut self, snapshot: &[u8]) -> Result<()> {
            self.0 = u64::from_le_bytes(
                snapshot
                    .try_into()
                    .map_err(|_| crate::Error::Codec("bad counter snapshot".into()))?,
            );
            Ok(())
        }
    }

    #[tokio::test]
    async fn commands_are_applied_in_order() {
        let s = MemoryMetadataStore::with_state_machine(Box::new(Counter(0)));
        assert_eq!(
            s.apply_command(vec![0; 3]).await.unwrap(),
            3u64.to_le_bytes()
        );
        assert_eq!(
            s.apply_command(vec![0; 4]).await.unwrap(),
            7u64.to_le_bytes()
        );
        assert!(MemoryMetadataStore::new()
            .apply_command(vec![])
            .await
            .is_err());
        assert_eq!(s.leadership(), Leadership::Standalone);
        assert!(s.group().is_none());
    }

    #[tokio::test]
    async fn list_by_prefix() {
        let s = MemoryMetadataStore::new();
        for k in ["p/a", "p/b", "q/a", "p"] {
            s.put(k, k.as_bytes().to_vec()).await.unwrap();
        }
        let keys: Vec<String> = s
            .list("p/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec!["p/a", "p/b"]);
        assert_eq!(s.list("").await.unwrap().len(), 4);
    }
}
