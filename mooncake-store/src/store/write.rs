//! Writes: put, upsert, their batch, multi-part and zero-copy forms.
//!
//! Performance-critical: every put goes through `write_wave`.
//!
//! A write is PutStart (the master reserves one range per replica) → the client writes each
//! replica → PutEnd, or PutRevoke when a transfer failed. A put of a key that already exists
//! succeeds without writing, as in upstream Mooncake; an upsert replaces the value.
//!
//! A WRITE that fails on one segment (its storage node died and the master, which expires it
//! only after `client_ttl`, still places replicas there) does not fail the write: the client
//! asks the master to place that replica again elsewhere (ReplaceReplicas, which frees the
//! failed range) and writes it there, up to twice. With no other segment to go to, the value
//! commits with the replicas that were written, as upstream's PutStart places fewer replicas
//! than asked when fewer segments have room; with none written it fails (TRANSFER_FAIL) and
//! nothing of it stays. For a few seconds after, a write that also has replicas elsewhere
//! leaves that segment out without trying it.
//!
//! A put with one replica and no placement wishes, small enough, instead goes into space the
//! client holds ([`reserve`](super::reserve)): the client writes, then one CommitReserved makes
//! the values objects. A key that exists is then found at commit (the bytes were written for
//! nothing, and the put still succeeds without changing the value). A value whose WRITE into
//! the reservation failed goes through PutStart instead; nothing of it is committed, and the
//! reservation's unused space returns to its segment when the reservation expires.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::Either;

use mooncake_core::{Error, ErrorCode, Result, TransferRequest};
use mooncake_master::{
    Command, PutItem, PutStartResponse, ReplicaDescriptor, ReplicateConfig, ReservedPut, Response,
    WriteKind,
};

use super::checksum;
use super::reserve::Carved;
use super::Store;
use mooncake_rpc::{MasterReply, MasterRequest};

/// How long the master may hold a commit waiting for its WRITEs' landing reports.
const LANDING_WAIT: Duration = Duration::from_secs(1);

/// After a WRITE is acknowledged, how long its commit may stay unanswered before this client
/// reports the landing itself (the storage node's report is late or lost).
const CONFIRM_AFTER: Duration = Duration::from_millis(2);

/// After the master found no room for a reservation (or did not know this client, which then
/// remounts), puts go through PutStart this long before asking again.
const RESERVE_PAUSE_FULL: Duration = Duration::from_millis(200);

/// After the master refused reservations otherwise (turned off, or a master that predates them),
/// puts go through PutStart this long before asking again.
const RESERVE_PAUSE_REFUSED: Duration = Duration::from_secs(60);

/// Where a value's bytes come from.
enum Source<'a> {
    /// Caller bytes, in parts concatenated in order; copied through the staging buffer (or
    /// straight into this client's own segment when a replica lands there).
    Bytes(Vec<&'a [u8]>),
    /// Registered caller memory, in parts concatenated in order: moved with no copy.
    Registered(Vec<(u64, u64)>),
}

impl Source<'_> {
    fn size(&self) -> u64 {
        match self {
            Source::Bytes(parts) => parts.iter().map(|p| p.len() as u64).sum(),
            Source::Registered(parts) => parts.iter().map(|p| p.1).sum(),
        }
    }

    /// Staging bytes the value takes on its way out (none for registered memory).
    fn staged(&self) -> u64 {
        match self {
            Source::Bytes(_) => self.size().next_multiple_of(64),
            Source::Registered(_) => 0,
        }
    }
}

struct Item<'a> {
    key: &'a str,
    source: Source<'a>,
    /// The value's checksum, sent with its commit (computed in `write_many`, once).
    checksum: u32,
}

fn bytes_items<'a>(items: &[(&'a str, &'a [u8])]) -> Vec<Item<'a>> {
    items
        .iter()
        .map(|&(key, v)| Item {
            key,
            source: Source::Bytes(vec![v]),
            checksum: 0,
        })
        .collect()
}

fn registered_items<'a>(items: &[(&'a str, u64, u64)]) -> Vec<Item<'a>> {
    items
        .iter()
        .map(|&(key, addr, size)| Item {
            key,
            source: Source::Registered(vec![(addr, size)]),
            checksum: 0,
        })
        .collect()
}

/// A wave's WRITE requests, ready to send.
struct Prepared {
    /// Staging space of the wave's byte values, held until the WRITEs are done.
    slot: Option<super::staging::Slot>,
    requests: Vec<TransferRequest>,
    /// For each request, which of its item's replicas it writes.
    replica_of: Vec<usize>,
    /// Per item with targets: its position, its requests, or why it has none.
    spans: Vec<(usize, std::ops::Range<usize>, Option<Error>)>,
    /// `(position, replica)` of replicas whose segment could not be opened.
    unreachable: Vec<(usize, usize, Error)>,
    /// Items in the wave.
    items: usize,
}

/// How an item's WRITEs went.
#[derive(Clone, Debug)]
enum Written {
    /// Every replica was written.
    All,
    /// The WRITEs to these replicas (indexes into the item's targets) failed; `error` is the
    /// first failure.
    Failed { replicas: Vec<usize>, error: Error },
    /// Nothing was sent, for a reason that is no replica's fault.
    Not(Error),
}

/// How many times a write asks the master to place the replicas whose WRITE failed again.
const REPLACE_ROUNDS: usize = 2;

/// How long a segment a WRITE failed to reach is avoided when a write also has replicas
/// elsewhere: those are written and committed, and the avoided replica is placed again (or left
/// out) without trying it. The master expires a dead node after its `client_ttl` (10 s); this
/// spares the writes meanwhile a WRITE to it that may take a transfer timeout to fail.
const AVOID_FOR: Duration = Duration::from_secs(3);

impl Store {
    /// Stores the concatenation of `parts` under `key`: a put leaves a key that exists as it is
    /// (success), an upsert replaces its value.
    pub async fn write_parts(
        &self,
        kind: WriteKind,
        key: &str,
        parts: &[&[u8]],
        config: &ReplicateConfig,
    ) -> Result<()> {
        self.write_one(kind, key, Source::Bytes(parts.to_vec()), config)
            .await
    }

    /// Puts or upserts each `(key, value)`; one result per item.
    pub async fn write_batch(
        &self,
        kind: WriteKind,
        items: &[(&str, &[u8])],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        self.write_many(kind, bytes_items(items), config).await
    }

    /// Zero-copy batch put or upsert: `(key, address, size)` of registered memory each.
    pub async fn batch_write_from(
        &self,
        kind: WriteKind,
        items: &[(&str, u64, u64)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        self.write_many(kind, registered_items(items), config).await
    }

    /// Stores `value` under `key`. A key that exists already is left as it is (success).
    pub async fn put(&self, key: &str, value: &[u8], config: &ReplicateConfig) -> Result<()> {
        self.write_one(WriteKind::Put, key, Source::Bytes(vec![value]), config)
            .await
    }

    /// Stores the concatenation of `parts` under `key`.
    pub async fn put_parts(
        &self,
        key: &str,
        parts: &[&[u8]],
        config: &ReplicateConfig,
    ) -> Result<()> {
        self.write_one(WriteKind::Put, key, Source::Bytes(parts.to_vec()), config)
            .await
    }

    /// Stores `value` under `key`, replacing any current value.
    pub async fn upsert(&self, key: &str, value: &[u8], config: &ReplicateConfig) -> Result<()> {
        self.write_one(WriteKind::Upsert, key, Source::Bytes(vec![value]), config)
            .await
    }

    /// Stores the concatenation of `parts` under `key`, replacing any current value.
    pub async fn upsert_parts(
        &self,
        key: &str,
        parts: &[&[u8]],
        config: &ReplicateConfig,
    ) -> Result<()> {
        self.write_one(
            WriteKind::Upsert,
            key,
            Source::Bytes(parts.to_vec()),
            config,
        )
        .await
    }

    /// Stores `size` bytes of registered memory at `addr` under `key`, with no copy.
    pub async fn put_from(
        &self,
        key: &str,
        addr: u64,
        size: u64,
        config: &ReplicateConfig,
    ) -> Result<()> {
        self.write_one(
            WriteKind::Put,
            key,
            Source::Registered(vec![(addr, size)]),
            config,
        )
        .await
    }

    /// [`put_from`](Self::put_from), replacing any current value.
    pub async fn upsert_from(
        &self,
        key: &str,
        addr: u64,
        size: u64,
        config: &ReplicateConfig,
    ) -> Result<()> {
        self.write_one(
            WriteKind::Upsert,
            key,
            Source::Registered(vec![(addr, size)]),
            config,
        )
        .await
    }

    /// Stores each `(key, value)`; one result per item.
    pub async fn put_batch(
        &self,
        items: &[(&str, &[u8])],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        self.write_many(WriteKind::Put, bytes_items(items), config)
            .await
    }

    /// Upserts each `(key, value)`; one result per item.
    pub async fn upsert_batch(
        &self,
        items: &[(&str, &[u8])],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        self.write_many(WriteKind::Upsert, bytes_items(items), config)
            .await
    }

    /// Zero-copy batch put: `(key, address, size)` of registered memory each.
    pub async fn batch_put_from(
        &self,
        items: &[(&str, u64, u64)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        self.write_many(WriteKind::Put, registered_items(items), config)
            .await
    }

    /// Zero-copy batch upsert: `(key, address, size)` of registered memory each.
    pub async fn batch_upsert_from(
        &self,
        items: &[(&str, u64, u64)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        self.write_many(WriteKind::Upsert, registered_items(items), config)
            .await
    }

    /// Zero-copy batch put where each value is the concatenation of several registered buffers
    /// `(address, size)`.
    pub async fn batch_put_from_multi_buffers(
        &self,
        items: &[(&str, Vec<(u64, u64)>)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        let items = items
            .iter()
            .map(|(k, parts)| Item {
                key: k,
                source: Source::Registered(parts.clone()),
                checksum: 0,
            })
            .collect();
        self.write_many(WriteKind::Put, items, config).await
    }

    async fn write_one(
        &self,
        kind: WriteKind,
        key: &str,
        source: Source<'_>,
        config: &ReplicateConfig,
    ) -> Result<()> {
        let item = Item {
            key,
            source,
            checksum: 0,
        };
        self.write_many(kind, vec![item], config)
            .await
            .pop()
            .expect("one result per item")
    }

    fn check(&self, item: &Item<'_>, config: &ReplicateConfig) -> Result<()> {
        let invalid = |m: String| Err(Error::with_code(ErrorCode::INVALID_PARAMS, m));
        if item.key.is_empty() {
            return invalid("empty key".into());
        }
        if config.replica_num == 0 {
            return invalid("replica_num is 0".into());
        }
        let size = item.source.size();
        if size == 0 {
            return invalid(format!("empty value for {:?}", item.key));
        }
        match &item.source {
            Source::Bytes(_) if size > self.staging.size() => invalid(format!(
                "value of {size} bytes exceeds local_buffer_size ({} bytes)",
                self.staging.size()
            )),
            Source::Bytes(_) => Ok(()),
            Source::Registered(parts) => {
                for &(addr, len) in parts {
                    self.engine.memory().resolve(addr, len).map_err(|_| {
                        Error::with_code(
                            ErrorCode::INVALID_PARAMS,
                            format!("buffer {addr:#x}+{len} is not inside a registered buffer"),
                        )
                    })?;
                }
                Ok(())
            }
        }
    }

    async fn write_many(
        &self,
        kind: WriteKind,
        mut items: Vec<Item<'_>>,
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        let mut results: Vec<Option<Result<()>>> = (0..items.len()).map(|_| None).collect();
        for (i, item) in items.iter_mut().enumerate() {
            if let Err(e) = self.check(item, config) {
                results[i] = Some(Err(e));
                continue;
            }
            item.checksum = match &item.source {
                Source::Bytes(parts) => checksum::of_bytes(parts),
                Source::Registered(parts) => {
                    match checksum::of_registered(self.engine.memory(), parts, item.source.size()) {
                        Ok(c) => c,
                        Err(e) => {
                            results[i] = Some(Err(e));
                            continue;
                        }
                    }
                }
            };
        }
        // Waves whose staged bytes fit the staging buffer together.
        let mut wave: Vec<(usize, &Item<'_>)> = Vec::new();
        let mut wave_bytes = 0u64;
        for (i, item) in items.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let staged = item.source.staged();
            if wave_bytes + staged > self.staging.size() && !wave.is_empty() {
                for (j, r) in self.write_wave(kind, &wave, wave_bytes, config).await {
                    results[j] = Some(r);
                }
                wave.clear();
                wave_bytes = 0;
            }
            wave.push((i, item));
            wave_bytes += staged;
        }
        if !wave.is_empty() {
            for (j, r) in self.write_wave(kind, &wave, wave_bytes, config).await {
                results[j] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every item has a result"))
            .collect()
    }

    /// Writes one wave: into this client's reservation when the wave qualifies (see
    /// [`reserve`](super::reserve)), else through PutStart and PutEnd.
    async fn write_wave(
        &self,
        kind: WriteKind,
        wave: &[(usize, &Item<'_>)],
        staged_bytes: u64,
        config: &ReplicateConfig,
    ) -> Vec<(usize, Result<()>)> {
        match self.carve_wave(kind, wave, config).await {
            Some(carved) => {
                self.write_reserved(kind, wave, staged_bytes, config, carved)
                    .await
            }
            None => self.write_started(kind, wave, staged_bytes, config).await,
        }
    }

    /// Space for `wave` in this client's reservation, asking the master for a new one when the
    /// current one is used up; `None` when the wave goes through PutStart instead.
    async fn carve_wave(
        &self,
        kind: WriteKind,
        wave: &[(usize, &Item<'_>)],
        config: &ReplicateConfig,
    ) -> Option<Carved> {
        let chunk = self.config.reservation_bytes;
        let plain = config.replica_num == 1
            && config.preferred_segment.is_empty()
            && config.preferred_segments.is_empty()
            && !config.prefer_alloc_in_same_node;
        if kind != WriteKind::Put || chunk == 0 || !plain {
            return None;
        }
        let sizes: Vec<u64> = wave.iter().map(|(_, item)| item.source.size()).collect();
        let total = sizes
            .iter()
            .try_fold(0u64, |a, s| a.checked_add(s.checked_next_multiple_of(64)?))?;
        if total > chunk / 4 {
            return None;
        }
        let session = self.master.session();
        if let Some(c) = self.reserved.carve(&sizes, session) {
            return Some(c);
        }
        if !self.reserved.may_ask() {
            return None;
        }
        let _one = self.reserved.refill.lock().await;
        if let Some(c) = self.reserved.carve(&sizes, session) {
            return Some(c);
        }
        let asked_at = Instant::now();
        let answer = self
            .apply(Command::Reserve {
                client_id: self.client_id,
                size: chunk,
                min_size: total,
            })
            .await;
        match answer {
            Ok((_, Response::Reserved(Ok(grant)))) => {
                self.reserved.install(grant, session, asked_at);
                self.reserved.carve(&sizes, session)
            }
            Ok((
                _,
                Response::Reserved(Err(
                    ErrorCode::NO_AVAILABLE_HANDLE | ErrorCode::CLIENT_NOT_FOUND,
                )),
            )) => {
                self.reserved.refused(RESERVE_PAUSE_FULL);
                None
            }
            other => {
                tracing::debug!("no reservation ({other:?}); writing through PutStart");
                self.reserved.refused(RESERVE_PAUSE_REFUSED);
                None
            }
        }
    }

    /// True when every one of `replicas` is written by a one-sided transport (same-host shared
    /// memory): the WRITE's completion already says the bytes landed, so the commit is best sent
    /// after it, and a landing report would only add a message.
    async fn one_sided(&self, replicas: &[ReplicaDescriptor]) -> bool {
        for r in replicas {
            let one_sided = match (self.locate(r).await, r.memory()) {
                (Ok((segment, addr)), Some(mem)) => self
                    .engine
                    .carrier(&segment, addr, mem.size)
                    .is_some_and(|t| t.capabilities().one_sided),
                _ => false,
            };
            if !one_sided {
                return false;
            }
        }
        !replicas.is_empty()
    }

    /// Writes a wave into carved reservation space and commits it; values the master does not
    /// take (other than existing keys, which a put leaves alone) are written again through
    /// PutStart. With `commit_on_landing` the commit travels with the WRITEs and the master
    /// applies it when the storage node reports them landed; otherwise, or when that commit
    /// fails, it is sent after the WRITEs are acknowledged.
    async fn write_reserved(
        &self,
        kind: WriteKind,
        wave: &[(usize, &Item<'_>)],
        staged_bytes: u64,
        config: &ReplicateConfig,
        carved: Carved,
    ) -> Vec<(usize, Result<()>)> {
        let targets: Vec<Option<&[ReplicaDescriptor]>> = carved
            .replicas
            .iter()
            .map(|r| Some(std::slice::from_ref(r)))
            .collect();
        let overlap = match self.config.commit_on_landing {
            Some(forced) => forced,
            None => carved.commit_on_landing && !self.one_sided(&carved.replicas).await,
        };
        let prepared = match self
            .prepare(wave, staged_bytes, &targets, overlap, carved.land_by)
            .await
        {
            Ok(p) => p,
            Err(e) => return wave.iter().map(|(i, _)| (*i, Err(e.clone()))).collect(),
        };
        if Instant::now() >= carved.usable_until {
            // Too late to write into the reservation (staging space took long to free).
            drop(prepared);
            self.reserved.drop_grant(carved.id);
            return self.write_started(kind, wave, staged_bytes, config).await;
        }
        // Items whose WRITEs are built (the others failed already).
        let ready: Vec<usize> = prepared
            .spans
            .iter()
            .filter(|s| s.2.is_none())
            .map(|s| s.0)
            .collect();
        let (transferred, landed) = if overlap && !ready.is_empty() {
            self.send_and_commit(prepared, wave, &carved, &ready, config)
                .await
        } else {
            (self.send(prepared).await, None)
        };
        let mut results: Vec<Option<Result<()>>> = vec![None; wave.len()];
        let mut again = Vec::new();
        // A commit's answer for the value at `pos`: done, or to be written again.
        let settle = |results: &mut [Option<Result<()>>],
                      again: &mut Vec<usize>,
                      pos: usize,
                      r: std::result::Result<(), ErrorCode>| match r {
            Ok(()) | Err(ErrorCode::OBJECT_ALREADY_EXISTS) => results[pos] = Some(Ok(())),
            Err(code) => {
                tracing::debug!("reserved write of {:?}: {code:?}", wave[pos].1.key);
                again.push(pos);
            }
        };
        if let Some(per_item) = landed {
            // Every ready value landed and the master has answered for each.
            self.reserved.on_landing.fetch_add(1, Ordering::Relaxed);
            for (&pos, r) in ready.iter().zip(per_item) {
                settle(&mut results, &mut again, pos, r);
            }
            let mut is_ready = vec![false; wave.len()];
            ready.iter().for_each(|&pos| is_ready[pos] = true);
            for (pos, t) in transferred.into_iter().enumerate() {
                if let Some(Err(e)) = t.filter(|_| !is_ready[pos]) {
                    self.reserved.drop_grant(carved.id);
                    results[pos] = Some(Err(e));
                }
            }
        } else {
            let mut commit = Vec::new();
            for (pos, t) in transferred.into_iter().enumerate() {
                match t {
                    Some(Ok(())) => commit.push(pos),
                    Some(Err(e)) if ready.contains(&pos) => {
                        // The reservation's node failed the WRITE: the value goes through
                        // PutStart, placed where the master says (and placed again if that
                        // fails too). Nothing is committed here; the reservation's unused
                        // space returns to its segment when the reservation expires.
                        tracing::debug!("reserved write of {:?}: {e}", wave[pos].1.key);
                        if let Some(m) = carved.replicas[pos].memory() {
                            self.avoid(&m.segment_name);
                        }
                        again.push(pos);
                    }
                    Some(Err(e)) => {
                        self.reserved.drop_grant(carved.id);
                        results[pos] = Some(Err(e));
                    }
                    None => results[pos] = Some(Ok(())),
                }
            }
            if !commit.is_empty() {
                self.reserved.after_write.fetch_add(1, Ordering::Relaxed);
                let n = commit.len();
                let answer = self
                    .apply(self.commit_reserved(wave, &carved, &commit, config))
                    .await;
                let per_item: Vec<std::result::Result<(), ErrorCode>> = match answer {
                    Ok((_, Response::UnitBatch(rs))) if rs.len() == n => rs,
                    Ok((_, other)) => {
                        tracing::warn!("CommitReserved answered {other:?}");
                        vec![Err(ErrorCode::INTERNAL_ERROR); n]
                    }
                    // Maybe applied, maybe not: writing again through PutStart finds out (a put
                    // of a committed key is left alone).
                    Err(e) => {
                        tracing::debug!("committing {n} reserved writes: {e}");
                        vec![Err(e.code()); n]
                    }
                };
                for (pos, r) in commit.into_iter().zip(per_item) {
                    settle(&mut results, &mut again, pos, r);
                }
            }
        }
        if !again.is_empty() {
            self.reserved.drop_grant(carved.id);
            let retry: Vec<(usize, &Item<'_>)> = again.iter().map(|&pos| wave[pos]).collect();
            let staged = retry.iter().map(|(_, item)| item.source.staged()).sum();
            let redone = self.write_started(kind, &retry, staged, config).await;
            for (&pos, (_, r)) in again.iter().zip(redone) {
                results[pos] = Some(r);
            }
        }
        wave.iter()
            .zip(results)
            .map(|((i, _), r)| (*i, r.expect("every item has a result")))
            .collect()
    }

    /// The CommitReserved of the wave's values at `positions`.
    fn commit_reserved(
        &self,
        wave: &[(usize, &Item<'_>)],
        carved: &Carved,
        positions: &[usize],
        config: &ReplicateConfig,
    ) -> Command {
        let items = positions
            .iter()
            .map(|&pos| ReservedPut {
                key: wave[pos].1.key.to_owned(),
                offset: carved.offsets[pos],
                size: wave[pos].1.source.size(),
            })
            .collect();
        Command::CommitReservedChecked {
            client_id: self.client_id,
            reservation: carved.id,
            items,
            config: config.clone(),
            checksums: positions.iter().map(|&pos| wave[pos].1.checksum).collect(),
        }
    }

    /// Sends the WRITEs of the `ready` items together with a commit the master applies once the
    /// storage node reports them landed. Returns the transfer results and, when that commit was
    /// applied, its per-item answers (in `ready` order); `None` when it was not (a WRITE failed,
    /// or the master gave up waiting), in which case the caller commits the ordinary way.
    async fn send_and_commit(
        &self,
        prepared: Prepared,
        wave: &[(usize, &Item<'_>)],
        carved: &Carved,
        ready: &[usize],
        config: &ReplicateConfig,
    ) -> (
        Vec<Option<Result<()>>>,
        Option<Vec<std::result::Result<(), ErrorCode>>>,
    ) {
        let mut segment = String::new();
        let mut ranges = Vec::with_capacity(ready.len());
        for &pos in ready {
            let mem = carved.replicas[pos]
                .memory()
                .expect("reserved replicas are in memory");
            if segment.is_empty() {
                segment.clone_from(&mem.segment_name);
            }
            ranges.push((mem.buffer_address, mem.size));
        }
        let n = ready.len();
        let (command, _in_flight) = self
            .ids
            .name(self.commit_reserved(wave, carved, ready, config));
        let request = MasterRequest::CommitWhenLanded {
            command,
            segment: segment.clone(),
            ranges: ranges.clone(),
            wait_ms: LANDING_WAIT.as_millis() as u64,
        };
        // The commit goes out first, so it is at the master before the bytes have landed.
        let commit = std::pin::pin!(async {
            self.check_open()?;
            self.master.call(request).await
        });
        let sending = std::pin::pin!(self.send(prepared));
        let (transferred, answer) = match futures::future::select(commit, sending).await {
            Either::Left((answer, sending)) => (sending.await, answer),
            Either::Right((transferred, commit)) => {
                let all_written = ready
                    .iter()
                    .all(|&pos| matches!(transferred[pos], Some(Ok(()))));
                if !all_written {
                    // The commit can no longer apply (a range will never be reported landed).
                    return (transferred, None);
                }
                let nudge = std::pin::pin!(tokio::time::sleep(CONFIRM_AFTER));
                let answer = match futures::future::select(commit, nudge).await {
                    Either::Left((answer, _)) => answer,
                    Either::Right(((), commit)) => {
                        // The storage node's report is late or lost; the acknowledged WRITEs
                        // have landed, so this client vouches for them itself (the master
                        // takes that from the client holding the reservation only).
                        self.reserved
                            .confirmed_by_client
                            .fetch_add(1, Ordering::Relaxed);
                        let note = self.master.call(MasterRequest::Landed {
                            client_id: self.client_id,
                            segment,
                            ranges,
                        });
                        futures::future::join(commit, note).await.0
                    }
                };
                (transferred, answer)
            }
        };
        let per_item = match answer {
            Ok(MasterReply::Applied {
                response: Response::UnitBatch(rs),
                ..
            }) if rs.len() == n => Some(rs),
            other => {
                tracing::debug!("commit on landing: {other:?}; committing after the WRITE");
                None
            }
        };
        (transferred, per_item)
    }

    /// Starts, transfers and ends the writes of one wave through PutStart and PutEnd. A replica
    /// whose WRITE failed (its node died, say, and the master has not expired it yet) is placed
    /// again elsewhere ([`Command::ReplaceReplicas`]) and written there, up to
    /// [`REPLACE_ROUNDS`] times; when no other segment has room, the write commits with the
    /// replicas it has (as a PutStart that found fewer segments does), and a write with none
    /// left fails, its space given back.
    async fn write_started(
        &self,
        kind: WriteKind,
        wave: &[(usize, &Item<'_>)],
        staged_bytes: u64,
        config: &ReplicateConfig,
    ) -> Vec<(usize, Result<()>)> {
        // The WRITEs' deadline counts from before PutStart is sent, so it is earlier than the
        // master's takeover of the write, counted from when it applied PutStart.
        let land_by = Instant::now() + self.config.put_write_deadline;
        let started = match self.start(kind, wave, config).await {
            Ok(s) => s,
            Err(e) => return wave.iter().map(|(i, _)| (*i, Err(e.clone()))).collect(),
        };
        let n = wave.len();
        // Per item: the replicas to write in this round.
        let mut targets: Vec<Option<Vec<ReplicaDescriptor>>> = started
            .iter()
            .map(|s| match s {
                Ok(Some(r)) => Some(r.replicas.clone()),
                _ => None,
            })
            .collect();
        let in_progress: Vec<bool> = targets.iter().map(Option::is_some).collect();
        // Per item: why it failed, and whether the master already dropped its write.
        let mut failed: Vec<Option<Error>> = vec![None; n];
        let mut gone = vec![false; n];
        // Per item: segments whose replicas are to be placed again, and the last WRITE error.
        let mut replace: Vec<Vec<String>> = vec![Vec::new(); n];
        let mut last_error: Vec<Option<String>> = vec![None; n];
        // A replica on a segment that failed a moment ago is placed again without a try, when
        // the item has replicas elsewhere to commit with anyway.
        for (pos, t) in targets.iter_mut().enumerate() {
            let Some(replicas) = t else { continue };
            let (avoided, usable): (Vec<_>, Vec<_>) = std::mem::take(replicas)
                .into_iter()
                .partition(|r| r.memory().is_some_and(|m| self.is_avoided(&m.segment_name)));
            if usable.is_empty() {
                *replicas = avoided;
            } else {
                replace[pos] = (avoided.iter())
                    .filter_map(|r| r.memory().map(|m| m.segment_name.clone()))
                    .collect();
                last_error[pos] = Some(format!(
                    "{:?} failed a WRITE within {AVOID_FOR:?}",
                    replace[pos]
                ));
                *replicas = usable;
            }
        }
        for round in 0..=REPLACE_ROUNDS {
            let sub: Vec<usize> = (0..n)
                .filter(|&pos| {
                    failed[pos].is_none() && targets[pos].as_ref().is_some_and(|t| !t.is_empty())
                })
                .collect();
            if !sub.is_empty() {
                let sub_wave: Vec<(usize, &Item<'_>)> = sub.iter().map(|&pos| wave[pos]).collect();
                let sub_targets: Vec<Option<&[ReplicaDescriptor]>> =
                    sub.iter().map(|&pos| targets[pos].as_deref()).collect();
                let staged = if round == 0 {
                    staged_bytes
                } else {
                    sub_wave.iter().map(|(_, item)| item.source.staged()).sum()
                };
                match self
                    .prepare(&sub_wave, staged, &sub_targets, false, land_by)
                    .await
                {
                    Ok(prepared) => {
                        let written = self.send_detailed(prepared).await;
                        for (&pos, w) in sub.iter().zip(written) {
                            match w {
                                None | Some(Written::All) => {}
                                Some(Written::Failed { replicas, error }) => {
                                    let mine = targets[pos].as_deref().unwrap_or_default();
                                    for r in replicas {
                                        if let Some(m) = mine.get(r).and_then(|r| r.memory()) {
                                            self.avoid(&m.segment_name);
                                            replace[pos].push(m.segment_name.clone());
                                        }
                                    }
                                    last_error[pos] = Some(error.to_string());
                                }
                                Some(Written::Not(e)) => {
                                    failed[pos] = Some(Error::with_code(
                                        ErrorCode::TRANSFER_FAIL,
                                        format!("writing a replica failed: {e}"),
                                    ));
                                }
                            }
                        }
                    }
                    Err(e) => sub.iter().for_each(|&pos| failed[pos] = Some(e.clone())),
                }
            }
            targets.iter_mut().for_each(|t| *t = None);
            let again: Vec<usize> = (0..n)
                .filter(|&pos| failed[pos].is_none() && !replace[pos].is_empty())
                .collect();
            if again.is_empty() {
                break;
            }
            if round == REPLACE_ROUNDS {
                for pos in again {
                    let e = last_error[pos].take().unwrap_or_default();
                    failed[pos] = Some(Error::with_code(
                        ErrorCode::TRANSFER_FAIL,
                        format!("writing a replica failed: {e}"),
                    ));
                }
                break;
            }
            let mut names: Vec<String> =
                again.iter().flat_map(|&pos| replace[pos].clone()).collect();
            names.sort();
            names.dedup();
            let keys = again
                .iter()
                .map(|&pos| wave[pos].1.key.to_owned())
                .collect();
            match self.replace_replicas(keys, names).await {
                Ok(per_key) => {
                    for (&pos, r) in again.iter().zip(per_key) {
                        replace[pos].clear();
                        match r {
                            // Possibly none: the write commits with the replicas it has.
                            Ok(placed) => targets[pos] = Some(placed.replicas),
                            Err(code) => {
                                // The master dropped the write (or it was not this client's
                                // any more): nothing to commit or revoke.
                                gone[pos] = true;
                                let e = last_error[pos].take().unwrap_or_default();
                                failed[pos] = Some(Error::with_code(
                                    ErrorCode::TRANSFER_FAIL,
                                    format!("writing a replica failed ({e}), and placing it again did too ({code:?})"),
                                ));
                            }
                        }
                    }
                }
                Err(e) => again.iter().for_each(|&pos| failed[pos] = Some(e.clone())),
            }
        }
        let revoke: Vec<String> = (0..n)
            .filter(|&pos| in_progress[pos] && failed[pos].is_some() && !gone[pos])
            .map(|pos| wave[pos].1.key.to_owned())
            .collect();
        if !revoke.is_empty() {
            self.end(false, revoke, Vec::new()).await;
        }
        let commit: Vec<usize> = (0..n)
            .filter(|&pos| in_progress[pos] && failed[pos].is_none())
            .collect();
        if !commit.is_empty() {
            let keys = commit
                .iter()
                .map(|&pos| wave[pos].1.key.to_owned())
                .collect();
            let checksums = commit.iter().map(|&pos| wave[pos].1.checksum).collect();
            let ended = self.end(true, keys, checksums).await;
            for (&pos, r) in commit.iter().zip(ended) {
                if let Err(e) = r {
                    failed[pos] = Some(e);
                }
            }
        }
        let mut out = Vec::with_capacity(n);
        for (pos, ((i, _), start)) in wave.iter().zip(started).enumerate() {
            let r = match start {
                Err(e) => Err(e),
                Ok(None) => Ok(()),
                Ok(Some(_)) => failed[pos].take().map_or(Ok(()), Err),
            };
            out.push((*i, r));
        }
        out
    }

    /// ReplaceReplicas: places again, elsewhere, the replicas on `failed` segments of this
    /// client's writes in progress on `keys`; per key the new replicas to write.
    async fn replace_replicas(
        &self,
        keys: Vec<String>,
        failed: Vec<String>,
    ) -> Result<Vec<std::result::Result<PutStartResponse, ErrorCode>>> {
        let n = keys.len();
        match self
            .apply(Command::ReplaceReplicas {
                client_id: self.client_id,
                keys,
                failed,
            })
            .await?
            .1
        {
            Response::PutStartBatch(rs) if rs.len() == n => Ok(rs),
            other => Err(Error::Protocol(format!(
                "ReplaceReplicas answered {other:?}"
            ))),
        }
    }

    /// Remembers that a WRITE to `segment` failed (see [`AVOID_FOR`]).
    fn avoid(&self, segment: &str) {
        let mut avoided = self.avoided.lock().expect("avoided segments");
        let now = Instant::now();
        avoided.retain(|_, until| *until > now);
        avoided.insert(segment.to_owned(), now + AVOID_FOR);
    }

    /// Whether a WRITE to `segment` failed within [`AVOID_FOR`].
    fn is_avoided(&self, segment: &str) -> bool {
        let avoided = self.avoided.lock().expect("avoided segments");
        avoided
            .get(segment)
            .is_some_and(|until| *until > Instant::now())
    }

    /// Stages a wave's byte values and builds its WRITE requests (asking for landing notices
    /// when `notify`) for each item that has targets, fenced by `land_by` (no byte lands after
    /// it: the space may be another object's then). Byte values go through one staging slot
    /// of `staged_bytes`; waiting for it fails the whole wave.
    async fn prepare(
        &self,
        wave: &[(usize, &Item<'_>)],
        staged_bytes: u64,
        targets: &[Option<&[ReplicaDescriptor]>],
        notify: bool,
        land_by: Instant,
    ) -> Result<Prepared> {
        let slot = if staged_bytes > 0 {
            Some(
                self.staging
                    .reserve(staged_bytes, self.config.staging_wait)
                    .await?,
            )
        } else {
            None
        };
        let mut requests = Vec::new();
        let mut replica_of = Vec::new();
        let mut spans = Vec::new();
        let mut unreachable = Vec::new();
        let mut staged_at = slot.as_ref().map_or(0, |s| s.addr);
        for (pos, ((_, item), replicas)) in wave.iter().zip(targets).enumerate() {
            let Some(replicas) = replicas else {
                continue;
            };
            let first = requests.len();
            let outcome: Result<()> = async {
                // The parts of the value as registered (address, length) ranges.
                let parts: Vec<(u64, u64)> = match &item.source {
                    Source::Registered(parts) => parts.clone(),
                    Source::Bytes(parts) => {
                        let size = item.source.size();
                        let mut at = staged_at;
                        let region = self.engine.memory().resolve(at, size)?;
                        for p in parts {
                            region
                                .slice(at - staged_at, p.len() as u64)?
                                .write_from(p)?;
                            at += p.len() as u64;
                        }
                        let staged = vec![(staged_at, size)];
                        staged_at += size.next_multiple_of(64);
                        staged
                    }
                };
                for (r, replica) in replicas.iter().enumerate() {
                    // A replica in this client's own segment is written by memcpy in the engine.
                    let (seg, mut addr) = match self.locate(replica).await {
                        Ok(located) => located,
                        // Its node is unreachable: the replica fails, not the item.
                        Err(e) if replica.memory().is_some() => {
                            unreachable.push((pos, r, e));
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    for &(src, len) in &parts {
                        let write =
                            TransferRequest::write(&seg, addr, src, len).with_deadline(land_by);
                        requests.push(if notify {
                            write.with_landing_notice()
                        } else {
                            write
                        });
                        replica_of.push(r);
                        addr += len;
                    }
                }
                Ok(())
            }
            .await;
            match outcome {
                Ok(()) => spans.push((pos, first..requests.len(), None)),
                Err(e) => {
                    requests.truncate(first);
                    replica_of.truncate(first);
                    unreachable.retain(|u| u.0 != pos);
                    spans.push((pos, first..first, Some(e)));
                }
            }
        }
        Ok(Prepared {
            slot,
            requests,
            replica_of,
            spans,
            unreachable,
            items: wave.len(),
        })
    }

    /// Sends prepared WRITEs: per item `None` (no targets), `Ok` (written everywhere) or the
    /// failure (`TRANSFER_FAIL`).
    async fn send(&self, prepared: Prepared) -> Vec<Option<Result<()>>> {
        self.send_detailed(prepared)
            .await
            .into_iter()
            .map(|w| {
                w.map(|w| match w {
                    Written::All => Ok(()),
                    Written::Failed { error: e, .. } | Written::Not(e) => Err(Error::with_code(
                        ErrorCode::TRANSFER_FAIL,
                        format!("writing a replica failed: {e}"),
                    )),
                })
            })
            .collect()
    }

    /// Sends prepared WRITEs: per item `None` (no targets), or how its WRITEs went.
    async fn send_detailed(&self, prepared: Prepared) -> Vec<Option<Written>> {
        let Prepared {
            slot,
            requests,
            replica_of,
            spans,
            unreachable,
            items,
        } = prepared;
        let transfer_results = self.engine.transfer(requests).await;
        drop(slot);
        let mut out: Vec<Option<Written>> = vec![None; items];
        for (pos, range, early) in spans {
            if let Some(e) = early {
                out[pos] = Some(Written::Not(e));
                continue;
            }
            let mut replicas = Vec::new();
            let mut error = None;
            for i in range {
                if let Err(e) = &transfer_results[i] {
                    if !replicas.contains(&replica_of[i]) {
                        replicas.push(replica_of[i]);
                    }
                    error.get_or_insert_with(|| e.clone());
                }
            }
            for (_, r, e) in unreachable.iter().filter(|u| u.0 == pos) {
                if !replicas.contains(r) {
                    replicas.push(*r);
                }
                error.get_or_insert_with(|| e.clone());
            }
            out[pos] = Some(match error {
                None => Written::All,
                Some(error) => Written::Failed { replicas, error },
            });
        }
        out
    }

    /// PutStart/UpsertStart for a wave: per item the replicas to write, `None` when the key
    /// exists and a put leaves it alone, or the error.
    async fn start(
        &self,
        kind: WriteKind,
        wave: &[(usize, &Item<'_>)],
        config: &ReplicateConfig,
    ) -> Result<Vec<Result<Option<PutStartResponse>>>> {
        let client_id = self.client_id;
        let config = config.clone();
        let results = if let [(_, item)] = wave {
            let (key, size) = (item.key.to_owned(), item.source.size());
            let command = match kind {
                WriteKind::Put => Command::PutStart {
                    client_id,
                    key,
                    size,
                    config,
                },
                WriteKind::Upsert => Command::UpsertStart {
                    client_id,
                    key,
                    size,
                    config,
                },
            };
            match self.apply(command).await?.1 {
                Response::PutStart(r) => vec![r],
                other => return Err(Error::Protocol(format!("PutStart answered {other:?}"))),
            }
        } else {
            let items = wave
                .iter()
                .map(|(_, item)| PutItem {
                    key: item.key.to_owned(),
                    size: item.source.size(),
                })
                .collect();
            let command = match kind {
                WriteKind::Put => Command::BatchPutStart {
                    client_id,
                    items,
                    config,
                },
                WriteKind::Upsert => Command::BatchUpsertStart {
                    client_id,
                    items,
                    config,
                },
            };
            match self.apply(command).await?.1 {
                Response::PutStartBatch(r) if r.len() == wave.len() => r,
                other => return Err(Error::Protocol(format!("BatchPutStart answered {other:?}"))),
            }
        };
        Ok(results
            .into_iter()
            .map(|r| match r {
                Ok(s) => Ok(Some(s)),
                Err(ErrorCode::OBJECT_ALREADY_EXISTS) if kind == WriteKind::Put => Ok(None),
                Err(code) => Err(Error::with_code(code, "the master refused the write")),
            })
            .collect())
    }

    /// PutEnd (`commit`, with the values' `checksums`, one per key) or PutRevoke for `keys`;
    /// one result per key.
    async fn end(&self, commit: bool, keys: Vec<String>, checksums: Vec<u32>) -> Vec<Result<()>> {
        let client_id = self.client_id;
        let n = keys.len();
        debug_assert!(!commit || checksums.len() == n);
        let command = match (commit, n) {
            (true, 1) => Command::PutEndChecked {
                client_id,
                key: keys.into_iter().next().expect("one"),
                checksum: checksums[0],
            },
            (false, 1) => Command::PutRevoke {
                client_id,
                key: keys.into_iter().next().expect("one"),
            },
            (true, _) => Command::BatchPutEndChecked {
                client_id,
                keys,
                checksums,
            },
            (false, _) => Command::BatchPutRevoke { client_id, keys },
        };
        let what = if commit { "committing" } else { "revoking" };
        match self.apply(command).await {
            Ok((_, Response::Unit(r))) => vec![r.map_err(|c| Error::with_code(c, what))],
            Ok((_, Response::UnitBatch(rs))) if rs.len() == n => rs
                .into_iter()
                .map(|r| r.map_err(|c| Error::with_code(c, what)))
                .collect(),
            Ok((_, other)) => vec![Err(Error::Protocol(format!("{what} answered {other:?}"))); n],
            Err(e) => {
                tracing::warn!("{what} {n} writes failed: {e}");
                vec![Err(e); n]
            }
        }
    }
}
