//! Member incarnations: a member whose data directory was wiped (or replaced) and that comes
//! back under the same id is refused until it is removed and added again.
//!
//! Such a member has lost its log and its vote: as a voter it would vote a second time in a term
//! it already voted in, and count towards a quorum for entries it no longer holds, so a
//! candidate missing committed entries could win with its vote and those entries would be lost.
//! Nothing in raft tells it apart from the member it was.
//!
//! So each data directory gets a random incarnation number when it is first used
//! ([`load_or_create`], in the file [`FILE`]), and every raft message a member sends carries it
//! as an extra protobuf field ([`FIELD`]; a peer that does not know it skips it, so members
//! of earlier versions still talk), along with the incarnation the group recorded for the
//! receiver, when it has one ([`FIELD_TO`]). The group records each member's incarnation in its
//! replicated state, through the log: the leader proposes the record the first time it hears
//! from a member it has none for (and its own once it leads), and a membership change removing a
//! member deletes its record. Every member then refuses messages from a member whose
//! incarnation differs from the record (with a rate-limited log line saying what to do), so a
//! wiped member neither votes nor acknowledges anything, and cannot be elected; nothing is sent
//! to it any more. The wiped member refuses, in turn, messages that name another incarnation
//! for it (so it never takes the leader's commit index for its empty log, which raft-rs
//! treats as a fatal error), and logs why. Once an
//! operator removes it (`mooncake_master admin remove N`) and adds it again as a learner, its
//! new incarnation is recorded on first contact.
//!
//! The guard holds from the moment the record is committed, which is one round trip after the
//! group first hears from the member: a directory wiped before that is not recognised.

use std::io::{self, Read, Write};
use std::path::Path;

use protobuf::Message as _;
use raft::prelude::Message;

/// The file in a member's data directory holding its incarnation (8 bytes, little endian).
pub const FILE: &str = "incarnation";

/// The protobuf field number carrying the sender's incarnation in a raft message (varint).
pub const FIELD: u32 = 1000;

/// The protobuf field number carrying the incarnation the sender's group state records for the
/// receiver, when it records one (varint).
pub const FIELD_TO: u32 = 1001;

/// The key of member `id`'s incarnation record in the replicated KV map (hidden from listings:
/// it starts with a NUL byte).
pub(crate) fn record_key(id: u64) -> String {
    format!("{RESERVED_PREFIX}raft/incarnation/{id}")
}

/// Keys of the KV map reserved for the group's own records; listings skip them unless asked
/// for by this prefix.
pub(crate) const RESERVED_PREFIX: &str = "\0";

/// Reads the incarnation of the data directory `dir`, creating it (random, non-zero, fsync'd
/// with its directory) when the directory has none yet.
pub fn load_or_create(dir: &Path) -> io::Result<u64> {
    let path = dir.join(FILE);
    match std::fs::File::open(&path) {
        Ok(mut f) => {
            let mut b = [0u8; 8];
            f.read_exact(&mut b).map_err(|e| {
                io::Error::new(e.kind(), format!("reading {}: {e}", path.display()))
            })?;
            return Ok(u64::from_le_bytes(b));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let value = random_nonzero();
    let tmp = dir.join(format!("{FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&value.to_le_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(value)
}

/// A random non-zero number from the process's hash keys (drawn from the OS) and the clock.
fn random_nonzero() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        let v = h.finish();
        if v != 0 {
            return v;
        }
    }
}

/// Stamps an outgoing message with the sender's incarnation and, when known, the receiver's.
pub(crate) fn stamp(m: &mut Message, sender: u64, receiver: Option<u64>) {
    let f = m.mut_unknown_fields();
    f.add_varint(FIELD, sender);
    if let Some(r) = receiver {
        f.add_varint(FIELD_TO, r);
    }
}

/// Takes the incarnations out of a received message: the sender's, and the one it knows for
/// the receiver (`None`: not said).
pub fn take(m: &mut Message) -> (Option<u64>, Option<u64>) {
    let mut field = |n: u32| {
        let v = m
            .get_unknown_fields()
            .get(n)
            .and_then(|v| v.varint.last().copied());
        if v.is_some() {
            m.mut_unknown_fields().remove(n);
        }
        v
    };
    let sender = field(FIELD);
    let receiver = field(FIELD_TO);
    (sender, receiver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::prelude::MessageType;

    #[test]
    fn the_field_travels_with_a_message_and_is_taken_out() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = 3;
        m.to = 1;
        m.term = 7;
        let mut stamped = m.clone();
        stamp(&mut stamped, u64::MAX - 5, Some(9));
        let bytes = stamped.write_to_bytes().unwrap();
        let mut got = Message::parse_from_bytes(&bytes).unwrap();
        assert_eq!(take(&mut got), (Some(u64::MAX - 5), Some(9)));
        assert_eq!(take(&mut got), (None, None));
        assert_eq!(got.write_to_bytes().unwrap(), m.write_to_bytes().unwrap());
        // A message without them (a peer of an earlier version).
        let mut plain = Message::parse_from_bytes(&m.write_to_bytes().unwrap()).unwrap();
        assert_eq!(take(&mut plain), (None, None));
    }

    #[test]
    fn a_directory_keeps_its_incarnation_and_a_new_one_gets_another() {
        let base = std::env::temp_dir().join(format!("mooncake-inc-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let first = load_or_create(&a).unwrap();
        assert_ne!(first, 0);
        assert_eq!(load_or_create(&a).unwrap(), first);
        assert_ne!(load_or_create(&b).unwrap(), first);
        std::fs::remove_dir_all(&a).unwrap();
        std::fs::create_dir_all(&a).unwrap();
        assert_ne!(
            load_or_create(&a).unwrap(),
            first,
            "a wiped directory is a new incarnation"
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
