//! Pieces: how a file is cut (pieces subdivide the catalog's shards), how a piece maps onto a
//! peer's buffers, which pieces a peer holds ([`Bitmap`]) and what a piece's hash is.

use serde::{Deserialize, Serialize};

/// Pieces [`auto_piece_size`] aims at per payload.
pub const AUTO_PIECES: u64 = 512;
/// Smallest piece [`auto_piece_size`] picks: per piece there is one request, one hash and one
/// bit in every availability record.
pub const AUTO_PIECE_MIN: u64 = 512 << 10;
/// Largest piece [`auto_piece_size`] picks: a pull holds `max_in_flight` pieces of scratch.
pub const AUTO_PIECE_MAX: u64 = 8 << 20;

/// The piece size for a payload of `total_size` bytes when none is configured: about
/// [`AUTO_PIECES`] pieces (the size rounded up to a power of two), within
/// [`AUTO_PIECE_MIN`]..=[`AUTO_PIECE_MAX`].
///
/// Why so many pieces: when readers start together, the last pieces the origin sends still have
/// to be relayed to every reader after it is done, which takes about (readers - 1) x piece /
/// bandwidth, i.e. (readers - 1) / pieces of the ideal time. Measured on 256 MiB to 8 readers
/// at 200 Mbit/s (README): 4 MiB pieces (64) took 1.6x the lower bound, 1 MiB (256) 1.14-1.17x,
/// 512 KiB (512) 1.11-1.12x.
pub fn auto_piece_size(total_size: u64) -> u64 {
    total_size
        .div_ceil(AUTO_PIECES)
        .next_power_of_two()
        .clamp(AUTO_PIECE_MIN, AUTO_PIECE_MAX)
}

/// A piece's BLAKE3 hash.
pub type PieceHash = [u8; 32];

/// The hash of one piece's bytes.
pub fn hash_piece(bytes: &[u8]) -> PieceHash {
    *blake3::hash(bytes).as_bytes()
}

/// A byte range of the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceRange {
    /// Offset in the file.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub len: u64,
}

/// The pieces of a file of `total_size` bytes cut in shards of `max_shard_size`, each shard cut
/// in pieces of at most `piece_size`: a piece never straddles two shards.
pub fn layout(total_size: u64, max_shard_size: u64, piece_size: u64) -> Vec<PieceRange> {
    assert!(
        max_shard_size > 0 && piece_size > 0,
        "zero shard or piece size"
    );
    let mut pieces = Vec::new();
    let mut shard = 0;
    while shard < total_size {
        let shard_end = (shard + max_shard_size).min(total_size);
        let mut offset = shard;
        while offset < shard_end {
            let len = piece_size.min(shard_end - offset);
            pieces.push(PieceRange { offset, len });
            offset += len;
        }
        shard = shard_end;
    }
    pieces
}

/// A memory range in some process's segment: one of the buffers whose concatenation is the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buffer {
    /// Address in the owner's segment (inside memory registered with its engine).
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Buffer {
    /// A buffer of `len` bytes at `addr`.
    pub fn new(addr: u64, len: u64) -> Self {
        Buffer { addr, len }
    }
}

/// The pieces of `[offset, offset + len)` of the file laid out in `buffers`, as `(address,
/// length, offset within the range)` fragments in order; `None` if the range passes the end.
pub fn fragments(buffers: &[Buffer], offset: u64, len: u64) -> Option<Vec<(u64, u64, u64)>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    let end = offset.checked_add(len)?;
    for b in buffers {
        let b_end = start + b.len;
        if b_end > offset && start < end {
            let from = offset.max(start);
            let to = end.min(b_end);
            out.push((b.addr + (from - start), to - from, from - offset));
        }
        start = b_end;
        if start >= end {
            break;
        }
    }
    let covered: u64 = out.iter().map(|f| f.1).sum();
    (covered == len).then_some(out)
}

/// One bit per piece.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bitmap {
    len: usize,
    words: Vec<u64>,
}

impl Bitmap {
    /// `len` bits, all clear.
    pub fn new(len: usize) -> Self {
        Bitmap {
            len,
            words: vec![0; len.div_ceil(64)],
        }
    }

    /// `len` bits, all set.
    pub fn full(len: usize) -> Self {
        let mut b = Bitmap::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bit `i` (false past the end).
    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`.
    pub fn set(&mut self, i: usize) {
        assert!(i < self.len, "bit {i} of {}", self.len);
        self.words[i / 64] |= 1 << (i % 64);
    }

    /// Clears bit `i`.
    pub fn clear(&mut self, i: usize) {
        assert!(i < self.len, "bit {i} of {}", self.len);
        self.words[i / 64] &= !(1 << (i % 64));
    }

    /// The bits, 64 to a word, bit `i` at `words()[i / 64] >> (i % 64)`; none set past the end.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Whether no bit is set.
    pub fn is_clear(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Indexes of the set bits, in order.
    pub fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        ones(&self.words)
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether every bit is set.
    pub fn is_full(&self) -> bool {
        self.count_ones() == self.len
    }

    /// Whether the encoding is consistent (length matches, no bits past the end), for bitmaps
    /// read from the catalog.
    pub fn is_valid(&self) -> bool {
        self.words.len() == self.len.div_ceil(64)
            && (self.len % 64 == 0 || self.words.last().is_none_or(|w| w >> (self.len % 64) == 0))
    }
}

/// Indexes of the set bits of `words`, in order.
pub(crate) fn ones(words: &[u64]) -> impl Iterator<Item = usize> + '_ {
    words.iter().enumerate().flat_map(|(i, &w)| {
        let mut w = w;
        std::iter::from_fn(move || {
            if w == 0 {
                return None;
            }
            let bit = w.trailing_zeros() as usize;
            w &= w - 1;
            Some(i * 64 + bit)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_subdivide_shards() {
        let l = layout(10, 4, 3);
        let got: Vec<(u64, u64)> = l.iter().map(|p| (p.offset, p.len)).collect();
        assert_eq!(got, vec![(0, 3), (3, 1), (4, 3), (7, 1), (8, 2)]);
        assert!(layout(0, 4, 3).is_empty());
        let l = layout(16, 8, 8);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn fragments_follow_buffer_order() {
        let bufs = [
            Buffer::new(100, 4),
            Buffer::new(500, 2),
            Buffer::new(900, 10),
        ];
        assert_eq!(fragments(&bufs, 0, 4), Some(vec![(100, 4, 0)]));
        assert_eq!(
            fragments(&bufs, 3, 5),
            Some(vec![(103, 1, 0), (500, 2, 1), (900, 2, 3)])
        );
        assert_eq!(fragments(&bufs, 15, 1), Some(vec![(909, 1, 0)]));
        assert_eq!(fragments(&bufs, 15, 2), None);
        assert_eq!(fragments(&bufs, u64::MAX, 2), None);
    }

    #[test]
    fn bitmap_bits_and_validation() {
        let mut b = Bitmap::new(70);
        assert!(!b.get(69) && !b.get(1000));
        b.set(69);
        b.set(0);
        assert_eq!(b.count_ones(), 2);
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 69]);
        b.clear(0);
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![69]);
        assert!(!b.is_clear());
        b.clear(69);
        assert!(b.is_clear());
        b.set(0);
        b.set(69);
        assert!(b.is_valid() && !b.is_full());
        assert!(Bitmap::full(70).is_full());
        let bad = Bitmap {
            len: 3,
            words: vec![0b1000],
        };
        assert!(!bad.is_valid());
        let bad = Bitmap {
            len: 3,
            words: vec![],
        };
        assert!(!bad.is_valid());
    }

    #[test]
    fn hashes_differ_with_content() {
        assert_ne!(hash_piece(b"a"), hash_piece(b"b"));
        assert_eq!(hash_piece(b"a"), hash_piece(b"a"));
    }
}
