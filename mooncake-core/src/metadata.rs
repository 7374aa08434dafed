//! The [`MetadataStore`] trait: where cluster metadata lives.
//!
//! Two kinds of metadata live here:
//! - keys and values with a revision number per key (transfer-engine segment descriptors under
//!   [`segment_key`], the P2P store's catalog with compare-and-swap), so callers can do
//!   optimistic concurrency without a lock service;
//! - a command log driving a [`StateMachine`] (the store master): every state change is a
//!   command the store orders and applies, so a replicated store (Raft) replicates the master
//!   without the master knowing.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::Result;

/// A deterministic state machine whose commands a [`MetadataStore`] orders and applies.
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

    /// Orders `command` in the store's command log, applies it to the attached
    /// [`StateMachine`] and returns the response. Stores without a command log say so.
    async fn apply_command(&self, command: Vec<u8>) -> Result<Vec<u8>> {
        let _ = command;
        Err(crate::Error::NotSupported(
            "this metadata store has no command log".into(),
        ))
    }
}

/// The key under which a segment's descriptor is published.
pub fn segment_key(name: &str) -> String {
    format!("mooncake/segments/{name}")
}

/// An in-process [`MetadataStore`]: for embedded single-process deployments and tests. Its
/// command log is the order of calls: each command is applied at once.
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

    async fn apply_command(&self, command: Vec<u8>) -> Result<Vec<u8>> {
        match self.machine.lock().expect("state machine lock").as_mut() {
            Some(m) => Ok(m.apply(&command)),
            None => Err(crate::Error::NotSupported(
                "no state machine is attached to this metadata store".into(),
            )),
        }
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
