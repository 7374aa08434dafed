//! The revocation table of one process's shared buffers, and a peer's checked view of them.
//!
//! A target's transport owns a [`SlotTable`]: a small memfd of 64-bit words, one per shared
//! buffer, holding that buffer's generation. Unregistering bumps the generation; a peer holding a
//! [`SharedRange`] checks the word before and after every copy, so a copy that overlaps the
//! revocation fails instead of reporting success. Word 0 is the owner's open flag: once
//! [`SlotTable::close`] has run, every range of that owner fails.
//!
//! Memory safety does not depend on those checks: a peer's mapping keeps the memfd's pages alive
//! after the owner unmapped them, and the owner never reuses a memfd for another buffer.

use std::os::fd::OwnedFd;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mooncake_core::memfd::{check_memfd, create_memfd, Mapping};
use mooncake_core::memory::range_within;
use mooncake_core::{Error, MemRegion, Result};

/// Buffers one process can share at once (one word each in its [`SlotTable`]).
pub(crate) const SLOTS: u32 = 65_535;

/// The revocation table of one process's shared buffers (see the module docs).
#[derive(Debug)]
pub(crate) struct SlotTable {
    fd: OwnedFd,
    map: Mapping,
    free: Mutex<FreeSlots>,
}

#[derive(Debug, Default)]
struct FreeSlots {
    released: Vec<u32>,
    next: u32,
}

/// Bytes of a table: the open flag and one word per slot.
const TABLE_BYTES: u64 = (SLOTS as u64 + 1) * 8;

fn word(map: &Mapping, index: u32) -> &AtomicU64 {
    debug_assert!(u64::from(index) * 8 < map.len());
    // SAFETY: the mapping is page-aligned and TABLE_BYTES long (checked by whoever mapped it),
    // `index` is at most SLOTS (callers check), AtomicU64 has u64's layout, and the words are
    // only ever accessed atomically, here and in the peer processes.
    unsafe { &*((map.addr() + u64::from(index) * 8) as *const AtomicU64) }
}

impl SlotTable {
    /// A new table with every slot free and the owner open.
    pub(crate) fn new() -> Result<SlotTable> {
        let fd = create_memfd("mooncake-shm-slots", TABLE_BYTES)?;
        let map = Mapping::map(&fd, TABLE_BYTES)?;
        Ok(SlotTable {
            fd,
            map,
            free: Mutex::new(FreeSlots {
                released: Vec::new(),
                next: 1,
            }),
        })
    }

    /// The table's memfd, for peers to map read-only.
    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Takes a free slot; returns it with its current generation, or `None` when all are used.
    pub(crate) fn take(&self) -> Option<(u32, u64)> {
        let mut free = self.free.lock().expect("slot lock");
        let slot = match free.released.pop() {
            Some(s) => s,
            None if free.next <= SLOTS => {
                free.next += 1;
                free.next - 1
            }
            None => return None,
        };
        Some((slot, word(&self.map, slot).load(Ordering::Acquire)))
    }

    /// Revokes `slot`: every peer range holding its old generation fails from now on.
    pub(crate) fn revoke(&self, slot: u32) {
        if (1..=SLOTS).contains(&slot) {
            word(&self.map, slot).fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Returns a revoked slot for reuse (with its new generation).
    pub(crate) fn release(&self, slot: u32) {
        if (1..=SLOTS).contains(&slot) {
            self.free.lock().expect("slot lock").released.push(slot);
        }
    }

    /// Marks the owner closed: every peer range of this table fails from now on.
    pub(crate) fn close(&self) {
        word(&self.map, 0).store(1, Ordering::Release);
    }

    /// Marks the owner open again (a transport serving the segment anew).
    pub(crate) fn open(&self) {
        word(&self.map, 0).store(0, Ordering::Release);
    }
}

/// A peer's view of another process's [`SlotTable`], mapped read-only.
#[derive(Debug)]
pub(crate) struct SlotView {
    map: Mapping,
}

impl SlotView {
    /// Maps a table received from its owner, after checking it is a sealed memfd of the right
    /// size.
    pub(crate) fn map(fd: &OwnedFd) -> Result<SlotView> {
        check_memfd(fd, TABLE_BYTES)?;
        Ok(SlotView {
            map: Mapping::map_read_only(fd, TABLE_BYTES)?,
        })
    }

    /// True while the owner is open and `slot` still holds `generation`.
    pub(crate) fn live(&self, slot: u32, generation: u64) -> bool {
        (1..=SLOTS).contains(&slot)
            && word(&self.map, 0).load(Ordering::Acquire) == 0
            && word(&self.map, slot).load(Ordering::Acquire) == generation
    }

    /// True once the owner has closed.
    pub(crate) fn closed(&self) -> bool {
        word(&self.map, 0).load(Ordering::Acquire) != 0
    }
}

/// What a process tells a peer about one of its shared buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SharedInfo {
    /// Start address in the owner's address space.
    pub(crate) addr: u64,
    /// Length in bytes.
    pub(crate) len: u64,
    /// Slot in the owner's table.
    pub(crate) slot: u32,
    /// Generation the slot held when the buffer was registered.
    pub(crate) generation: u64,
}

/// A peer's mapping of another process's shared buffer: copies to and from it are plain memcpy,
/// each checked against the owner's revocation table before and after.
#[derive(Debug)]
pub(crate) struct SharedRange {
    info: SharedInfo,
    map: Mapping,
    table: Arc<SlotView>,
}

impl SharedRange {
    /// Maps a buffer received from its owner with its descriptor.
    pub(crate) fn map(info: SharedInfo, fd: &OwnedFd, table: Arc<SlotView>) -> Result<SharedRange> {
        check_memfd(fd, info.len)?;
        Ok(SharedRange {
            map: Mapping::map(fd, info.len)?,
            info,
            table,
        })
    }

    /// What the owner said about the buffer.
    pub(crate) fn info(&self) -> &SharedInfo {
        &self.info
    }

    /// True while the owner has neither unregistered the buffer nor closed.
    pub(crate) fn live(&self) -> bool {
        self.table.live(self.info.slot, self.info.generation)
    }

    /// True when `[addr, addr + len)` (owner's addresses) lies inside the buffer.
    pub(crate) fn covers(&self, addr: u64, len: u64) -> bool {
        range_within(self.info.addr, self.info.len, addr, len)
    }

    /// Copies `[addr, addr + local.len())` of the owner's buffer into `local`.
    pub(crate) fn read(&self, addr: u64, local: &MemRegion) -> Result<()> {
        let src = self.local_ptr(addr, local.len())?;
        // SAFETY: `src` is inside our live mapping (checked by local_ptr) and `local` is a
        // validated registered range kept alive by the region; they are distinct mappings, and
        // `ptr::copy` tolerates overlap anyway.
        unsafe { std::ptr::copy(src, local.as_ptr(), local.len() as usize) };
        fence(Ordering::Acquire);
        self.still_live()
    }

    /// Copies `local` into `[addr, addr + local.len())` of the owner's buffer.
    pub(crate) fn write(&self, addr: u64, local: &MemRegion) -> Result<()> {
        let dst = self.local_ptr(addr, local.len())?;
        // SAFETY: as in `read`, with the roles swapped.
        unsafe { std::ptr::copy(local.as_ptr(), dst, local.len() as usize) };
        fence(Ordering::Release);
        self.still_live()
    }

    fn local_ptr(&self, addr: u64, len: u64) -> Result<*mut u8> {
        if !self.covers(addr, len) {
            return Err(Error::RemoteRangeInvalid { addr, len });
        }
        self.still_live()?;
        Ok((self.map.addr() + (addr - self.info.addr)) as *mut u8)
    }

    fn still_live(&self) -> Result<()> {
        if self.live() {
            Ok(())
        } else {
            Err(Error::StaleMapping(format!(
                "shared buffer {:#x}+{} was unregistered or its owner closed",
                self.info.addr, self.info.len
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_revoke_and_close() {
        let table = SlotTable::new().unwrap();
        let view = Arc::new(SlotView::map(table.fd()).unwrap());
        let (slot, generation) = table.take().unwrap();
        assert!(view.live(slot, generation));
        assert!(!view.live(slot, generation + 1));
        assert!(!view.live(0, 0) && !view.live(SLOTS + 1, 0));
        table.revoke(slot);
        assert!(!view.live(slot, generation));
        table.release(slot);
        let (again, g2) = table.take().unwrap();
        assert_eq!(again, slot);
        assert_ne!(g2, generation, "a reused slot has a new generation");
        assert!(view.live(again, g2));
        table.close();
        assert!(view.closed() && !view.live(again, g2));
        table.open();
        assert!(view.live(again, g2));
    }

    #[test]
    fn an_unsealed_table_is_refused() {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: plain system call with a valid C string.
        let raw = unsafe { libc::memfd_create(c"plain".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: a new descriptor owned by nobody else.
        let plain = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sizing our own descriptor.
        let sized = unsafe { libc::ftruncate(plain.as_raw_fd(), TABLE_BYTES as libc::off_t) };
        assert_eq!(sized, 0);
        assert!(SlotView::map(&plain).is_err(), "a peer could shrink it");
    }

    #[test]
    fn table_runs_out_of_slots_cleanly() {
        let table = SlotTable::new().unwrap();
        for _ in 0..SLOTS {
            assert!(table.take().is_some());
        }
        assert!(table.take().is_none());
        table.revoke(7);
        table.release(7);
        assert_eq!(table.take().map(|s| s.0), Some(7));
    }
}
