//! Which piece to ask of which peer, and when to give up on a request: a sans-IO state machine.
//!
//! No sockets, no tokio, no clock: time (`now`) and randomness (a seed) are inputs, so the pull
//! loop of [`P2PStore::get_replica`](crate::P2PStore::get_replica), the unit tests and the property tests drive the same object.
//!
//! The policy is BitTorrent's (BEP 3; Legout et al., IMC 2006), with Kraken's timeouts and
//! blacklisting:
//! - **random first**: the first [`random_first`](SchedulerConfig::random_first) pieces are
//!   picked at random, so a fresh peer soon has something to offer others;
//! - **rarest first**: then the piece the fewest known peers hold, ties broken at random, which
//!   keeps piece diversity high in the swarm;
//! - **origin last, each piece out of it once**: the payload's origin
//!   ([`set_origin`](Scheduler::set_origin)) is asked only when no other usable peer can serve
//!   a piece, and then only for a piece no other peer holds: its uplink is the swarm's scarcest
//!   resource, and every byte it sends twice costs every reader time. Readers pulling at once
//!   split those pieces into stripes ([`set_stripe`](Scheduler::set_stripe)): each asks the
//!   origin for its own stripe in ascending order and, once that is exhausted, takes from the
//!   far end of the others' stripes, skipping the pieces other readers said they are fetching
//!   from the origin ([`set_claims`](Scheduler::set_claims)), so two readers ask the origin
//!   for one piece only when that news has not reached them yet. The claims of a reader whose
//!   last request failed are void (it may have died holding them). Once every piece is
//!   somewhere else, the origin serves like any peer, rarest first;
//! - **endgame**: once every missing piece is outstanding, a piece whose request is late (out
//!   for [`endgame_patience`](SchedulerConfig::endgame_patience) times as long as pieces
//!   typically take) is asked of up to [`endgame_copies`](SchedulerConfig::endgame_copies)
//!   peers at once, and the duplicates are cancelled when one lands. With pieces of megabytes
//!   and many in flight, duplicating every outstanding piece would spend a large share of the
//!   swarm's uplinks twice; only a straggler is worth it. The origin gets a duplicate only once
//!   it has sent every piece once. Outside endgame no piece is ever outstanding twice;
//! - **pipelining**: at most [`pipeline_per_peer`](SchedulerConfig::pipeline_per_peer) requests
//!   outstanding per peer, or fewer where the peer's upload admission says so
//!   ([`set_peer_limit`](Scheduler::set_peer_limit), [`fair_share`]);
//! - **timeouts and backoff**: a request not answered within
//!   [`request_timeout`](SchedulerConfig::request_timeout) fails; a failing peer is avoided for a
//!   backoff that doubles with each consecutive failure (up to
//!   [`backoff_max`](SchedulerConfig::backoff_max)) and resets on success; a peer that served a
//!   corrupted piece is never asked for that piece again;
//! - **lost sources**: [`remove_peer`](Scheduler::remove_peer) fails its outstanding requests,
//!   and only pieces still missing are asked of others.
//!
//! Choosing one request costs O(usable peers × pieces / 64) word operations plus a pass over
//! the candidate pieces: for 25,600 pieces (100 GiB in 4 MiB pieces), tens of microseconds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::piece::Bitmap;

/// A peer, as the caller numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u32);

/// One request the scheduler handed out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Fetch `piece` from `peer`; report the outcome with the `id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Identifies this request in [`Scheduler::on_success`] and [`Scheduler::on_failure`].
    pub id: RequestId,
    /// Piece index.
    pub piece: usize,
    /// Who to read it from.
    pub peer: PeerId,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The transfer failed (peer unreachable, range no longer registered, ...).
    Transfer,
    /// The bytes arrived but their hash did not match the catalog's: never ask this peer for
    /// this piece again.
    Corrupt,
}

/// Scheduler knobs. Defaults come from Kraken and BitTorrent practice.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Requests outstanding per peer. Default 3 (Kraken; BitTorrent uses about 5).
    pub pipeline_per_peer: usize,
    /// Pieces picked at random before rarest-first takes over. Default 4 (BitTorrent's "random
    /// first piece", a few of them so that peers starting together diverge).
    pub random_first: usize,
    /// Peers asked at once for one piece in endgame. Default 2.
    pub endgame_copies: usize,
    /// In endgame a piece is asked of another peer once its request has been outstanding this
    /// many times the typical time a piece takes (a moving average of the requests that
    /// succeeded; before any did, a quarter of [`request_timeout`](Self::request_timeout)).
    /// 0 duplicates every outstanding piece at once, as BitTorrent does. Default 1.5.
    pub endgame_patience: f64,
    /// A request not answered by then fails. Default 20 s (Kraken: max(4 s, 4 s per MB), for
    /// 4 MiB pieces about 17 s).
    pub request_timeout: Duration,
    /// Backoff after a peer's first consecutive failure; doubles with each further one.
    /// Default 500 ms.
    pub backoff_base: Duration,
    /// Longest backoff. Default 10 s.
    pub backoff_max: Duration,
    /// Seed of the random choices. Default 0; give each peer its own.
    pub seed: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            pipeline_per_peer: 3,
            random_first: 4,
            endgame_copies: 2,
            endgame_patience: 1.5,
            request_timeout: Duration::from_secs(20),
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            seed: 0,
        }
    }
}

#[derive(Debug)]
struct PeerState {
    have: Bitmap,
    outstanding: usize,
    /// This reader's share of the peer's upload slots (at most `pipeline_per_peer`).
    limit: usize,
    consecutive_failures: u32,
    avoid_until: Option<Instant>,
    /// Pieces this peer (another reader) says it is fetching from the origin.
    claims: Vec<usize>,
}

#[derive(Clone, Copy, Debug)]
struct Outstanding {
    piece: usize,
    peer: PeerId,
    issued: Instant,
    deadline: Instant,
}

/// What a successful request changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The piece is now complete; the listed requests for it (endgame duplicates) are cancelled:
    /// their late outcomes are ignored.
    Completed {
        /// The cancelled duplicates.
        cancelled: Vec<Request>,
    },
    /// The piece was already complete (a late duplicate): nothing to do.
    Duplicate,
}

/// See the module docs.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    have: Bitmap,
    completed: usize,
    /// Per piece: how many known peers hold it.
    availability: Vec<u32>,
    /// Per piece: its outstanding requests.
    in_flight: Vec<Vec<RequestId>>,
    /// Pieces missing with no request outstanding.
    unrequested: Bitmap,
    outstanding: BTreeMap<RequestId, Outstanding>,
    peers: BTreeMap<PeerId, PeerState>,
    /// (piece, peer) pairs that delivered a corrupted piece.
    corrupt: HashSet<(usize, PeerId)>,
    next_id: u64,
    rng: SplitMix64,
    /// The payload's registering peer: asked only for what no other usable peer can serve.
    origin: Option<PeerId>,
    /// This reader's stripe of the origin-only pieces: (rank, readers).
    stripe: Option<(usize, usize)>,
    /// Moving average of the time successful requests took.
    piece_time: Option<Duration>,
}

impl Scheduler {
    /// A scheduler for `pieces` pieces, of which those set in `have` are already complete.
    pub fn new(pieces: usize, have: Bitmap, config: SchedulerConfig) -> Self {
        assert_eq!(have.len(), pieces, "bitmap of another length");
        let completed = have.count_ones();
        let rng = SplitMix64(config.seed);
        let mut unrequested = Bitmap::new(pieces);
        for p in (0..pieces).filter(|&p| !have.get(p)) {
            unrequested.set(p);
        }
        Scheduler {
            config,
            have,
            completed,
            availability: vec![0; pieces],
            in_flight: vec![Vec::new(); pieces],
            unrequested,
            outstanding: BTreeMap::new(),
            peers: BTreeMap::new(),
            corrupt: HashSet::new(),
            next_id: 0,
            rng,
            origin: None,
            stripe: None,
            piece_time: None,
        }
    }

    /// Number of pieces.
    pub fn pieces(&self) -> usize {
        self.have.len()
    }

    /// The pieces complete so far.
    pub fn have(&self) -> &Bitmap {
        &self.have
    }

    /// Whether every piece is complete.
    pub fn is_complete(&self) -> bool {
        self.completed == self.have.len()
    }

    /// Whether every missing piece is outstanding, so that further requests duplicate.
    pub fn in_endgame(&self) -> bool {
        !self.is_complete() && self.unrequested.is_clear()
    }

    /// Outstanding requests for `piece`.
    pub fn outstanding_for(&self, piece: usize) -> usize {
        self.in_flight[piece].len()
    }

    /// Outstanding requests to `peer`.
    pub fn outstanding_at(&self, peer: PeerId) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.outstanding)
    }

    /// All outstanding requests.
    pub fn outstanding(&self) -> impl Iterator<Item = Request> + '_ {
        self.outstanding.iter().map(|(&id, o)| Request {
            id,
            piece: o.piece,
            peer: o.peer,
        })
    }

    /// Until when `peer` is avoided after failures, if it is.
    pub fn avoided_until(&self, peer: PeerId) -> Option<Instant> {
        self.peers.get(&peer).and_then(|p| p.avoid_until)
    }

    /// Whether `peer` is known to hold `piece`.
    pub fn peer_has(&self, peer: PeerId, piece: usize) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.have.get(piece))
    }

    /// Adds `peer` or replaces what it is known to hold (from a fresh look at the catalog).
    /// Its failure history is kept.
    pub fn set_peer(&mut self, peer: PeerId, have: Bitmap) {
        assert_eq!(have.len(), self.pieces(), "bitmap of another length");
        let state = self.peers.entry(peer).or_insert_with(|| PeerState {
            have: Bitmap::new(have.len()),
            outstanding: 0,
            limit: usize::MAX,
            consecutive_failures: 0,
            avoid_until: None,
            claims: Vec::new(),
        });
        // Only the bits that changed move the counts.
        let changed: Vec<u64> = (state.have.words().iter())
            .zip(have.words())
            .map(|(a, b)| a ^ b)
            .collect();
        for p in crate::piece::ones(&changed) {
            if have.get(p) {
                self.availability[p] += 1;
            } else {
                self.availability[p] -= 1;
            }
        }
        state.have = have;
    }

    /// Marks `peer` as the payload's origin: the source of last resort. A piece goes to the
    /// origin only when no other usable peer (holding it, with a free pipeline slot, not
    /// backing off) can serve one, and the origin is asked first for the pieces no other
    /// known peer holds, at random among them, so concurrent readers spread over them.
    pub fn set_origin(&mut self, peer: PeerId) {
        self.origin = Some(peer);
    }

    /// Makes this reader number `rank` of `readers` pulling at once (every reader must number
    /// the same set the same way, e.g. by sorted segment name): piece `p` is in stripe
    /// `p % readers`, and of the pieces only the origin holds this reader asks it for its own
    /// stripe first. Without a stripe (or with `readers` 0 or `rank` out of range), origin-only
    /// pieces are drawn at random.
    pub fn set_stripe(&mut self, rank: usize, readers: usize) {
        self.stripe = (rank < readers).then_some((rank, readers));
    }

    /// Records the pieces `peer` (another reader) says it is fetching from the origin now:
    /// while it is not failing, this reader leaves them to it. Out-of-range pieces and
    /// unknown peers are ignored.
    pub fn set_claims(&mut self, peer: PeerId, pieces: impl IntoIterator<Item = usize>) {
        let n = self.pieces();
        if let Some(p) = self.peers.get_mut(&peer) {
            p.claims = pieces.into_iter().filter(|&p| p < n).collect();
        }
    }

    /// The typical time a request took (a moving average of the successful ones), once one
    /// succeeded.
    pub fn typical_piece_time(&self) -> Option<Duration> {
        self.piece_time
    }

    /// The origin, if one was set and is still known.
    pub fn origin(&self) -> Option<PeerId> {
        self.origin.filter(|o| self.peers.contains_key(o))
    }

    /// Caps the requests outstanding at `peer` to `limit` (at least 1), below
    /// [`pipeline_per_peer`](SchedulerConfig::pipeline_per_peer): this reader's share of the
    /// peer's upload slots. Requests already outstanding stay; new ones wait until fewer are.
    /// A peer not known yet is ignored.
    pub fn set_peer_limit(&mut self, peer: PeerId, limit: usize) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.limit = limit.max(1);
        }
    }

    /// The most requests this reader keeps outstanding at `peer` now.
    pub fn peer_limit(&self, peer: PeerId) -> usize {
        self.peers
            .get(&peer)
            .map_or(0, |p| p.limit.min(self.config.pipeline_per_peer))
    }

    /// Forgets `peer` (it left the swarm): its outstanding requests fail and their pieces go
    /// back to the missing ones. Returns those requests, so the caller stops waiting for them.
    pub fn remove_peer(&mut self, peer: PeerId) -> Vec<Request> {
        let Some(state) = self.peers.remove(&peer) else {
            return Vec::new();
        };
        for p in 0..state.have.len() {
            if state.have.get(p) {
                self.availability[p] -= 1;
            }
        }
        let ids: Vec<RequestId> = self
            .outstanding
            .iter()
            .filter(|(_, o)| o.peer == peer)
            .map(|(&id, _)| id)
            .collect();
        ids.into_iter().filter_map(|id| self.forget(id)).collect()
    }

    /// The earliest instant at which [`poll_requests`](Self::poll_requests) may do something
    /// new on its own (a request times out or a backoff ends). Backoffs that ended by the last
    /// [`handle_timeouts`](Self::handle_timeouts) (or poll) no longer count, so a caller that
    /// polls and then sleeps until this instant never wakes for nothing.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timeouts = self.outstanding.values().map(|o| o.deadline);
        let backoffs = self.peers.values().filter_map(|p| p.avoid_until);
        timeouts.chain(backoffs).min()
    }

    /// Fails requests whose deadline passed (their peers back off) and returns them.
    pub fn handle_timeouts(&mut self, now: Instant) -> Vec<Request> {
        // Backoffs that ended are over: they no longer bound the caller's sleep.
        for p in self.peers.values_mut() {
            if p.avoid_until.is_some_and(|t| t <= now) {
                p.avoid_until = None;
            }
        }
        let expired: Vec<RequestId> = self
            .outstanding
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        let mut failed = Vec::new();
        for id in expired {
            if let Some(r) = self.forget(id) {
                self.penalise(r.peer, now);
                failed.push(r);
            }
        }
        failed
    }

    /// Up to `budget` new requests, after expiring overdue ones (see
    /// [`handle_timeouts`](Self::handle_timeouts); their requests are not returned here, ask
    /// that method first to learn of them).
    pub fn poll_requests(&mut self, now: Instant, budget: usize) -> Vec<Request> {
        self.handle_timeouts(now);
        let mut out = Vec::new();
        while out.len() < budget {
            let Some((piece, peer)) = self.pick(now) else {
                break;
            };
            out.push(self.issue(piece, peer, now));
        }
        out
    }

    /// Whether `p` has room for another request now (pipeline, share, backoff).
    fn has_room(&self, p: &PeerState, now: Instant) -> bool {
        p.outstanding < self.config.pipeline_per_peer.min(p.limit)
            && p.avoid_until.is_none_or(|t| t <= now)
    }

    /// Whether `peer` (which has room) may be asked for `piece`.
    fn may_ask(&self, peer: PeerId, piece: usize, endgame: bool) -> bool {
        self.peers[&peer].have.get(piece)
            && !self.corrupt.contains(&(piece, peer))
            && !(endgame && self.asked(piece, peer))
    }

    /// The next piece to ask for and whom to ask, if any.
    ///
    /// Word-parallel: the candidates are the union of the usable peers' bitmaps masked by the
    /// pieces still unrequested (or, in endgame, still missing), so one call costs
    /// O(usable peers × pieces / 64) plus a pass over the candidates.
    ///
    /// The origin is the source of last resort: the other usable peers are tried first, and
    /// only when none of them can serve a piece is the origin asked (see
    /// [`pick_from_origin`](Self::pick_from_origin)).
    fn pick(&mut self, now: Instant) -> Option<(usize, PeerId)> {
        if self.is_complete() {
            return None;
        }
        let usable: Vec<PeerId> = (self.peers.iter())
            .filter(|(_, p)| self.has_room(p, now))
            .map(|(&id, _)| id)
            .collect();
        let Some(origin) = self.origin.filter(|o| self.peers.contains_key(o)) else {
            return self.pick_among(&usable, false, now);
        };
        let others: Vec<PeerId> = usable.iter().copied().filter(|&id| id != origin).collect();
        if let Some(choice) = self.pick_among(&others, false, now) {
            return Some(choice);
        }
        if !usable.contains(&origin) {
            return None;
        }
        self.pick_from_origin(origin, now)
    }

    /// A piece to ask the origin for, if it should be asked at all: one that no other peer
    /// (not backing off, not known to corrupt it) holds, from this reader's stripe first, then
    /// from the far end of the others'; or, once every missing piece is held elsewhere (the
    /// origin has sent everything once), the rarest, like any peer; in endgame, like any peer.
    fn pick_from_origin(&mut self, origin: PeerId, now: Instant) -> Option<(usize, PeerId)> {
        let words = self.have.words().len();
        // Pieces another usable-soon peer holds.
        let mut elsewhere = vec![0u64; words];
        for (id, p) in &self.peers {
            if *id != origin && p.avoid_until.is_none_or(|t| t <= now) {
                for (e, w) in elsewhere.iter_mut().zip(p.have.words()) {
                    *e |= w;
                }
            }
        }
        // A peer that corrupted a piece does not count as holding it.
        for &(piece, bad) in &self.corrupt {
            if bad == origin || !bit(&elsewhere, piece) {
                continue;
            }
            let another = self.peers.iter().any(|(id, p)| {
                *id != origin
                    && *id != bad
                    && p.have.get(piece)
                    && p.avoid_until.is_none_or(|t| t <= now)
                    && !self.corrupt.contains(&(piece, *id))
            });
            if !another {
                elsewhere[piece / 64] &= !(1 << (piece % 64));
            }
        }
        let origin_have = self.peers[&origin].have.words();
        // Is any missing piece only at the origin? Then the origin is busy sending pieces
        // once, and asking it for what others hold would delay that.
        let pending =
            (0..words).any(|i| origin_have[i] & !self.have.words()[i] & !elsewhere[i] != 0);
        if self.in_endgame() {
            if pending && self.stripe.is_some() {
                return None;
            }
            return self.pick_among(&[origin], true, now);
        }
        let only_origin: Vec<u64> = (0..words)
            .map(|i| {
                origin_have[i] & self.unrequested.words()[i] & !elsewhere[i] & !self.have.words()[i]
            })
            .collect();
        let ok = |p: usize| !self.corrupt.contains(&(p, origin));
        let mut candidates: Vec<usize> = crate::piece::ones(&only_origin)
            .filter(|&p| ok(p))
            .collect();
        // Leave to others what they are fetching (those not failing), unless nothing else is
        // left.
        let mut claimed = Bitmap::new(self.pieces());
        for p in self.peers.values().filter(|p| p.consecutive_failures == 0) {
            for &c in &p.claims {
                claimed.set(c);
            }
        }
        let unclaimed: Vec<usize> = (candidates.iter().copied())
            .filter(|&p| !claimed.get(p))
            .collect();
        if !unclaimed.is_empty() || self.stripe.is_some() {
            candidates = unclaimed;
        }
        if candidates.is_empty() {
            if pending && self.stripe.is_some() {
                return None;
            }
            return self.pick_among(&[origin], true, now);
        }
        let piece = match self.stripe {
            Some((rank, readers)) => {
                let own = candidates.iter().copied().find(|p| p % readers == rank);
                own.or_else(|| {
                    // Help the others from the far end of their stripes, nearest rank first;
                    // helpers of one stripe start at different depths from its end (the
                    // helper at distance k at the k-th last piece), so that helpers who
                    // do not know of each other's fetches yet still ask for different pieces.
                    (1..readers).find_map(|k| {
                        let s = (rank + k) % readers;
                        let tail: Vec<usize> = (candidates.iter().rev().copied())
                            .filter(|p| p % readers == s)
                            .collect();
                        let depth = (k - 1) % tail.len().max(1);
                        tail.get(depth).copied()
                    })
                })?
            }
            None => candidates[(self.rng.next() % candidates.len() as u64) as usize],
        };
        Some((piece, origin))
    }

    /// [`pick`](Self::pick) among `usable` peers; `shuffle` draws among equally rare pieces
    /// uniformly (a pass over all candidates) rather than taking the first from a random word.
    fn pick_among(
        &mut self,
        usable: &[PeerId],
        shuffle: bool,
        now: Instant,
    ) -> Option<(usize, PeerId)> {
        if usable.is_empty() {
            return None;
        }
        let endgame = self.in_endgame();
        let words = self.have.words().len();
        let mut mask = vec![0u64; words];
        for id in usable {
            for (m, w) in mask.iter_mut().zip(self.peers[id].have.words()) {
                *m |= w;
            }
        }
        for (i, m) in mask.iter_mut().enumerate() {
            *m &= if endgame {
                !self.have.words()[i]
            } else {
                self.unrequested.words()[i]
            };
        }
        // Corrupt pairs and (in endgame) peers already asked need a per-peer look.
        let check_peers = endgame || !self.corrupt.is_empty();
        let random = !endgame && self.completed < self.config.random_first;
        // Scan from a random word on, wrapping around: ties go to whichever comes first from
        // there, which spreads choices without drawing a random number per candidate. A key
        // that cannot be beaten (a piece one peer holds) ends the scan.
        let floor = if endgame { (1, 1) } else { (0, 1) };
        let start = (self.rng.next() % words.max(1) as u64) as usize;
        let rotated = mask[start..].iter().chain(&mask[..start]);
        let mut best: Option<((usize, u32), usize)> = None;
        let mut ties = 0u64;
        for (k, &word) in rotated.enumerate() {
            let base = ((start + k) % words) * 64;
            for bit in crate::piece::ones(&[word]) {
                let p = base + bit;
                if endgame
                    && (self.in_flight[p].len() >= self.config.endgame_copies || !self.late(p, now))
                {
                    continue;
                }
                if check_peers && !usable.iter().any(|&id| self.may_ask(id, p, endgame)) {
                    continue;
                }
                // Random first: every candidate ties. Rarest first; in endgame, fewest
                // copies outstanding first.
                let key = match (random, endgame) {
                    (true, _) => (0, 0),
                    (false, false) => (0, self.availability[p]),
                    (false, true) => (self.in_flight[p].len(), self.availability[p]),
                };
                if random || shuffle {
                    // Reservoir sampling among the best keys: every one equally likely.
                    if best.is_none_or(|(b, _)| key < b) {
                        best = Some((key, p));
                        ties = 1;
                    } else if best.is_some_and(|(b, _)| key == b) {
                        ties += 1;
                        if self.rng.next() % ties == 0 {
                            best = Some((key, p));
                        }
                    }
                } else if best.is_none_or(|(b, _)| key < b) {
                    best = Some((key, p));
                }
            }
            if !random && !shuffle && best.is_some_and(|(b, _)| b <= floor) {
                break;
            }
        }
        let (_, piece) = best?;
        // The least loaded usable peer that may be asked, ties at random.
        let mut chosen: Option<(usize, u64, PeerId)> = None;
        for &id in usable {
            if !self.may_ask(id, piece, endgame) {
                continue;
            }
            let key = (self.peers[&id].outstanding, self.rng.next(), id);
            if chosen.is_none_or(|c| key < c) {
                chosen = Some(key);
            }
        }
        chosen.map(|(_, _, id)| (piece, id))
    }

    /// Whether the oldest request for `piece` is late enough for an endgame duplicate.
    fn late(&self, piece: usize, now: Instant) -> bool {
        let typical = (self.piece_time).unwrap_or(self.config.request_timeout / 4);
        let patience = typical.mul_f64(self.config.endgame_patience.max(0.0));
        self.in_flight[piece]
            .iter()
            .filter_map(|id| self.outstanding.get(id))
            .any(|o| now.saturating_duration_since(o.issued) >= patience)
    }

    /// Whether `piece` is outstanding at `peer`.
    fn asked(&self, piece: usize, peer: PeerId) -> bool {
        self.in_flight[piece]
            .iter()
            .any(|id| self.outstanding.get(id).is_some_and(|o| o.peer == peer))
    }

    fn issue(&mut self, piece: usize, peer: PeerId, now: Instant) -> Request {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.outstanding.insert(
            id,
            Outstanding {
                piece,
                peer,
                issued: now,
                deadline: now + self.config.request_timeout,
            },
        );
        self.in_flight[piece].push(id);
        self.unrequested.clear(piece);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.outstanding += 1;
        }
        Request { id, piece, peer }
    }

    /// Removes an outstanding request; returns it if it was outstanding.
    fn forget(&mut self, id: RequestId) -> Option<Request> {
        let o = self.outstanding.remove(&id)?;
        self.in_flight[o.piece].retain(|&r| r != id);
        if self.in_flight[o.piece].is_empty() && !self.have.get(o.piece) {
            self.unrequested.set(o.piece);
        }
        if let Some(p) = self.peers.get_mut(&o.peer) {
            p.outstanding -= 1;
        }
        Some(Request {
            id,
            piece: o.piece,
            peer: o.peer,
        })
    }

    fn penalise(&mut self, peer: PeerId, now: Instant) {
        let (base, max) = (self.config.backoff_base, self.config.backoff_max);
        if let Some(p) = self.peers.get_mut(&peer) {
            p.consecutive_failures = p.consecutive_failures.saturating_add(1);
            let shift = (p.consecutive_failures - 1).min(16);
            let backoff = base.saturating_mul(1 << shift).min(max);
            p.avoid_until = Some(now + backoff);
        }
    }

    /// `piece` arrived from `peer` at `now` and its hash matched (a request that already timed
    /// out or was cancelled still counts: the bytes are good).
    pub fn on_success(&mut self, request: Request, now: Instant) -> Completion {
        if let Some(o) = self.outstanding.get(&request.id) {
            let took = now.saturating_duration_since(o.issued);
            self.piece_time = Some(match self.piece_time {
                None => took,
                Some(t) => t.mul_f64(0.8) + took.mul_f64(0.2),
            });
        }
        self.forget(request.id);
        if let Some(p) = self.peers.get_mut(&request.peer) {
            p.consecutive_failures = 0;
            p.avoid_until = None;
        }
        if self.have.get(request.piece) {
            return Completion::Duplicate;
        }
        self.have.set(request.piece);
        self.unrequested.clear(request.piece);
        self.completed += 1;
        let dups = std::mem::take(&mut self.in_flight[request.piece]);
        // `forget` edits `in_flight[piece]`, which is empty now; keep the peer counts right.
        let cancelled = dups
            .into_iter()
            .filter_map(|id| {
                let o = self.outstanding.remove(&id)?;
                if let Some(p) = self.peers.get_mut(&o.peer) {
                    p.outstanding -= 1;
                }
                Some(Request {
                    id,
                    piece: o.piece,
                    peer: o.peer,
                })
            })
            .collect();
        Completion::Completed { cancelled }
    }

    /// The request failed at `now`; the peer backs off and the piece is missing again (unless
    /// another request already completed it). A late failure of a request that timed out or
    /// was cancelled changes nothing but the record of corrupt pieces.
    pub fn on_failure(&mut self, request: Request, failure: Failure, now: Instant) {
        if failure == Failure::Corrupt {
            self.corrupt.insert((request.piece, request.peer));
        }
        if self.forget(request.id).is_some() {
            self.penalise(request.peer, now);
        }
    }

    /// Pieces missing that no known peer (apart from those that corrupted them) holds.
    pub fn unavailable(&self) -> Vec<usize> {
        (0..self.pieces())
            .filter(|&p| {
                !self.have.get(p)
                    && !self
                        .peers
                        .iter()
                        .any(|(&id, s)| s.have.get(p) && !self.corrupt.contains(&(p, id)))
            })
            .collect()
    }

    /// Outstanding requests per peer, for progress reports.
    pub fn load(&self) -> HashMap<PeerId, usize> {
        self.peers
            .iter()
            .map(|(&id, p)| (id, p.outstanding))
            .collect()
    }
}

/// One reader's share of a holder's `upload_slots` when `pullers` readers (this one included)
/// pull at once: the slots split evenly, rounded up, at least 1 and at most `pipeline`.
///
/// READs are one-sided, so a holder cannot refuse them; instead each holder publishes how many
/// uploads it admits and every reader keeps to its share, which bounds the holder's concurrent
/// uploads to about `upload_slots` (plus one per reader when there are more readers than slots).
pub fn fair_share(upload_slots: usize, pullers: usize, pipeline: usize) -> usize {
    upload_slots
        .div_ceil(pullers.max(1))
        .clamp(1, pipeline.max(1))
}

/// Bit `i` of a word-packed bitmap.
fn bit(words: &[u64], i: usize) -> bool {
    words[i / 64] >> (i % 64) & 1 == 1
}

/// SplitMix64: a small seeded generator, enough for tie-breaking.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
