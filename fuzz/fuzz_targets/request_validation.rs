//! Fuzzes `MemoryRegistry::resolve`, the check every remote READ/WRITE goes through before the
//! transport touches memory.
//!
//! Up to 8 zeroed `AlignedBuffer`s of at most 64 KiB are registered; then each probe asks for a
//! range, either anywhere in the address space or relative to a real buffer (just before, inside,
//! at or past its end). Checks:
//! - `resolve(addr, len).is_ok()` equals a naive u128 containment check against the buffers;
//! - an accepted region has the requested address and length and belongs to a buffer that
//!   contains it (a zero-length range where two buffers meet lies in both);
//! - `MemRegion::slice` accepts exactly the sub-ranges inside the region;
//! - writing through an accepted region and reading it back round-trips, and the write lands
//!   exactly there: the whole buffer matches a shadow copy afterwards.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mooncake_core::{AlignedBuffer, Location, MemoryRegistry};

const MAX_BUFFERS: usize = 8;
const MAX_PROBES: usize = 256;
/// Longest range written through for the round-trip check.
const MAX_WRITE: u64 = 1 << 20;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Buffer sizes: `size as usize + 1` bytes, so 1 B ..= 64 KiB.
    sizes: Vec<u16>,
    probes: Vec<Probe>,
}

#[derive(Arbitrary, Debug)]
enum Probe {
    /// Any range at all.
    Wild { addr: u64, len: u64 },
    /// A range starting `offset` bytes from the start of buffer `buffer` (may be negative).
    Near { buffer: u8, offset: i32, len: u32 },
    /// A range starting `back` bytes before the end of buffer `buffer` (negative: past it).
    NearEnd { buffer: u8, back: i16, len: u16 },
    /// Like `Near`, with a huge length meant to overflow `addr + len`.
    Overflow { buffer: u8, offset: u16, minus: u16 },
    /// A sub-range of the region a `Near` probe resolves to.
    Slice {
        buffer: u8,
        offset: u16,
        len: u16,
        sub_offset: u64,
        sub_len: u64,
    },
}

struct Buf {
    addr: u64,
    len: u64,
    shadow: Vec<u8>,
}

/// Indices of the buffers `[addr, addr + len)` lies in: at most one, except that a zero-length
/// range at the boundary of two adjacent buffers lies in both.
fn naive(bufs: &[Buf], addr: u64, len: u64) -> Vec<usize> {
    (0..bufs.len())
        .filter(|&i| {
            let b = &bufs[i];
            addr as u128 >= b.addr as u128
                && addr as u128 + len as u128 <= b.addr as u128 + b.len as u128
        })
        .collect()
}

fuzz_target!(|input: Input| {
    let reg = MemoryRegistry::new();
    let mut bufs: Vec<Buf> = Vec::new();
    for &s in input.sizes.iter().take(MAX_BUFFERS) {
        let len = s as usize + 1;
        let addr = reg
            .register_owned(
                AlignedBuffer::new(len).expect("allocation"),
                Location::cpu(0),
            )
            .expect("fresh allocations never overlap");
        bufs.push(Buf {
            addr,
            len: len as u64,
            shadow: vec![0; len],
        });
    }

    for (n, probe) in input.probes.iter().take(MAX_PROBES).enumerate() {
        let pick =
            |i: u8| -> Option<&Buf> { (!bufs.is_empty()).then(|| &bufs[i as usize % bufs.len()]) };
        let (addr, len, sub) = match *probe {
            Probe::Wild { addr, len } => (addr, len, None),
            Probe::Near {
                buffer,
                offset,
                len,
            } => match pick(buffer) {
                Some(b) => (b.addr.wrapping_add_signed(offset as i64), len as u64, None),
                None => (offset as u64, len as u64, None),
            },
            Probe::NearEnd { buffer, back, len } => match pick(buffer) {
                Some(b) => (
                    (b.addr + b.len).wrapping_sub(back as i64 as u64),
                    len as u64,
                    None,
                ),
                None => (back as u64, len as u64, None),
            },
            Probe::Overflow {
                buffer,
                offset,
                minus,
            } => {
                let base = pick(buffer).map_or(0, |b| b.addr);
                (
                    base.wrapping_add(offset as u64),
                    u64::MAX - minus as u64,
                    None,
                )
            }
            Probe::Slice {
                buffer,
                offset,
                len,
                sub_offset,
                sub_len,
            } => {
                let base = pick(buffer).map_or(0, |b| b.addr);
                (
                    base.wrapping_add(offset as u64),
                    len as u64,
                    Some((sub_offset, sub_len)),
                )
            }
        };

        let expected = naive(&bufs, addr, len);
        let got = reg.resolve(addr, len);
        assert_eq!(
            got.is_ok(),
            !expected.is_empty(),
            "resolve({addr:#x}, {len}) = {got:?}, buffers {:?}",
            bufs.iter().map(|b| (b.addr, b.len)).collect::<Vec<_>>()
        );
        let Ok(mut region) = got else {
            continue;
        };
        assert_eq!((region.addr(), region.len()), (addr, len));
        assert_eq!(region.is_empty(), len == 0);
        let owner = (region.buffer().addr(), region.buffer().len());
        let which = *expected
            .iter()
            .find(|&&i| (bufs[i].addr, bufs[i].len) == owner)
            .unwrap_or_else(|| {
                panic!("{region:?} attributed to {owner:?}, not a containing buffer")
            });

        if let Some((sub_offset, sub_len)) = sub {
            let in_range = (sub_offset as u128 + sub_len as u128) <= len as u128;
            let sliced = region.slice(sub_offset, sub_len);
            assert_eq!(
                sliced.is_ok(),
                in_range,
                "slice({sub_offset}, {sub_len}) of {region:?}"
            );
            match sliced {
                Ok(s) => {
                    assert_eq!((s.addr(), s.len()), (addr + sub_offset, sub_len));
                    region = s;
                }
                Err(_) => continue,
            }
        }

        if region.len() <= MAX_WRITE {
            let b = &mut bufs[which];
            let pattern: Vec<u8> = (0..region.len())
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(n as u8 ^ 0xa5))
                .collect();
            region.write_from(&pattern).expect("exact length");
            assert_eq!(region.to_vec(), pattern, "write/read round trip");
            assert!(
                region
                    .write_from(&pattern[..pattern.len().saturating_sub(1)])
                    .is_err()
                    || pattern.is_empty()
            );
            let at = (region.addr() - b.addr) as usize;
            b.shadow[at..at + pattern.len()].copy_from_slice(&pattern);
            let whole = reg.resolve(b.addr, b.len).expect("whole buffer resolves");
            assert!(
                whole.to_vec() == b.shadow,
                "write strayed outside its range"
            );
        }
    }

    // Everything unregisters; nothing resolves afterwards.
    for b in &bufs {
        reg.unregister(b.addr).expect("registered, no live regions");
        assert!(reg.resolve(b.addr, 1).is_err());
    }
});
