//! Byte helpers shared by the in-process P2P tests: filling and reading a store's buffers.
#![allow(dead_code, unreachable_pub)]

use mooncake_p2p::{Buffer, P2PStore};

/// Writes `bytes` across `bufs` in order (the payload is their concatenation).
pub fn write(store: &P2PStore, bufs: &[Buffer], bytes: &[u8]) {
    let mut at = 0;
    for b in bufs {
        let region = store.engine().memory().resolve(b.addr, b.len).unwrap();
        region.write_from(&bytes[at..at + b.len as usize]).unwrap();
        at += b.len as usize;
    }
}

/// The concatenated bytes of `bufs`.
pub fn read(store: &P2PStore, bufs: &[Buffer]) -> Vec<u8> {
    let memory = store.engine().memory();
    bufs.iter()
        .flat_map(|b| memory.resolve(b.addr, b.len).unwrap().to_vec())
        .collect()
}
