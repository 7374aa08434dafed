//! Per-object checksums (see [`ValueChecksum`]).

/// An incremental checksum of one value: what a writer computes over a value and sends with
/// its commit.
///
/// The master never reads object bytes: it records the checksum a commit carries
/// ([`Command::PutEndChecked`](super::Command::PutEndChecked),
/// [`Command::BatchPutEndChecked`](super::Command::BatchPutEndChecked),
/// [`Command::CommitReservedChecked`](super::Command::CommitReservedChecked)) with the object and
/// hands it out with every [`ReplicaList`](super::ReplicaList). A reader recomputes it over the
/// bytes it received, and a replica whose bytes differ (a late WRITE that landed in space since
/// handed to this object, a corrupted range) is never returned: the reader tries another replica,
/// and answers `CHECKSUM_MISMATCH` (-801) when none matches. A copy or move task copies the bytes
/// unchanged, so the object's checksum stays as committed; an upsert's commit replaces it.
///
/// The function is CRC-32 (IEEE polynomial) as `crc32fast` computes it: with PCLMULQDQ (x86-64)
/// or the ARMv8 CRC instructions it runs at several GB/s per core, and a CRC detects every
/// burst of up to 32 flipped bits and any other corruption with probability 1 - 2^-32, which is
/// what a guard against misplaced or torn writes needs (it is not a defence against an
/// adversary, who could forge it; peers are authenticated for that).
#[derive(Clone, Debug, Default)]
pub struct ValueChecksum(crc32fast::Hasher);

impl ValueChecksum {
    /// A checksum of nothing yet.
    pub fn new() -> Self {
        ValueChecksum(crc32fast::Hasher::new())
    }

    /// Adds the next bytes of the value.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The checksum of the bytes added.
    pub fn finish(self) -> u32 {
        self.0.finalize()
    }

    /// The checksum of a value in one piece.
    pub fn of(bytes: &[u8]) -> u32 {
        crc32fast::hash(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_sum_as_the_whole() {
        let v: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut c = ValueChecksum::new();
        for part in v.chunks(777) {
            c.update(part);
        }
        assert_eq!(c.finish(), ValueChecksum::of(&v));
        let mut w = v.clone();
        w[5000] ^= 1;
        assert_ne!(ValueChecksum::of(&w), ValueChecksum::of(&v));
        // The standard CRC-32 check value.
        assert_eq!(ValueChecksum::of(b"123456789"), 0xCBF4_3926);
    }
}
