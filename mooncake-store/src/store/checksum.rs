//! Per-object checksums on the client side: computed once per value on put, checked on read.
//!
//! Every put computes the value's checksum ([`ValueChecksum`]) once, from the caller's bytes or
//! registered buffers, and sends it with the commit (PutEnd or CommitReserved, their `Checked`
//! forms); the master returns it with the replica list. A read checks the bytes it received
//! against it:
//! - always when the value is returned as bytes (`get`, `get_batch`, `get_staged`, and what the
//!   Python binding's `get`/`get_buffer` call);
//! - on zero-copy reads (`get_into` and its batch forms) when
//!   [`StoreConfig::verify_zero_copy`](super::StoreConfig::verify_zero_copy) is set (by default,
//!   when the environment says `MOONCAKE_STORE_CHECKSUM=1`, upstream's switch).
//!
//! A replica whose bytes do not match is not returned: the read tries the object's other
//! replicas, and answers `CHECKSUM_MISMATCH` (-801) when none matches. A value committed
//! without a checksum (by an older client, or restored from a snapshot made before checksums)
//! is read unverified.
//!
//! This is the guard of last resort against a WRITE that lands late, in space the master has
//! since handed to another object: the TCP transport refuses WRITEs past their deadline at the
//! target, but a transport where the writer copies the bytes itself (same-host shared memory)
//! cannot be fenced by the target, and there the reader's check is what keeps such bytes from
//! being returned.

use mooncake_core::{Error, ErrorCode, MemoryRegistry, Result};
use mooncake_master::{ReplicaList, ValueChecksum};

/// The checksum of the concatenation of `parts`.
pub(super) fn of_bytes(parts: &[&[u8]]) -> u32 {
    let mut sum = ValueChecksum::new();
    parts.iter().for_each(|p| sum.update(p));
    sum.finish()
}

/// The checksum of the first `size` bytes of the registered ranges `parts`, in order, read in
/// place. Only for ranges nothing writes meanwhile: a put's source (the caller leaves it alone
/// during the call) or a read's destination once its transfer has completed.
pub(super) fn of_registered(
    memory: &MemoryRegistry,
    parts: &[(u64, u64)],
    size: u64,
) -> Result<u32> {
    let mut sum = ValueChecksum::new();
    let mut left = size;
    for &(addr, len) in parts {
        if left == 0 {
            break;
        }
        let len = len.min(left);
        let region = memory.resolve(addr, len)?;
        // SAFETY: as this function's contract says, nothing writes the range while it is read.
        sum.update(unsafe { region.bytes() });
        left -= len;
    }
    Ok(sum.finish())
}

/// `CHECKSUM_MISMATCH` for the replica read from `segment`.
pub(super) fn mismatch(segment: &str) -> Error {
    Error::with_code(
        ErrorCode::CHECKSUM_MISMATCH,
        format!("the bytes read from {segment} do not match the value's checksum"),
    )
}

/// Whether `got` is what `list` says the value's checksum is (true when it records none).
pub(super) fn matches(list: &ReplicaList, got: impl FnOnce() -> Result<u32>) -> Result<bool> {
    match list.checksum {
        None => Ok(true),
        Some(expected) => Ok(got()? == expected),
    }
}
