//! The target side's memory: buffers in sealed memfds, which the engine allocates through this
//! transport's [`MemoryProvider`], and the slot each one holds in the revocation table while it
//! is registered.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use mooncake_core::memfd::{create_memfd, Mapping};
use mooncake_core::{AlignedBuffer, MemoryProvider, ProvidedMemory, Result};

use crate::table::SlotTable;

/// A buffer's memory: a sealed memfd, mapped shared in this process, that peers of this host
/// map too once they have its descriptor.
#[derive(Debug)]
pub(crate) struct ShmMemory {
    fd: OwnedFd,
    map: Mapping,
}

impl ShmMemory {
    /// The memfd, to pass to a peer.
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

// SAFETY: the mapping is page-aligned (mmap), non-empty (`Mapping` refuses 0 bytes), read-write,
// never moved or resized, and unmapped only when this value drops; the memfd is sealed against
// shrinking, so every page stays backed.
unsafe impl ProvidedMemory for ShmMemory {
    fn addr(&self) -> u64 {
        self.map.addr()
    }
    fn len(&self) -> usize {
        self.map.len() as usize
    }
}

/// Allocates the engine's buffers as [`ShmMemory`].
#[derive(Debug)]
pub(crate) struct ShmProvider;

impl MemoryProvider for ShmProvider {
    fn allocate(&self, len: usize) -> Result<AlignedBuffer> {
        let fd = create_memfd("mooncake-segment", len as u64)?;
        let map = Mapping::map(&fd, len as u64)?;
        AlignedBuffer::from_provided(ShmMemory { fd, map })
    }
}

/// Kept with a registered [`ShmMemory`] buffer: its slot in the revocation table and the
/// generation peers must see there. The slot is revoked when the buffer is unregistered and
/// returned for reuse once the buffer is released.
#[derive(Debug)]
pub(crate) struct Share {
    pub(crate) slot: u32,
    pub(crate) generation: u64,
    pub(crate) table: Arc<SlotTable>,
}

impl Drop for Share {
    fn drop(&mut self) {
        // Revoked already when it was unregistered; again in case it never was (a registry
        // dropped with the buffer in it), so that no peer range outlives it.
        self.table.revoke(self.slot);
        self.table.release(self.slot);
    }
}
