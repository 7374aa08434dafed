//! The [`Allocator`] trait and [`RangeAllocator`], which hands out ranges of a mounted segment.
//!
//! The master keeps one allocator per mounted segment; each replica of an object is one
//! contiguous range. `RangeAllocator` is best-fit over free ranges kept in two ordered maps (by
//! offset, for coalescing, and by size, for the fit), so allocation and free are `O(log n)` in
//! the number of free ranges, and it tracks live allocations to reject double and foreign frees.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::error::{Error, ErrorCode, Result};

/// A range handed out by an [`Allocator`], in bytes from the start of its segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Allocation {
    /// Offset from the segment start.
    pub offset: u64,
    /// Length actually reserved (the request rounded up to the allocator's granularity).
    pub len: u64,
}

/// Hands out non-overlapping ranges of a fixed-size space.
pub trait Allocator: Send + Sync + std::fmt::Debug {
    /// Reserves at least `size` bytes; `None` when no free range is large enough.
    fn allocate(&mut self, size: u64) -> Option<Allocation>;
    /// Returns a range obtained from [`allocate`](Self::allocate). Anything else is an error and
    /// changes nothing.
    fn free(&mut self, allocation: Allocation) -> Result<()>;
    /// Total bytes managed.
    fn capacity(&self) -> u64;
    /// Bytes currently reserved.
    fn used(&self) -> u64;
    /// The largest request that would succeed now.
    fn largest_free(&self) -> u64;
}

/// Best-fit range allocator with coalescing; see the module docs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RangeAllocator {
    capacity: u64,
    granularity: u64,
    used: u64,
    free_by_offset: BTreeMap<u64, u64>,
    free_by_size: BTreeSet<(u64, u64)>,
    /// Serialized in offset order, so equal allocators encode to equal bytes (replicas of a
    /// replicated master compare snapshots).
    #[serde(serialize_with = "sorted_live")]
    live: HashMap<u64, u64>,
}

fn sorted_live<S: serde::Serializer>(
    live: &HashMap<u64, u64>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_map(live.iter().collect::<BTreeMap<_, _>>())
}

impl RangeAllocator {
    /// Default rounding of requests: 64 bytes, a cache line, so replicas never share one.
    pub const DEFAULT_GRANULARITY: u64 = 64;

    /// An allocator over `[0, capacity)` rounding requests to `granularity` (a power of two).
    pub fn new(capacity: u64, granularity: u64) -> Result<Self> {
        if !granularity.is_power_of_two() {
            return Err(Error::InvalidArgument(format!(
                "granularity {granularity} is not a power of two"
            )));
        }
        let capacity = capacity & !(granularity - 1);
        let mut a = RangeAllocator {
            capacity,
            granularity,
            used: 0,
            free_by_offset: BTreeMap::new(),
            free_by_size: BTreeSet::new(),
            live: HashMap::new(),
        };
        if capacity > 0 {
            a.insert_free(0, capacity);
        }
        Ok(a)
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        self.free_by_offset.insert(offset, len);
        self.free_by_size.insert((len, offset));
    }

    fn remove_free(&mut self, offset: u64, len: u64) {
        self.free_by_offset.remove(&offset);
        self.free_by_size.remove(&(len, offset));
    }

    /// Number of live allocations.
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Splits the live allocation `allocation` at offset `at` (a multiple of the granularity
    /// strictly inside it) into two live allocations, `[offset, at)` and `[at, end)`, each freed
    /// on its own. Used bytes do not change. Anything else is an error and changes nothing.
    pub fn split(&mut self, allocation: Allocation, at: u64) -> Result<(Allocation, Allocation)> {
        let end = allocation.offset.saturating_add(allocation.len);
        let live = self.live.get(&allocation.offset) == Some(&allocation.len);
        if !live || at <= allocation.offset || at >= end || at % self.granularity != 0 {
            return Err(Error::with_code(
                ErrorCode::INVALID_PARAMS,
                format!(
                    "split of {}+{} at {at}: not a live allocation with {at} inside it on a \
                     {}-byte boundary",
                    allocation.offset, allocation.len, self.granularity
                ),
            ));
        }
        let head = Allocation {
            offset: allocation.offset,
            len: at - allocation.offset,
        };
        let tail = Allocation {
            offset: at,
            len: end - at,
        };
        self.live.insert(head.offset, head.len);
        self.live.insert(tail.offset, tail.len);
        Ok((head, tail))
    }

    /// The allocator's granularity.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Free ranges as `(offset, len)`, by offset (for invariant checks).
    pub fn free_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.free_by_offset.iter().map(|(o, l)| (*o, *l))
    }
}

impl Allocator for RangeAllocator {
    fn allocate(&mut self, size: u64) -> Option<Allocation> {
        if size == 0 {
            return None;
        }
        let len = size.checked_add(self.granularity - 1)? & !(self.granularity - 1);
        let &(free_len, offset) = self.free_by_size.range((len, 0)..).next()?;
        self.remove_free(offset, free_len);
        if free_len > len {
            self.insert_free(offset + len, free_len - len);
        }
        self.used += len;
        self.live.insert(offset, len);
        Some(Allocation { offset, len })
    }

    fn free(&mut self, allocation: Allocation) -> Result<()> {
        match self.live.get(&allocation.offset) {
            Some(&len) if len == allocation.len => {}
            _ => {
                return Err(Error::with_code(
                    ErrorCode::INVALID_PARAMS,
                    format!(
                        "free of {}+{} that is not a live allocation",
                        allocation.offset, allocation.len
                    ),
                ))
            }
        }
        self.live.remove(&allocation.offset);
        self.used -= allocation.len;
        let mut offset = allocation.offset;
        let mut len = allocation.len;
        if let Some((&prev_off, &prev_len)) = self.free_by_offset.range(..offset).next_back() {
            if prev_off + prev_len == offset {
                self.remove_free(prev_off, prev_len);
                offset = prev_off;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.free_by_offset.get(&(offset + len)) {
            self.remove_free(offset + len, next_len);
            len += next_len;
        }
        self.insert_free(offset, len);
        Ok(())
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn used(&self) -> u64 {
        self.used
    }

    fn largest_free(&self) -> u64 {
        self.free_by_size.iter().next_back().map_or(0, |(l, _)| *l)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocate_free_coalesce() {
        let mut a = RangeAllocator::new(1 << 20, 64).unwrap();
        let x = a.allocate(100).unwrap();
        assert_eq!(x.len, 128);
        let y = a.allocate(1000).unwrap();
        let z = a.allocate(64).unwrap();
        assert_eq!(a.used(), 128 + 1024 + 64);
        a.free(y).unwrap();
        assert!(a.free(y).is_err(), "double free is refused");
        a.free(x).unwrap();
        a.free(z).unwrap();
        assert_eq!(a.used(), 0);
        assert_eq!(a.free_ranges().collect::<Vec<_>>(), vec![(0, 1 << 20)]);
        assert!(a.allocate(0).is_none());
        assert!(a.allocate(u64::MAX).is_none());
        assert!(a.allocate((1 << 20) + 1).is_none());
        assert!(a.allocate(1 << 20).is_some());
        assert!(a.allocate(1).is_none());
    }

    #[test]
    fn split_pieces_are_freed_on_their_own() {
        let mut a = RangeAllocator::new(1 << 20, 64).unwrap();
        let x = a.allocate(4096).unwrap();
        assert!(a.split(x, x.offset + 100).is_err(), "not on a granule");
        assert!(a.split(x, x.offset).is_err(), "empty head");
        assert!(a.split(x, x.offset + 4096).is_err(), "empty tail");
        let (h, t) = a.split(x, x.offset + 1024).unwrap();
        assert_eq!((h.len, t.offset, t.len), (1024, x.offset + 1024, 3072));
        assert!(a.free(x).is_err(), "the whole is no longer live");
        assert_eq!((a.used(), a.live_count()), (4096, 2));
        a.free(t).unwrap();
        assert_eq!(a.used(), 1024);
        a.free(h).unwrap();
        assert_eq!(a.free_ranges().collect::<Vec<_>>(), vec![(0, 1 << 20)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u64),
        Free(usize),
        /// Split the i-th live allocation at the j-th granule inside it.
        Split(usize, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..5000).prop_map(Op::Alloc),
            (1u64..70_000).prop_map(Op::Alloc),
            any::<usize>().prop_map(Op::Free),
            (any::<usize>(), any::<u64>()).prop_map(|(i, j)| Op::Split(i, j)),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(op(), 1..300)) {
            let cap = 256 * 1024;
            let mut a = RangeAllocator::new(cap, 64).unwrap();
            let mut live: Vec<Allocation> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(n) => {
                        if let Some(x) = a.allocate(n) {
                            prop_assert!(x.len >= n && x.offset + x.len <= cap);
                            for y in &live {
                                prop_assert!(x.offset + x.len <= y.offset || y.offset + y.len <= x.offset,
                                    "{:?} overlaps {:?}", x, y);
                            }
                            live.push(x);
                        } else {
                            prop_assert!(a.largest_free() < n);
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let x = live.swap_remove(i % live.len());
                        a.free(x).unwrap();
                    }
                    Op::Free(_) => {}
                    Op::Split(i, j) if !live.is_empty() => {
                        let k = i % live.len();
                        let x = live[k];
                        let granules = x.len / 64;
                        if granules < 2 {
                            prop_assert!(a.split(x, x.offset + x.len / 2).is_err());
                        } else {
                            let at = x.offset + 64 * (1 + j % (granules - 1));
                            let (h, t) = a.split(x, at).unwrap();
                            prop_assert_eq!((h.offset, h.len + t.len, t.offset), (x.offset, x.len, at));
                            live[k] = h;
                            live.push(t);
                        }
                    }
                    Op::Split(..) => {}
                }
                prop_assert_eq!(a.live_count(), live.len());
                let used: u64 = live.iter().map(|x| x.len).sum();
                prop_assert_eq!(a.used(), used);
                let free: u64 = a.free_ranges().map(|(_, l)| l).sum();
                prop_assert_eq!(free + used, cap);
                // Free ranges never touch: they would have been coalesced.
                let ranges: Vec<_> = a.free_ranges().collect();
                for w in ranges.windows(2) {
                    prop_assert!(w[0].0 + w[0].1 < w[1].0);
                }
            }
        }
    }
}
