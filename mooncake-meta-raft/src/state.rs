//! The replicated state this crate owns besides the attached state machine: the versioned KV map
//! and the peer directory, plus the envelope that tells log entries apart.
//!
//! Every normal log entry starts with a tag byte: [`TAG_COMMAND`] (the rest is an opaque command
//! for the [`StateMachine`](mooncake_core::StateMachine)) or [`TAG_KV`] (the rest is a
//! postcard-encoded [`KvOp`]). Applying is deterministic: the revision counter lives in the state.

use std::collections::BTreeMap;

use mooncake_core::Versioned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Tag of an entry carrying a state-machine command.
pub(crate) const TAG_COMMAND: u8 = 0;
/// Tag of an entry carrying a [`KvOp`].
pub(crate) const TAG_KV: u8 = 1;

/// Addresses of one member of the group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Raft node id (never 0).
    pub id: u64,
    /// Where its raft transport listens (`127.0.0.1:7001`).
    pub raft_addr: String,
    /// Its client-facing service address, returned to clients as the leader hint.
    pub service_addr: String,
}

/// A write or linearizable read of the replicated KV map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
    /// Unconditional write.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Delete.
    Delete {
        /// Key.
        key: String,
    },
    /// Compare-and-swap on the key's revision (`0`: must not exist); `None` deletes.
    Cas {
        /// Key.
        key: String,
        /// Expected revision.
        expected: u64,
        /// New value, or `None` to delete.
        value: Option<Vec<u8>>,
    },
    /// Keys with a prefix, read at this position of the log.
    List {
        /// Prefix.
        prefix: String,
    },
}

/// The result of applying a [`KvOp`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResult {
    /// New revision of a put.
    Put(u64),
    /// Whether a deleted key existed.
    Delete(bool),
    /// New revision of a successful compare-and-swap.
    Cas(Option<u64>),
    /// Keys, values and revisions, in key order.
    List(Vec<(String, Vec<u8>, u64)>),
}

/// The versioned KV map, replicated through the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvState {
    revision: u64,
    map: BTreeMap<String, (Vec<u8>, u64)>,
}

impl KvState {
    /// Reads a key from local state.
    pub fn get(&self, key: &str) -> Option<Versioned> {
        self.map.get(key).map(|(value, revision)| Versioned {
            value: value.clone(),
            revision: *revision,
        })
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The store-wide revision of the last write.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Applies `op`; `want_result` false skips building a large response nobody waits for.
    pub(crate) fn apply(&mut self, op: KvOp, want_result: bool) -> KvResult {
        match op {
            KvOp::Put { key, value } => {
                self.revision += 1;
                self.map.insert(key, (value, self.revision));
                KvResult::Put(self.revision)
            }
            KvOp::Delete { key } => {
                let existed = self.map.remove(&key).is_some();
                if existed {
                    self.revision += 1;
                }
                KvResult::Delete(existed)
            }
            KvOp::Cas {
                key,
                expected,
                value,
            } => {
                let current = self.map.get(&key).map_or(0, |(_, r)| *r);
                if current != expected {
                    return KvResult::Cas(None);
                }
                self.revision += 1;
                match value {
                    Some(v) => {
                        self.map.insert(key, (v, self.revision));
                    }
                    None => {
                        self.map.remove(&key);
                    }
                }
                KvResult::Cas(Some(self.revision))
            }
            KvOp::List { prefix } => {
                if !want_result {
                    return KvResult::List(Vec::new());
                }
                // The group's own records are listed only when asked for by their prefix.
                let hide = !prefix.starts_with(crate::incarnation::RESERVED_PREFIX);
                KvResult::List(
                    self.map
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .filter(|(k, _)| {
                            !(hide && k.starts_with(crate::incarnation::RESERVED_PREFIX))
                        })
                        .map(|(k, (v, r))| (k.clone(), v.clone(), *r))
                        .collect(),
                )
            }
        }
    }
}

/// What a snapshot's data holds: everything applied up to its index.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SnapshotData {
    pub(crate) kv: KvState,
    pub(crate) peers: BTreeMap<u64, PeerInfo>,
    pub(crate) machine: Vec<u8>,
}

impl SnapshotData {
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        postcard::from_bytes(bytes).map_err(|e| Error::Codec(format!("snapshot data: {e}")))
    }
}

/// Encodes a state-machine command as a log entry payload.
pub(crate) fn encode_command(command: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(command.len() + 1);
    out.push(TAG_COMMAND);
    out.extend_from_slice(command);
    out
}

/// Encodes a KV operation as a log entry payload.
pub(crate) fn encode_kv(op: &KvOp) -> Vec<u8> {
    let out = vec![TAG_KV];
    postcard::to_extend(op, out).expect("kv ops always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_semantics_match_the_memory_store() {
        let mut s = KvState::default();
        assert_eq!(
            s.apply(
                KvOp::Cas {
                    key: "a".into(),
                    expected: 3,
                    value: Some(vec![1])
                },
                true
            ),
            KvResult::Cas(None)
        );
        let KvResult::Put(r1) = s.apply(
            KvOp::Put {
                key: "a".into(),
                value: vec![1],
            },
            true,
        ) else {
            panic!()
        };
        assert_eq!(s.get("a").unwrap().revision, r1);
        assert_eq!(
            s.apply(KvOp::Delete { key: "b".into() }, true),
            KvResult::Delete(false)
        );
        assert_eq!(s.revision(), r1);
        assert_eq!(
            s.apply(
                KvOp::List {
                    prefix: String::new()
                },
                true
            ),
            KvResult::List(vec![("a".into(), vec![1], r1)])
        );
    }
}
