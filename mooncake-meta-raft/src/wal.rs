//! On-disk formats: the raft log (WAL), the hard-state file and the snapshot file.
//!
//! Files in the data directory:
//! - `raft.wal`: the magic [`WAL_MAGIC`], then records of `[len: u32][crc32(payload): u32]
//!   [crc32(first 8 header bytes): u32][payload]`: the length is under a CRC of its own, so a
//!   damaged length is told apart from a torn append. The first record is a base record (index
//!   and term of the compaction point); the others are entry batches, each of which first
//!   truncates the log at its first index and then appends. A record never exceeds half the
//!   configured record cap: a large ready cycle is split over several records, so every record
//!   written can be read back. Compaction rewrites the file through `raft.wal.tmp` and a rename.
//!   A log of the earlier format (records with an 8-byte header whose CRC covers only the
//!   payload, no magic) is read and rewritten in this format at start.
//! - `hardstate`: two 40-byte slots `[seq][term][vote][commit][crc32][pad]`, written in turn, so
//!   a torn write leaves the other slot intact; the valid slot with the larger `seq` wins.
//! - `snapshot`: one framed record holding a protobuf `Snapshot` (metadata and data), replaced
//!   through `snapshot.tmp` and a rename.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use protobuf::Message as _;
pub use raft::prelude::Entry;
use raft::prelude::{EntryType, HardState, Snapshot};

use crate::codec::{self, Parsed};
use crate::error::{Error, Result};

/// Name of the log file.
pub const WAL_FILE: &str = "raft.wal";
/// Name of the hard-state file.
pub const HARD_STATE_FILE: &str = "hardstate";
/// Name of the snapshot file.
pub const SNAPSHOT_FILE: &str = "snapshot";

/// The first bytes of a log in the current format.
pub const WAL_MAGIC: &[u8; 8] = b"mcwal/2\n";
/// Bytes of a record header in the current format.
const WAL_HEADER_LEN: usize = 12;

const REC_BASE: u8 = 1;
const REC_ENTRIES: u8 = 2;
const SLOT_LEN: u64 = 40;

/// One decoded WAL record.
#[derive(Debug)]
pub(crate) enum WalRecord {
    /// The log starts after `index` (whose term is `term`).
    Base {
        index: u64,
        #[allow(dead_code)]
        term: u64,
    },
    /// Truncate at the first entry's index, then append.
    Entries(Vec<Entry>),
}

fn entry_type_code(t: EntryType) -> u8 {
    match t {
        EntryType::EntryNormal => 0,
        EntryType::EntryConfChange => 1,
        EntryType::EntryConfChangeV2 => 2,
    }
}

/// Encodes a base record's payload.
pub(crate) fn encode_base(index: u64, term: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(17);
    p.push(REC_BASE);
    p.extend_from_slice(&index.to_le_bytes());
    p.extend_from_slice(&term.to_le_bytes());
    p
}

/// Encodes an entry batch's payload.
pub(crate) fn encode_entries(entries: &[Entry]) -> Vec<u8> {
    let size: usize = entries
        .iter()
        .map(|e| 25 + e.data.len() + e.context.len())
        .sum();
    let mut p = Vec::with_capacity(5 + size);
    p.push(REC_ENTRIES);
    p.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        p.extend_from_slice(&e.index.to_le_bytes());
        p.extend_from_slice(&e.term.to_le_bytes());
        p.push(entry_type_code(e.get_entry_type()));
        p.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
        p.extend_from_slice(&e.data);
        p.extend_from_slice(&(e.context.len() as u32).to_le_bytes());
        p.extend_from_slice(&e.context);
    }
    p
}

/// Appends one record in the current format to `out`.
pub(crate) fn frame_record(out: &mut Vec<u8>, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("a record of {} bytes cannot be framed", payload.len()),
        )
    })?;
    let mut header = [0u8; WAL_HEADER_LEN];
    header[0..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let header_crc = crc32fast::hash(&header[0..8]);
    header[8..12].copy_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    Ok(())
}

/// Frames `entries` as one or more entry records, each payload at most `max_record / 2` bytes
/// (an entry larger than that gets a record of its own, which must still fit `max_record`).
/// An entry that could not be read back is an error before anything is written.
pub(crate) fn frame_entries(
    out: &mut Vec<u8>,
    entries: &[Entry],
    max_record: usize,
) -> std::io::Result<()> {
    let cap = (max_record / 2).max(1);
    let size = |e: &Entry| 25 + e.data.len() + e.context.len();
    let mut start = 0;
    while start < entries.len() {
        let mut end = start;
        let mut bytes = 5;
        while end < entries.len() && (end == start || bytes + size(&entries[end]) <= cap) {
            bytes += size(&entries[end]);
            end += 1;
        }
        if bytes > max_record {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "entry {} of {bytes} bytes exceeds the log's record cap of {max_record} \
                     bytes: it could not be read back, so it is not written",
                    entries[start].index
                ),
            ));
        }
        frame_record(out, &encode_entries(&entries[start..end]))?;
        start = end;
    }
    Ok(())
}

/// What [`parse_wal_record`] found.
enum WalParsed<'a> {
    Record {
        payload: &'a [u8],
        next: usize,
    },
    /// The file ends inside a record, or only zeros follow (an append cut short).
    Torn,
    /// Damage that an append cut short cannot explain.
    Corrupt(String),
}

fn parse_wal_record(buf: &[u8], offset: usize, max_len: usize) -> WalParsed<'_> {
    let rest = &buf[offset..];
    if rest.len() < WAL_HEADER_LEN || rest.iter().all(|b| *b == 0) {
        return WalParsed::Torn;
    }
    let word = |i: usize| u32::from_le_bytes(rest[i..i + 4].try_into().expect("4 bytes"));
    let (len, crc, header_crc) = (word(0) as usize, word(4), word(8));
    if crc32fast::hash(&rest[0..8]) != header_crc {
        return WalParsed::Corrupt(format!(
            "record header at offset {offset} is damaged and {} bytes follow it",
            rest.len()
        ));
    }
    if len > max_len {
        return WalParsed::Corrupt(format!(
            "record at offset {offset} claims {len} bytes, above the cap of {max_len}"
        ));
    }
    if rest.len() < WAL_HEADER_LEN + len {
        return WalParsed::Torn;
    }
    let payload = &rest[WAL_HEADER_LEN..WAL_HEADER_LEN + len];
    if crc32fast::hash(payload) != crc {
        let after = &rest[WAL_HEADER_LEN + len..];
        if after.iter().all(|b| *b == 0) {
            // The last record (only zeros after it), whole in length but not in content: a
            // write cut short.
            return WalParsed::Torn;
        }
        return WalParsed::Corrupt(format!(
            "record at offset {offset} fails its CRC and {} more bytes follow it",
            after.len()
        ));
    }
    WalParsed::Record {
        payload,
        next: offset + WAL_HEADER_LEN + len,
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

/// Decodes a record payload whose CRC already matched; `None` means it is malformed.
pub(crate) fn decode_record(payload: &[u8]) -> Option<WalRecord> {
    let mut c = Cursor(payload);
    let rec = match c.u8()? {
        REC_BASE => WalRecord::Base {
            index: c.u64()?,
            term: c.u64()?,
        },
        REC_ENTRIES => {
            let n = c.u32()? as usize;
            let mut entries = Vec::with_capacity(n.min(payload.len() / 25));
            for _ in 0..n {
                let mut e = Entry::default();
                e.index = c.u64()?;
                e.term = c.u64()?;
                e.set_entry_type(match c.u8()? {
                    0 => EntryType::EntryNormal,
                    1 => EntryType::EntryConfChange,
                    2 => EntryType::EntryConfChangeV2,
                    _ => return None,
                });
                let len = c.u32()? as usize;
                e.data = c.take(len)?.to_vec().into();
                let len = c.u32()? as usize;
                e.context = c.take(len)?.to_vec().into();
                entries.push(e);
            }
            WalRecord::Entries(entries)
        }
        _ => return None,
    };
    c.0.is_empty().then_some(rec)
}

/// What reading the WAL found.
#[derive(Debug, Default)]
pub(crate) struct WalScan {
    /// Decoded records, in file order.
    pub(crate) records: Vec<WalRecord>,
    /// Offset and length of a damaged or torn tail that was dropped.
    pub(crate) dropped_tail: Option<(u64, u64)>,
    /// Offset just past the last good record.
    pub(crate) valid_len: u64,
    /// The log is in the earlier format (to be rewritten in the current one).
    pub(crate) earlier_format: bool,
}

/// Reads every good record of the WAL at `path`. A damaged last record (torn write) is
/// reported in `dropped_tail`; damage followed by more data is a hard error.
pub(crate) fn scan_wal(path: &Path, max_record: usize) -> Result<WalScan> {
    let buf = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(WalScan::default()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut scan = WalScan::default();
    if buf.is_empty() {
        return Ok(scan);
    }
    if buf.starts_with(WAL_MAGIC) {
        let mut offset = WAL_MAGIC.len();
        while offset < buf.len() {
            match parse_wal_record(&buf, offset, max_record) {
                WalParsed::Record { payload, next } => {
                    scan.records.push(decode_record(payload).ok_or_else(|| {
                        Error::corrupt(
                            path,
                            format!(
                                "record at offset {offset} has a valid CRC but does not decode"
                            ),
                        )
                    })?);
                    offset = next;
                }
                WalParsed::Torn => {
                    scan.dropped_tail = Some((offset as u64, (buf.len() - offset) as u64));
                    break;
                }
                WalParsed::Corrupt(reason) => {
                    return Err(Error::corrupt(
                        path,
                        format!("{reason}: the log is damaged, refusing to start"),
                    ));
                }
            }
        }
        scan.valid_len = offset as u64;
        return Ok(scan);
    }
    if WAL_MAGIC.starts_with(&buf[..buf.len().min(WAL_MAGIC.len())]) {
        // The magic itself was cut short: a log created just before a crash.
        scan.dropped_tail = Some((0, buf.len() as u64));
        return Ok(scan);
    }
    scan.earlier_format = true;
    let mut offset = 0usize;
    while offset < buf.len() {
        match codec::parse_record(&buf, offset, max_record) {
            Parsed::Record { payload, next } => {
                let rec = decode_record(payload).ok_or_else(|| {
                    Error::corrupt(
                        path,
                        format!("record at offset {offset} has a valid CRC but does not decode"),
                    )
                })?;
                scan.records.push(rec);
                offset = next;
            }
            Parsed::Truncated => {
                scan.dropped_tail = Some((offset as u64, (buf.len() - offset) as u64));
                break;
            }
            Parsed::Bad(reason) => {
                let len = u32::from_le_bytes(buf[offset..offset + 4].try_into().expect("4"));
                let end = offset + codec::HEADER_LEN + len as usize;
                if end < buf.len() && len as usize <= max_record {
                    return Err(Error::corrupt(
                        path,
                        format!(
                            "record at offset {offset} is damaged ({reason}) and {} more bytes \
                             follow it: the log is corrupt in the middle, refusing to start",
                            buf.len() - end
                        ),
                    ));
                }
                scan.dropped_tail = Some((offset as u64, (buf.len() - offset) as u64));
                break;
            }
        }
    }
    scan.valid_len = offset as u64;
    Ok(scan)
}

/// Opens `path` for appending, creating it.
pub(crate) fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// Flushes a directory so renames and creations in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Writes `contents` to `dir/name` through a temporary file, fsync and rename.
pub(crate) fn replace_file(dir: &Path, name: &str, contents: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(contents).map_err(|e| Error::io(&tmp, e))?;
    f.sync_data().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    sync_dir(dir)
}

/// Writes a WAL holding only `base` and `entries` (compaction, snapshot install, or a log of
/// the earlier format brought to the current one), in records of at most `max_record` bytes.
pub(crate) fn rewrite_wal(
    dir: &Path,
    base: (u64, u64),
    entries: &[Entry],
    max_record: usize,
) -> Result<()> {
    let buf =
        encode_log(base, entries, max_record).map_err(|e| Error::io(dir.join(WAL_FILE), e))?;
    replace_file(dir, WAL_FILE, &buf)
}

/// The bytes of a log in the current format holding `base` (index and term) and `entries`, in
/// records of at most `max_record` bytes; what [`rewrite_wal`] writes (also for tools and fuzz
/// seeds).
pub fn encode_log(
    base: (u64, u64),
    entries: &[Entry],
    max_record: usize,
) -> std::io::Result<Vec<u8>> {
    let mut buf = WAL_MAGIC.to_vec();
    frame_record(&mut buf, &encode_base(base.0, base.1))?;
    frame_entries(&mut buf, entries, max_record)?;
    Ok(buf)
}

/// Reads the snapshot file, if any.
pub(crate) fn read_snapshot(dir: &Path) -> Result<Option<Snapshot>> {
    let path = dir.join(SNAPSHOT_FILE);
    let buf = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&path, e)),
    };
    match codec::parse_record(&buf, 0, u32::MAX as usize) {
        Parsed::Record { payload, next } if next == buf.len() => {
            let snap = Snapshot::parse_from_bytes(payload)
                .map_err(|e| Error::corrupt(&path, format!("snapshot does not decode: {e}")))?;
            Ok(Some(snap))
        }
        Parsed::Record { .. } => Err(Error::corrupt(&path, "trailing bytes after the snapshot")),
        Parsed::Truncated => Err(Error::corrupt(
            &path,
            format!("snapshot truncated at {} bytes", buf.len()),
        )),
        Parsed::Bad(reason) => Err(Error::corrupt(&path, format!("offset 0: {reason}"))),
    }
}

/// Durably replaces the snapshot file.
pub(crate) fn write_snapshot(dir: &Path, snap: &Snapshot) -> Result<()> {
    let payload = snap
        .write_to_bytes()
        .map_err(|e| Error::Codec(e.to_string()))?;
    let mut buf = Vec::with_capacity(payload.len() + codec::HEADER_LEN);
    codec::frame_into(&mut buf, &payload).map_err(|e| Error::io(dir.join(SNAPSHOT_FILE), e))?;
    replace_file(dir, SNAPSHOT_FILE, &buf)
}

/// The hard-state file with its two alternating slots.
#[derive(Debug)]
pub(crate) struct HardStateFile {
    path: PathBuf,
    file: File,
    seq: u64,
}

fn encode_slot(seq: u64, hs: &HardState) -> [u8; SLOT_LEN as usize] {
    let mut b = [0u8; SLOT_LEN as usize];
    b[0..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&hs.term.to_le_bytes());
    b[16..24].copy_from_slice(&hs.vote.to_le_bytes());
    b[24..32].copy_from_slice(&hs.commit.to_le_bytes());
    let crc = crc32fast::hash(&b[0..32]);
    b[32..36].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_slot(b: &[u8]) -> Option<(u64, HardState)> {
    let crc = u32::from_le_bytes(b[32..36].try_into().ok()?);
    if crc32fast::hash(&b[0..32]) != crc {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let mut hs = HardState::default();
    hs.term = word(8);
    hs.vote = word(16);
    hs.commit = word(24);
    Some((word(0), hs))
}

impl HardStateFile {
    /// Opens (creating) the file and returns the newest valid hard state.
    pub(crate) fn open(dir: &Path) -> Result<(Self, HardState)> {
        let path = dir.join(HARD_STATE_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let buf = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let slots: Vec<(u64, HardState)> = buf
            .chunks_exact(SLOT_LEN as usize)
            .take(2)
            .filter_map(decode_slot)
            .collect();
        let best = slots.into_iter().max_by_key(|(seq, _)| *seq);
        if best.is_none() && !buf.is_empty() {
            return Err(Error::corrupt(
                &path,
                format!(
                    "no valid hard-state slot in {} bytes (offsets 0 and {SLOT_LEN})",
                    buf.len()
                ),
            ));
        }
        let (seq, hs) = best.unwrap_or_default();
        Ok((HardStateFile { path, file, seq }, hs))
    }

    /// Writes `hs` into the older slot; `sync` makes it durable before returning.
    pub(crate) fn write(&mut self, hs: &HardState, sync: bool) -> Result<()> {
        self.seq += 1;
        let slot = encode_slot(self.seq, hs);
        self.file
            .write_all_at(&slot, (self.seq % 2) * SLOT_LEN)
            .map_err(|e| Error::io(&self.path, e))?;
        if sync {
            self.file
                .sync_data()
                .map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }
}
