//! The master as a [`StateMachine`] behind a command log.
//!
//! A log entry is a [`LogEntry`]: the command and the time it is applied at, chosen once by
//! whoever appends it (the leader), so every replica applies it with the same `now`. Entries and
//! responses are postcard-encoded.

use serde::{Deserialize, Serialize};

use super::command::{Command, Response};
use super::types::Timestamp;
use super::Master;
use crate::error::ErrorCode;
use crate::metadata::StateMachine;

/// One entry of the master's command log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Time the command is applied at.
    pub now: Timestamp,
    /// The command.
    pub command: Command,
}

impl LogEntry {
    /// The entry's bytes, as the log carries them.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("log entries always serialize")
    }
}

/// Decodes a response produced by [`StateMachine::apply`] on a [`Master`].
pub fn decode_response(bytes: &[u8]) -> Result<Response, ErrorCode> {
    postcard::from_bytes(bytes).map_err(|_| ErrorCode::DESERIALIZE_FAIL)
}

impl StateMachine for Master {
    /// Decodes a [`LogEntry`], applies it, and encodes the [`Response`]. Bytes that are not an
    /// entry change nothing and give `Unit(Err(DESERIALIZE_FAIL))`, the same on every replica.
    fn apply(&mut self, entry: &[u8]) -> Vec<u8> {
        let response = match postcard::from_bytes::<LogEntry>(entry) {
            Ok(e) => Master::apply(self, e.now, e.command),
            Err(_) => Response::Unit(Err(ErrorCode::DESERIALIZE_FAIL)),
        };
        postcard::to_allocvec(&response).expect("responses always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::{ClientId, MasterConfig, SegmentSpec};

    #[test]
    fn applies_encoded_entries() {
        let mut m = Master::new(MasterConfig::default()).unwrap();
        let entry = LogEntry {
            now: Timestamp(5),
            command: Command::MountSegment {
                client_id: ClientId(1),
                segment: SegmentSpec::new("a:1", 0, 1 << 20),
            },
        };
        let out = StateMachine::apply(&mut m, &entry.encode());
        assert_eq!(decode_response(&out), Ok(Response::Unit(Ok(()))));
        assert_eq!(m.now(), Timestamp(5));
        let out = StateMachine::apply(&mut m, &[0xff, 0xff, 0xff]);
        assert_eq!(
            decode_response(&out),
            Ok(Response::Unit(Err(ErrorCode::DESERIALIZE_FAIL)))
        );
        assert_eq!(decode_response(&[]), Err(ErrorCode::DESERIALIZE_FAIL));
    }
}
