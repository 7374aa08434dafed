//! Shared memory between a dummy client and the real client: a sealed memfd mapped by both
//! (see [`mooncake_core::memfd`]), its descriptor passed with `SCM_RIGHTS`, and a small range
//! allocator for the dummy's side.

use std::collections::BTreeMap;
use std::sync::Mutex;

pub(crate) use mooncake_core::memfd::{
    check_memfd, create_memfd, send_with_fds, try_recv_with_fds, Mapping,
};

/// A first-fit allocator of offsets in `[0, len)`, with coalescing frees.
#[derive(Debug)]
pub(crate) struct RangeAlloc {
    free: Mutex<BTreeMap<u64, u64>>,
}

impl RangeAlloc {
    /// All of `[0, len)` free.
    pub(crate) fn new(len: u64) -> Self {
        let mut free = BTreeMap::new();
        if len > 0 {
            free.insert(0, len);
        }
        RangeAlloc {
            free: Mutex::new(free),
        }
    }

    /// An offset of `size` bytes aligned to `align` (a power of two), or `None` when no free
    /// range is large enough. The allocation is `size` rounded up to `align`.
    pub(crate) fn alloc(&self, size: u64, align: u64) -> Option<u64> {
        let size = size.max(1).checked_add(align - 1)? & !(align - 1);
        let mut free = self.free.lock().expect("allocator lock");
        let (start, len, at) = free.iter().find_map(|(&start, &len)| {
            let at = start.checked_add(align - 1)? & !(align - 1);
            (at.checked_add(size)? <= start + len).then_some((start, len, at))
        })?;
        free.remove(&start);
        if at > start {
            free.insert(start, at - start);
        }
        let end = at + size;
        if end < start + len {
            free.insert(end, start + len - end);
        }
        Some(at)
    }

    /// Frees what `alloc(size, align)` returned at `offset`.
    pub(crate) fn free(&self, offset: u64, size: u64, align: u64) {
        let mut size = size.max(1).saturating_add(align - 1) & !(align - 1);
        let mut offset = offset;
        let mut free = self.free.lock().expect("allocator lock");
        if let Some((&s, &l)) = free.range(..offset).next_back() {
            if s + l == offset {
                free.remove(&s);
                offset = s;
                size += l;
            }
        }
        if let Some(&l) = free.get(&(offset + size)) {
            free.remove(&(offset + size));
            size += l;
        }
        free.insert(offset, size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_fits_aligns_and_coalesces() {
        let a = RangeAlloc::new(4096);
        let x = a.alloc(100, 64).unwrap();
        let y = a.alloc(1000, 64).unwrap();
        assert_eq!(x, 0);
        assert_eq!(y, 128);
        assert!(a.alloc(4096, 64).is_none());
        a.free(x, 100, 64);
        a.free(y, 1000, 64);
        assert_eq!(a.alloc(4096, 64), Some(0));
        assert!(a.alloc(1, 64).is_none());
        let b = RangeAlloc::new(3 * 4096);
        assert_eq!(b.alloc(10, 4096), Some(0));
        assert_eq!(b.alloc(10, 4096), Some(4096));
    }
}
