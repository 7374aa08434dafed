//! Errors of the P2P store: one enum whose variants say what the caller can do.

use std::time::Duration;

/// A P2P store error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `register` of a name the catalog already holds: pick another name, or pass
    /// `force_create` to replace it.
    #[error("payload {0:?} already exists; pass force_create to replace it")]
    AlreadyExists(String),
    /// The catalog has no payload of this name.
    #[error("payload {0:?} not found")]
    NotFound(String),
    /// `unregister` of a name this instance did not register.
    #[error("payload {0:?} was not registered by this instance")]
    NotRegisteredHere(String),
    /// `get_replica` of a name this instance already holds, is pulling, or registered: a name is
    /// pulled at most once per instance (`delete_replica` first to pull it again).
    #[error("payload {0:?} is already held or being pulled by this instance")]
    AlreadyPulled(String),
    /// `delete_replica` of a name this instance holds no replica of.
    #[error("no replica of {0:?} on this instance")]
    NoReplica(String),
    /// The buffers do not fit: outside memory registered with the engine, or of another total
    /// size than the payload.
    #[error("invalid buffers: {0}")]
    InvalidBuffers(String),
    /// An argument makes no sense (empty name, zero shard size, bad config).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// `get_replica` did not finish in time. Nothing unverified was published; pieces that were
    /// verified are withdrawn with the partial replica.
    #[error(
        "pull of {name:?} timed out after {elapsed:?}: {verified}/{total} pieces verified, \
         {unavailable} with no live source"
    )]
    Timeout {
        /// The payload.
        name: String,
        /// Time spent.
        elapsed: Duration,
        /// Pieces verified when it stopped.
        verified: usize,
        /// Pieces in the payload.
        total: usize,
        /// Missing pieces no known peer held (apart from peers that served them corrupted).
        unavailable: usize,
    },
    /// `get_replica` was cancelled through its [`CancelToken`](crate::CancelToken). Its partial
    /// replica is withdrawn; the name may be pulled again.
    #[error("pull of {name:?} cancelled: {verified}/{total} pieces were verified")]
    Cancelled {
        /// The payload.
        name: String,
        /// Pieces verified when it stopped.
        verified: usize,
        /// Pieces in the payload.
        total: usize,
    },
    /// A catalog entry that does not decode or is inconsistent (written by another version?).
    #[error("catalog entry {key}: {reason}")]
    BadCatalogEntry {
        /// The metadata key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The payload was replaced (`force_create`) or removed while pulling it.
    #[error("payload {0:?} changed in the catalog while pulling it")]
    Changed(String),
    /// The store was closed.
    #[error("the P2P store is closed")]
    Closed,
    /// From the metadata store or the transfer engine.
    #[error(transparent)]
    Core(#[from] mooncake_core::Error),
}

/// Result of the P2P store.
pub type Result<T> = std::result::Result<T, Error>;
