//! Messages between a dummy client and the real client (postcard, over [`crate::rpc`]).

use mooncake_core::{Error, ErrorCode};
use mooncake_master::{
    MasterMetrics, ReplicaDescriptor, ReplicateConfig, TaskId, TaskInfo, WriteKind,
};
use serde::{Deserialize, Serialize};

/// Version of the protocol between dummy and real clients, checked by `Hello`. 2:
/// `GetIntoChecked`.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest inline value either side puts in one message (the RPC frame limit, less headroom).
pub(crate) const MAX_INLINE: usize = mooncake_rpc::rpc::MAX_FRAME - (1 << 20);

/// An error as it crosses the wire: the numeric code and a message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct WireError {
    pub(crate) code: i32,
    pub(crate) message: String,
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        WireError {
            code: e.code().code(),
            message: e.to_string(),
        }
    }
}

impl From<Error> for WireError {
    fn from(e: Error) -> Self {
        WireError::from(&e)
    }
}

impl From<WireError> for Error {
    fn from(w: WireError) -> Self {
        let code = ErrorCode::from_i32(w.code).unwrap_or(ErrorCode::INTERNAL_ERROR);
        Error::with_code(code, format!("real client: {}", w.message))
    }
}

/// A result that crosses the wire.
pub(crate) type WireResult<T> = Result<T, WireError>;

/// Converts a store result for the wire.
pub(crate) fn to_wire<T>(r: mooncake_core::Result<T>) -> WireResult<T> {
    r.map_err(WireError::from)
}

/// Converts a wire result back.
pub(crate) fn from_wire<T>(r: WireResult<T>) -> mooncake_core::Result<T> {
    r.map_err(Error::from)
}

/// One item of a zero-copy call: a key and its `(dummy address, size)` parts, in order.
pub(crate) type PoolItem = (String, Vec<(u64, u64)>);

/// A call from a dummy client. Calls that touch the shared pool carry the session the pool was
/// registered under.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    /// First call: protocol check; answers the Unix socket to register the pool on.
    Hello {
        /// The dummy's [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// Put (or upsert) of inline bytes, in parts concatenated in order.
    PutInline {
        kind: WriteKind,
        key: String,
        parts: Vec<Blob>,
        config: ReplicateConfig,
    },
    /// Batch put (or upsert) of inline values.
    PutBatchInline {
        kind: WriteKind,
        items: Vec<(String, Blob)>,
        config: ReplicateConfig,
    },
    /// Zero-copy put (or upsert) from the session's pool.
    PutFrom {
        session: u64,
        kind: WriteKind,
        items: Vec<PoolItem>,
        config: ReplicateConfig,
    },
    /// A value, inline.
    GetInline { key: String },
    /// Zero-copy reads into the session's pool: bytes read per item.
    GetInto { session: u64, items: Vec<PoolItem> },
    /// Sizes of several objects.
    GetSizes { keys: Vec<String> },
    /// Existence of one key.
    IsExist { key: String },
    /// Existence of several keys.
    BatchIsExist { keys: Vec<String> },
    /// Removal of one key.
    Remove { key: String, force: bool },
    /// Removal of several keys.
    BatchRemove { keys: Vec<String>, force: bool },
    /// Removal by regular expression.
    RemoveByRegex { pattern: String, force: bool },
    /// Removal of everything.
    RemoveAll { force: bool },
    /// Replica descriptors of one key.
    GetReplicaDesc { key: String },
    /// Replica descriptors of several keys.
    BatchGetReplicaDesc { keys: Vec<String> },
    /// A copy task.
    CreateCopyTask { key: String, targets: Vec<String> },
    /// A move task.
    CreateMoveTask {
        key: String,
        source: String,
        target: String,
    },
    /// A task's status.
    QueryTask { id: TaskId },
    /// The master's metrics.
    MasterMetrics,
    /// [`Request::GetInto`] for a dummy's `get` (bytes returned as a value): the bytes are
    /// checked against the value's checksum whatever `MOONCAKE_STORE_CHECKSUM` says. Added
    /// last: earlier variants keep their wire tags.
    GetIntoChecked { session: u64, items: Vec<PoolItem> },
}

impl Request {
    /// The session field of a call that touches the shared pool.
    pub(crate) fn session_mut(&mut self) -> Option<&mut u64> {
        match self {
            Request::PutFrom { session, .. }
            | Request::GetInto { session, .. }
            | Request::GetIntoChecked { session, .. } => Some(session),
            _ => None,
        }
    }
}

/// The real client's answers, one variant per result shape.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    /// Answer to `Hello`.
    Hello {
        /// The real client's [`PROTOCOL_VERSION`].
        version: u32,
        /// Abstract Unix socket name on which to register the pool.
        ipc_name: String,
        /// The real client's segment name (`host:port`).
        hostname: String,
    },
    /// A unit result.
    Unit(WireResult<()>),
    /// One unit result per item.
    Units(Vec<WireResult<()>>),
    /// One unit result per item, or a failure of the whole call.
    UnitsOr(WireResult<Vec<WireResult<()>>>),
    /// A value.
    Bytes(WireResult<Blob>),
    /// A count.
    Count(WireResult<u64>),
    /// One count per item.
    Counts(Vec<WireResult<u64>>),
    /// A yes/no answer.
    Bool(WireResult<bool>),
    /// Yes/no answers.
    Bools(WireResult<Vec<bool>>),
    /// Replica descriptors.
    Replicas(WireResult<Vec<ReplicaDescriptor>>),
    /// Replica descriptors per key.
    ReplicaMap(WireResult<Vec<(String, Vec<ReplicaDescriptor>)>>),
    /// A new task.
    Task(WireResult<TaskId>),
    /// A task's status.
    TaskInfo(WireResult<TaskInfo>),
    /// The master's metrics.
    Metrics(WireResult<Box<MasterMetrics>>),
    /// The request could not be served at all.
    Failed(WireError),
}

/// Bytes serialized as one byte string (postcard copies them in one go, not byte by byte).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Blob(pub(crate) Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Blob;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write's kind is one byte on the wire, the same bytes the `upsert: bool` it replaced
    /// had (`Put` = 0 = false, `Upsert` = 1 = true), and it survives a round trip in a request.
    #[test]
    fn write_kind_is_one_byte_like_the_bool_it_replaced() {
        for (kind, upsert) in [(WriteKind::Put, false), (WriteKind::Upsert, true)] {
            let bytes = postcard::to_stdvec(&kind).unwrap();
            assert_eq!(bytes, postcard::to_stdvec(&upsert).unwrap());
            let request = Request::PutBatchInline {
                kind,
                items: vec![("k".into(), Blob(b"v".to_vec()))],
                config: ReplicateConfig::default(),
            };
            let back: Request =
                postcard::from_bytes(&postcard::to_stdvec(&request).unwrap()).unwrap();
            assert!(matches!(back, Request::PutBatchInline { kind: k, .. } if k == kind));
        }
    }
}
