//! A value read by a bytes call, held where it landed until it is copied out once.
//!
//! Performance-critical: every bytes get returns one.

use std::sync::Arc;

use mooncake_core::{Result, TransferEngine};

use super::staging::Slot;

/// A value read by [`Store::get_staged`](super::Store::get_staged): in this client's staging
/// buffer (holding that space until dropped), or owned (a replica in this client's own segment,
/// or a value moved out of staging to make room). Copying it straight to its final place, such
/// as a Python `bytes` object, saves the intermediate vector of [`Store::get`](super::Store::get).
#[derive(Debug)]
pub struct StagedValue(Held);

#[derive(Debug)]
enum Held {
    Owned(Vec<u8>),
    Staged {
        engine: Arc<TransferEngine>,
        _slot: Arc<Slot>,
        addr: u64,
        len: u64,
    },
}

impl From<Vec<u8>> for StagedValue {
    fn from(v: Vec<u8>) -> Self {
        StagedValue::owned(v)
    }
}

impl StagedValue {
    pub(crate) fn owned(v: Vec<u8>) -> Self {
        StagedValue(Held::Owned(v))
    }

    /// `len` bytes at `addr` of the staging space `slot`.
    pub(crate) fn staged(
        engine: Arc<TransferEngine>,
        slot: Arc<Slot>,
        addr: u64,
        len: u64,
    ) -> Self {
        StagedValue(Held::Staged {
            engine,
            _slot: slot,
            addr,
            len,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        match &self.0 {
            Held::Owned(v) => v.len(),
            Held::Staged { len, .. } => *len as usize,
        }
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the value into `dst`, which must be exactly [`len`](Self::len) bytes.
    pub fn read_into(&self, dst: &mut [u8]) -> Result<()> {
        match &self.0 {
            Held::Owned(v) if v.len() == dst.len() => {
                dst.copy_from_slice(v);
                Ok(())
            }
            Held::Owned(v) => Err(mooncake_core::Error::InvalidArgument(format!(
                "destination of {} bytes for a value of {}",
                dst.len(),
                v.len()
            ))),
            Held::Staged {
                engine, addr, len, ..
            } => engine.memory().resolve(*addr, *len)?.read_into(dst),
        }
    }

    /// The value as a vector (moved if owned, else copied out of staging).
    pub fn into_vec(self) -> Result<Vec<u8>> {
        match self.0 {
            Held::Owned(v) => Ok(v),
            Held::Staged {
                engine, addr, len, ..
            } => Ok(engine.memory().resolve(addr, len)?.to_vec()),
        }
    }

    /// Moves the value out of staging, freeing that space once no other value holds it.
    pub(crate) fn into_owned(self) -> Result<Self> {
        match self.0 {
            Held::Owned(_) => Ok(self),
            staged => Ok(StagedValue::owned(StagedValue(staged).into_vec()?)),
        }
    }
}
