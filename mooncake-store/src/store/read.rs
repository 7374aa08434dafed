//! Reads: get, its batch and zero-copy forms, and object sizes.
//!
//! Performance-critical: every get goes through `read_many`.
//!
//! A read asks the master for the COMPLETE replicas (which grants a read lease), reads one of
//! them (this client's own segment first, a memcpy), falling back to the others if a transfer
//! fails, and reports `LEASE_EXPIRED` when the transfer ended after the lease did: the bytes may
//! then have been overwritten while they were read.
//!
//! The bytes are checked against the value's checksum (see [`checksum`](super::checksum)):
//! always when they are returned as bytes, on zero-copy reads when
//! [`StoreConfig::verify_zero_copy`](super::StoreConfig::verify_zero_copy) says so. A replica
//! that does not match is passed over for the next; none matching is `CHECKSUM_MISMATCH`.
//!
//! A key read before is read again from where it was, at the same time as the master call
//! (see [`LocationCache`](super::locations::LocationCache)); the bytes count only if the answer
//! confirms that place, else the object is read from the answer's replicas.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{Error, ErrorCode, Result, TransferRequest};
use mooncake_master::{Command, ReplicaDescriptor, ReplicaId, ReplicaList, Response};

use super::checksum;
use super::locations::Located;
use super::staging::Slot;
use super::value::StagedValue;
use super::Store;

/// Where the bytes of a read go.
enum Dest {
    /// A new vector (through the staging buffer, or straight from this client's own segment).
    Bytes,
    /// Registered caller memory, filled in order; must hold the whole object. The flag: check
    /// the bytes against the value's checksum.
    Registered(Vec<(u64, u64)>, bool),
}

/// A read of one object for `read_batch`: its replicas, where its bytes go, and whether to check
/// them against its checksum.
type Job<'a> = (&'a ReplicaList, &'a [(u64, u64)], bool);

/// A zero-copy read waiting to run: item index, key, replicas, destination buffers and the local
/// lease deadline.
type DirectRead<'a> = (usize, &'a str, ReplicaList, Vec<(u64, u64)>, Instant, bool);

/// Reads sent ahead of the master's answer (see [`LocationCache`](super::locations::LocationCache)).
#[derive(Default)]
struct Ahead {
    requests: Vec<TransferRequest>,
    reads: Vec<AheadRead>,
    /// Staging space of the byte-destined reads.
    slot: Option<Arc<Slot>>,
}

/// One object read ahead: its item, the guess, where its bytes land in staging (byte
/// destinations) and its transfer requests.
struct AheadRead {
    item: usize,
    guess: Located,
    staged: Option<u64>,
    span: std::ops::Range<usize>,
}

/// The outcome of reading one object.
enum Got {
    Bytes(StagedValue),
    Into(u64),
}

impl Store {
    /// The value of `key`.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.get_staged(key).await?.into_vec()
    }

    /// The values of `keys`; one result per key.
    pub async fn get_batch(&self, keys: &[&str]) -> Vec<Result<Vec<u8>>> {
        self.get_batch_staged(keys)
            .await
            .into_iter()
            .map(|r| r.and_then(StagedValue::into_vec))
            .collect()
    }

    /// The value of `key`, left where it landed (see [`StagedValue`]).
    pub async fn get_staged(&self, key: &str) -> Result<StagedValue> {
        match self.read_one(key, Dest::Bytes).await? {
            Got::Bytes(v) => Ok(v),
            Got::Into(_) => unreachable!("bytes requested"),
        }
    }

    /// The values of `keys`, left where they landed; one result per key. Values that did not
    /// fit the staging buffer together were moved out of it as they were read.
    pub async fn get_batch_staged(&self, keys: &[&str]) -> Vec<Result<StagedValue>> {
        let items = keys.iter().map(|k| (*k, Dest::Bytes)).collect();
        self.read_many(items)
            .await
            .into_iter()
            .map(|r| {
                r.map(|g| match g {
                    Got::Bytes(v) => v,
                    Got::Into(_) => unreachable!("bytes requested"),
                })
            })
            .collect()
    }

    /// Reads `key` into `size` bytes of registered memory at `addr`, with no copy; returns the
    /// object's size. A buffer smaller than the object is `INVALID_PARAMS`. After an error the
    /// buffer's contents are unspecified (a read sent ahead may have landed there).
    pub async fn get_into(&self, key: &str, addr: u64, size: u64) -> Result<u64> {
        match self
            .read_one(
                key,
                Dest::Registered(vec![(addr, size)], self.config.verify_zero_copy),
            )
            .await?
        {
            Got::Into(n) => Ok(n),
            Got::Bytes(_) => unreachable!("registered memory requested"),
        }
    }

    /// Zero-copy batch read: `(key, address, size)` each; one result (bytes read) per item.
    pub async fn batch_get_into(&self, items: &[(&str, u64, u64)]) -> Vec<Result<u64>> {
        let items = items
            .iter()
            .map(|(k, a, s)| {
                let dest = Dest::Registered(vec![(*a, *s)], self.config.verify_zero_copy);
                (*k, dest)
            })
            .collect();
        Self::sizes(self.read_many(items).await)
    }

    /// Zero-copy batch read where each object is spread over several registered buffers
    /// `(address, size)`, filled in order.
    pub async fn batch_get_into_multi_buffers(
        &self,
        items: &[(&str, Vec<(u64, u64)>)],
    ) -> Vec<Result<u64>> {
        let verify = self.config.verify_zero_copy;
        let items = items
            .iter()
            .map(|(k, parts)| (*k, Dest::Registered(parts.clone(), verify)))
            .collect();
        Self::sizes(self.read_many(items).await)
    }

    /// [`Store::batch_get_into_multi_buffers`], checking every value against its checksum
    /// whatever [`StoreConfig::verify_zero_copy`](super::StoreConfig::verify_zero_copy) says:
    /// for callers that hand the bytes on as a value (the real client serving a dummy's `get`).
    pub async fn batch_get_into_checked(
        &self,
        items: &[(&str, Vec<(u64, u64)>)],
    ) -> Vec<Result<u64>> {
        let items = items
            .iter()
            .map(|(k, parts)| (*k, Dest::Registered(parts.clone(), true)))
            .collect();
        Self::sizes(self.read_many(items).await)
    }

    fn sizes(results: Vec<Result<Got>>) -> Vec<Result<u64>> {
        results
            .into_iter()
            .map(|r| {
                r.map(|g| match g {
                    Got::Into(n) => n,
                    Got::Bytes(v) => v.len() as u64,
                })
            })
            .collect()
    }

    /// The size of `key`'s value (grants a read lease, as any replica query).
    pub async fn get_size(&self, key: &str) -> Result<u64> {
        Ok(self
            .replica_lists(&[key])
            .await?
            .0
            .pop()
            .expect("one")?
            .size)
    }

    async fn read_one(&self, key: &str, dest: Dest) -> Result<Got> {
        self.read_many(vec![(key, dest)])
            .await
            .pop()
            .expect("one result per item")
    }

    /// GetReplicaList (or its batch form) for `keys`: per key the list or the error, and the
    /// master time of the answer.
    pub(super) async fn replica_lists(
        &self,
        keys: &[&str],
    ) -> Result<(Vec<Result<ReplicaList>>, mooncake_master::Timestamp)> {
        let not_found =
            |c: ErrorCode, k: &str| Error::with_code(c, format!("no readable value for {k:?}"));
        if let [key] = keys {
            let (now, resp) = self
                .apply(Command::GetReplicaList {
                    key: (*key).to_owned(),
                })
                .await?;
            match resp {
                Response::Replicas(r) => Ok((vec![r.map_err(|c| not_found(c, key))], now)),
                other => Err(Error::Protocol(format!(
                    "GetReplicaList answered {other:?}"
                ))),
            }
        } else {
            let (now, resp) = self
                .apply(Command::BatchGetReplicaList {
                    keys: keys.iter().map(|k| (*k).to_owned()).collect(),
                })
                .await?;
            match resp {
                Response::ReplicasBatch(rs) if rs.len() == keys.len() => Ok((
                    rs.into_iter()
                        .zip(keys)
                        .map(|(r, k)| r.map_err(|c| not_found(c, k)))
                        .collect(),
                    now,
                )),
                other => Err(Error::Protocol(format!(
                    "BatchGetReplicaList answered {other:?}"
                ))),
            }
        }
    }

    async fn read_many(&self, items: Vec<(&str, Dest)>) -> Vec<Result<Got>> {
        let started = Instant::now();
        if items.iter().any(|(k, _)| k.is_empty()) {
            // Empty keys are invalid; answer them without bothering the master.
            let mut out = Vec::new();
            for (key, dest) in items {
                out.push(if key.is_empty() {
                    Err(Error::with_code(ErrorCode::INVALID_PARAMS, "empty key"))
                } else {
                    Box::pin(self.read_many(vec![(key, dest)]))
                        .await
                        .pop()
                        .expect("one")
                });
            }
            return out;
        }
        let keys: Vec<&str> = items.iter().map(|(k, _)| *k).collect();
        let session = self.master.session();
        let mut ahead = self.plan_ahead(&items, session).await;
        if ahead.reads.is_empty() {
            let answer = self.replica_lists(&keys).await;
            let same_session = self.master.session() == session;
            return match answer {
                Ok((lists, now)) => {
                    if same_session {
                        self.learn(&keys, session, &lists);
                    }
                    self.read_listed(items, lists, now, started).await
                }
                Err(e) => items.iter().map(|_| Err(e.clone())).collect(),
            };
        }
        // Read where the objects were last time while the master answers where they are.
        let requests = std::mem::take(&mut ahead.requests);
        let (answer, results) =
            futures::join!(self.replica_lists(&keys), self.engine.transfer(requests));
        let same_session = self.master.session() == session;
        let (lists, master_now) = match answer {
            Ok(x) => x,
            Err(e) => return items.iter().map(|_| Err(e.clone())).collect(),
        };
        if same_session {
            self.learn(&keys, session, &lists);
        }
        let mut out: Vec<Option<Result<Got>>> = (0..items.len()).map(|_| None).collect();
        for read in &ahead.reads {
            let failure = results[read.span.clone()]
                .iter()
                .find_map(|r| r.as_ref().err());
            let transferred = failure.is_none();
            let list = match &lists[read.item] {
                Ok(list)
                    if transferred && same_session && read.guess.confirmed_by(session, list) =>
                {
                    list
                }
                _ => {
                    match (failure, read.guess.replica.memory()) {
                        // The caller's buffer, not the peer: the guess may still hold.
                        (None | Some(Error::LocalRangeNotRegistered { .. }), _) => {}
                        // The peer may be gone: other keys there wait for the master too.
                        (Some(_), Some(m)) => self.locations.forget_segment(&m.segment_name),
                        (Some(_), None) => self.locations.forget(keys[read.item]),
                    }
                    self.locations.count(false);
                    continue;
                }
            };
            // Bytes that do not match the checksum are read again from the answer's replicas.
            let verified = match (read.staged, &items[read.item].1) {
                (Some(addr), _) => self.verified(list, &[(addr, list.size)], true),
                (None, Dest::Registered(parts, verify)) => self.verified(list, parts, *verify),
                (None, Dest::Bytes) => false,
            };
            if !verified {
                self.locations.forget(keys[read.item]);
                self.locations.count(false);
                continue;
            }
            self.locations.count(true);
            let deadline = started + Duration::from_millis(list.lease.0.since(master_now));
            let key = keys[read.item];
            out[read.item] = Some(lease_check(deadline, key).map(|()| match read.staged {
                Some(addr) => Got::Bytes(StagedValue::staged(
                    self.engine.clone(),
                    ahead.slot.clone().expect("staged reads have a slot"),
                    addr,
                    list.size,
                )),
                None => Got::Into(list.size),
            }));
        }
        // Everything not confirmed is read again from the answer, as without a guess.
        let mut rest_items = Vec::new();
        let mut rest_lists = Vec::new();
        let mut rest_at = Vec::new();
        for (i, (item, list)) in items.into_iter().zip(lists).enumerate() {
            if out[i].is_none() {
                rest_items.push(item);
                rest_lists.push(list);
                rest_at.push(i);
            }
        }
        if !rest_items.is_empty() {
            // The rest may need the staging space the early reads hold.
            for r in out.iter_mut().flatten() {
                own_value(r);
            }
            let rest = self
                .read_listed(rest_items, rest_lists, master_now, started)
                .await;
            for (i, r) in rest_at.into_iter().zip(rest) {
                out[i] = Some(r);
            }
        }
        out.into_iter()
            .map(|r| r.expect("every item has a result"))
            .collect()
    }

    /// Remembers, per key of an answer, the replica a read uses (see [`LocationCache`](super::locations::LocationCache)).
    fn learn(&self, keys: &[&str], session: u64, lists: &[Result<ReplicaList>]) {
        let own = self.engine.segment_name();
        for (key, list) in keys.iter().zip(lists) {
            let remote = list.as_ref().ok().and_then(|l| {
                preferred_replica(l, own)
                    .filter(|r| r.memory().is_some_and(|m| m.segment_name != own))
                    .map(|r| (l, r))
            });
            self.locations.learn(key, session, remote);
        }
    }

    /// The reads that can go out before the master answers: items whose key has a guess from
    /// this session, on another client's segment, with room for it (registered memory, or the
    /// staging buffer when free space is there at once).
    async fn plan_ahead(&self, items: &[(&str, Dest)], session: u64) -> Ahead {
        let mut ahead = Ahead::default();
        let mut guessed = Vec::new();
        let mut staged_bytes = 0u64;
        for (i, (key, dest)) in items.iter().enumerate() {
            let Some(guess) = self.locations.get(key, session) else {
                continue;
            };
            match dest {
                Dest::Registered(parts, _)
                    if parts.iter().map(|p| p.1).sum::<u64>() < guess.size =>
                {
                    continue
                }
                Dest::Registered(..) => {}
                Dest::Bytes => staged_bytes += guess.size.next_multiple_of(64),
            }
            guessed.push((i, guess));
        }
        if guessed.is_empty() {
            return ahead;
        }
        let mut staged_at = None;
        if staged_bytes > 0 && staged_bytes <= self.staging.size() {
            ahead.slot = self.staging.try_reserve(staged_bytes).map(Arc::new);
            staged_at = ahead.slot.as_ref().map(|s| s.addr);
        }
        for (i, guess) in guessed {
            let (staged, parts) = match &items[i].1 {
                Dest::Registered(parts, _) => (None, parts.clone()),
                Dest::Bytes => {
                    let Some(at) = staged_at.as_mut() else {
                        continue;
                    };
                    let addr = *at;
                    *at += guess.size.next_multiple_of(64);
                    (Some(addr), vec![(addr, guess.size)])
                }
            };
            let Ok((seg, addr)) = self.locate(&guess.replica).await else {
                continue;
            };
            let first = ahead.requests.len();
            ahead
                .requests
                .extend(read_requests(&seg, addr, guess.size, &parts));
            ahead.reads.push(AheadRead {
                item: i,
                guess,
                staged,
                span: first..ahead.requests.len(),
            });
        }
        ahead
    }

    /// Reads `items` from the replicas the master listed for them (`lists`, answered at
    /// `master_now`; `started` is when the call began, for the lease deadline).
    async fn read_listed(
        &self,
        items: Vec<(&str, Dest)>,
        lists: Vec<Result<ReplicaList>>,
        master_now: mooncake_master::Timestamp,
        started: Instant,
    ) -> Vec<Result<Got>> {
        let keys: Vec<&str> = items.iter().map(|(k, _)| *k).collect();
        let mut out = Vec::with_capacity(items.len());
        // Bytes destinations that need the staging buffer, read together below.
        let mut staged: Vec<(usize, ReplicaList, Instant)> = Vec::new();
        // Registered destinations, read concurrently below.
        let mut direct: Vec<DirectRead<'_>> = Vec::new();
        for (i, ((key, dest), list)) in items.into_iter().zip(lists).enumerate() {
            let list = match list {
                Ok(l) => l,
                Err(e) => {
                    out.push(Some(Err(e)));
                    continue;
                }
            };
            let deadline = started + Duration::from_millis(list.lease.0.since(master_now));
            match dest {
                Dest::Registered(parts, verify) => {
                    let capacity: u64 = parts.iter().map(|p| p.1).sum();
                    let r = if capacity < list.size {
                        Err(Error::with_code(
                            ErrorCode::INVALID_PARAMS,
                            format!(
                                "buffer of {capacity} bytes is smaller than {key:?} ({} bytes)",
                                list.size
                            ),
                        ))
                    } else {
                        // Read below, all at once.
                        out.push(None);
                        direct.push((i, key, list, parts, deadline, verify));
                        continue;
                    };
                    out.push(Some(r));
                }
                Dest::Bytes => {
                    if let Some(local) = self.local_copy(&list) {
                        out.push(Some(local.and_then(|v| {
                            lease_check(deadline, key).map(|()| Got::Bytes(StagedValue::owned(v)))
                        })));
                    } else {
                        out.push(None);
                        staged.push((i, list, deadline));
                    }
                }
            }
        }
        // Zero-copy reads go out as one transfer batch.
        let jobs: Vec<Job<'_>> = direct
            .iter()
            .map(|(_, _, list, parts, _, verify)| (list, parts.as_slice(), *verify))
            .collect();
        let results = if jobs.is_empty() {
            Vec::new()
        } else {
            self.read_batch(&jobs).await
        };
        for ((i, key, list, _, deadline, _), r) in direct.iter().zip(results) {
            out[*i] = Some(
                r.and_then(|()| lease_check(*deadline, key))
                    .map(|()| Got::Into(list.size)),
            );
        }
        // Read staged values in waves that fit the staging buffer.
        let mut wave: Vec<(usize, ReplicaList, Instant)> = Vec::new();
        let mut wave_bytes = 0;
        let mut pending = staged.into_iter().peekable();
        while let Some(item) = pending.next() {
            let need = item.1.size.next_multiple_of(64);
            if need > self.staging.size() {
                out[item.0] = Some(Err(Error::with_code(
                    ErrorCode::INVALID_PARAMS,
                    format!(
                        "value of {} bytes exceeds local_buffer_size ({} bytes); use get_into",
                        item.1.size,
                        self.staging.size()
                    ),
                )));
                continue;
            }
            wave_bytes += need;
            wave.push(item);
            let next_fits = pending
                .peek()
                .is_some_and(|n| wave_bytes + n.1.size.next_multiple_of(64) <= self.staging.size());
            if !next_fits {
                let last = pending.peek().is_none();
                for (i, mut r) in self.read_staged_wave(&wave, &keys, wave_bytes).await {
                    if !last {
                        // The next wave needs this staging space.
                        own_value(&mut r);
                    }
                    out[i] = Some(r);
                }
                wave.clear();
                wave_bytes = 0;
            }
        }
        out.into_iter()
            .map(|r| r.expect("every item has a result"))
            .collect()
    }

    async fn read_staged_wave(
        &self,
        wave: &[(usize, ReplicaList, Instant)],
        keys: &[&str],
        bytes: u64,
    ) -> Vec<(usize, Result<Got>)> {
        let slot = match self.staging.reserve(bytes, self.config.staging_wait).await {
            Ok(s) => Arc::new(s),
            Err(e) => return wave.iter().map(|(i, _, _)| (*i, Err(e.clone()))).collect(),
        };
        let mut at = slot.addr;
        let mut placed = Vec::with_capacity(wave.len());
        for (_, list, _) in wave {
            placed.push(at);
            at += list.size.next_multiple_of(64);
        }
        let parts: Vec<[(u64, u64); 1]> = wave
            .iter()
            .zip(&placed)
            .map(|((_, list, _), &addr)| [(addr, list.size)])
            .collect();
        let jobs: Vec<Job<'_>> = wave
            .iter()
            .zip(&parts)
            .map(|((_, list, _), p)| (list, p.as_slice(), true))
            .collect();
        let results = self.read_batch(&jobs).await;
        wave.iter()
            .zip(placed)
            .zip(results)
            .map(|(((i, list, deadline), addr), r)| {
                let r = r.and_then(|()| {
                    lease_check(*deadline, keys[*i]).map(|()| {
                        Got::Bytes(StagedValue::staged(
                            self.engine.clone(),
                            slot.clone(),
                            addr,
                            list.size,
                        ))
                    })
                });
                (*i, r)
            })
            .collect()
    }

    /// The value copied straight out of this client's own segment, when a replica is there
    /// and matches the value's checksum (`None` otherwise: the value is read from the replicas).
    fn local_copy(&self, list: &ReplicaList) -> Option<Result<Vec<u8>>> {
        let own = self.engine.segment_name();
        let mem = list
            .replicas
            .iter()
            .filter_map(|r| r.memory())
            .find(|m| m.segment_name == own)?;
        let copied = self
            .engine
            .memory()
            .resolve(mem.buffer_address, list.size)
            .map(|r| r.to_vec());
        match copied {
            Ok(v)
                if !checksum::matches(list, || Ok(checksum::of_bytes(&[&v]))).unwrap_or(false) =>
            {
                tracing::warn!("{}", checksum::mismatch(own));
                None
            }
            other => Some(other),
        }
    }

    /// Whether the bytes read into `parts` match `list`'s checksum (true when not asked to
    /// `verify`, or when the value has none).
    fn verified(&self, list: &ReplicaList, parts: &[(u64, u64)], verify: bool) -> bool {
        !verify
            || checksum::matches(list, || {
                checksum::of_registered(self.engine.memory(), parts, list.size)
            })
            .unwrap_or(false)
    }

    /// Reads several objects with one transfer batch, each from its preferred replica (this
    /// client's own first); an object whose read fails is retried alone over all its replicas.
    async fn read_batch(&self, jobs: &[Job<'_>]) -> Vec<Result<()>> {
        let own = self.engine.segment_name();
        let mut requests = Vec::new();
        let mut spans: Vec<Option<(std::ops::Range<usize>, ReplicaId)>> =
            Vec::with_capacity(jobs.len());
        for (list, parts, _) in jobs {
            let Some(replica) = preferred_replica(list, own) else {
                spans.push(None);
                continue;
            };
            let Ok((seg, addr)) = self.locate(replica).await else {
                spans.push(None);
                continue;
            };
            let first = requests.len();
            requests.extend(read_requests(&seg, addr, list.size, parts));
            spans.push(Some((first..requests.len(), replica.id)));
        }
        let results = self.engine.transfer(requests).await;
        let mut out = Vec::with_capacity(jobs.len());
        for ((list, parts, verify), span) in jobs.iter().zip(spans) {
            let (failed, used) = match span {
                Some((range, id)) => (results[range].iter().find_map(|r| r.clone().err()), id),
                None => (Some(Error::Shutdown), ReplicaId(0)),
            };
            out.push(match failed {
                None if self.verified(list, parts, *verify) => Ok(()),
                None => {
                    tracing::warn!("a replica of a value does not match its checksum");
                    self.read_replicas(list, parts, *verify, Some(used)).await
                }
                Some(e @ Error::LocalRangeNotRegistered { .. }) => {
                    Err(Error::with_code(ErrorCode::INVALID_PARAMS, e.to_string()))
                }
                // Try again over every replica, one object at a time.
                Some(_) => self.read_replicas(list, parts, *verify, None).await,
            });
        }
        out
    }

    /// Reads the object into `parts` (registered, together at least `list.size` bytes) from one
    /// replica, this client's own first, trying the next replica when a transfer fails or (when
    /// asked to `verify`) the bytes do not match the checksum. `mismatched` is a replica already
    /// found not to match: it is skipped, and without a matching replica the answer is
    /// `CHECKSUM_MISMATCH`.
    async fn read_replicas(
        &self,
        list: &ReplicaList,
        parts: &[(u64, u64)],
        verify: bool,
        mismatched: Option<ReplicaId>,
    ) -> Result<()> {
        let own = self.engine.segment_name();
        let mut order: Vec<_> = list
            .replicas
            .iter()
            .filter(|r| r.memory().is_some() && Some(r.id) != mismatched)
            .collect();
        order.sort_by_key(|r| r.memory().is_some_and(|m| m.segment_name != own));
        let mut last = match mismatched {
            Some(_) => checksum::mismatch("every replica"),
            None => Error::with_code(ErrorCode::REPLICA_IS_NOT_READY, "no readable replica"),
        };
        for replica in order {
            let (seg, addr) = match self.locate(replica).await {
                Ok(x) => x,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let requests = read_requests(&seg, addr, list.size, parts);
            match self
                .engine
                .transfer(requests)
                .await
                .into_iter()
                .find_map(Result::err)
            {
                None if self.verified(list, parts, verify) => return Ok(()),
                None => {
                    tracing::warn!("{}", checksum::mismatch(&seg.name));
                    last = checksum::mismatch(&seg.name);
                }
                Some(e @ Error::LocalRangeNotRegistered { .. }) => {
                    return Err(Error::with_code(ErrorCode::INVALID_PARAMS, e.to_string()))
                }
                Some(e) => {
                    tracing::debug!("reading a replica from {} failed: {e}", seg.name);
                    if last.code() == ErrorCode::CHECKSUM_MISMATCH {
                        // A replica that did not match says more than one that could not be read.
                        continue;
                    }
                    last = Error::with_code(
                        ErrorCode::TRANSFER_FAIL,
                        format!("reading from {}: {e}", seg.name),
                    );
                }
            }
        }
        Err(last)
    }
}

/// The replica a read uses: one in this client's own segment (`own`) if any, else the first
/// memory replica.
fn preferred_replica<'a>(list: &'a ReplicaList, own: &str) -> Option<&'a ReplicaDescriptor> {
    list.replicas
        .iter()
        .filter(|r| r.memory().is_some())
        .min_by_key(|r| r.memory().is_some_and(|m| m.segment_name != own))
}

/// READ requests moving `size` bytes at `addr` of `seg` into `parts` (registered, filled in
/// order).
fn read_requests(
    seg: &mooncake_core::SegmentHandle,
    addr: u64,
    size: u64,
    parts: &[(u64, u64)],
) -> Vec<TransferRequest> {
    let mut requests = Vec::with_capacity(parts.len());
    let mut offset = 0u64;
    for &(local, len) in parts {
        if offset >= size {
            break;
        }
        let len = len.min(size - offset);
        requests.push(TransferRequest::read(seg, addr + offset, local, len));
        offset += len;
    }
    requests
}

/// Moves a staged value of `r` out of the staging buffer.
fn own_value(r: &mut Result<Got>) {
    let taken = std::mem::replace(r, Ok(Got::Into(0)));
    *r = taken.and_then(|g| match g {
        Got::Bytes(v) => v.into_owned().map(Got::Bytes),
        into => Ok(into),
    });
}

fn lease_check(deadline: Instant, key: &str) -> Result<()> {
    if Instant::now() < deadline {
        Ok(())
    } else {
        Err(Error::with_code(
            ErrorCode::LEASE_EXPIRED,
            format!("the read lease of {key:?} expired during the transfer"),
        ))
    }
}
