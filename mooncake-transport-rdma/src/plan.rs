//! Pure planning: how a request is cut into slices, which NICs serve which memory, and the keys
//! a buffer publishes. No I/O here, so all of it is unit- and property-tested.

use std::collections::HashMap;

use mooncake_core::{Error, Result};

/// Which local NICs serve memory of each location, upstream's "NIC priority matrix": for a
/// location (`cpu:0`, `cuda:1`), the preferred NICs and the fallback ones. Slices of a request
/// go round-robin over the preferred NICs of its memory; a retry may use the fallback ones.
///
/// Empty (the default) is auto-selection: for `cpu:N`, the NICs on NUMA node `N` are preferred
/// and the others are fallback; for other locations, or when no NIC's node is known, every NIC
/// is preferred. A location missing from a non-empty matrix is auto-selected too. Entry `*`
/// applies to locations not named otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NicPriorityMatrix {
    entries: HashMap<String, (Vec<String>, Vec<String>)>,
}

impl NicPriorityMatrix {
    /// An empty matrix (auto-selection).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the preferred and fallback NICs (by device name) of `location`.
    pub fn set(
        &mut self,
        location: impl Into<String>,
        preferred: Vec<String>,
        fallback: Vec<String>,
    ) -> &mut Self {
        self.entries.insert(location.into(), (preferred, fallback));
        self
    }

    /// True when nothing is set (auto-selection).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Parses upstream's JSON form, `{"cpu:0": [["mlx5_0"], ["mlx5_1"]], ...}`: for each
    /// location, a list of preferred device names and a list of fallback ones.
    pub fn parse_json(text: &str) -> Result<Self> {
        let bad = |m: &str| Error::InvalidArgument(format!("NIC priority matrix: {m}"));
        let mut p = JsonCursor {
            s: text.as_bytes(),
            i: 0,
        };
        let mut matrix = NicPriorityMatrix::new();
        p.expect(b'{').map_err(|_| bad("expected an object"))?;
        if p.peek() == Some(b'}') {
            p.i += 1;
        } else {
            loop {
                let location = p.string().map_err(|_| bad("expected a location string"))?;
                p.expect(b':').map_err(|_| bad("expected ':'"))?;
                p.expect(b'[')
                    .map_err(|_| bad("expected [preferred, fallback]"))?;
                let preferred = p
                    .string_list()
                    .map_err(|_| bad("expected a list of names"))?;
                let fallback = if p.peek() == Some(b',') {
                    p.i += 1;
                    p.string_list()
                        .map_err(|_| bad("expected a list of names"))?
                } else {
                    Vec::new()
                };
                p.expect(b']').map_err(|_| bad("expected ']'"))?;
                matrix.set(location, preferred, fallback);
                match p.next() {
                    Some(b',') => continue,
                    Some(b'}') => break,
                    _ => return Err(bad("expected ',' or '}'")),
                }
            }
        }
        if p.peek().is_some() {
            return Err(bad("trailing characters"));
        }
        Ok(matrix)
    }

    /// Candidate NICs (indices into `devices`) for memory at `location`: the preferred ones,
    /// then the fallback ones. The first list is never empty when `devices` is not; the second
    /// holds every device not in the first, so a retry can reach any NIC.
    pub fn candidates(&self, location: &str, devices: &[NicInfo]) -> (Vec<u16>, Vec<u16>) {
        let index = |name: &String| devices.iter().position(|d| &d.name == name);
        let entry = self.entries.get(location).or_else(|| self.entries.get("*"));
        let mut preferred: Vec<u16> = Vec::new();
        let mut fallback: Vec<u16> = Vec::new();
        if let Some((p, f)) = entry {
            preferred = p.iter().filter_map(index).map(|i| i as u16).collect();
            fallback = f.iter().filter_map(index).map(|i| i as u16).collect();
            if preferred.is_empty() {
                preferred = std::mem::take(&mut fallback);
            }
        }
        if preferred.is_empty() {
            let node = location
                .strip_prefix("cpu:")
                .and_then(|n| n.parse::<u32>().ok());
            preferred = (0..devices.len())
                .filter(|&i| node.is_none() || devices[i].numa_node == node)
                .map(|i| i as u16)
                .collect();
            if preferred.is_empty() {
                preferred = (0..devices.len() as u16).collect();
            }
        }
        let mut all = preferred.clone();
        all.extend(fallback.iter().copied().filter(|i| !preferred.contains(i)));
        all.extend(
            (0..devices.len() as u16).filter(|i| !preferred.contains(i) && !fallback.contains(i)),
        );
        let rest = all.split_off(preferred.len());
        (preferred, rest)
    }
}

/// A tiny reader for the matrix's JSON (objects of arrays of strings only).
struct JsonCursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonCursor<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }
    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), ()> {
        if self.next() == Some(c) {
            Ok(())
        } else {
            Err(())
        }
    }
    fn string(&mut self) -> std::result::Result<String, ()> {
        self.expect(b'"')?;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != b'"' {
            if self.s[self.i] == b'\\' {
                return Err(());
            }
            self.i += 1;
        }
        let text = std::str::from_utf8(self.s.get(start..self.i).ok_or(())?).map_err(|_| ())?;
        self.expect(b'"')?;
        Ok(text.to_owned())
    }
    fn string_list(&mut self) -> std::result::Result<Vec<String>, ()> {
        self.expect(b'[')?;
        let mut out = Vec::new();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(out);
        }
        loop {
            out.push(self.string()?);
            match self.next() {
                Some(b',') => continue,
                Some(b']') => return Ok(out),
                _ => return Err(()),
            }
        }
    }
}

/// What planning needs to know of a NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NicInfo {
    /// Device name.
    pub name: String,
    /// NUMA node, when known.
    pub numa_node: Option<u32>,
}

/// One slice of a request: `len` bytes at offset `offset` of the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Offset from the start of the request.
    pub offset: u64,
    /// Length (at most the slice size, never zero).
    pub len: u64,
    /// Index of the local registration chunk the piece lies in.
    pub local_chunk: u32,
    /// Index of the remote registration chunk the piece lies in.
    pub remote_chunk: u32,
}

/// How buffers are cut into registration chunks: `[base + k * chunk, base + (k + 1) * chunk)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunking {
    /// Start of the buffer.
    pub base: u64,
    /// Chunk length (non-zero).
    pub chunk: u64,
}

impl Chunking {
    fn index(&self, addr: u64) -> u64 {
        (addr - self.base) / self.chunk
    }
    fn end_of_chunk(&self, addr: u64) -> u64 {
        self.base + (self.index(addr) + 1) * self.chunk
    }
}

/// Cuts a request of `len` bytes from `local_addr` (in a buffer chunked as `local`) to
/// `remote_addr` (in a buffer chunked as `remote`) into pieces of at most `slice` bytes, none
/// crossing a chunk boundary on either side. Calls `f` with each, in order.
pub fn slice_request(
    local_addr: u64,
    remote_addr: u64,
    len: u64,
    slice: u64,
    local: Chunking,
    remote: Chunking,
    mut f: impl FnMut(Piece),
) {
    debug_assert!(slice > 0 && local.chunk > 0 && remote.chunk > 0);
    let mut offset = 0;
    while offset < len {
        let l = local_addr + offset;
        let r = remote_addr + offset;
        let this = (len - offset)
            .min(slice)
            .min(local.end_of_chunk(l) - l)
            .min(remote.end_of_chunk(r) - r);
        f(Piece {
            offset,
            len: this,
            local_chunk: local.index(l) as u32,
            remote_chunk: remote.index(r) as u32,
        });
        offset += this;
    }
}

/// The NIC for attempt `attempt` of slice number `n`: the first attempt goes round-robin over
/// the preferred NICs; each retry moves on through every candidate (preferred, then fallback),
/// so consecutive attempts use different NICs whenever there is more than one.
pub fn pick_nic(preferred: &[u16], all: &[u16], n: u64, attempt: u32) -> u16 {
    let first = (n % preferred.len() as u64) as usize;
    if attempt == 0 {
        return preferred[first];
    }
    // `first` is also the position of that NIC in `all` (which starts with `preferred`).
    all[(first + attempt as usize) % all.len()]
}

/// Version tag of the keys a buffer publishes.
pub const KEYS_V1: u64 = 1;

/// The keys a buffer publishes under `rdma`: `[KEYS_V1, chunk, devices, preferred mask,
/// rkey(chunk 0, device 0), rkey(chunk 0, device 1), ..., rkey(chunk 1, device 0), ...]`. The
/// preferred mask has bit `d` set when the owner's NIC `d` is preferred for the buffer's memory.
pub fn encode_keys(chunk: u64, devices: usize, preferred_mask: u64, rkeys: &[u32]) -> Vec<u64> {
    let mut v = Vec::with_capacity(4 + rkeys.len());
    v.extend([KEYS_V1, chunk, devices as u64, preferred_mask]);
    v.extend(rkeys.iter().map(|&k| k as u64));
    v
}

/// A peer's published keys of one buffer, checked.
#[derive(Clone, Copy, Debug)]
pub struct RemoteKeys<'a> {
    /// Chunk length.
    pub chunk: u64,
    /// Number of the owner's NICs.
    pub devices: usize,
    /// Bit `d` set: the owner prefers NIC `d` for this buffer.
    pub preferred_mask: u64,
    rkeys: &'a [u64],
}

impl<'a> RemoteKeys<'a> {
    /// Parses keys for a buffer of `len` bytes; `None` when they are malformed.
    pub fn parse(keys: &'a [u64], len: u64) -> Option<Self> {
        if keys.len() < 4 || keys[0] != KEYS_V1 {
            return None;
        }
        let (chunk, devices, mask) = (keys[1], keys[2], keys[3]);
        if chunk == 0 || devices == 0 || devices > MAX_NICS as u64 {
            return None;
        }
        let chunks = len.div_ceil(chunk);
        if (keys.len() - 4) as u64 != chunks.checked_mul(devices)? {
            return None;
        }
        Some(RemoteKeys {
            chunk,
            devices: devices as usize,
            preferred_mask: mask,
            rkeys: &keys[4..],
        })
    }

    /// The rkey of chunk `chunk` on the owner's NIC `device`.
    pub fn rkey(&self, chunk: u32, device: u16) -> u32 {
        self.rkeys[chunk as usize * self.devices + device as usize] as u32
    }

    /// The owner's preferred NICs and the others, as candidates for [`pick_nic`].
    pub fn candidates(&self) -> (Vec<u16>, Vec<u16>) {
        let (mut preferred, mut rest): (Vec<u16>, Vec<u16>) =
            (0..self.devices as u16).partition(|&d| self.preferred_mask & (1 << d) != 0);
        if preferred.is_empty() {
            preferred = std::mem::take(&mut rest);
        }
        (preferred, rest)
    }
}

/// Most NICs a host may use (the preferred mask is 64 bits).
pub const MAX_NICS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nics(nodes: &[Option<u32>]) -> Vec<NicInfo> {
        nodes
            .iter()
            .enumerate()
            .map(|(i, &numa_node)| NicInfo {
                name: format!("mlx5_{i}"),
                numa_node,
            })
            .collect()
    }

    #[test]
    fn auto_selection_prefers_the_buffers_numa_node() {
        let d = nics(&[Some(0), Some(1), Some(0), Some(1)]);
        let m = NicPriorityMatrix::new();
        assert_eq!(m.candidates("cpu:0", &d), (vec![0, 2], vec![1, 3]));
        assert_eq!(m.candidates("cpu:1", &d), (vec![1, 3], vec![0, 2]));
        // Unknown node or another kind of memory: every NIC.
        assert_eq!(m.candidates("cpu:7", &d), (vec![0, 1, 2, 3], vec![]));
        assert_eq!(m.candidates("cuda:0", &d), (vec![0, 1, 2, 3], vec![]));
        let unknown = nics(&[None, None]);
        assert_eq!(m.candidates("cpu:0", &unknown), (vec![0, 1], vec![]));
    }

    #[test]
    fn the_matrix_names_preferred_and_fallback_nics() {
        let d = nics(&[None, None, None]);
        let m = NicPriorityMatrix::parse_json(
            r#"{"cpu:0": [["mlx5_2", "mlx5_0"], ["mlx5_1"]], "*": [["mlx5_1"], []],
                "cuda:0": [["nope"], ["mlx5_0"]]}"#,
        )
        .unwrap();
        assert_eq!(m.candidates("cpu:0", &d), (vec![2, 0], vec![1]));
        assert_eq!(m.candidates("cpu:1", &d), (vec![1], vec![0, 2]));
        // A preferred list of unknown devices falls to the fallback list.
        assert_eq!(m.candidates("cuda:0", &d), (vec![0], vec![1, 2]));
        assert!(NicPriorityMatrix::parse_json("{}").unwrap().is_empty());
        for bad in [
            "",
            "[]",
            r#"{"cpu:0": ["x"]}"#,
            r#"{"a": [[]]} x"#,
            r#"{"a" [[]]}"#,
        ] {
            assert!(NicPriorityMatrix::parse_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_round_trip_and_malformed_keys_are_refused() {
        let keys = encode_keys(4096, 2, 0b10, &[1, 2, 3, 4, 5, 6]);
        let k = RemoteKeys::parse(&keys, 3 * 4096).unwrap();
        assert_eq!(k.rkey(1, 0), 3);
        assert_eq!(k.rkey(2, 1), 6);
        assert_eq!(k.candidates(), (vec![1], vec![0]));
        assert!(
            RemoteKeys::parse(&keys, 4 * 4096).is_none(),
            "too few rkeys"
        );
        assert!(RemoteKeys::parse(&keys[..5], 3 * 4096).is_none());
        assert!(RemoteKeys::parse(&encode_keys(0, 2, 0, &[]), 0).is_none());
        assert!(RemoteKeys::parse(&[9, 4096, 1, 0, 1], 4096).is_none());
    }

    #[test]
    fn slices_respect_chunks_on_both_sides() {
        let local = Chunking {
            base: 0,
            chunk: 1000,
        };
        let remote = Chunking {
            base: 500,
            chunk: 700,
        };
        let mut pieces = Vec::new();
        slice_request(900, 1100, 1500, 400, local, remote, |p| pieces.push(p));
        let spans: Vec<(u64, u64)> = pieces.iter().map(|p| (p.offset, p.len)).collect();
        // local boundary at 1000 (offset 100), remote at 1200 (offset 100) and 1900 (800),
        // local at 2000 (1100), remote at 2600 (1500).
        assert_eq!(
            spans,
            vec![(0, 100), (100, 400), (500, 300), (800, 300), (1100, 400)]
        );
        assert_eq!(pieces[1].local_chunk, 1);
        assert_eq!(pieces[1].remote_chunk, 1);
        assert_eq!(pieces[4].local_chunk, 2);
        assert_eq!(pieces[4].remote_chunk, 2);
    }

    proptest! {
        /// Every byte of the request is in exactly one piece, in order; pieces are non-empty,
        /// at most the slice size, and inside one chunk on each side (the chunk they name).
        #[test]
        fn slicing_covers_every_byte_once(
            local_base in 0u64..1 << 40,
            remote_base in 0u64..1 << 40,
            local_off in 0u64..1 << 22,
            remote_off in 0u64..1 << 22,
            len in 0u64..1 << 22,
            slice in 1u64..1 << 20,
            local_chunk in 1u64..1 << 21,
            remote_chunk in 1u64..1 << 21,
        ) {
            let local = Chunking { base: local_base, chunk: local_chunk };
            let remote = Chunking { base: remote_base, chunk: remote_chunk };
            let (l, r) = (local_base + local_off, remote_base + remote_off);
            let mut at = 0;
            let mut count = 0u64;
            slice_request(l, r, len, slice, local, remote, |p| {
                assert_eq!(p.offset, at);
                assert!(p.len > 0 && p.len <= slice);
                let (ls, rs) = (l + p.offset, r + p.offset);
                assert_eq!((ls - local_base) / local_chunk, p.local_chunk as u64);
                assert_eq!((ls + p.len - 1 - local_base) / local_chunk, p.local_chunk as u64);
                assert_eq!((rs - remote_base) / remote_chunk, p.remote_chunk as u64);
                assert_eq!((rs + p.len - 1 - remote_base) / remote_chunk, p.remote_chunk as u64);
                at += p.len;
                count += 1;
            });
            prop_assert_eq!(at, len);
            // No gratuitous cuts: at most one piece per slice plus one per chunk boundary.
            let bound = len.div_ceil(slice) + len / local_chunk + len / remote_chunk + 2;
            prop_assert!(count <= bound);
        }

        /// First attempts spread evenly over the preferred NICs only; retries never repeat the
        /// NIC of the previous attempt when there is another, and reach every candidate.
        #[test]
        fn nic_selection_respects_preferences(
            nodes in proptest::collection::vec(proptest::option::of(0u32..3), 1..8),
            location in 0u32..4,
            slices in 1u64..200,
        ) {
            let d = nics(&nodes);
            let (preferred, rest) =
                NicPriorityMatrix::new().candidates(&format!("cpu:{location}"), &d);
            let mut all = preferred.clone();
            all.extend(&rest);
            let mut sorted = all.clone();
            sorted.sort();
            prop_assert_eq!(sorted, (0..d.len() as u16).collect::<Vec<_>>());
            for &p in &preferred {
                let on_node = d[p as usize].numa_node == Some(location);
                let none_on_node = !d.iter().any(|n| n.numa_node == Some(location));
                prop_assert!(on_node || none_on_node);
            }
            let mut counts = vec![0u64; d.len()];
            for n in 0..slices {
                let nic = pick_nic(&preferred, &all, n, 0);
                prop_assert!(preferred.contains(&nic));
                counts[nic as usize] += 1;
                let mut seen = vec![nic];
                for attempt in 1..all.len() as u32 {
                    let next = pick_nic(&preferred, &all, n, attempt);
                    prop_assert_ne!(next, *seen.last().unwrap());
                    seen.push(next);
                }
                seen.sort();
                seen.dedup();
                prop_assert_eq!(seen.len(), all.len(), "retries reach every NIC");
            }
            let used: Vec<u64> = preferred.iter().map(|&p| counts[p as usize]).collect();
            let (lo, hi) = (used.iter().min().unwrap(), used.iter().max().unwrap());
            prop_assert!(hi - lo <= 1, "round-robin over preferred NICs: {used:?}");
        }
    }
}
