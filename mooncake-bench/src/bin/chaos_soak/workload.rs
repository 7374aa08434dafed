//! The clients of the soak: each issues puts, upserts, removes and gets of random keys with
//! values unique to the run, and records every operation with its start, end and result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::ErrorCode;
use mooncake_store::{ReplicateConfig, Store};

use crate::check::{Kind, Op, Res, Vid};

/// A small deterministic generator (splitmix64).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The name of key number `k`.
pub(crate) fn key_name(k: u32) -> String {
    format!("chaos-{k}")
}

/// The bytes of write `vid` to key `k`: a header naming both, then filler derived from them, of
/// a length (1-16 KiB) derived from them too.
pub(crate) fn value(k: u32, vid: Vid) -> Vec<u8> {
    let mut rng = Rng(((vid.0 as u64) << 48) ^ vid.1 ^ ((k as u64) << 24));
    let len = 1024 + rng.below(15 * 1024) as usize;
    let mut v = format!("mc.{}.{}.{}.", k, vid.0, vid.1).into_bytes();
    while v.len() < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Which write of key `k` the bytes `v` are, if they are exactly one.
pub(crate) fn decode(k: u32, v: &[u8]) -> Option<Vid> {
    let head = v.get(..v.len().min(64))?;
    let mut parts = head.split(|&b| b == b'.');
    let num = |p: Option<&[u8]>| -> Option<u64> { std::str::from_utf8(p?).ok()?.parse().ok() };
    if parts.next()? != b"mc" || num(parts.next())? != k as u64 {
        return None;
    }
    let vid = (u32::try_from(num(parts.next())?).ok()?, num(parts.next())?);
    (value(k, vid) == v).then_some(vid)
}

/// Error codes of a write refused before it did anything.
fn refused(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::OBJECT_ALREADY_EXISTS
            | ErrorCode::OBJECT_REPLICA_BUSY
            | ErrorCode::NO_AVAILABLE_HANDLE
            | ErrorCode::INVALID_PARAMS
    )
}

/// Seconds since `t0`.
pub(crate) fn secs(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64()
}

/// Runs one operation of `kind` on key `key` as write `vid`; its record.
pub(crate) async fn run_op(
    store: &Store,
    t0: Instant,
    key: u32,
    kind: Kind,
    vid: Vid,
    last: bool,
) -> Op {
    let two = ReplicateConfig::with_replicas(2);
    let name = key_name(key);
    let start = secs(t0);
    let res = match kind {
        Kind::Put | Kind::Upsert => {
            let v = value(key, vid);
            let r = if kind == Kind::Put {
                store.put(&name, &v, &two).await
            } else {
                store.upsert(&name, &v, &two).await
            };
            match r {
                Ok(()) => Res::Ok,
                Err(e) if refused(e.code()) => Res::Refused(e.code().code()),
                Err(e) => Res::Unknown(e.code().code()),
            }
        }
        Kind::Remove => match store.remove(&name, false).await {
            Ok(()) => Res::Ok,
            Err(e) if e.code() == ErrorCode::OBJECT_NOT_FOUND => Res::NotFound,
            Err(e) if e.code() == ErrorCode::OBJECT_HAS_LEASE => Res::Refused(e.code().code()),
            Err(e) => Res::Unknown(e.code().code()),
        },
        Kind::Get => match store.get(&name).await {
            Ok(v) => decode(key, &v).map_or(Res::Corrupt, Res::Got),
            Err(e) if e.code() == ErrorCode::OBJECT_NOT_FOUND => Res::NotFound,
            Err(e) => Res::ReadErr(e.code().code()),
        },
    };
    Op {
        client: vid.0,
        seq: vid.1,
        key,
        kind,
        start,
        end: secs(t0),
        res,
        last,
    }
}

/// One client's loop until `stop`: random keys among `keys`, 35% gets, 20% puts, 30% upserts,
/// 15% removes, a few milliseconds apart. Returns its history.
pub(crate) async fn worker(
    store: Arc<Store>,
    client: u32,
    keys: u32,
    seed: u64,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Op> {
    let mut rng = Rng(seed ^ (client as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut history = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let key = rng.below(keys as u64) as u32;
        let kind = match rng.below(100) {
            0..35 => Kind::Get,
            35..55 => Kind::Put,
            55..85 => Kind::Upsert,
            _ => Kind::Remove,
        };
        history.push(run_op(&store, t0, key, kind, (client, seq), false).await);
        tokio::time::sleep(Duration::from_millis(2 + rng.below(8))).await;
    }
    history
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_decode_to_their_write_and_nothing_else() {
        let v = value(12, (3, 99));
        assert!(v.len() >= 1024 && v.len() < 16 * 1024);
        assert_eq!(decode(12, &v), Some((3, 99)));
        assert_eq!(decode(13, &v), None, "another key's value");
        let mut bad = v.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(decode(12, &bad), None, "a flipped byte");
        assert_eq!(decode(12, &v[..v.len() - 1]), None, "a short value");
        assert_eq!(decode(12, b""), None);
    }
}
