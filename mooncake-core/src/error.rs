//! Errors and the stable numeric error codes.
//!
//! [`ErrorCode`] is the one table of numeric codes in the project. Its values are the ones users of
//! the Mooncake Store API already test against (`-704` for a missing object, `-200` for no space,
//! ...), so Python callers and wire peers see the same numbers everywhere.

use std::fmt;

/// Defines [`ErrorCode`] with its numeric values and names in one place.
macro_rules! error_codes {
    ($( $(#[$doc:meta])* $name:ident = $value:expr ),* $(,)?) => {
        /// Stable numeric status codes, as returned to Python callers and carried on the wire.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[repr(i32)]
        #[allow(non_camel_case_types)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name = $value, )*
        }

        impl ErrorCode {
            /// Every code, in table order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The code's upper-case name, as upstream spells it (`OBJECT_NOT_FOUND`).
            pub fn name(self) -> &'static str {
                match self { $(ErrorCode::$name => stringify!($name),)* }
            }

            /// The code for a numeric value, if the value is in the table.
            pub fn from_i32(value: i32) -> Option<ErrorCode> {
                match value { $(v if v == $value => Some(ErrorCode::$name),)* _ => None }
            }
        }
    };
}

error_codes! {
    /// Success.
    OK = 0,
    /// An internal invariant failed.
    INTERNAL_ERROR = -1,
    /// A buffer was too small for the data.
    BUFFER_OVERFLOW = -10,
    /// A shard index was out of range.
    SHARD_INDEX_OUT_OF_RANGE = -100,
    /// No segment of that name is mounted or known.
    SEGMENT_NOT_FOUND = -101,
    /// A segment of that name is already mounted.
    SEGMENT_ALREADY_EXISTS = -102,
    /// The master does not know the client.
    CLIENT_NOT_FOUND = -103,
    /// No space could be allocated.
    NO_AVAILABLE_HANDLE = -200,
    /// A version did not match.
    INVALID_VERSION = -300,
    /// The key is invalid.
    INVALID_KEY = -400,
    /// A write failed.
    WRITE_FAIL = -500,
    /// An argument was invalid.
    INVALID_PARAMS = -600,
    /// The client is not allowed to do this.
    ILLEGAL_CLIENT = -601,
    /// A write was invalid.
    INVALID_WRITE = -700,
    /// A read was invalid.
    INVALID_READ = -701,
    /// A replica was invalid.
    INVALID_REPLICA = -702,
    /// No replica is complete yet.
    REPLICA_IS_NOT_READY = -703,
    /// No object has that key.
    OBJECT_NOT_FOUND = -704,
    /// An object with that key exists.
    OBJECT_ALREADY_EXISTS = -705,
    /// The object holds a read lease.
    OBJECT_HAS_LEASE = -706,
    /// The read lease expired during the transfer.
    LEASE_EXPIRED = -707,
    /// The object has a replication task.
    OBJECT_HAS_REPLICATION_TASK = -708,
    /// The object has no replication task.
    OBJECT_NO_REPLICATION_TASK = -709,
    /// No such replica.
    REPLICA_NOT_FOUND = -710,
    /// The replica exists already.
    REPLICA_ALREADY_EXISTS = -711,
    /// The replica is gone.
    REPLICA_IS_GONE = -712,
    /// The replica is not in local memory.
    REPLICA_NOT_IN_LOCAL_MEMORY = -713,
    /// The replica is busy.
    OBJECT_REPLICA_BUSY = -714,
    /// A transfer failed.
    TRANSFER_FAIL = -800,
    /// A checksum did not match.
    CHECKSUM_MISMATCH = -801,
    /// A remote call failed.
    RPC_FAIL = -900,
    /// A remote call timed out.
    RPC_TIMEOUT = -901,
    /// Not available in the current status.
    UNAVAILABLE_IN_CURRENT_STATUS = -1010,
    /// Not available in the current mode.
    UNAVAILABLE_IN_CURRENT_MODE = -1011,
    /// Not supported.
    NOT_SUPPORTED = -1012,
    /// No such file.
    FILE_NOT_FOUND = -1100,
    /// A file could not be opened.
    FILE_OPEN_FAIL = -1101,
    /// A file read failed.
    FILE_READ_FAIL = -1102,
    /// A file write failed.
    FILE_WRITE_FAIL = -1103,
    /// A file buffer was invalid.
    FILE_INVALID_BUFFER = -1104,
    /// A file lock failed.
    FILE_LOCK_FAIL = -1105,
    /// A file handle was invalid.
    FILE_INVALID_HANDLE = -1106,
    /// No task has that id.
    TASK_NOT_FOUND = -1400,
    /// Too many pending tasks.
    TASK_PENDING_LIMIT_EXCEEDED = -1401,
    /// Serialization not supported.
    SERIALIZE_UNSUPPORTED = -1500,
    /// Serialization failed.
    SERIALIZE_FAIL = -1501,
    /// Deserialization failed.
    DESERIALIZE_FAIL = -1502,
    /// Persisting failed.
    PERSISTENT_FAIL = -1503,
}

impl ErrorCode {
    /// The numeric value.
    pub fn code(self) -> i32 {
        self as i32
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

/// Errors of the core crate: registered memory, the transfer engine and transports.
///
/// Each variant says what went wrong in terms the caller can act on, and maps to one
/// [`ErrorCode`] through [`Error::code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An argument was invalid (zero-sized registration, overlapping buffers, bad name, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A local address range is not inside one registered buffer of this process.
    #[error("local range {addr:#x}+{len} is not inside a registered buffer")]
    LocalRangeNotRegistered {
        /// Start address of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// The target refused a request whose range is not inside one of its registered buffers.
    #[error("target range {addr:#x}+{len} is not inside a buffer registered by the target")]
    RemoteRangeInvalid {
        /// Start address of the range on the target.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
    /// No segment of this name could be found (metadata store or handshake).
    #[error("segment not found: {0}")]
    SegmentNotFound(String),
    /// A buffer overlapping this one is registered already.
    #[error("buffer {addr:#x}+{len} overlaps a registered buffer")]
    AddressOverlapped {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// No buffer is registered at this address.
    #[error("no buffer is registered at {0:#x}")]
    NotRegistered(u64),
    /// The peer could not be reached or closed the connection.
    #[error("peer {peer} unreachable: {reason}")]
    PeerUnreachable {
        /// The peer's address.
        peer: String,
        /// What happened.
        reason: String,
    },
    /// A peer's mapping of shared memory went stale: its owner unregistered the buffer or
    /// closed. The copy that saw it may have been partial; map the buffer again.
    #[error("stale shared-memory mapping: {0}")]
    StaleMapping(String),
    /// The request did not complete within the configured timeout.
    #[error("transfer timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The peer answered with something that breaks the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// No installed transport can reach this segment.
    #[error("no transport can reach segment {segment} (it offers: {offered})")]
    NoTransport {
        /// The segment's name.
        segment: String,
        /// The protocols the segment offers.
        offered: String,
    },
    /// The operation is not supported by this component.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// The peer's certificate does not allow what it asked for (a missing role, a name that is
    /// not its own).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The engine or transport is shut down.
    #[error("shut down")]
    Shutdown,
    /// A metadata store operation failed.
    #[error("metadata store: {0}")]
    Metadata(String),
    /// Encoding or decoding failed.
    #[error("codec: {0}")]
    Codec(String),
    /// An I/O error.
    #[error("i/o: {0}")]
    Io(String),
    /// An error carrying a code from the table, with context.
    #[error("{code}: {context}")]
    Code {
        /// The code.
        code: ErrorCode,
        /// What was being done.
        context: String,
    },
}

impl Error {
    /// The stable numeric code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument(_) | Error::LocalRangeNotRegistered { .. } => {
                ErrorCode::INVALID_PARAMS
            }
            Error::RemoteRangeInvalid { .. } => ErrorCode::INVALID_PARAMS,
            Error::SegmentNotFound(_) => ErrorCode::SEGMENT_NOT_FOUND,
            Error::AddressOverlapped { .. } => ErrorCode::INVALID_PARAMS,
            Error::NotRegistered(_) => ErrorCode::INVALID_PARAMS,
            Error::PeerUnreachable { .. } | Error::Protocol(_) | Error::NoTransport { .. } => {
                ErrorCode::TRANSFER_FAIL
            }
            Error::Timeout(_) => ErrorCode::RPC_TIMEOUT,
            Error::NotSupported(_) => ErrorCode::NOT_SUPPORTED,
            Error::Shutdown => ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS,
            Error::PermissionDenied(_) => ErrorCode::ILLEGAL_CLIENT,
            Error::Metadata(_) => ErrorCode::RPC_FAIL,
            Error::Codec(_) => ErrorCode::DESERIALIZE_FAIL,
            Error::Io(_) | Error::StaleMapping(_) => ErrorCode::TRANSFER_FAIL,
            Error::Code { code, .. } => *code,
        }
    }

    /// An error with a table code and context.
    pub fn with_code(code: ErrorCode, context: impl Into<String>) -> Self {
        Error::Code {
            code,
            context: context.into(),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Io(e.to_string())
    }
}

impl From<postcard::Error> for Error {
    fn from(e: postcard::Error) -> Self {
        Error::Codec(e.to_string())
    }
}

/// Result with the core [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_and_names_are_unique() {
        let codes: HashSet<i32> = ErrorCode::ALL.iter().map(|c| c.code()).collect();
        assert_eq!(codes.len(), ErrorCode::ALL.len());
        let names: HashSet<&str> = ErrorCode::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }

    #[test]
    fn values_match_the_published_table() {
        assert_eq!(ErrorCode::NO_AVAILABLE_HANDLE.code(), -200);
        assert_eq!(ErrorCode::INVALID_PARAMS.code(), -600);
        assert_eq!(ErrorCode::OBJECT_NOT_FOUND.code(), -704);
        assert_eq!(ErrorCode::OBJECT_HAS_LEASE.code(), -706);
        assert_eq!(ErrorCode::LEASE_EXPIRED.code(), -707);
        assert_eq!(ErrorCode::TASK_NOT_FOUND.code(), -1400);
        assert_eq!(ErrorCode::PERSISTENT_FAIL.code(), -1503);
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_i32(c.code()), Some(*c));
        }
        assert_eq!(ErrorCode::from_i32(-2), None);
    }
}
