//! The master as a [`StateMachine`] behind a command log.
//!
//! A log entry is a [`LogEntry`]: the command and the time it is applied at, chosen once by
//! whoever appends it (the leader), so every replica applies it with the same `now`, plus the
//! reads the leader served outside the log that the command's outcome depends on (see
//! [`LeaderView`](super::LeaderView)). Entries and responses are postcard-encoded.

use serde::{Deserialize, Serialize};

use super::command::{Command, Response};
use super::types::Timestamp;
use super::Master;
use mooncake_core::error::ErrorCode;
use mooncake_core::metadata::StateMachine;

/// One entry of the master's command log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Time the command is applied at.
    pub now: Timestamp,
    /// Reads served outside the log, `(key, read time)`, applied as lease grants before the
    /// command.
    pub reads: Vec<(String, Timestamp)>,
    /// The command.
    pub command: Command,
}

impl LogEntry {
    /// An entry carrying no reads.
    pub fn new(now: Timestamp, command: Command) -> Self {
        LogEntry {
            now,
            reads: Vec::new(),
            command,
        }
    }

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
            Ok(e) => {
                self.record_reads(&e.reads);
                Master::apply(self, e.now, e.command)
            }
            Err(_) => Response::Unit(Err(ErrorCode::DESERIALIZE_FAIL)),
        };
        postcard::to_allocvec(&response).expect("responses always serialize")
    }

    /// The whole master (configuration, RNG state, segments with their allocators, objects,
    /// clients, tasks, counters), postcard-encoded, followed by the remembered request outcomes,
    /// then the objects' checksums (`(key, checksum)` for each object that has one).
    fn snapshot(&self) -> mooncake_core::Result<Vec<u8>> {
        let mut bytes = postcard::to_allocvec(self)?;
        bytes.extend_from_slice(&postcard::to_allocvec(&self.requests)?);
        let checksums: Vec<(&str, u32)> = self
            .objects
            .iter()
            .filter_map(|(k, o)| o.checksum.map(|c| (k.as_str(), c)))
            .collect();
        bytes.extend_from_slice(&postcard::to_allocvec(&checksums)?);
        Ok(bytes)
    }

    /// Replaces the master with a snapshot, after checking it decodes and its configuration is
    /// valid. A snapshot without remembered request outcomes (made before they existed)
    /// restores with none, and one without checksums (made before them) restores its objects
    /// without any: they are served unverified.
    fn restore(&mut self, snapshot: &[u8]) -> mooncake_core::Result<()> {
        let (mut restored, rest): (Master, &[u8]) = postcard::take_from_bytes(snapshot)?;
        if !rest.is_empty() {
            let (requests, rest) = postcard::take_from_bytes(rest)?;
            restored.requests = requests;
            if !rest.is_empty() {
                let checksums: Vec<(String, u32)> = postcard::from_bytes(rest)?;
                for (key, checksum) in checksums {
                    if let Some(o) = restored.objects.get_mut(&key) {
                        o.checksum = Some(checksum);
                    }
                }
            }
        }
        restored.config().validate()?;
        restored.rebuild_indexes();
        *self = restored;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientId, MasterConfig, SegmentSpec};

    #[test]
    fn applies_encoded_entries() {
        let mut m = Master::new(MasterConfig::default()).unwrap();
        let entry = LogEntry::new(
            Timestamp(5),
            Command::MountSegment {
                client_id: ClientId(1),
                segment: SegmentSpec::new("a:1", 0, 1 << 20),
            },
        );
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

    #[test]
    fn snapshots_restore_an_identical_master() {
        use crate::{ReplicateConfig, Timestamp};
        let mut m = Master::new(MasterConfig::default()).unwrap();
        let cmds = |i: u64| {
            vec![
                Command::MountSegment {
                    client_id: ClientId(u128::from(i % 3 + 1)),
                    segment: SegmentSpec::new(format!("h{}:1", i % 3), (i % 3 + 1) << 32, 1 << 24),
                },
                Command::PutStart {
                    client_id: ClientId(1),
                    key: format!("k{i}"),
                    size: 1000 + i,
                    config: ReplicateConfig::with_replicas(2),
                },
                Command::PutEnd {
                    client_id: ClientId(1),
                    key: format!("k{i}"),
                },
                Command::GetReplicaList {
                    key: format!("k{}", i / 2),
                },
            ]
        };
        for i in 0..50 {
            for c in cmds(i) {
                m.apply(Timestamp(i * 10), c);
            }
        }
        let snap = StateMachine::snapshot(&m).unwrap();
        let mut copy = Master::new(MasterConfig::default()).unwrap();
        StateMachine::restore(&mut copy, &snap).unwrap();
        assert_eq!(copy.metrics(), m.metrics());
        for i in 50..80 {
            for c in cmds(i) {
                let a = m.apply(Timestamp(i * 10), c.clone());
                let b = copy.apply(Timestamp(i * 10), c);
                assert_eq!(a, b, "restored master diverged at step {i}");
            }
        }
        let before = copy.metrics();
        assert!(StateMachine::restore(&mut copy, &snap[..snap.len() / 2]).is_err());
        assert_eq!(copy.metrics(), before, "a failed restore changes nothing");
    }

    #[test]
    fn a_snapshot_made_before_request_ids_restores_with_none_remembered() {
        use crate::{RequestId, Timestamp};
        let mut m = Master::new(MasterConfig::default()).unwrap();
        let mount = Command::MountSegment {
            client_id: ClientId(1),
            segment: SegmentSpec::new("h:1", 1 << 32, 1 << 24),
        };
        m.apply(Timestamp(1), mount);
        let named = |key: &str| Command::Once {
            id: RequestId {
                client: ClientId(1),
                seq: 1,
            },
            done_below: 0,
            command: Box::new(Command::Remove {
                key: key.into(),
                force: false,
            }),
        };
        m.apply(Timestamp(2), named("k"));
        // The earlier format: the master alone, nothing after it.
        let old = postcard::to_allocvec(&m).unwrap();
        let mut copy = Master::new(MasterConfig::default()).unwrap();
        StateMachine::restore(&mut copy, &old).unwrap();
        assert_eq!(copy.metrics().capacity_bytes, m.metrics().capacity_bytes);
        // The current format carries the remembered outcome: the retry is answered from it.
        let mut full = Master::new(MasterConfig::default()).unwrap();
        StateMachine::restore(&mut full, &StateMachine::snapshot(&m).unwrap()).unwrap();
        assert_eq!(
            full.apply(Timestamp(3), named("k")),
            m.apply(Timestamp(3), named("k"))
        );
    }
}
