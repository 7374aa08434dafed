use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

/// The tests' fixed origin of time: the scheduler only ever sees instants derived from it.
fn t0() -> Instant {
    #[allow(clippy::disallowed_methods)] // the one clock read, to get an `Instant` at all
    static T0: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    *T0
}

fn bits(len: usize, set: &[usize]) -> Bitmap {
    let mut b = Bitmap::new(len);
    for &i in set {
        b.set(i);
    }
    b
}

fn config() -> SchedulerConfig {
    SchedulerConfig {
        pipeline_per_peer: 2,
        random_first: 0,
        endgame_copies: 2,
        endgame_patience: 0.0,
        request_timeout: Duration::from_secs(1),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_millis(800),
        seed: 7,
    }
}

#[test]
fn rarest_piece_first() {
    let mut s = Scheduler::new(4, Bitmap::new(4), config());
    s.set_peer(PeerId(0), Bitmap::full(4));
    s.set_peer(PeerId(1), bits(4, &[0, 1, 2]));
    s.set_peer(PeerId(2), bits(4, &[0, 1]));
    let now = t0();
    // Piece 3 is held by one peer only, piece 2 by two: those go first.
    let r = s.poll_requests(now, 1);
    assert_eq!((r[0].piece, r[0].peer), (3, PeerId(0)));
    let r = s.poll_requests(now, 1);
    assert_eq!(r[0].piece, 2);
    assert_ne!(r[0].peer, PeerId(2));
}

#[test]
fn random_first_then_rarest() {
    let mut seen = HashSet::new();
    for seed in 0..20 {
        let mut c = config();
        c.random_first = 1;
        c.seed = seed;
        let mut s = Scheduler::new(8, Bitmap::new(8), c);
        s.set_peer(PeerId(0), Bitmap::full(8));
        s.set_peer(PeerId(1), bits(8, &[0, 1, 2, 3, 4, 5, 6]));
        let r = s.poll_requests(t0(), 1)[0];
        seen.insert(r.piece);
    }
    // Rarest-first would always pick piece 7; random-first spreads the first pick.
    assert!(seen.len() > 3, "{seen:?}");
}

#[test]
fn pipeline_bound_per_peer() {
    let mut s = Scheduler::new(10, Bitmap::new(10), config());
    s.set_peer(PeerId(0), Bitmap::full(10));
    let r = s.poll_requests(t0(), 10);
    assert_eq!(r.len(), 2);
    assert_eq!(s.outstanding_at(PeerId(0)), 2);
    s.set_peer(PeerId(1), Bitmap::full(10));
    assert_eq!(s.poll_requests(t0(), 10).len(), 2);
    assert!(s.poll_requests(t0(), 10).is_empty());
}

#[test]
fn peer_limit_caps_the_pipeline() {
    let mut s = Scheduler::new(10, Bitmap::new(10), config());
    s.set_peer(PeerId(0), Bitmap::full(10));
    s.set_peer_limit(PeerId(0), 1);
    s.set_peer_limit(PeerId(9), 1); // unknown: ignored
    assert_eq!(s.peer_limit(PeerId(0)), 1);
    assert_eq!(s.poll_requests(t0(), 10).len(), 1);
    // A larger share is still capped by the pipeline.
    s.set_peer_limit(PeerId(0), 50);
    assert_eq!(s.peer_limit(PeerId(0)), 2);
    assert_eq!(s.poll_requests(t0(), 10).len(), 1);
    assert!(s.poll_requests(t0(), 10).is_empty());
}

#[test]
fn fair_share_splits_upload_slots() {
    assert_eq!(fair_share(8, 1, 3), 3);
    assert_eq!(fair_share(8, 4, 3), 2);
    assert_eq!(fair_share(8, 8, 3), 1);
    assert_eq!(fair_share(8, 100, 3), 1);
    assert_eq!(fair_share(0, 0, 3), 1);
    assert_eq!(fair_share(9, 4, 5), 3);
}

#[test]
fn endgame_duplicates_then_cancels() {
    let mut s = Scheduler::new(2, Bitmap::new(2), config());
    s.set_peer(PeerId(0), Bitmap::full(2));
    let now = t0();
    let first = s.poll_requests(now, 2);
    assert_eq!(first.len(), 2);
    assert!(s.in_endgame());
    s.set_peer(PeerId(1), Bitmap::full(2));
    let dups = s.poll_requests(now, 10);
    assert_eq!(
        dups.len(),
        2,
        "each last piece asked of the second peer too"
    );
    assert!(dups.iter().all(|r| r.peer == PeerId(1)));
    // Piece 0 lands from peer 1: the request to peer 0 is cancelled.
    let d0 = *dups.iter().find(|r| r.piece == 0).unwrap();
    let f0 = *first.iter().find(|r| r.piece == 0).unwrap();
    assert_eq!(
        s.on_success(d0, t0()),
        Completion::Completed {
            cancelled: vec![f0]
        }
    );
    assert_eq!(s.outstanding_for(0), 0);
    // The cancelled request's late success is a duplicate, not a second completion.
    assert_eq!(s.on_success(f0, t0()), Completion::Duplicate);
    assert!(!s.is_complete());
}

#[test]
fn no_endgame_while_pieces_are_unrequested() {
    let mut s = Scheduler::new(3, Bitmap::new(3), config());
    s.set_peer(PeerId(0), bits(3, &[0]));
    s.set_peer(PeerId(1), bits(3, &[0]));
    let now = t0();
    assert_eq!(s.poll_requests(now, 10).len(), 1);
    // Pieces 1 and 2 are missing and unrequested (nobody has them): no duplicate of 0.
    assert!(s.poll_requests(now, 10).is_empty());
    assert_eq!(s.unavailable(), vec![1, 2]);
}

#[test]
fn timeout_backs_off_and_moves_to_another_peer() {
    let mut s = Scheduler::new(1, Bitmap::new(1), config());
    s.set_peer(PeerId(0), Bitmap::full(1));
    let t0 = t0();
    let r = s.poll_requests(t0, 1)[0];
    assert_eq!(r.peer, PeerId(0));
    s.set_peer(PeerId(1), Bitmap::full(1));
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_secs(1)));
    let t1 = t0 + Duration::from_secs(1);
    assert_eq!(s.handle_timeouts(t1), vec![r]);
    assert_eq!(
        s.avoided_until(PeerId(0)),
        Some(t1 + Duration::from_millis(100))
    );
    let r2 = s.poll_requests(t1, 1)[0];
    assert_eq!((r2.piece, r2.peer), (0, PeerId(1)));
    // Both peers back off now: nobody to ask until a backoff ends.
    s.on_failure(r2, Failure::Transfer, t1);
    assert!(s
        .poll_requests(t1 + Duration::from_millis(50), 1)
        .is_empty());
    // A second consecutive failure doubles that peer's backoff.
    let t2 = t1 + Duration::from_millis(100);
    let r3 = s.poll_requests(t2, 1)[0];
    s.on_failure(r3, Failure::Transfer, t2);
    assert_eq!(
        s.avoided_until(r3.peer),
        Some(t2 + Duration::from_millis(200))
    );
    let r4 = s.poll_requests(t2 + Duration::from_millis(50), 1)[0];
    assert_ne!(r4.peer, r3.peer);
    assert!(matches!(s.on_success(r4, t0), Completion::Completed { .. }));
    assert_eq!(s.avoided_until(r4.peer), None);
    assert!(s.is_complete());
}

#[test]
fn ended_backoffs_do_not_hold_the_next_deadline_in_the_past() {
    // One failure, then another peer serves: the failed peer's backoff ends long before the
    // new request's timeout, and once it ended it must not be the next deadline (a caller
    // sleeping until then would wake at once, again and again: a busy loop).
    let mut s = Scheduler::new(1, Bitmap::new(1), config());
    s.set_peer(PeerId(0), Bitmap::full(1));
    s.set_peer(PeerId(1), Bitmap::full(1));
    let t0 = t0();
    let r = s.poll_requests(t0, 1)[0];
    s.on_failure(r, Failure::Transfer, t0);
    let t1 = t0 + Duration::from_millis(50);
    let r2 = s.poll_requests(t1, 1)[0];
    assert_ne!(r2.peer, r.peer);
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_millis(100)));
    let t2 = t0 + Duration::from_millis(300);
    assert!(s.handle_timeouts(t2).is_empty());
    let next = s.next_deadline().expect("a request is outstanding");
    assert!(next > t2, "next deadline {next:?} already passed at {t2:?}");
    assert_eq!(next, t1 + Duration::from_secs(1));
    assert_eq!(s.avoided_until(r.peer), None);
}

#[test]
fn nothing_pending_after_a_backoff_ends_means_no_deadline() {
    // Piece 1 is held by nobody: after the one request fails and its backoff passes, there is
    // nothing to wait for but the catalog.
    let mut s = Scheduler::new(2, Bitmap::new(2), config());
    s.set_peer(PeerId(0), bits(2, &[0]));
    let t0 = t0();
    let r = s.poll_requests(t0, 1)[0];
    s.on_failure(r, Failure::Transfer, t0);
    s.set_peer(PeerId(0), Bitmap::new(2));
    assert_eq!(s.next_deadline(), Some(t0 + Duration::from_millis(100)));
    let t1 = t0 + Duration::from_millis(150);
    assert!(s.poll_requests(t1, 4).is_empty());
    assert_eq!(s.next_deadline(), None);
}

#[test]
fn origin_is_the_source_of_last_resort() {
    let mut s = Scheduler::new(4, Bitmap::new(4), config());
    s.set_peer(PeerId(0), Bitmap::full(4));
    s.set_origin(PeerId(0));
    s.set_peer(PeerId(1), bits(4, &[0, 1]));
    let now = t0();
    // Peer 1's pipeline (2) fills first with the pieces it holds, although pieces 2 and 3
    // (only the origin's) are rarer; then the origin serves what only it has.
    let first: Vec<Request> = s.poll_requests(now, 2);
    assert!(first.iter().all(|r| r.peer == PeerId(1)), "{first:?}");
    let mut pieces: Vec<usize> = first.iter().map(|r| r.piece).collect();
    pieces.sort();
    assert_eq!(pieces, vec![0, 1]);
    let then: Vec<Request> = s.poll_requests(now, 2);
    assert!(then.iter().all(|r| r.peer == PeerId(0)), "{then:?}");
    let mut pieces: Vec<usize> = then.iter().map(|r| r.piece).collect();
    pieces.sort();
    assert_eq!(pieces, vec![2, 3]);
}

#[test]
fn origin_asked_for_pieces_only_it_holds_first() {
    let mut s = Scheduler::new(8, Bitmap::new(8), config());
    s.set_peer(PeerId(0), Bitmap::full(8));
    s.set_origin(PeerId(0));
    s.set_peer(PeerId(1), bits(8, &[0, 1, 2, 3]));
    s.set_peer_limit(PeerId(1), 1);
    let now = t0();
    let r = s.poll_requests(now, 3);
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].peer, PeerId(1));
    assert!(r[0].piece < 4);
    // Peer 1 is busy: the origin gets pieces 4..8, which nobody else holds.
    for q in &r[1..] {
        assert_eq!(q.peer, PeerId(0));
        assert!(q.piece >= 4, "{q:?}: peer 1 holds that piece too");
    }
    // Once peer 1 is free again, it serves the pieces it holds, not the origin.
    s.on_success(r[0], t0());
    s.on_success(r[1], t0());
    let q = s.poll_requests(now, 1)[0];
    assert_eq!(q.peer, PeerId(1));
}

#[test]
fn readers_spread_over_origin_only_pieces() {
    // Readers with different seeds asking the origin alone pick different pieces first, even
    // within one 64-piece word, so concurrent readers do not fetch the same pieces.
    let n = 100;
    let mut first = HashSet::new();
    for seed in 1..=16 {
        let mut c = config();
        c.seed = seed;
        let mut s = Scheduler::new(n, Bitmap::new(n), c);
        s.set_peer(PeerId(0), Bitmap::full(n));
        s.set_origin(PeerId(0));
        // Another peer holds a few pieces but is busy: the origin must still prefer the
        // pieces only it holds.
        s.set_peer(PeerId(1), bits(n, &[0, 1, 2, 3, 4, 5]));
        s.set_peer_limit(PeerId(1), 1);
        let r = s.poll_requests(t0(), 2);
        assert_eq!(r[0].peer, PeerId(1));
        assert_eq!(r[1].peer, PeerId(0));
        assert!(r[1].piece > 5);
        first.insert(r[1].piece);
    }
    assert!(first.len() >= 10, "16 readers started on only {first:?}");
}

#[test]
fn lost_source_refetches_only_missing_pieces() {
    let mut s = Scheduler::new(4, Bitmap::new(4), config());
    s.set_peer(PeerId(0), Bitmap::full(4));
    let now = t0();
    let r = s.poll_requests(now, 2);
    s.on_success(r[0], t0());
    let lost = s.remove_peer(PeerId(0));
    assert_eq!(lost, vec![r[1]]);
    s.set_peer(PeerId(1), Bitmap::full(4));
    let mut asked = Vec::new();
    while !s.is_complete() {
        for q in s.poll_requests(now, 10) {
            assert_eq!(q.peer, PeerId(1));
            asked.push(q.piece);
            s.on_success(q, t0());
        }
    }
    asked.sort();
    let mut expected: Vec<usize> = (0..4).filter(|&p| p != r[0].piece).collect();
    expected.sort();
    assert_eq!(asked, expected);
}

#[test]
fn corrupt_piece_never_asked_of_that_peer_again() {
    let mut s = Scheduler::new(1, Bitmap::new(1), config());
    s.set_peer(PeerId(0), Bitmap::full(1));
    let t = t0();
    let r = s.poll_requests(t, 1)[0];
    s.on_failure(r, Failure::Corrupt, t);
    let later = t + Duration::from_secs(60);
    assert!(s.poll_requests(later, 1).is_empty());
    assert_eq!(s.unavailable(), vec![0]);
    s.set_peer(PeerId(1), Bitmap::full(1));
    assert_eq!(s.poll_requests(later, 1)[0].peer, PeerId(1));
}

#[test]
fn starts_from_pieces_already_held() {
    let mut s = Scheduler::new(3, bits(3, &[0, 2]), config());
    s.set_peer(PeerId(0), Bitmap::full(3));
    let r = s.poll_requests(t0(), 10);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].piece, 1);
}

#[test]
fn thousands_of_pieces_each_fetched_once_and_spread_over_peers() {
    let n = 4096;
    let mut c = config();
    c.pipeline_per_peer = 3;
    let mut s = Scheduler::new(n, Bitmap::new(n), c);
    s.set_peer(PeerId(0), Bitmap::full(n));
    // Fifteen peers with disjoint slices of half the file, the origin with all of it.
    for i in 1..16u32 {
        let set: Vec<usize> = (0..n).filter(|p| p % 30 == i as usize).collect();
        s.set_peer(PeerId(i), bits(n, &set));
    }
    let mut asked = vec![0u8; n];
    let mut from = HashMap::<PeerId, usize>::new();
    while !s.is_complete() {
        let issued = s.poll_requests(t0(), 64);
        assert!(!issued.is_empty());
        for r in issued {
            asked[r.piece] += 1;
            *from.entry(r.peer).or_default() += 1;
            s.on_success(r, t0());
        }
    }
    // No endgame needed without failures: every piece once, none twice.
    assert!(asked.iter().all(|&a| a == 1));
    // Rarest first keeps the origin on the pieces only it holds; the others serve theirs.
    let held_by_others = (0..n).filter(|p| (1..16).contains(&(p % 30))).count();
    assert_eq!(from[&PeerId(0)], n - held_by_others);
}

/// A reader `rank` of `readers` with the origin (peer 0, holding all `n` pieces) only.
fn striped_reader(n: usize, rank: usize, readers: usize, have: &[usize]) -> Scheduler {
    let mut c = config();
    c.pipeline_per_peer = 8;
    let mut s = Scheduler::new(n, bits(n, have), c);
    s.set_peer(PeerId(0), Bitmap::full(n));
    s.set_origin(PeerId(0));
    s.set_stripe(rank, readers);
    s
}

#[test]
fn readers_split_origin_only_pieces_into_stripes() {
    let (n, readers) = (32, 4);
    let mut all = Vec::new();
    for rank in 0..readers {
        let mut s = striped_reader(n, rank, readers, &[]);
        let asked: Vec<usize> = s.poll_requests(t0(), 3).iter().map(|r| r.piece).collect();
        // Its own stripe, in order.
        assert_eq!(asked, vec![rank, rank + readers, rank + 2 * readers]);
        all.extend(asked);
    }
    let distinct: HashSet<usize> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "two readers asked the origin for one piece"
    );
}

#[test]
fn helpers_take_from_the_far_end_at_different_depths() {
    // Every stripe but 2 is done everywhere; its owner and three helpers ask the origin for
    // different pieces of it without knowing what the others fetch.
    let (n, readers) = (16, 4);
    let rest: Vec<usize> = (0..n).filter(|p| p % readers != 2).collect();
    let first = |rank: usize| {
        let mut s = striped_reader(n, rank, readers, &rest);
        let r = s.poll_requests(t0(), 1)[0];
        assert_eq!(r.peer, PeerId(0));
        r.piece
    };
    assert_eq!(first(2), 2, "the owner starts at the front");
    assert_eq!(first(1), 14, "the nearest helper at the last piece");
    assert_eq!(first(0), 10);
    assert_eq!(first(3), 6);
}

#[test]
fn claimed_pieces_are_left_to_their_reader() {
    let n = 8;
    let mut s = striped_reader(n, 0, 2, &[]);
    // Another reader, holding nothing yet.
    let other = PeerId(1);
    s.set_peer(other, Bitmap::new(n));
    s.set_claims(other, [0, 9999]);
    let r = s.poll_requests(t0(), 1)[0];
    assert_eq!(r.piece, 2, "piece 0 is another reader's");
    s.set_claims(other, [0, 4, 6]);
    let r = s.poll_requests(t0(), 1)[0];
    assert_eq!(r.piece, 7, "own stripe claimed: help stripe 1 from its end");
    s.set_claims(other, [0, 1, 3, 4, 5, 6]);
    assert!(
        s.poll_requests(t0(), 4).is_empty(),
        "what is left at the origin is being fetched by others"
    );
}

#[test]
fn a_failing_readers_claims_are_void() {
    let n = 8;
    let mut s = striped_reader(n, 0, 2, &[]);
    // Another reader holds piece 1 and claims the rest of what the origin alone holds.
    let other = PeerId(1);
    s.set_peer(other, bits(n, &[1]));
    s.set_claims(other, [0, 2, 3, 4, 5, 6, 7]);
    let t = t0();
    let r = s.poll_requests(t, 4);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!((r[0].piece, r[0].peer), (1, other));
    // It died: its request fails, and what it claimed is fair game again.
    s.on_failure(r[0], Failure::Transfer, t);
    let r = s.poll_requests(t, 2);
    assert_eq!(r.len(), 2, "{r:?}");
    assert!(r.iter().all(|q| q.peer == PeerId(0)));
    assert_eq!(r[0].piece, 0, "own stripe first");
}

#[test]
fn origin_keeps_to_unique_pieces_while_any_remain() {
    let n = 8;
    let mut s = striped_reader(n, 0, 2, &[]);
    // Peer 1 holds half the file and serves one request at a time.
    s.set_peer(PeerId(1), bits(n, &[0, 1, 2, 3]));
    s.set_peer_limit(PeerId(1), 1);
    s.set_claims(PeerId(1), [4, 5, 6, 7]);
    let r = s.poll_requests(t0(), 4);
    assert_eq!(
        r.len(),
        1,
        "{r:?}: the origin must not send what peer 1 holds"
    );
    assert_eq!(r[0].peer, PeerId(1));
    // Once the others' fetches landed, everything is elsewhere: the origin helps like a peer.
    s.set_peer(PeerId(2), bits(n, &[4, 5, 6, 7]));
    s.set_peer_limit(PeerId(2), 1);
    s.set_claims(PeerId(1), []);
    let r = s.poll_requests(t0(), 4);
    assert_eq!(r.len(), 4, "{r:?}");
    assert_eq!(r.iter().filter(|q| q.peer == PeerId(2)).count(), 1);
    assert_eq!(r.iter().filter(|q| q.peer == PeerId(0)).count(), 3);
}

#[test]
fn endgame_duplicates_only_late_requests() {
    let mut c = config();
    c.endgame_patience = 1.5;
    let mut s = Scheduler::new(3, Bitmap::new(3), c);
    s.set_peer(PeerId(0), Bitmap::full(3));
    s.set_peer(PeerId(1), Bitmap::full(3));
    let t = t0();
    let first = s.poll_requests(t, 3);
    assert_eq!(first.len(), 3);
    assert!(s.in_endgame());
    // One lands after 100 ms: pieces typically take 100 ms.
    s.on_success(first[0], t + Duration::from_millis(100));
    assert!(s
        .poll_requests(t + Duration::from_millis(140), 4)
        .is_empty());
    // At 150 ms the other two are late: each is asked of the peer not yet asked.
    let dups = s.poll_requests(t + Duration::from_millis(150), 4);
    assert_eq!(dups.len(), 2, "{dups:?}");
    for d in &dups {
        let orig = first.iter().find(|r| r.piece == d.piece).unwrap();
        assert_ne!(orig.peer, d.peer);
    }
}

/// One step of a random swarm.
#[derive(Clone, Debug)]
enum Op {
    Poll(usize),
    Succeed(usize),
    Fail(usize),
    Corrupt(usize),
    Advance(u64),
    Remove(u32),
    Readd(u32),
    Limit(u32, usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..6).prop_map(Op::Poll),
        3 => any::<usize>().prop_map(Op::Succeed),
        1 => any::<usize>().prop_map(Op::Fail),
        1 => any::<usize>().prop_map(Op::Corrupt),
        1 => (0u64..1500).prop_map(Op::Advance),
        1 => (0u32..5).prop_map(Op::Remove),
        1 => (0u32..5).prop_map(Op::Readd),
        1 => (0u32..5, 1usize..4).prop_map(|(p, l)| Op::Limit(p, l)),
    ]
}

/// A swarm: peer 0 holds everything and never corrupts; the others hold random pieces.
fn swarm() -> impl Strategy<Value = (usize, Vec<Vec<bool>>)> {
    (1usize..24, 1usize..5).prop_flat_map(|(pieces, others)| {
        (
            Just(pieces),
            proptest::collection::vec(proptest::collection::vec(any::<bool>(), pieces), others),
        )
    })
}

/// Polls and checks every issued request against the state just before it was issued.
fn checked_poll(s: &mut Scheduler, now: Instant, budget: usize, cfg: &SchedulerConfig) {
    s.handle_timeouts(now);
    let mut per_piece: HashMap<usize, usize> = HashMap::new();
    for r in s.outstanding() {
        *per_piece.entry(r.piece).or_default() += 1;
    }
    let mut at_peer: HashMap<PeerId, usize> = s.load();
    let issued = s.poll_requests(now, budget);
    assert!(issued.len() <= budget);
    for r in issued {
        assert!(
            !s.have().get(r.piece),
            "completed piece {} re-requested",
            r.piece
        );
        assert!(s.peer_has(r.peer, r.piece), "{r:?} from a peer without it");
        let already = per_piece.get(&r.piece).copied().unwrap_or(0);
        if already > 0 {
            let endgame = (0..s.pieces())
                .all(|p| s.have().get(p) || per_piece.get(&p).copied().unwrap_or(0) > 0);
            assert!(endgame, "duplicate request for {} outside endgame", r.piece);
            assert!(already < cfg.endgame_copies);
        }
        *per_piece.entry(r.piece).or_default() += 1;
        let n = at_peer.entry(r.peer).or_default();
        *n += 1;
        assert!(*n <= s.peer_limit(r.peer), "{r:?} past the peer's limit");
    }
    for (peer, n) in s.load() {
        assert!(n <= cfg.pipeline_per_peer, "{peer:?} has {n} outstanding");
        if n > 0 {
            // Requests go only to peers that were not backing off when asked.
            assert!(s.outstanding().any(|r| r.peer == peer));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_swarms_keep_invariants_and_complete(
        (pieces, others) in swarm(),
        ops in proptest::collection::vec(op(), 0..80),
        seed in any::<u64>(),
        with_origin in any::<bool>(),
        stripe in proptest::option::of((0usize..4, 1usize..5)),
        claims in proptest::collection::vec(0usize..30, 0..6),
    ) {
        let cfg = SchedulerConfig { seed, random_first: 2, ..config() };
        let mut s = Scheduler::new(pieces, Bitmap::new(pieces), cfg.clone());
        let mut maps = vec![Bitmap::full(pieces)];
        for held in &others {
            let set: Vec<usize> = (0..pieces).filter(|&p| held[p]).collect();
            maps.push(bits(pieces, &set));
        }
        for (i, m) in maps.iter().enumerate() {
            s.set_peer(PeerId(i as u32), m.clone());
        }
        if with_origin {
            s.set_origin(PeerId(0));
        }
        if let Some((rank, readers)) = stripe {
            s.set_stripe(rank, readers);
        }
        s.set_claims(PeerId(1), claims);
        let start = t0();
        let mut now = start;
        let mut completed_once = vec![false; pieces];
        let mut complete = |s: &mut Scheduler, r: Request| {
            if let Completion::Completed { cancelled } = s.on_success(r, t0()) {
                prop_assert!(!completed_once[r.piece], "piece {} completed twice", r.piece);
                completed_once[r.piece] = true;
                prop_assert!(cancelled.iter().all(|c| c.piece == r.piece));
            }
            prop_assert_eq!(s.outstanding_for(r.piece), 0);
            Ok(())
        };
        for o in ops {
            let outstanding: Vec<Request> = s.outstanding().collect();
            match o {
                Op::Poll(b) => checked_poll(&mut s, now, b, &cfg),
                Op::Succeed(k) if !outstanding.is_empty() => {
                    complete(&mut s, outstanding[k % outstanding.len()])?;
                }
                Op::Fail(k) if !outstanding.is_empty() => {
                    s.on_failure(outstanding[k % outstanding.len()], Failure::Transfer, now);
                }
                Op::Corrupt(k) if !outstanding.is_empty() => {
                    let r = outstanding[k % outstanding.len()];
                    if r.peer != PeerId(0) {
                        s.on_failure(r, Failure::Corrupt, now);
                        prop_assert!(s.outstanding().all(|q| q != r));
                    }
                }
                Op::Advance(ms) => now += Duration::from_millis(ms),
                Op::Remove(p) if (p as usize) < maps.len() => {
                    let failed = s.remove_peer(PeerId(p));
                    prop_assert!(failed.iter().all(|r| r.peer == PeerId(p)));
                    prop_assert!(s.outstanding().all(|r| r.peer != PeerId(p)));
                }
                Op::Readd(p) if (p as usize) < maps.len() => {
                    s.set_peer(PeerId(p), maps[p as usize].clone());
                }
                Op::Limit(p, l) => s.set_peer_limit(PeerId(p), l),
                _ => {}
            }
            let endgame = !s.is_complete()
                && (0..pieces).all(|p| s.have().get(p) || s.outstanding_for(p) > 0);
            prop_assert_eq!(s.in_endgame(), endgame);
        }
        // Then a calm swarm: everyone back, every request answered, the other readers' fetches
        // from the origin done. It must finish, and every missing piece must be asked of a
        // peer that has it.
        s.set_claims(PeerId(1), []);
        for (i, m) in maps.iter().enumerate() {
            s.set_peer(PeerId(i as u32), m.clone());
        }
        for _ in 0..(4 * pieces + 20) {
            if s.is_complete() {
                break;
            }
            checked_poll(&mut s, now, 8, &cfg);
            let outstanding: Vec<Request> = s.outstanding().collect();
            for r in outstanding {
                complete(&mut s, r)?;
            }
            now += cfg.backoff_max;
        }
        prop_assert!(s.is_complete(), "stuck: have {:?}", s.have());
        prop_assert!(completed_once.iter().all(|&c| c));
        prop_assert_eq!(s.outstanding().count(), 0);
    }
}
