//! The socket protocol between an initiator and a target of one host.
//!
//! All integers little-endian. On accept the target sends a [`Hello`] with its revocation
//! table's memfd. Then the initiator sends requests, each a 24-byte header, and the target
//! answers each with a 32-byte [`Reply`]:
//! - `MAP addr len`: the buffer holding the range, with its memfd attached, or a status saying
//!   why not;
//! - `LANDED count`: followed by `count` (addr, len) pairs of WRITEs that asked for a landing
//!   notice; answered once the target's observer has them.

use mooncake_core::{Error, Result};

/// First bytes of a hello.
pub(crate) const MAGIC: u32 = 0x4853_434d; // "MCSH"
/// Protocol version.
pub(crate) const VERSION: u32 = 1;
/// Hello size.
pub(crate) const HELLO_LEN: usize = 16;
/// Request header size.
pub(crate) const REQUEST_LEN: usize = 24;
/// Reply size.
pub(crate) const REPLY_LEN: usize = 32;
/// Most ranges in one LANDED request.
pub(crate) const MAX_LANDED: u32 = 4096;

/// Request opcodes.
pub(crate) const OP_MAP: u32 = 1;
pub(crate) const OP_LANDED: u32 = 2;

/// Reply statuses.
pub(crate) const OK: u32 = 0;
pub(crate) const NOT_REGISTERED: u32 = 1;
pub(crate) const NOT_SHARED: u32 = 2;
pub(crate) const BAD_REQUEST: u32 = 3;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The target's greeting.
pub(crate) fn hello() -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    b
}

/// Checks a greeting; returns the target's process id.
pub(crate) fn check_hello(b: &[u8; HELLO_LEN]) -> Result<u64> {
    if u32_at(b, 0) != MAGIC || u32_at(b, 4) != VERSION {
        return Err(Error::Protocol(format!(
            "not a shared-memory target of version {VERSION} (hello {:02x?})",
            &b[..8]
        )));
    }
    Ok(u64_at(b, 8))
}

/// One request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) op: u32,
    pub(crate) count: u32,
    pub(crate) a: u64,
    pub(crate) b: u64,
}

impl Request {
    pub(crate) fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.count.to_le_bytes());
        b[8..16].copy_from_slice(&self.a.to_le_bytes());
        b[16..24].copy_from_slice(&self.b.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8; REQUEST_LEN]) -> Request {
        Request {
            op: u32_at(b, 0),
            count: u32_at(b, 4),
            a: u64_at(b, 8),
            b: u64_at(b, 16),
        }
    }
}

/// One reply. For a mapped buffer: its start, length, slot and generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Reply {
    pub(crate) status: u32,
    pub(crate) slot: u32,
    pub(crate) addr: u64,
    pub(crate) len: u64,
    pub(crate) generation: u64,
}

impl Reply {
    pub(crate) fn status(status: u32) -> Reply {
        Reply {
            status,
            ..Reply::default()
        }
    }

    pub(crate) fn encode(&self) -> [u8; REPLY_LEN] {
        let mut b = [0u8; REPLY_LEN];
        b[0..4].copy_from_slice(&self.status.to_le_bytes());
        b[4..8].copy_from_slice(&self.slot.to_le_bytes());
        b[8..16].copy_from_slice(&self.addr.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.generation.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8; REPLY_LEN]) -> Reply {
        Reply {
            status: u32_at(b, 0),
            slot: u32_at(b, 4),
            addr: u64_at(b, 8),
            len: u64_at(b, 16),
            generation: u64_at(b, 24),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let r = Request {
            op: OP_MAP,
            count: 7,
            a: u64::MAX - 3,
            b: 1 << 40,
        };
        assert_eq!(Request::decode(&r.encode()), r);
        let p = Reply {
            status: NOT_SHARED,
            slot: 65535,
            addr: 0x7f00_0000_1000,
            len: 4096,
            generation: 9,
        };
        assert_eq!(Reply::decode(&p.encode()), p);
        assert_eq!(
            check_hello(&hello()).unwrap(),
            u64::from(std::process::id())
        );
        let mut bad = hello();
        bad[4] = 2;
        assert!(check_hello(&bad).is_err());
    }
}
