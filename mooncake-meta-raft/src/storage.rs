//! [`DiskStorage`]: raft-rs [`Storage`] over the files of [`crate::wal`], with every entry kept in
//! memory as well (metadata logs are small and compacted by snapshots).
//!
//! Durability: [`DiskStorage::persist`] appends entries and fdatasyncs the log before it returns,
//! then writes the hard state (fdatasync'd when term or vote changed, which Raft's safety needs;
//! the commit index alone is written without a sync). The node sends no message that
//! acknowledges an entry before `persist` returned.

use std::cell::Cell;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

use crate::error::{Error, Result};
use crate::wal::{self, HardStateFile, WalRecord, WAL_FILE};

/// What [`DiskStorage::open`] found on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// A torn or damaged tail of the log (`(offset, bytes)`) that held no committed entry and
    /// was dropped.
    pub dropped_tail: Option<(u64, u64)>,
    /// Index of the snapshot the state was restored from (0: none).
    pub snapshot_index: u64,
    /// Last log index after recovery.
    pub last_index: u64,
    /// Commit index from the hard state.
    pub commit: u64,
}

/// Raft log, hard state and snapshot, durable under one directory.
#[derive(Debug)]
pub struct DiskStorage {
    dir: PathBuf,
    /// Largest log record read back; records written are at most half of it.
    max_record: usize,
    wal: File,
    hs_file: HardStateFile,
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: Snapshot,
    entries: Vec<Entry>,
    /// Set when raft asked for a snapshot the stored one cannot serve (too old, or taken before
    /// the receiver joined the configuration); the node then takes a fresh one.
    snapshot_wanted: Cell<bool>,
}

fn snap_index(s: &Snapshot) -> u64 {
    s.get_metadata().index
}

impl DiskStorage {
    /// Opens or creates the storage in `dir`, recovering the log. Damage that could hide a
    /// committed entry is an [`Error::Corrupt`]; a torn tail past the commit index is dropped
    /// with a warning.
    pub fn open(dir: &Path, max_record: usize) -> Result<(Self, RecoveryReport)> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let snapshot = wal::read_snapshot(dir)?.unwrap_or_default();
        let (hs_file, mut hard_state) = HardStateFile::open(dir)?;
        let wal_path = dir.join(WAL_FILE);
        let scan = wal::scan_wal(&wal_path, max_record)?;
        let snap_idx = snap_index(&snapshot);
        let snap_term = snapshot.get_metadata().term;

        let mut base: Option<u64> = None;
        let mut entries: Vec<Entry> = Vec::new();
        for rec in scan.records {
            match rec {
                WalRecord::Base { index, .. } => {
                    if base.is_some() {
                        return Err(Error::corrupt(&wal_path, "a second base record"));
                    }
                    base = Some(index);
                    entries.clear();
                }
                WalRecord::Entries(batch) => {
                    let Some(b) = base else {
                        return Err(Error::corrupt(&wal_path, "entries before the base record"));
                    };
                    let Some(first) = batch.first().map(|e| e.index) else {
                        continue;
                    };
                    let last = entries.last().map_or(b, |e| e.index);
                    if first > last + 1 || first <= b {
                        return Err(Error::corrupt(
                            &wal_path,
                            format!("entry batch starting at {first} does not follow the log (base {b}, last {last})"),
                        ));
                    }
                    let start = entries.first().map_or(first, |e| e.index);
                    entries.truncate((first - start) as usize);
                    entries.extend(batch);
                }
            }
        }
        if let Some(b) = base {
            if b > snap_idx {
                return Err(Error::corrupt(
                    &wal_path,
                    format!("the log starts after index {b} but the snapshot is at {snap_idx}"),
                ));
            }
        }
        // Entries the snapshot covers are dropped; if the log disagrees with the snapshot at its
        // index, the log's later entries are a stale branch (a snapshot install was cut short).
        if let Some(pos) = entries.iter().position(|e| e.index == snap_idx) {
            if entries[pos].term != snap_term {
                entries.clear();
            }
        }
        entries.retain(|e| e.index > snap_idx);
        if entries.first().is_some_and(|e| e.index != snap_idx + 1) {
            return Err(Error::corrupt(
                &wal_path,
                format!(
                    "the log resumes at index {} but the snapshot ends at {snap_idx}",
                    entries[0].index
                ),
            ));
        }
        let last_index = entries.last().map_or(snap_idx, |e| e.index);
        hard_state.commit = hard_state.commit.max(snap_idx);
        hard_state.term = hard_state.term.max(snap_term);
        if last_index < hard_state.commit {
            let at = scan
                .dropped_tail
                .map_or(String::new(), |(o, _)| format!(" (damage at offset {o})"));
            return Err(Error::corrupt(
                &wal_path,
                format!(
                    "the log ends at index {last_index} but entries up to {} are committed{at}: \
                     committed entries are missing or damaged, refusing to start",
                    hard_state.commit
                ),
            ));
        }
        if let Some((offset, len)) = scan.dropped_tail {
            tracing::warn!(
                file = %wal_path.display(),
                offset,
                bytes = len,
                "raft log has a torn or damaged tail past the commit index; dropping it"
            );
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&wal_path)
                .map_err(|e| Error::io(&wal_path, e))?;
            f.set_len(scan.valid_len)
                .and_then(|()| f.sync_all())
                .map_err(|e| Error::io(&wal_path, e))?;
        }
        let conf_state = snapshot.get_metadata().get_conf_state().clone();
        let report = RecoveryReport {
            dropped_tail: scan.dropped_tail,
            snapshot_index: snap_idx,
            last_index,
            commit: hard_state.commit,
        };
        if base.is_none() || scan.earlier_format {
            // A new log, a snapshot written before its log, or a log of the earlier format:
            // start the log (again) at the snapshot, in the current format.
            wal::rewrite_wal(dir, (snap_idx, snap_term), &entries, max_record)?;
        }
        let wal = wal::open_append(&wal_path)?;
        Ok((
            DiskStorage {
                dir: dir.to_owned(),
                max_record,
                wal,
                hs_file,
                hard_state,
                conf_state,
                snapshot,
                entries,
                snapshot_wanted: Cell::new(false),
            },
            report,
        ))
    }

    /// Whether the storage holds a group configuration (bootstrapped or installed a snapshot).
    pub fn is_initialized(&self) -> bool {
        snap_index(&self.snapshot) > 0
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether raft asked for a fresher snapshot than the stored one (clears the request).
    pub(crate) fn take_snapshot_request(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// The latest snapshot (metadata and data).
    pub fn snapshot_ref(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The hard state as last persisted.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Sets the in-memory configuration (persisted with the next snapshot; the log replays it).
    pub(crate) fn set_conf_state(&mut self, cs: ConfState) {
        self.conf_state = cs;
    }

    /// The configuration as of the last applied entry.
    pub(crate) fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    fn first(&self) -> u64 {
        snap_index(&self.snapshot) + 1
    }

    fn last(&self) -> u64 {
        self.entries
            .last()
            .map_or(snap_index(&self.snapshot), |e| e.index)
    }

    /// Appends `entries` (truncating any conflicting suffix) and makes them durable, then writes
    /// `hs` if given. Returns after the log is fdatasync'd.
    pub(crate) fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<()> {
        if let Some(first) = entries.first().map(|e| e.index) {
            let mut buf = Vec::new();
            let path = || self.dir.join(WAL_FILE);
            wal::frame_entries(&mut buf, entries, self.max_record)
                .map_err(|e| Error::io(path(), e))?;
            self.wal.write_all(&buf).map_err(|e| Error::io(path(), e))?;
            self.wal.sync_data().map_err(|e| Error::io(path(), e))?;
            assert!(
                first >= self.first() && first <= self.last() + 1,
                "raft appended entries at {first} outside [{}, {}]",
                self.first(),
                self.last() + 1
            );
            let keep = (first - self.first()) as usize;
            self.entries.truncate(keep);
            self.entries.extend_from_slice(entries);
        }
        if let Some(hs) = hs {
            let must_sync = hs.term != self.hard_state.term || hs.vote != self.hard_state.vote;
            self.hard_state = hs.clone();
            self.hs_file.write(hs, must_sync)?;
        }
        Ok(())
    }

    /// Records a new commit index (not synced: Raft does not need it durable; it is used on
    /// restart to detect a log that lost committed entries).
    pub(crate) fn set_commit(&mut self, commit: u64) -> Result<()> {
        if commit > self.hard_state.commit {
            self.hard_state.commit = commit;
            let hs = self.hard_state.clone();
            self.hs_file.write(&hs, false)?;
        }
        Ok(())
    }

    /// Installs a snapshot received from the leader: snapshot file, then an empty log based at
    /// its index, then the hard state.
    pub(crate) fn apply_snapshot(&mut self, snap: Snapshot) -> Result<()> {
        let meta = snap.get_metadata();
        let (index, term) = (meta.index, meta.term);
        wal::write_snapshot(&self.dir, &snap)?;
        wal::rewrite_wal(&self.dir, (index, term), &[], self.max_record)?;
        self.wal = wal::open_append(&self.dir.join(WAL_FILE))?;
        self.entries.clear();
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot = snap;
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(term);
        hs.commit = hs.commit.max(index);
        let sync = hs.term != self.hard_state.term;
        self.hard_state = hs.clone();
        self.hs_file.write(&hs, sync)
    }

    /// Takes a snapshot at the applied index `index` with `data`, then compacts the log.
    pub(crate) fn create_snapshot(&mut self, index: u64, data: Vec<u8>) -> Result<()> {
        let term = self.term(index)?;
        let mut snap = Snapshot::default();
        snap.data = data.into();
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        wal::write_snapshot(&self.dir, &snap)?;
        let keep: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| e.index > index)
            .cloned()
            .collect();
        wal::rewrite_wal(&self.dir, (index, term), &keep, self.max_record)?;
        self.wal = wal::open_append(&self.dir.join(WAL_FILE))?;
        self.entries = keep;
        self.snapshot = snap;
        Ok(())
    }
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = self.first();
        let mut out = self.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut out, max_size.into());
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let snap = self.snapshot.get_metadata();
        if idx == snap.index {
            return Ok(snap.term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let cs = self.snapshot.get_metadata().get_conf_state();
        let knows_to = cs.voters.contains(&to)
            || cs.learners.contains(&to)
            || cs.voters_outgoing.contains(&to)
            || cs.learners_next.contains(&to);
        if snap_index(&self.snapshot) < request_index || !knows_to {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    /// A directory removed when the test ends.
    struct Dir(PathBuf);
    impl Dir {
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tempdir() -> Dir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "mooncake-wal-unit-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }

    fn entry(index: u64, len: usize) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = 1;
        e.data = vec![index as u8; len].into();
        e
    }

    fn open(dir: &Path, max_record: usize) -> Result<(DiskStorage, RecoveryReport)> {
        DiskStorage::open(dir, max_record)
    }

    fn committed(s: &mut DiskStorage, last: u64) {
        let mut hs = s.hard_state.clone();
        hs.term = 1;
        hs.commit = last;
        s.persist(&[], Some(&hs)).unwrap();
    }

    fn indexes(s: &DiskStorage) -> Vec<u64> {
        s.entries.iter().map(|e| e.index).collect()
    }

    #[test]
    fn a_ready_cycle_larger_than_a_record_is_split_and_read_back_whole() {
        let dir = tempdir();
        let cap = 64 << 10;
        let (mut s, _) = open(dir.path(), cap).unwrap();
        // 12 entries of 10 KiB: 120 KiB, more than the whole cap, in one persist.
        let batch: Vec<Entry> = (1..=12).map(|i| entry(i, 10 << 10)).collect();
        s.persist(&batch, None).unwrap();
        committed(&mut s, 12);
        drop(s);
        let (s, report) = open(dir.path(), cap).unwrap();
        assert_eq!(report.dropped_tail, None);
        assert_eq!(indexes(&s), (1..=12).collect::<Vec<_>>());
        assert!(s.entries.iter().all(|e| e.data.len() == 10 << 10));
        // An entry that could not be read back is refused before anything is written.
        let (mut s, _) = open(dir.path(), cap).unwrap();
        let before = std::fs::read(dir.path().join(WAL_FILE)).unwrap();
        let err = s.persist(&[entry(13, cap + 1)], None).unwrap_err();
        assert!(err.to_string().contains("record cap"), "{err}");
        assert_eq!(std::fs::read(dir.path().join(WAL_FILE)).unwrap(), before);
    }

    #[test]
    fn a_log_of_the_earlier_format_is_read_and_rewritten() {
        let dir = tempdir();
        let mut old = Vec::new();
        codec::frame_into(&mut old, &wal::encode_base(0, 0)).unwrap();
        codec::frame_into(
            &mut old,
            &wal::encode_entries(&[entry(1, 10), entry(2, 10)]),
        )
        .unwrap();
        codec::frame_into(&mut old, &wal::encode_entries(&[entry(3, 10)])).unwrap();
        std::fs::write(dir.path().join(WAL_FILE), &old).unwrap();
        let (mut s, _) = open(dir.path(), 1 << 20).unwrap();
        assert_eq!(indexes(&s), vec![1, 2, 3]);
        let now = std::fs::read(dir.path().join(WAL_FILE)).unwrap();
        assert!(now.starts_with(wal::WAL_MAGIC));
        s.persist(&[entry(4, 10)], None).unwrap();
        committed(&mut s, 4);
        drop(s);
        let (s, _) = open(dir.path(), 1 << 20).unwrap();
        assert_eq!(indexes(&s), vec![1, 2, 3, 4]);
    }

    fn log_of_ten(dir: &Path) -> Vec<u8> {
        let (mut s, _) = open(dir, 1 << 20).unwrap();
        for i in 1..=10 {
            s.persist(&[entry(i, 100)], None).unwrap();
        }
        committed(&mut s, 6);
        drop(s);
        std::fs::read(dir.join(WAL_FILE)).unwrap()
    }

    #[test]
    fn a_damaged_length_in_the_middle_is_corruption_not_a_torn_tail() {
        let dir = tempdir();
        let bytes = log_of_ten(dir.path());
        // The third entry record's length: magic, base record (12 + 17), two entry records.
        let record = 12 + 5 + 25 + 100;
        let at = wal::WAL_MAGIC.len() + 12 + 17 + 2 * record;
        for damaged in [u32::MAX, 100_000, 2_000] {
            let mut b = bytes.clone();
            b[at..at + 4].copy_from_slice(&damaged.to_le_bytes());
            std::fs::write(dir.path().join(WAL_FILE), &b).unwrap();
            let err = open(dir.path(), 1 << 20).unwrap_err().to_string();
            assert!(
                err.contains("damaged") || err.contains("cap"),
                "{damaged}: {err}"
            );
        }
        // The last records cut short or zero-filled (a crash during the append) are a torn tail,
        // and the committed entries before it survive.
        let mut b = bytes.clone();
        b.truncate(bytes.len() - 50);
        b.extend_from_slice(&[0u8; 4096]);
        std::fs::write(dir.path().join(WAL_FILE), &b).unwrap();
        let (s, report) = open(dir.path(), 1 << 20).unwrap();
        assert_eq!(indexes(&s), (1..=9).collect::<Vec<_>>());
        assert_eq!(
            report.dropped_tail.map(|(_, len)| len),
            Some(record as u64 - 50 + 4096)
        );
    }
}
