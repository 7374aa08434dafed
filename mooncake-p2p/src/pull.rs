//! Performance-critical: the pull loop, which moves every byte of a replica.
//!
//! It drives a [`Scheduler`] with the clock and the transfer engine: each request is a one-sided
//! READ of a piece from the chosen peer into a scratch buffer (one per request in flight); the
//! piece's hash is checked there, and only a verified piece is copied into the destination and
//! marked available. So the destination never holds unverified bytes that a peer could be told
//! about, and endgame duplicates (two READs of one piece) never write the same memory. The cost
//! is one extra copy per byte, far below network speed.
//!
//! Availability is published (at most once per `publish_interval`) as pieces verify; the
//! catalog is read again every `refresh_interval` for new holders and pieces. Both run as
//! background tasks, so a slow metadata service never stalls the data path.

// The pull loop is where the clock is read: the scheduler gets `now` from here.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use mooncake_core::{Location, SegmentHandle, TransferRequest};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::catalog::{HaveRecord, PayloadRecord};
use crate::error::{Error, Result};
use crate::piece::{fragments, hash_piece, layout, Bitmap, Buffer, PieceRange};
use crate::scheduler::{fair_share, Completion, Failure, PeerId, Request, Scheduler};
use crate::store::{random_u64, PullMode, Shared};

/// What a completed pull did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PullReport {
    /// Pieces in the payload.
    pub pieces: usize,
    /// Bytes of the payload.
    pub bytes: u64,
    /// Time from the start of the pull to the last verified piece.
    pub elapsed: Duration,
    /// Verified pieces, by the segment they came from.
    pub pieces_from: BTreeMap<String, usize>,
    /// Pieces that arrived with a wrong hash (dropped and fetched again elsewhere).
    pub corrupt: usize,
    /// Pieces whose READs completed (verified or not, late duplicates included). Barring local
    /// errors (the destination unregistered mid-pull) it is `pieces + corrupt + duplicates`: a
    /// piece is fetched again only after it arrived corrupted, or as an endgame duplicate.
    pub fetched: usize,
    /// Requests that failed or timed out.
    pub failed_requests: usize,
    /// Endgame duplicates that arrived after their piece was complete (wasted transfers).
    pub duplicates: usize,
}

/// Per-call settings of [`P2PStore::get_replica_with`](crate::P2PStore::get_replica_with): the
/// Go API's `ctx` (a deadline and a cancellation), and a progress counter.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// The pull fails with [`Error::Timeout`] after this long. Default: the store's
    /// [`pull_timeout`](crate::P2PConfig::pull_timeout).
    pub timeout: Option<Duration>,
    /// The pull fails with [`Error::Cancelled`] once this is cancelled (from any thread).
    pub cancel: Option<CancelToken>,
    /// Each piece's size is added here as soon as it is verified and stored, for a progress
    /// display.
    pub progress: Option<Arc<AtomicU64>>,
}

/// Cancels the pulls it is given to ([`PullOptions::cancel`]); clones share the state, and a
/// cancelled token stays cancelled. Dropping a pull's future cancels it too; this is for
/// cancelling from elsewhere (another thread, a signal handler, a Python binding).
#[derive(Clone, Debug)]
pub struct CancelToken(Arc<watch::Sender<bool>>);

impl Default for CancelToken {
    fn default() -> Self {
        CancelToken(Arc::new(watch::Sender::new(false)))
    }
}

impl CancelToken {
    /// A token not cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels every pull given this token (or a clone), now and later.
    pub fn cancel(&self) {
        self.0.send_replace(true);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }
}

/// A known holder of the payload.
#[derive(Debug)]
struct Holder {
    record: HaveRecord,
    segment: Option<SegmentHandle>,
    /// When its record was last seen to change.
    changed: Instant,
}

/// Scratch buffers where pieces land, unregistered when the pull ends (a transfer still using
/// one keeps it alive until it finishes).
struct Scratch {
    shared: Arc<Shared>,
    slots: Vec<u64>,
    free: Vec<usize>,
    len: usize,
    max: usize,
}

impl Scratch {
    /// A free slot, allocated if none is free and fewer than `max` exist.
    fn take(&mut self) -> Result<Option<usize>> {
        if let Some(slot) = self.free.pop() {
            return Ok(Some(slot));
        }
        if self.slots.len() >= self.max {
            return Ok(None);
        }
        let addr = self
            .shared
            .engine
            .allocate_buffer(self.len, Location::default())?;
        self.slots.push(addr);
        Ok(Some(self.slots.len() - 1))
    }

    /// Slots free or allocatable.
    fn available(&self) -> usize {
        self.free.len() + (self.max - self.slots.len())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for &addr in &self.slots {
            // The returned future only tells when the last transfer let go: not needed.
            let _ = self.shared.engine.unregister_memory_async(addr);
        }
    }
}

/// Aborts a background task when the pull ends, however it ends.
struct Background(Option<JoinHandle<()>>);

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

type Outcome = (Request, usize, mooncake_core::Result<()>);

/// How long a pull waits after announcing itself before its first look at the catalog, so that
/// readers started together (within this) all count each other from their first requests and
/// split the origin's pieces the same way. Readers arriving later learn what the others fetch
/// from the origin from their records instead.
const SETTLE: Duration = Duration::from_millis(25);

/// Pulls `record` into `dest` (already checked: registered, of the payload's size).
///
/// The catalog is read and written by two background tasks, so a slow metadata service
/// delays availability updates but never the data path.
pub(crate) async fn pull(
    shared: &Arc<Shared>,
    record: &PayloadRecord,
    dest: &[Buffer],
    options: &PullOptions,
) -> Result<PullReport> {
    let config = &shared.config;
    let engine = &shared.engine;
    let me = engine.segment_name().to_owned();
    let started = Instant::now();
    let deadline = started + options.timeout.unwrap_or(config.pull_timeout);
    let no_progress = AtomicU64::new(0);
    let verified_bytes = options.progress.as_deref().unwrap_or(&no_progress);
    let token = options.cancel.clone().unwrap_or_default();
    let mut cancelled = token.0.subscribe();
    let pieces = layout(record.total_size, record.max_shard_size, record.piece_size);
    let n = pieces.len();
    let mut sched_config = config.scheduler.clone();
    if sched_config.seed == 0 {
        sched_config.seed = random_u64(&me);
    }
    let upstream = config.mode == PullMode::Upstream;
    if upstream {
        // Random order throughout, never a duplicate request.
        sched_config.random_first = usize::MAX;
        sched_config.endgame_copies = 1;
    }
    let mut sched = Scheduler::new(n, Bitmap::new(n), sched_config);
    let live_max = config.max_in_flight.min(n).max(1);
    // Requests that timed out keep their slot until the transport gives up on them; spare
    // slots let new requests go on meanwhile.
    let mut scratch = Scratch {
        shared: shared.clone(),
        slots: Vec::new(),
        free: Vec::new(),
        len: record.piece_size as usize,
        max: 2 * live_max,
    };
    // Peers read our verified pieces from `dest`: they must see it in our descriptor.
    engine.publish().await?;

    // Announce the pull (in swarm mode) before any piece lands, so that readers starting together count each
    // other (upload shares, stripes of the origin's pieces) from their first look.
    let announce = HaveRecord {
        generation: record.generation,
        segment: me.clone(),
        buffers: dest.to_vec(),
        have: Bitmap::new(n),
        fetching: Vec::new(),
        upload_slots: config.upload_slots,
    };
    if !upstream {
        shared.catalog.publish_have(&record.name, &announce).await?;
    }
    let (have_tx, have_rx) = watch::channel(Progress {
        have: Bitmap::new(n),
        fetching: Vec::new(),
    });
    let mut publisher = Background(Some(tokio::spawn(publish_loop(
        shared.clone(),
        announce,
        record.name.clone(),
        have_rx,
    ))));
    let (holders_tx, mut holders_rx) = mpsc::channel(1);
    let _refresher = Background(Some(tokio::spawn(refresh_loop(
        shared.clone(),
        record.clone(),
        if upstream { Duration::ZERO } else { SETTLE },
        holders_tx,
    ))));

    let mut in_flight: FuturesUnordered<futures::future::BoxFuture<'static, Outcome>> =
        FuturesUnordered::new();
    let mut holders: HashMap<PeerId, Holder> = HashMap::new();
    let mut ids: HashMap<String, PeerId> = HashMap::new();
    let mut report = PullReport {
        pieces: n,
        bytes: record.total_size,
        ..PullReport::default()
    };
    let mut staging = vec![0u8; record.piece_size as usize];
    let mut closed = shared.closed.subscribe();

    while !sched.is_complete() {
        if *closed.borrow_and_update() {
            return Err(Error::Closed);
        }
        if *cancelled.borrow_and_update() {
            return Err(Error::Cancelled {
                name: record.name.clone(),
                verified: sched.have().count_ones(),
                total: n,
            });
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout {
                name: record.name.clone(),
                elapsed: now - started,
                verified: sched.have().count_ones(),
                total: n,
                unavailable: sched.unavailable().len(),
            });
        }
        report.failed_requests += sched.handle_timeouts(now).len();
        let live = sched.outstanding().count();
        let budget = live_max.saturating_sub(live).min(scratch.available());
        for r in sched.poll_requests(now, budget) {
            let slot = scratch.take()?.expect("budget is the available slots");
            match start_read(shared, &mut holders, &pieces, r, scratch.slots[slot]).await {
                Ok(fut) => in_flight.push(Box::pin(async move { (r, slot, fut.await) })),
                Err(e) => {
                    tracing::debug!("request for piece {} to {:?}: {e}", r.piece, r.peer);
                    sched.on_failure(r, Failure::Transfer, now);
                    report.failed_requests += 1;
                    scratch.free.push(slot);
                }
            }
        }
        if !upstream {
            // Tell the other readers which pieces this one is fetching from the origin.
            let fetching = fetching_from_origin(&sched);
            have_tx.send_if_modified(|p| {
                let changed = p.fetching != fetching;
                p.fetching = fetching;
                changed
            });
        }
        let wake = sched.next_deadline().map_or(deadline, |t| t.min(deadline));
        let event = tokio::select! {
            Some(outcome) = in_flight.next(), if !in_flight.is_empty() => Event::Landed(outcome),
            Some(found) = holders_rx.recv() => Event::Holders(found),
            _ = closed.changed() => Event::Tick,
            _ = cancelled.changed() => Event::Tick,
            _ = tokio::time::sleep_until(wake.into()) => Event::Tick,
        };
        let (r, slot, result) = match event {
            Event::Landed(outcome) => outcome,
            Event::Holders(Err(Error::Changed(name))) => return Err(Error::Changed(name)),
            Event::Holders(found) => {
                let found = found.map(|mut found| {
                    if upstream {
                        // Only complete copies are sources.
                        found.retain(|h| h.have.is_full());
                    }
                    found
                });
                let roles = Roles {
                    me: &me,
                    // Upstream's mode keeps asking the least-loaded holder, origin included.
                    origin: if upstream {
                        None
                    } else {
                        record.origin.as_deref()
                    },
                    claim_ttl: config.scheduler.request_timeout,
                };
                update_holders(
                    &mut sched,
                    &mut holders,
                    &mut ids,
                    Instant::now(),
                    &roles,
                    found,
                );
                continue;
            }
            Event::Tick => continue,
        };
        let now = Instant::now();
        let outcome = match result {
            Err(e) => {
                tracing::debug!("piece {} from {:?} failed: {e}", r.piece, r.peer);
                if let Some(h) = holders.get_mut(&r.peer) {
                    // Look the descriptor up again next time (the peer may have moved).
                    h.segment = None;
                    engine.close_segment(&h.record.segment);
                }
                Err(Failure::Transfer)
            }
            Ok(()) => {
                report.fetched += 1;
                let landing = Landing {
                    piece: pieces[r.piece],
                    index: r.piece,
                    slot: scratch.slots[slot],
                    already_have: sched.have().get(r.piece),
                };
                verify_and_store(shared, record, dest, landing, &mut staging)
            }
        };
        scratch.free.push(slot);
        match outcome {
            Ok(()) => match sched.on_success(r, now) {
                Completion::Completed { .. } => {
                    verified_bytes.fetch_add(pieces[r.piece].len, Ordering::Relaxed);
                    if !upstream {
                        have_tx.send_modify(|p| p.have.set(r.piece));
                    }
                    let from = holders
                        .get(&r.peer)
                        .map_or_else(|| format!("{:?}", r.peer), |h| h.record.segment.clone());
                    *report.pieces_from.entry(from).or_default() += 1;
                }
                Completion::Duplicate => report.duplicates += 1,
            },
            Err(f) => {
                if f == Failure::Corrupt {
                    report.corrupt += 1;
                    tracing::warn!(
                        "piece {} of {:?} from {:?} failed verification; fetching it elsewhere",
                        r.piece,
                        record.name,
                        r.peer
                    );
                }
                report.failed_requests += 1;
                sched.on_failure(r, f, now);
            }
        }
    }
    report.elapsed = started.elapsed();
    // The publisher writes the last bitmap and ends once the sender is gone. Its writes are
    // best effort; this last one is awaited, after it, so that the pull returns only once the
    // catalog says the copy is complete.
    drop(have_tx);
    if let Some(h) = publisher.0.take() {
        let _ = h.await;
    }
    let full = HaveRecord {
        generation: record.generation,
        segment: me,
        buffers: dest.to_vec(),
        have: sched.have().clone(),
        fetching: Vec::new(),
        upload_slots: config.upload_slots,
    };
    shared.catalog.publish_have(&record.name, &full).await?;
    Ok(report)
}

/// What woke the pull loop.
enum Event {
    Landed(Outcome),
    Holders(Result<Vec<HaveRecord>>),
    Tick,
}

/// Who is who in a pull, for [`update_holders`].
struct Roles<'a> {
    /// This reader's segment.
    me: &'a str,
    /// The origin's segment, where it is the source of last resort.
    origin: Option<&'a str>,
    /// The longest another reader's record may stay unchanged before its claims on the
    /// origin's pieces lapse.
    claim_ttl: Duration,
}

/// Applies a fresh look at the catalog's holders to the scheduler.
fn update_holders(
    sched: &mut Scheduler,
    holders: &mut HashMap<PeerId, Holder>,
    ids: &mut HashMap<String, PeerId>,
    now: Instant,
    roles: &Roles<'_>,
    found: Result<Vec<HaveRecord>>,
) {
    let Roles {
        me,
        origin,
        claim_ttl,
    } = *roles;
    let found = match found {
        Ok(found) => found,
        Err(e) => {
            // The metadata service hiccuped: keep what we knew; the pull's deadline bounds it.
            tracing::warn!("reading the catalog's holders: {e}");
            return;
        }
    };
    let found: Vec<HaveRecord> = found.into_iter().filter(|h| h.segment != me).collect();
    // Readers pulling now, this one included, share each holder's upload slots, and split the
    // pieces only the origin holds into stripes, numbered by segment name.
    let mut pullers: Vec<&str> = (found.iter())
        .filter(|h| !h.have.is_full() && Some(h.segment.as_str()) != origin)
        .map(|h| h.segment.as_str())
        .chain([me])
        .collect();
    pullers.sort_unstable();
    if origin.is_some() {
        let rank = pullers.binary_search(&me).expect("this reader is listed");
        sched.set_stripe(rank, pullers.len());
    }
    let pullers = pullers.len();
    let mut seen = Vec::new();
    for h in found {
        let next = PeerId(ids.len() as u32);
        let id = *ids.entry(h.segment.clone()).or_insert(next);
        sched.set_peer(id, h.have.clone());
        if origin == Some(h.segment.as_str()) {
            // The payload's registering peer serves only what no other peer can.
            sched.set_origin(id);
        }
        sched.set_peer_limit(id, fair_share(h.upload_slots as usize, pullers, usize::MAX));
        seen.push(id);
        match holders.get_mut(&id) {
            Some(known) => {
                if known.record != h {
                    known.changed = now;
                }
                known.record = h;
            }
            None => {
                holders.insert(
                    id,
                    Holder {
                        record: h,
                        segment: None,
                        changed: now,
                    },
                );
            }
        }
    }
    let gone: Vec<PeerId> = holders
        .keys()
        .filter(|id| !seen.contains(id))
        .copied()
        .collect();
    for id in gone {
        // Its outstanding requests fail now; only missing pieces are asked again.
        sched.remove_peer(id);
        holders.remove(&id);
    }
    // What the others fetch from the origin. A live reader's record changes with every piece
    // it verifies; one silent for several piece times is a reader that stalled or died
    // mid-pull, whose claims would otherwise hold those pieces back (the scheduler also voids
    // the claims of a reader whose last request failed).
    let claim_ttl = sched.typical_piece_time().map_or(claim_ttl, |t| {
        (t * CLAIM_PIECE_TIMES).clamp(CLAIM_TTL_MIN, claim_ttl)
    });
    for (&id, h) in holders.iter() {
        let fresh = now.saturating_duration_since(h.changed) < claim_ttl;
        let claims = h.record.fetching.iter().map(|&p| p as usize);
        sched.set_claims(id, claims.filter(|_| fresh));
    }
}

/// Another reader's claims on the origin's pieces lapse once its record has been silent for
/// this many typical piece times (at least [`CLAIM_TTL_MIN`], at most a request timeout).
const CLAIM_PIECE_TIMES: u32 = 4;
/// See [`CLAIM_PIECE_TIMES`].
const CLAIM_TTL_MIN: Duration = Duration::from_secs(1);

/// The pieces this reader is fetching from the origin now, in order.
fn fetching_from_origin(sched: &Scheduler) -> Vec<u32> {
    let Some(origin) = sched.origin() else {
        return Vec::new();
    };
    let mut pieces: Vec<u32> = (sched.outstanding())
        .filter(|r| r.peer == origin)
        .map(|r| r.piece as u32)
        .collect();
    pieces.sort_unstable();
    pieces
}

/// What the publisher tells the catalog about this reader.
#[derive(Clone, Debug, PartialEq)]
struct Progress {
    /// Verified pieces.
    have: Bitmap,
    /// Pieces being fetched from the origin.
    fetching: Vec<u32>,
}

/// Publishes this peer's verified pieces (and what it fetches from the origin) as they change,
/// at most once per publish interval, and the last state once the pull drops its sender.
async fn publish_loop(
    shared: Arc<Shared>,
    mut record: HaveRecord,
    name: String,
    mut progress: watch::Receiver<Progress>,
) {
    let interval = shared.config.publish_interval;
    loop {
        let ended = progress.changed().await.is_err();
        let latest = progress.borrow_and_update().clone();
        if latest.have != record.have || latest.fetching != record.fetching {
            record.have = latest.have;
            record.fetching = latest.fetching;
            if let Err(e) = shared.catalog.publish_have(&name, &record).await {
                tracing::warn!("publishing availability of {name:?}: {e}");
            }
        }
        if ended {
            return;
        }
        tokio::time::sleep(interval).await;
    }
}

/// Reads the payload's holders from the catalog every refresh interval; sends
/// [`Error::Changed`] if the payload was replaced or removed.
async fn refresh_loop(
    shared: Arc<Shared>,
    record: PayloadRecord,
    settle: Duration,
    found: mpsc::Sender<Result<Vec<HaveRecord>>>,
) {
    let (n, size) = (record.pieces(), record.total_size);
    tokio::time::sleep(settle).await;
    loop {
        let catalog = &shared.catalog;
        // The payload must still be the one being pulled (not replaced or removed).
        let holders = match catalog.payload(&record.name).await {
            Ok(Some((now, _))) if now.generation == record.generation => {
                catalog
                    .holders(&record.name, record.generation, n, size)
                    .await
            }
            Ok(_) => Err(Error::Changed(record.name.clone())),
            Err(e) => Err(e),
        };
        if found.send(holders).await.is_err() {
            return;
        }
        tokio::time::sleep(shared.config.refresh_interval).await;
    }
}

/// Starts the READ of `r`'s piece into the scratch buffer at `slot`.
async fn start_read(
    shared: &Arc<Shared>,
    holders: &mut HashMap<PeerId, Holder>,
    pieces: &[PieceRange],
    r: Request,
    slot: u64,
) -> Result<futures::future::BoxFuture<'static, mooncake_core::Result<()>>> {
    let engine = &shared.engine;
    let holder = holders
        .get_mut(&r.peer)
        .ok_or_else(|| Error::InvalidArgument(format!("unknown peer {:?}", r.peer)))?;
    let segment = match &holder.segment {
        Some(s) => s.clone(),
        None => {
            // A fresh look: the holder may have registered buffers since we last opened it.
            let s = engine.refresh_segment(&holder.record.segment).await?;
            holder.segment = Some(s.clone());
            s
        }
    };
    let piece = pieces[r.piece];
    let frags = fragments(&holder.record.buffers, piece.offset, piece.len).ok_or_else(|| {
        Error::InvalidArgument(format!("piece {} outside the holder's buffers", r.piece))
    })?;
    let requests = frags
        .into_iter()
        .map(|(addr, len, at)| TransferRequest::read(&segment, addr, slot + at, len))
        .collect();
    let batch = engine.submit(requests);
    Ok(Box::pin(async move {
        batch
            .wait()
            .await
            .into_iter()
            .collect::<mooncake_core::Result<()>>()
    }))
}

/// A piece that landed in a scratch buffer.
struct Landing {
    piece: PieceRange,
    index: usize,
    /// Address of the scratch buffer.
    slot: u64,
    /// The piece is complete already (a late endgame duplicate): verify, do not store.
    already_have: bool,
}

/// Checks the piece in the scratch buffer against its hash and, if it is good and still
/// missing, copies it into the destination.
fn verify_and_store(
    shared: &Shared,
    record: &PayloadRecord,
    dest: &[Buffer],
    landing: Landing,
    staging: &mut [u8],
) -> std::result::Result<(), Failure> {
    let Landing {
        piece,
        index,
        slot,
        already_have,
    } = landing;
    let memory = shared.engine.memory();
    let bytes = &mut staging[..piece.len as usize];
    let copied = memory
        .resolve(slot, piece.len)
        .and_then(|r| r.read_into(bytes));
    if copied.is_err() {
        return Err(Failure::Transfer);
    }
    if hash_piece(bytes) != record.hashes[index] {
        return Err(Failure::Corrupt);
    }
    if already_have {
        return Ok(());
    }
    let frags = fragments(dest, piece.offset, piece.len).expect("destination was checked");
    for (addr, len, at) in frags {
        let written = memory
            .resolve(addr, len)
            .and_then(|r| r.write_from(&bytes[at as usize..(at + len) as usize]));
        if let Err(e) = written {
            // The caller unregistered the destination under us: nothing sensible to serve.
            tracing::warn!("writing piece {index} of {:?}: {e}", record.name);
            return Err(Failure::Transfer);
        }
    }
    Ok(())
}
