//! The crate's error type and its mapping onto the core error codes.

use std::path::PathBuf;

use mooncake_core::ErrorCode;

use crate::LeaderInfo;

/// Errors of the Raft metadata store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This node is not the leader. Retry at the leader's service address when one is known.
    #[error("not the raft leader{}", match .leader {
        Some(l) => format!("; leader is node {} at {}", l.id, l.service_addr),
        None => "; no leader is known yet, retry later".to_owned(),
    })]
    NotLeader {
        /// The current leader, if this node knows one.
        leader: Option<LeaderInfo>,
    },
    /// Leadership changed while the proposal was in flight: it may or may not have been applied.
    /// Retry at the new leader (commands should be idempotent or checked before retrying).
    #[error("leadership lost while the proposal was in flight; outcome unknown, retry at the new leader")]
    LeadershipLost,
    /// The raft group refused the proposal (a leadership transfer is in progress, a membership
    /// change is pending, or too much is uncommitted). Retry shortly.
    #[error("proposal dropped by raft: {0}")]
    ProposalDropped(String),
    /// The on-disk state is corrupt; the node refuses to start rather than apply bad data.
    #[error("corrupt raft data in {}: {reason}", .file.display())]
    Corrupt {
        /// The damaged file.
        file: PathBuf,
        /// What is wrong, including the byte offset.
        reason: String,
    },
    /// A file operation failed.
    #[error("i/o on {}: {source}", .file.display())]
    Io {
        /// The file or directory.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The configuration is invalid.
    #[error("invalid raft configuration: {0}")]
    Config(String),
    /// An argument is invalid (unknown node, oversized proposal, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// raft-rs reported an error.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// Encoding or decoding failed.
    #[error("codec: {0}")]
    Codec(String),
    /// The attached state machine failed to snapshot or restore.
    #[error("state machine: {0}")]
    StateMachine(mooncake_core::Error),
    /// The node is shut down.
    #[error("the raft node is shut down")]
    Shutdown,
}

impl Error {
    pub(crate) fn io(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            file: file.into(),
            source,
        }
    }

    pub(crate) fn corrupt(file: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            file: file.into(),
            reason: reason.into(),
        }
    }
}

impl From<postcard::Error> for Error {
    fn from(e: postcard::Error) -> Self {
        Error::Codec(e.to_string())
    }
}

/// Prefix of the context of a [`mooncake_core::Error`] made from [`Error::NotLeader`]; the
/// leader's service address follows it (empty when unknown). See [`leader_hint`].
pub const LEADER_HINT_PREFIX: &str = "leader_hint=";

impl From<Error> for mooncake_core::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::NotLeader { ref leader } => mooncake_core::Error::with_code(
                ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS,
                format!(
                    "{e} ({LEADER_HINT_PREFIX}{})",
                    leader.as_ref().map_or("", |l| l.service_addr.as_str())
                ),
            ),
            Error::LeadershipLost | Error::ProposalDropped(_) | Error::Shutdown => {
                mooncake_core::Error::with_code(
                    ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS,
                    e.to_string(),
                )
            }
            Error::InvalidArgument(m) => mooncake_core::Error::InvalidArgument(m),
            Error::Codec(m) => mooncake_core::Error::Codec(m),
            Error::StateMachine(e) => e,
            other => mooncake_core::Error::Metadata(other.to_string()),
        }
    }
}

/// The leader's service address carried by an error made from [`Error::NotLeader`]:
/// `Some(Some(addr))` when a leader is known, `Some(None)` when the error is a not-leader error
/// without a known leader, `None` for any other error.
pub fn leader_hint(error: &mooncake_core::Error) -> Option<Option<String>> {
    let mooncake_core::Error::Code { code, context } = error else {
        return None;
    };
    if *code != ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS {
        return None;
    }
    let start = context.rfind(LEADER_HINT_PREFIX)? + LEADER_HINT_PREFIX.len();
    let addr = context[start..].trim_end_matches(')');
    Some((!addr.is_empty()).then(|| addr.to_owned()))
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_carries_the_hint() {
        let e: mooncake_core::Error = Error::NotLeader {
            leader: Some(LeaderInfo {
                id: 2,
                service_addr: "127.0.0.1:5002".into(),
            }),
        }
        .into();
        assert_eq!(e.code(), ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS);
        assert_eq!(leader_hint(&e), Some(Some("127.0.0.1:5002".to_owned())));
        let e: mooncake_core::Error = Error::NotLeader { leader: None }.into();
        assert_eq!(leader_hint(&e), Some(None));
        assert_eq!(leader_hint(&mooncake_core::Error::Shutdown), None);
    }
}
