//! Fuzzes a Raft member's recovery from a damaged log: arbitrary bytes as the write-ahead log
//! file of a data directory, opened as a member opens it at start.
//!
//! Checks: no panic; either a clear error or a recovered log that does not end before its
//! snapshot.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mooncake_meta_raft::storage::DiskStorage;
use mooncake_meta_raft::wal::WAL_FILE;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("mooncake-fuzz-wal-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    for entry in std::fs::read_dir(d).expect("temp dir").flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    std::fs::write(d.join(WAL_FILE), data).expect("write the log");
    if let Ok((_storage, report)) = DiskStorage::open(d, 1 << 20) {
        assert!(report.last_index >= report.snapshot_index);
    }
});
