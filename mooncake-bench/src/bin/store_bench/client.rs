//! Process B: a `Store` with no segment that measures every case against process A.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{AlignedBuffer, SegmentHandle, TransferRequest};
use mooncake_store::{ReplicateConfig, Store, StoreConfig};

use crate::stats::{self, CaseResult, Meter};
use crate::util::{self, first_diff, fmt_bytes, fmt_ns};
use crate::{Args, Case, ClientRt};

const POISON: u8 = 0xA5;
/// Seed of the data every case writes.
const SEED: u64 = 0x5354_4f52_4542_4e43;
/// Most keys removed by one `batch_remove`.
const REMOVE_CHUNK: usize = 16_384;

/// Everything a case needs.
pub(crate) struct Ctx {
    pub(crate) args: Args,
    pub(crate) store: Arc<Store>,
    /// A second client of B with the location cache off, for the cold gets.
    cold: Arc<Store>,
    /// A's segment, opened by B's transfer engine.
    pub(crate) seg: SegmentHandle,
    /// A's scratch buffer (in A's address space).
    pub(crate) scratch: u64,
    /// Bytes-API source: slot `j` of size `s` is `src[j*s..(j+1)*s]`.
    pub(crate) src: Vec<u8>,
    /// Registered memory: `[reg_src, reg_src + R)` holds a copy of `src`, `[reg_dst, +R)` is
    /// where zero-copy reads land.
    _reg: AlignedBuffer,
    pub(crate) reg_src: u64,
    pub(crate) reg_dst: u64,
    pub(crate) rc: ReplicateConfig,
    prefix: String,
    next_key: AtomicU64,
}

pub(crate) fn err(what: impl std::fmt::Display, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl Ctx {
    /// The client a get case reads with.
    fn reader(&self, cold: bool) -> &Store {
        if cold {
            &self.cold
        } else {
            &self.store
        }
    }

    pub(crate) fn key(&self, size: u64, tag: &str) -> String {
        let n = self.next_key.fetch_add(1, Ordering::Relaxed);
        format!("{}/{size}/{tag}/{n}", self.prefix)
    }

    fn keys(&self, size: u64, tag: &str, n: usize) -> Vec<String> {
        (0..n).map(|_| self.key(size, tag)).collect()
    }

    pub(crate) fn src_slot(&self, size: u64, j: usize) -> &[u8] {
        let at = j * size as usize;
        &self.src[at..at + size as usize]
    }

    pub(crate) fn src_addr(&self, size: u64, j: usize) -> u64 {
        self.reg_src + j as u64 * size
    }

    pub(crate) fn dst_addr(&self, size: u64, j: usize) -> u64 {
        self.reg_dst + j as u64 * size
    }

    pub(crate) fn scratch_addr(&self, size: u64, j: usize) -> u64 {
        self.scratch + j as u64 * size
    }

    /// Compares `got` with slot `j` of size `size`.
    pub(crate) fn check(&self, what: &str, got: &[u8], size: u64, j: usize) -> Result<(), String> {
        match first_diff(got, self.src_slot(size, j)) {
            None => Ok(()),
            Some(i) => Err(format!(
                "data check failed: {what} ({}, object {j}): {} bytes read, byte {i} differs",
                fmt_bytes(size),
                got.len()
            )),
        }
    }

    fn poison_dst(&self, size: u64, j: usize) -> Result<(), String> {
        let poison = vec![POISON; size as usize];
        self.store
            .engine()
            .memory()
            .resolve(self.dst_addr(size, j), size)
            .and_then(|r| r.write_from(&poison))
            .map_err(|e| err("poisoning the read buffer", e))
    }

    fn check_dst(&self, what: &str, size: u64, j: usize) -> Result<(), String> {
        let got = self
            .store
            .engine()
            .memory()
            .resolve(self.dst_addr(size, j), size)
            .map_err(|e| err("reading the read buffer", e))?
            .to_vec();
        self.check(what, &got, size, j)
    }

    /// Largest number of live bytes a put case leaves in A's segment before removing them.
    fn budget(&self, size: u64) -> u64 {
        (size * self.args.batch as u64).max(128 << 20)
    }

    async fn remove(&self, keys: &[String]) -> Result<(), String> {
        for chunk in keys.chunks(REMOVE_CHUNK) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let results = self
                .store
                .batch_remove(&refs, true)
                .await
                .map_err(|e| err("batch_remove", e))?;
            if let Some((k, e)) = refs
                .iter()
                .zip(results)
                .find_map(|(k, r)| r.err().map(|e| (k, e)))
            {
                return Err(format!("removing {k:?}: {e}"));
            }
        }
        Ok(())
    }

    /// TE requests for slots `0..n` of size `size`: B's `reg_src`/`reg_dst` to/from A's scratch.
    pub(crate) fn te_requests(
        &self,
        write: bool,
        size: u64,
        slots: std::ops::Range<usize>,
    ) -> Vec<TransferRequest> {
        slots
            .map(|j| {
                let remote = self.scratch_addr(size, j);
                if write {
                    TransferRequest::write(&self.seg, remote, self.src_addr(size, j), size)
                } else {
                    TransferRequest::read(&self.seg, remote, self.dst_addr(size, j), size)
                }
            })
            .collect()
    }

    pub(crate) async fn te(&self, requests: Vec<TransferRequest>) -> Result<(), String> {
        for (i, r) in self
            .store
            .engine()
            .transfer(requests)
            .await
            .into_iter()
            .enumerate()
        {
            r.map_err(|e| err(format!("transfer engine request {i}"), e))?;
        }
        Ok(())
    }
}

/// Keys a put case wrote and has not removed yet.
struct Live {
    keys: Vec<String>,
    bytes: u64,
}

impl Live {
    fn new() -> Live {
        Live {
            keys: Vec::new(),
            bytes: 0,
        }
    }

    fn add(&mut self, keys: impl IntoIterator<Item = String>, size: u64) {
        for k in keys {
            self.keys.push(k);
            self.bytes += size;
        }
    }

    async fn flush_if_over(&mut self, ctx: &Ctx, budget: u64, next: u64) -> Result<(), String> {
        if self.bytes + next > budget || self.keys.len() >= 4 * REMOVE_CHUNK {
            self.flush(ctx).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, ctx: &Ctx) -> Result<(), String> {
        ctx.remove(&self.keys).await?;
        self.keys.clear();
        self.bytes = 0;
        Ok(())
    }
}

fn check_all<T>(
    what: &str,
    keys: &[String],
    results: Vec<mooncake_core::Result<T>>,
) -> Result<Vec<T>, String> {
    if results.len() != keys.len() {
        return Err(format!(
            "{what}: {} results for {} keys",
            results.len(),
            keys.len()
        ));
    }
    results
        .into_iter()
        .zip(keys)
        .map(|(r, k)| r.map_err(|e| format!("{what} {k:?}: {e}")))
        .collect()
}

fn refs(keys: &[String]) -> Vec<&str> {
    keys.iter().map(String::as_str).collect()
}

impl Ctx {
    async fn case_put(&self, size: u64) -> Result<CaseResult, String> {
        let batch = self.args.batch;
        let budget = self.budget(size);
        let mut live = Live::new();
        let k = self.key(size, "put");
        self.store
            .put(&k, self.src_slot(size, 0), &self.rc)
            .await
            .map_err(|e| err(format!("put {k:?}"), e))?;
        let got = self
            .store
            .get(&k)
            .await
            .map_err(|e| err(format!("get {k:?}"), e))?;
        self.check("put, read back with get", &got, size, 0)?;
        live.add([k], size);
        let mut m = Meter::new(&self.args);
        let mut i = 1;
        while !m.done() {
            let k = self.key(size, "put");
            let t = Instant::now();
            let r = self
                .store
                .put(&k, self.src_slot(size, i % batch), &self.rc)
                .await;
            m.record(t.elapsed(), 1, size);
            r.map_err(|e| err(format!("put {k:?}"), e))?;
            live.add([k], size);
            live.flush_if_over(self, budget, size).await?;
            i += 1;
        }
        live.flush(self).await?;
        Ok(m.finish(Case::Put, size, 1))
    }

    /// One timed put_from of source slot `j` under a new key, recorded in `m` and kept in `live`.
    async fn timed_put_from(
        &self,
        m: &mut Meter,
        live: &mut Live,
        size: u64,
        j: usize,
    ) -> Result<(), String> {
        let k = self.key(size, "put_from");
        let t = Instant::now();
        let r = self
            .store
            .put_from(&k, self.src_addr(size, j), size, &self.rc)
            .await;
        m.record(t.elapsed(), 1, size);
        r.map_err(|e| err(format!("put_from {k:?}"), e))?;
        live.add([k], size);
        live.flush_if_over(self, self.budget(size), size).await
    }

    /// One timed get_into of `key` into destination slot `j`, recorded in `m`.
    async fn timed_get_into(
        &self,
        store: &Store,
        m: &mut Meter,
        key: &str,
        size: u64,
        j: usize,
    ) -> Result<(), String> {
        let t = Instant::now();
        let r = store.get_into(key, self.dst_addr(size, j), size).await;
        m.record(t.elapsed(), 1, size);
        let n = r.map_err(|e| err(format!("get_into {key:?}"), e))?;
        if n != size {
            return Err(format!("get_into {key:?}: {n} bytes, expected {size}"));
        }
        Ok(())
    }

    async fn case_put_from(&self, size: u64) -> Result<CaseResult, String> {
        let batch = self.args.batch;
        let mut live = Live::new();
        let k = self.key(size, "put_from");
        self.store
            .put_from(&k, self.src_addr(size, 0), size, &self.rc)
            .await
            .map_err(|e| err(format!("put_from {k:?}"), e))?;
        let got = self
            .store
            .get(&k)
            .await
            .map_err(|e| err(format!("get {k:?}"), e))?;
        self.check("put_from, read back with get", &got, size, 0)?;
        live.add([k], size);
        let mut m = Meter::new(&self.args);
        let mut i = 1;
        while !m.done() {
            self.timed_put_from(&mut m, &mut live, size, i % batch)
                .await?;
            i += 1;
        }
        live.flush(self).await?;
        Ok(m.finish(Case::PutFrom, size, 1))
    }

    /// Verifies a batch written under `keys` (slot `j` for key `j`) with one `get_batch`.
    async fn verify_batch(&self, what: &str, keys: &[String], size: u64) -> Result<(), String> {
        let got = check_all(
            &format!("{what}: get_batch"),
            keys,
            self.store.get_batch(&refs(keys)).await,
        )?;
        for (j, v) in got.iter().enumerate() {
            self.check(what, v, size, j)?;
        }
        Ok(())
    }

    /// `put_batch` of slot `j` under `keys[j]`. The item list is built inside the timed call,
    /// as a caller would.
    async fn put_batch_slots(&self, keys: &[String], size: u64) -> Vec<mooncake_core::Result<()>> {
        let items: Vec<(&str, &[u8])> = keys
            .iter()
            .enumerate()
            .map(|(j, k)| (k.as_str(), self.src_slot(size, j)))
            .collect();
        self.store.put_batch(&items, &self.rc).await
    }

    /// `batch_put_from` of registered slot `j` under `keys[j]`.
    async fn batch_put_from_slots(
        &self,
        keys: &[String],
        size: u64,
    ) -> Vec<mooncake_core::Result<()>> {
        let items: Vec<(&str, u64, u64)> = keys
            .iter()
            .enumerate()
            .map(|(j, k)| (k.as_str(), self.src_addr(size, j), size))
            .collect();
        self.store.batch_put_from(&items, &self.rc).await
    }

    /// `put_batch`; the first batch (verified) becomes the get working set `g` when there is
    /// none yet.
    async fn case_put_batch(
        &self,
        size: u64,
        g: &mut Option<Vec<String>>,
    ) -> Result<CaseResult, String> {
        let batch = self.args.batch;
        let budget = self.budget(size);
        let mut live = Live::new();
        let keys = self.keys(size, "put_batch", batch);
        check_all("put_batch", &keys, self.put_batch_slots(&keys, size).await)?;
        self.verify_batch("put_batch, read back with get_batch", &keys, size)
            .await?;
        if g.is_none() {
            *g = Some(keys);
        } else {
            live.add(keys, size);
        }
        let mut m = Meter::new(&self.args);
        while !m.done() {
            live.flush_if_over(self, budget, size * batch as u64)
                .await?;
            let keys = self.keys(size, "put_batch", batch);
            let t = Instant::now();
            let r = self.put_batch_slots(&keys, size).await;
            m.record(t.elapsed(), batch as u64, size * batch as u64);
            check_all("put_batch", &keys, r)?;
            live.add(keys, size);
        }
        live.flush(self).await?;
        Ok(m.finish(Case::PutBatch, size, batch))
    }

    async fn case_batch_put_from(&self, size: u64) -> Result<CaseResult, String> {
        let batch = self.args.batch;
        let budget = self.budget(size);
        let mut live = Live::new();
        let keys = self.keys(size, "batch_put_from", batch);
        check_all(
            "batch_put_from",
            &keys,
            self.batch_put_from_slots(&keys, size).await,
        )?;
        self.verify_batch("batch_put_from, read back with get_batch", &keys, size)
            .await?;
        live.add(keys, size);
        let mut m = Meter::new(&self.args);
        while !m.done() {
            live.flush_if_over(self, budget, size * batch as u64)
                .await?;
            let keys = self.keys(size, "batch_put_from", batch);
            let t = Instant::now();
            let r = self.batch_put_from_slots(&keys, size).await;
            m.record(t.elapsed(), batch as u64, size * batch as u64);
            check_all("batch_put_from", &keys, r)?;
            live.add(keys, size);
        }
        live.flush(self).await?;
        Ok(m.finish(Case::BatchPutFrom, size, batch))
    }

    /// The get working set: `batch` objects of `size`, slot `j` under key `j`.
    async fn working_set<'a>(
        &self,
        size: u64,
        g: &'a mut Option<Vec<String>>,
    ) -> Result<&'a [String], String> {
        if g.is_none() {
            let keys = self.keys(size, "g", self.args.batch);
            check_all(
                "put_batch (get working set)",
                &keys,
                self.put_batch_slots(&keys, size).await,
            )?;
            *g = Some(keys);
        }
        Ok(g.as_deref().expect("set above"))
    }

    async fn case_get(
        &self,
        store: &Store,
        cold: bool,
        size: u64,
        g: &[String],
    ) -> Result<CaseResult, String> {
        let got = store
            .get(&g[0])
            .await
            .map_err(|e| err(format!("get {:?}", g[0]), e))?;
        self.check("get", &got, size, 0)?;
        let mut m = Meter::new(&self.args);
        let mut i = 1;
        while !m.done() {
            let k = &g[i % g.len()];
            let t = Instant::now();
            let r = store.get(k).await;
            m.record(t.elapsed(), 1, size);
            let v = r.map_err(|e| err(format!("get {k:?}"), e))?;
            if v.len() as u64 != size {
                return Err(format!("get {k:?}: {} bytes, expected {size}", v.len()));
            }
            i += 1;
        }
        Ok(m.finish(if cold { Case::GetCold } else { Case::Get }, size, 1))
    }

    async fn case_get_batch(
        &self,
        store: &Store,
        cold: bool,
        size: u64,
        g: &[String],
    ) -> Result<CaseResult, String> {
        self.verify_batch("get_batch", g, size).await?;
        let keys = refs(g);
        let mut m = Meter::new(&self.args);
        while !m.done() {
            let t = Instant::now();
            let r = store.get_batch(&keys).await;
            m.record(t.elapsed(), g.len() as u64, size * g.len() as u64);
            for v in check_all("get_batch", g, r)? {
                if v.len() as u64 != size {
                    return Err(format!("get_batch: {} bytes, expected {size}", v.len()));
                }
            }
        }
        let case = if cold {
            Case::GetBatchCold
        } else {
            Case::GetBatch
        };
        Ok(m.finish(case, size, g.len()))
    }

    async fn case_get_into(
        &self,
        store: &Store,
        cold: bool,
        size: u64,
        g: &[String],
    ) -> Result<CaseResult, String> {
        self.poison_dst(size, 0)?;
        let n = store
            .get_into(&g[0], self.dst_addr(size, 0), size)
            .await
            .map_err(|e| err(format!("get_into {:?}", g[0]), e))?;
        if n != size {
            return Err(format!("get_into {:?}: {n} bytes, expected {size}", g[0]));
        }
        self.check_dst("get_into", size, 0)?;
        let mut m = Meter::new(&self.args);
        let mut i = 1;
        while !m.done() {
            let j = i % g.len();
            self.timed_get_into(store, &mut m, &g[j], size, j).await?;
            i += 1;
        }
        let case = if cold {
            Case::GetIntoCold
        } else {
            Case::GetInto
        };
        Ok(m.finish(case, size, 1))
    }

    async fn case_batch_get_into(
        &self,
        store: &Store,
        cold: bool,
        size: u64,
        g: &[String],
    ) -> Result<CaseResult, String> {
        let items: Vec<(&str, u64, u64)> = g
            .iter()
            .enumerate()
            .map(|(j, k)| (k.as_str(), self.dst_addr(size, j), size))
            .collect();
        for j in 0..g.len() {
            self.poison_dst(size, j)?;
        }
        let sizes = check_all("batch_get_into", g, store.batch_get_into(&items).await)?;
        for (j, n) in sizes.into_iter().enumerate() {
            if n != size {
                return Err(format!("batch_get_into: {n} bytes, expected {size}"));
            }
            self.check_dst("batch_get_into", size, j)?;
        }
        let mut m = Meter::new(&self.args);
        while !m.done() {
            let t = Instant::now();
            let r = store.batch_get_into(&items).await;
            m.record(t.elapsed(), g.len() as u64, size * g.len() as u64);
            for n in check_all("batch_get_into", g, r)? {
                if n != size {
                    return Err(format!("batch_get_into: {n} bytes, expected {size}"));
                }
            }
        }
        let case = if cold {
            Case::BatchGetIntoCold
        } else {
            Case::BatchGetInto
        };
        Ok(m.finish(case, size, g.len()))
    }

    /// Raw transfer engine case: WRITE or READ, `n` requests per transfer call. Verified first
    /// by writing the slots, reading them back into poisoned memory and comparing.
    /// Single zero-copy store calls and single raw engine calls of the same size, alternated
    /// (raw, store, store, raw, raw, ...), so that both see the same moments of a noisy machine
    /// and each follows either kind equally often: put_from
    /// against te_write, or get_into (over the working set `g`) against te_read.
    async fn paired(
        &self,
        write: bool,
        size: u64,
        g: &[String],
    ) -> Result<(CaseResult, CaseResult), String> {
        let batch = self.args.batch;
        let mut live = Live::new();
        let (mut store_m, mut raw_m) = (Meter::new(&self.args), Meter::new(&self.args));
        let mut i = 1;
        while !(store_m.done() && raw_m.done()) {
            let j = i % batch;
            // Which goes first alternates too, so neither always follows the other.
            for store_turn in [i % 2 == 0, i % 2 == 1] {
                if !store_turn {
                    let reqs = self.te_requests(write, size, j..j + 1);
                    let t = Instant::now();
                    let r = self.te(reqs).await;
                    raw_m.record(t.elapsed(), 1, size);
                    r.map_err(|e| err("te (interleaved)", e))?;
                } else if write {
                    self.timed_put_from(&mut store_m, &mut live, size, j)
                        .await?;
                } else {
                    let jj = i % g.len();
                    self.timed_get_into(&self.store, &mut store_m, &g[jj], size, jj)
                        .await?;
                }
            }
            i += 1;
        }
        live.flush(self).await?;
        let (store_case, raw_case) = if write {
            (Case::PutFrom, Case::TeWrite)
        } else {
            (Case::GetInto, Case::TeRead)
        };
        Ok((
            store_m.finish(store_case, size, 1),
            raw_m.finish(raw_case, size, 1),
        ))
    }

    async fn case_te(&self, write: bool, size: u64, n: usize) -> Result<CaseResult, String> {
        let what = if write { "te WRITE" } else { "te READ" };
        self.te(self.te_requests(true, size, 0..n)).await?;
        for j in 0..n {
            self.poison_dst(size, j)?;
        }
        self.te(self.te_requests(false, size, 0..n)).await?;
        for j in 0..n {
            self.check_dst(&format!("{what}, read back"), size, j)?;
        }
        let batch = self.args.batch;
        let mut m = Meter::new(&self.args);
        let mut i = 1;
        while !m.done() {
            let reqs = if n == 1 {
                let j = i % batch;
                self.te_requests(write, size, j..j + 1)
            } else {
                self.te_requests(write, size, 0..n)
            };
            let t = Instant::now();
            let r = self.te(reqs).await;
            m.record(t.elapsed(), n as u64, size * n as u64);
            r.map_err(|e| err(what, e))?;
            i += 1;
        }
        let case = match (write, n > 1) {
            (true, false) => Case::TeWrite,
            (true, true) => Case::TeWriteBatch,
            (false, false) => Case::TeRead,
            (false, true) => Case::TeReadBatch,
        };
        Ok(m.finish(case, size, n))
    }

    async fn run_case(
        &self,
        case: Case,
        size: u64,
        g: &mut Option<Vec<String>>,
    ) -> Result<CaseResult, String> {
        let batch = self.args.batch;
        match case {
            Case::Put => self.case_put(size).await,
            Case::PutFrom => self.case_put_from(size).await,
            Case::PutBatch => self.case_put_batch(size, g).await,
            Case::BatchPutFrom => self.case_batch_put_from(size).await,
            Case::Get | Case::GetCold => {
                let g = self.working_set(size, g).await?;
                let cold = case == Case::GetCold;
                self.case_get(self.reader(cold), cold, size, g).await
            }
            Case::GetBatch | Case::GetBatchCold => {
                let g = self.working_set(size, g).await?;
                let cold = case == Case::GetBatchCold;
                self.case_get_batch(self.reader(cold), cold, size, g).await
            }
            Case::GetInto | Case::GetIntoCold => {
                let g = self.working_set(size, g).await?;
                let cold = case == Case::GetIntoCold;
                self.case_get_into(self.reader(cold), cold, size, g).await
            }
            Case::BatchGetInto | Case::BatchGetIntoCold => {
                let g = self.working_set(size, g).await?;
                let cold = case == Case::BatchGetIntoCold;
                self.case_batch_get_into(self.reader(cold), cold, size, g)
                    .await
            }
            Case::TeWrite => self.case_te(true, size, 1).await,
            Case::TeRead => self.case_te(false, size, 1).await,
            Case::TeWriteBatch => self.case_te(true, size, batch).await,
            Case::TeReadBatch => self.case_te(false, size, batch).await,
        }
    }
}

/// Execution order within a size: the puts (the first `put_batch` batch becomes the get working
/// set), the raw WRITEs, the gets, the raw READs.
const ORDER: [Case; 16] = [
    Case::Put,
    Case::PutBatch,
    Case::PutFrom,
    Case::BatchPutFrom,
    Case::TeWrite,
    Case::TeWriteBatch,
    Case::Get,
    Case::GetBatch,
    Case::GetInto,
    Case::BatchGetInto,
    Case::GetCold,
    Case::GetBatchCold,
    Case::GetIntoCold,
    Case::BatchGetIntoCold,
    Case::TeRead,
    Case::TeReadBatch,
];

/// Outcome of the measured part of B's run.
struct Outcome {
    rows: Vec<CaseResult>,
    /// (store, raw engine) measured in alternation.
    paired: Vec<(CaseResult, CaseResult)>,
    errors: Vec<String>,
    profile_ping: Vec<u64>,
}

async fn setup(args: &Args) -> Result<Ctx, String> {
    let master = args.master.clone().ok_or("--role client needs --master")?;
    let segment = args
        .segment
        .clone()
        .ok_or("--role client needs --segment")?;
    let scratch = args.scratch.ok_or("--role client needs --scratch")?;
    let scratch_len = args
        .scratch_len
        .ok_or("--role client needs --scratch-len")?;
    if scratch_len < args.batch_bytes() {
        return Err(format!(
            "A's scratch buffer ({scratch_len} bytes) is smaller than a batch of the largest \
             size ({} bytes)",
            args.batch_bytes()
        ));
    }
    let region = args.batch_bytes();
    let config = StoreConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: master,
        global_segment_size: 0,
        local_buffer_size: region.next_multiple_of(64) + (1 << 20),
        reservation_bytes: args
            .reservation_bytes
            .unwrap_or(StoreConfig::default().reservation_bytes),
        commit_on_landing: args.commit_on_landing,
        ..StoreConfig::default()
    };
    let cold = Store::setup(StoreConfig {
        location_cache_entries: 0,
        ..config.clone()
    })
    .await
    .map_err(|e| err("setting up the cold client store", e))?;
    let store = Store::setup(config)
        .await
        .map_err(|e| err("setting up the client store", e))?;
    let seg = store
        .engine()
        .open_segment(&segment)
        .await
        .map_err(|e| err(format!("opening A's segment {segment}"), e))?;
    let src = util::pattern(SEED, region as usize);
    let reg = AlignedBuffer::new(2 * region as usize)
        .map_err(|e| err("allocating the registered buffer", e))?;
    // SAFETY: `reg` lives in the returned `Ctx` and is unregistered before the Ctx is dropped
    // (at the end of `run`).
    unsafe { store.register_buffer(reg.addr(), 2 * region) }
        .map_err(|e| err("register_buffer", e))?;
    // SAFETY: as above.
    unsafe { cold.register_buffer(reg.addr(), 2 * region) }
        .map_err(|e| err("register_buffer (cold client)", e))?;
    let reg_src = reg.addr();
    let reg_dst = reg.addr() + region;
    store
        .engine()
        .memory()
        .resolve(reg_src, region)
        .and_then(|r| r.write_from(&src))
        .map_err(|e| err("filling the registered buffer", e))?;
    Ok(Ctx {
        args: args.clone(),
        store,
        cold,
        seg,
        scratch,
        src,
        _reg: reg,
        reg_src,
        reg_dst,
        rc: ReplicateConfig::default(),
        prefix: format!("sb{}", std::process::id()),
        next_key: AtomicU64::new(0),
    })
}

fn protocols<'a>(p: impl Iterator<Item = &'a str>) -> String {
    p.collect::<Vec<_>>().join("+")
}

async fn run(args: &Args) -> Result<Outcome, String> {
    let ctx = setup(args).await?;
    println!(
        "client: pid {}, store segment {} (global_segment_size 0), A's segment {}, \
         transports {} (A offers {}), reservation_bytes {}, commit_on_landing {:?}, runtime {}",
        std::process::id(),
        ctx.store.hostname(),
        ctx.seg.name,
        protocols(ctx.store.engine().transports().iter().map(|t| t.protocol())),
        protocols(ctx.seg.endpoints.iter().map(|e| e.protocol.as_str())),
        ctx.store.config().reservation_bytes,
        ctx.store.config().commit_on_landing,
        match args.client_rt {
            ClientRt::Multi => "multi_thread(2), calls made from a task on it",
            ClientRt::Current => "current_thread",
        }
    );
    let mut rows = Vec::new();
    let mut paired = Vec::new();
    let mut errors = Vec::new();
    for &size in &args.sizes {
        stats::print_header(size, args.batch);
        let mut g: Option<Vec<String>> = None;
        for case in ORDER.into_iter().filter(|c| args.runs(*c)) {
            match ctx.run_case(case, size, &mut g).await {
                Ok(r) => {
                    stats::print_row(&r);
                    rows.push(r);
                }
                Err(e) => {
                    println!("{:<16} ERROR: {e}", case.name());
                    errors.push(format!("{} {}: {e}", fmt_bytes(size), case.name()));
                }
            }
        }
        if size >= 1 << 20 {
            let mut pairs = Vec::new();
            if args.runs(Case::PutFrom) && args.runs(Case::TeWrite) {
                pairs.push(ctx.paired(true, size, &[]).await);
            }
            if let Some(keys) = g.as_deref().filter(|_| args.runs(Case::TeRead)) {
                pairs.push(ctx.paired(false, size, keys).await);
            }
            if !pairs.is_empty() {
                println!("-- interleaved: one raw engine call, one store call, alternately --");
            }
            for p in pairs {
                match p {
                    Ok((store, raw)) => {
                        stats::print_row(&raw);
                        stats::print_row(&store);
                        paired.push((store, raw));
                    }
                    Err(e) => {
                        println!("interleaved ERROR: {e}");
                        errors.push(format!("{} interleaved: {e}", fmt_bytes(size)));
                    }
                }
            }
        }
        if let Some(keys) = g.take() {
            if let Err(e) = ctx.remove(&keys).await {
                errors.push(format!(
                    "{}: removing the working set: {e}",
                    fmt_bytes(size)
                ));
            }
        }
    }
    let mut profile_ping = Vec::new();
    if args.profile {
        match crate::profile::run(&ctx).await {
            Ok(p) => profile_ping = p,
            Err(e) => {
                println!("profile ERROR: {e}");
                errors.push(format!("profile: {e}"));
            }
        }
    }
    for store in [&ctx.store, &ctx.cold] {
        let _ = store.unregister_buffer(ctx.reg_src);
        if let Err(e) = store.close().await {
            errors.push(format!("closing the store: {e}"));
        }
    }
    Ok(Outcome {
        rows,
        paired,
        errors,
        profile_ping,
    })
}

/// Process B's entry point; returns the exit code.
pub(crate) fn main(args: Args) -> i32 {
    // A holds our stdin: when it closes, A is gone and there is nothing left to measure.
    std::thread::spawn(|| {
        let mut sink = [0u8; 64];
        let mut stdin = std::io::stdin().lock();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        eprintln!("store_bench[B]: stdin closed (the server process is gone); exiting");
        std::process::exit(3);
    });
    let Some(echo) = args.echo else {
        eprintln!("store_bench: --role client needs --echo");
        return 2;
    };
    let rt = match args.client_rt {
        ClientRt::Multi => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
        ClientRt::Current => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("store_bench: starting the client runtime: {e}");
            return 1;
        }
    };
    let started = Instant::now();
    let ping_dur = Duration::from_secs_f64(args.ping_seconds);
    let ping1 = match util::ping(echo, ping_dur) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("store_bench: {e}");
            return 1;
        }
    };
    // The measuring loop runs as a task, as an async application calls the store; a caller that
    // blocks on each call from outside the runtime pays one more thread wake per round trip.
    let task_args = args.clone();
    let outcome = match rt.block_on(async move {
        tokio::spawn(async move { run(&task_args).await })
            .await
            .map_err(|e| format!("the measuring task failed: {e}"))?
    }) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("store_bench: error: {e}");
            return 1;
        }
    };
    let ping2 = match util::ping(echo, ping_dur) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("store_bench: {e}");
            return 1;
        }
    };
    report(&args, ping1, ping2, outcome, started.elapsed())
}

fn report(
    args: &Args,
    mut ping1: Vec<u64>,
    mut ping2: Vec<u64>,
    outcome: Outcome,
    took: Duration,
) -> i32 {
    let mut all: Vec<u64> = ping1
        .iter()
        .chain(&ping2)
        .chain(&outcome.profile_ping)
        .copied()
        .collect();
    let (p50_1, p99_1) = stats::percentiles(&mut ping1);
    let (p50_2, p99_2) = stats::percentiles(&mut ping2);
    let (p50, p99) = stats::percentiles(&mut all);
    println!();
    println!(
        "== baseline: 64-byte ping-pong, std TcpStream + TCP_NODELAY, B -> echo thread in A =="
    );
    println!(
        "start p50 {} p99 {} (n={}) | end p50 {} p99 {} (n={}) | all rounds p50 {} p99 {} (n={})",
        fmt_ns(p50_1),
        fmt_ns(p99_1),
        ping1.len(),
        fmt_ns(p50_2),
        fmt_ns(p99_2),
        ping2.len(),
        fmt_ns(p50),
        fmt_ns(p99),
        all.len()
    );
    println!();
    println!(
        "== targets (from this run; ping p50 = {}, all rounds) ==",
        fmt_ns(p50)
    );
    let checks = stats::evaluate(&outcome.rows, &outcome.paired, p50);
    for c in &checks {
        println!("{}  {}", if c.pass { "PASS" } else { "MISS" }, c.text);
    }
    let misses = checks.iter().filter(|c| !c.pass).count();
    println!(
        "{} targets: {} pass, {misses} miss; {} cases in {:.1} s (batch {}, {} s per case)",
        checks.len(),
        checks.len() - misses,
        outcome.rows.len(),
        took.as_secs_f64(),
        args.batch,
        args.seconds,
    );
    if outcome.errors.is_empty() {
        println!("no errors: every case's data check passed and every call succeeded");
        0
    } else {
        println!("ERRORS ({}):", outcome.errors.len());
        for e in &outcome.errors {
            println!("  {e}");
        }
        1
    }
}
