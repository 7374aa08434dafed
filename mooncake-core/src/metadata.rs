//! The [`MetadataStore`] trait: where cluster metadata lives.
//!
//! Today that is transfer-engine segment descriptors (under [`segment_key`]); the P2P store keeps
//! its catalog here with compare-and-swap, and the master's replicated command log builds on the
//! same trait. Values are opaque bytes with a revision number per key, so callers can do
//! optimistic concurrency without a lock service.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::Result;

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

/// The key under which a segment's descriptor is published.
pub fn segment_key(name: &str) -> String {
    format!("mooncake/segments/{name}")
}

/// An in-process [`MetadataStore`]: for embedded single-process deployments and tests.
#[derive(Debug, Default)]
pub struct MemoryMetadataStore {
    inner: Mutex<MemState>,
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
