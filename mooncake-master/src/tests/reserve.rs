//! Client-held reservations: grant, commit, expiry, and the quarantine of remounted segments.

use super::*;

impl H {
    fn reserve(
        &mut self,
        client: u128,
        size: u64,
        min: u64,
    ) -> Result<ReservationGrant, ErrorCode> {
        match self.apply(Command::Reserve {
            client_id: c(client),
            size,
            min_size: min,
        }) {
            Response::Reserved(r) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn commit(
        &mut self,
        client: u128,
        id: u64,
        items: &[(&str, u64, u64)],
    ) -> Vec<Result<(), ErrorCode>> {
        let items = items
            .iter()
            .map(|&(k, offset, size)| ReservedPut {
                key: k.into(),
                offset,
                size,
            })
            .collect();
        match self.apply(Command::CommitReserved {
            client_id: c(client),
            reservation: id,
            items,
            config: ReplicateConfig::default(),
        }) {
            Response::UnitBatch(r) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Registers a client that holds no segment.
    fn register(&mut self, client: u128) {
        let r = self.apply(Command::RemountSegments {
            client_id: c(client),
            segments: Vec::new(),
        });
        assert_eq!(r, Response::UnitBatch(Vec::new()));
    }

    fn used(&self) -> u64 {
        self.m.segments().iter().map(|s| s.used).sum()
    }
}

#[test]
fn committed_values_are_readable_where_they_were_written() {
    let mut h = H::new();
    h.mount(1, "a:1", 64 * MIB);
    assert_eq!(h.reserve(2, MIB, 4096), Err(ErrorCode::CLIENT_NOT_FOUND));
    assert_eq!(
        h.heartbeat(2),
        HeartbeatStatus::NeedRemount,
        "not registered by asking"
    );
    h.register(2);
    assert_eq!(h.heartbeat(2), HeartbeatStatus::Ok);
    let g = h.reserve(2, MIB, 4096).unwrap();
    assert_eq!(
        (g.segment_name.as_str(), g.size, g.granularity),
        ("a:1", MIB, 64)
    );
    assert_eq!(g.ttl_ms, 500);
    assert_eq!(h.used(), MIB, "the whole grant is held");
    // Out of order, with a gap, and a size that is not a multiple of the granularity.
    let r = h.commit(
        2,
        g.id,
        &[("b", 8192, 100), ("a", 0, 4096), ("c", 8192 + 128, 4096)],
    );
    assert_eq!(r, vec![Ok(()), Ok(()), Ok(())]);
    for (key, off, size) in [("a", 0, 4096), ("b", 8192, 100), ("c", 8192 + 128, 4096)] {
        let list = h.get(key).unwrap();
        assert_eq!(list.size, size);
        assert_eq!(list.replicas.len(), 1);
        let m = list.replicas[0].memory().unwrap();
        assert_eq!(
            (m.segment_name.as_str(), m.buffer_address),
            ("a:1", g.buffer_address + off)
        );
        assert_eq!(list.replicas[0].status, ReplicaStatus::Complete);
    }
    assert_eq!(h.m.metrics().counters.reserved_puts, 3);
    assert_eq!(h.m.metrics().reserved_bytes, MIB - 2 * 4096 - 128);
    // A committed value is an object like any other: removed, its range is retired until the
    // read lease ends, then freed to the segment (not to the reservation).
    h.remove("b", true).unwrap();
    assert_eq!(
        h.commit(2, g.id, &[("b2", 8192, 64)]),
        vec![Err(ErrorCode::INVALID_PARAMS)]
    );
    // Expiry frees what was never claimed; committed values stay.
    h.advance(1000);
    let ticked = h.tick();
    assert!(ticked
        .iter()
        .any(|(c, r)| *c == Command::ExpireReservations && *r == Response::Count(Ok(1))));
    assert_eq!(h.used(), 4096 + 4096 + 128, "b's range is retired");
    assert!(h.get("a").is_ok() && h.get("c").is_ok());
    assert_eq!(
        h.commit(2, g.id, &[("d", 16384, 64)]),
        vec![Err(ErrorCode::INVALID_WRITE)]
    );
}

#[test]
fn commits_are_checked() {
    let mut h = H::new();
    h.mount(1, "a:1", 64 * MIB);
    h.register(2);
    let g = h.reserve(2, 64 * 1024, 0).unwrap();
    h.put(3, "taken", 64, 1);
    let r = h.commit(
        2,
        g.id,
        &[
            ("taken", 0, 64),
            ("", 64, 64),
            ("z", 64, 0),
            ("odd", 65, 64),
            ("past", 64 * 1024 - 64, 128),
            ("huge", 0, u64::MAX),
            ("ok", 128, 64),
            ("again", 128, 64),
        ],
    );
    use ErrorCode as E;
    assert_eq!(
        r,
        vec![
            Err(E::OBJECT_ALREADY_EXISTS),
            Err(E::INVALID_PARAMS),
            Err(E::INVALID_PARAMS),
            Err(E::INVALID_PARAMS),
            Err(E::INVALID_PARAMS),
            Err(E::INVALID_PARAMS),
            Ok(()),
            Err(E::INVALID_PARAMS),
        ]
    );
    // Only the holder commits, and only into a reservation that exists.
    assert_eq!(
        h.commit(3, g.id, &[("x", 0, 64)]),
        vec![Err(E::INVALID_WRITE)]
    );
    assert_eq!(
        h.commit(2, g.id + 7, &[("x", 0, 64)]),
        vec![Err(E::INVALID_WRITE)]
    );
    // replica_num must be 1.
    let two = h.apply(Command::CommitReserved {
        client_id: c(2),
        reservation: g.id,
        items: vec![ReservedPut {
            key: "x".into(),
            offset: 0,
            size: 64,
        }],
        config: ReplicateConfig::with_replicas(2),
    });
    assert_eq!(two, Response::UnitBatch(vec![Err(E::INVALID_PARAMS)]));
    // A write in progress younger than the takeover age keeps its key.
    h.put_start(3, "busy", 64, 1).unwrap();
    assert_eq!(
        h.commit(2, g.id, &[("busy", 0, 64)]),
        vec![Err(E::OBJECT_ALREADY_EXISTS)]
    );
}

#[test]
fn grants_are_bounded() {
    let mut h = H::new();
    h.register(2);
    h.register(3);
    assert_eq!(
        h.reserve(2, MIB, 0),
        Err(ErrorCode::NO_AVAILABLE_HANDLE),
        "no segment"
    );
    h.mount(1, "a:1", 16 * MIB);
    assert_eq!(h.reserve(2, 0, 0), Err(ErrorCode::INVALID_PARAMS));
    assert_eq!(h.reserve(2, 64, 128), Err(ErrorCode::INVALID_PARAMS));
    // At most a sixteenth of the largest segment.
    let g = h.reserve(2, 8 * MIB, 0).unwrap();
    assert_eq!(g.size, MIB);
    assert_eq!(
        h.reserve(2, 8 * MIB, 2 * MIB),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    // At most four grants' worth unclaimed per client; used up grants do not count.
    let mut ids = vec![g.id];
    for _ in 1..MAX_UNCLAIMED_GRANTS_PER_CLIENT {
        ids.push(h.reserve(2, MIB, 0).unwrap().id);
    }
    assert_eq!(
        h.reserve(2, 64, 0),
        Err(ErrorCode::NO_AVAILABLE_HANDLE),
        "per client"
    );
    h.reserve(3, MIB, 0).unwrap();
    let n = h.m.reservations.len();
    assert_eq!(h.commit(2, ids[0], &[("whole", 0, MIB)]), vec![Ok(())]);
    assert_eq!(
        h.m.reservations.len(),
        n - 1,
        "a used up reservation is gone at once"
    );
    h.reserve(2, MIB, 0).unwrap();
    // Less than asked when that is all there is, but never less than the client can use.
    let mut small = H::with(MasterConfig {
        eviction_high_watermark_ratio: 1.0,
        ..MasterConfig::default()
    });
    small.mount(1, "a:1", 16 * MIB);
    small.mount(3, "b:1", 16 * MIB);
    small.register(2);
    let pin = |seg: &str| ReplicateConfig {
        preferred_segment: seg.into(),
        ..ReplicateConfig::default()
    };
    small.put_cfg(1, "f1", 16 * MIB - 300 * 1024, pin("a:1"));
    small.put_cfg(1, "f2", 16 * MIB - 300 * 1024, pin("b:1"));
    // 600 KiB free in all, in two ranges of 300 KiB: the grant is halved until one fits.
    assert_eq!(small.reserve(2, MIB, 0).unwrap().size, 300 * 1024);
    assert_eq!(
        small.reserve(2, MIB, 301 * 1024),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    // Never past the eviction watermark (0.9 of 16 MiB here).
    let mut full = H::new();
    full.mount(1, "a:1", 16 * MIB);
    full.register(2);
    full.put(1, "filler", 14 * MIB, 1);
    let room = ((16 * MIB) as f64 * 0.9) as u64 - 14 * MIB;
    assert_eq!(full.reserve(2, MIB, 0).unwrap().size, room & !63);
    assert_eq!(
        full.reserve(2, MIB, 64),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    assert!(full.tick().is_empty(), "no eviction for a reservation");
    // Off when the ttl is 0.
    let mut off = H::with(MasterConfig {
        reservation_ttl_ms: 0,
        ..MasterConfig::default()
    });
    off.mount(1, "a:1", 16 * MIB);
    off.register(2);
    assert_eq!(off.reserve(2, MIB, 0), Err(ErrorCode::NOT_SUPPORTED));
}

#[test]
fn reservations_go_with_their_client_and_segment() {
    let mut h = H::new();
    h.mount(1, "a:1", 64 * MIB);
    h.mount(3, "b:1", 64 * MIB);
    h.register(2);
    h.register(4);
    let g = h.reserve(2, MIB, 0).unwrap();
    h.commit(2, g.id, &[("k", 0, 4096)]);
    // The client goes silent: its unclaimed space is freed, its committed value stays.
    h.advance(MasterConfig::default().client_ttl_ms - 1);
    h.heartbeat(1);
    h.heartbeat(3);
    h.heartbeat(4);
    h.advance(1);
    h.tick();
    assert!(h.get("k").is_ok());
    assert_eq!(h.used(), 4096);
    // A segment that goes takes its reservations along.
    let g = h.reserve(4, MIB, 0).unwrap();
    let owner = if g.segment_name == "a:1" { 1 } else { 3 };
    h.apply(Command::UnmountSegment {
        client_id: c(owner),
        name: g.segment_name.clone(),
    })
    .into_unit()
    .unwrap();
    assert_eq!(
        h.commit(4, g.id, &[("x", 0, 64)]),
        vec![Err(ErrorCode::INVALID_WRITE)]
    );
}

#[test]
fn a_remounted_segment_waits_out_reservations_of_a_previous_master() {
    let mut h = H::new();
    let spec = SegmentSpec::new("a:1", 0x1000_0000, 64 * MIB);
    h.at(5_000);
    let remount = h.apply(Command::RemountSegments {
        client_id: c(1),
        segments: vec![spec],
    });
    assert_eq!(remount, Response::UnitBatch(vec![Ok(())]));
    h.register(2);
    assert_eq!(
        h.put_start(2, "k", 64, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    assert_eq!(h.reserve(2, MIB, 0), Err(ErrorCode::NO_AVAILABLE_HANDLE));
    h.advance(999);
    assert_eq!(
        h.put_start(2, "k", 64, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    h.advance(1);
    h.put(2, "k", 64, 1);
    h.reserve(2, MIB, 0).unwrap();
    // Later in the master's life a remount waits for nothing.
    h.advance(5_000);
    let later = h.apply(Command::RemountSegments {
        client_id: c(5),
        segments: vec![SegmentSpec::new("e:1", 0x9000_0000, 64 * MIB)],
    });
    assert_eq!(later, Response::UnitBatch(vec![Ok(())]));
    let on_e = ReplicateConfig {
        preferred_segment: "e:1".into(),
        ..ReplicateConfig::default()
    };
    let r = h.put_start_cfg(2, "k3", 64, on_e).unwrap();
    assert_eq!(H::segment_names(&r.replicas), vec!["e:1".to_owned()]);
    // A first mount takes allocations at once.
    h.mount(3, "b:1", 64 * MIB);
    let r = h.put_start_cfg(
        2,
        "k2",
        64,
        ReplicateConfig {
            preferred_segment: "b:1".into(),
            ..ReplicateConfig::default()
        },
    );
    assert_eq!(
        H::segment_names(&r.unwrap().replicas),
        vec!["b:1".to_owned()]
    );
}

#[test]
fn only_the_segment_owner_or_the_reserving_writer_may_report_landings() {
    let mut h = H::new();
    h.mount(1, "a:1", 64 * MIB);
    h.register(2);
    h.register(3);
    let g = h.reserve(2, MIB, 0).unwrap();
    let at = g.buffer_address;
    let who =
        |h: &H, client: u128, ranges: &[(u64, u64)]| h.m.landing_reporter(c(client), "a:1", ranges);
    // The storage node reports anything on its own segment.
    assert_eq!(
        who(&h, 1, &[(at, 64), (0, 1)]),
        Ok(LandingReporter::SegmentOwner)
    );
    // The writer vouches for its own reserved space, pieces of a range included.
    assert_eq!(
        who(&h, 2, &[(at, 4096), (at + MIB - 64, 64), (at, 0)]),
        Ok(LandingReporter::Writer)
    );
    // Anyone else is refused, and so is an unknown client or segment.
    assert_eq!(
        who(&h, 3, &[(at, 64)]),
        Err(LandingRefusal::OthersReservation(c(2)))
    );
    assert_eq!(who(&h, 9, &[(at, 64)]), Err(LandingRefusal::UnknownClient));
    assert_eq!(
        h.m.landing_reporter(c(1), "b:1", &[]),
        Err(LandingRefusal::UnknownSegment)
    );
    // Not past the reservation, nor before the segment, nor overflowing.
    for bad in [(at + MIB - 64, 65), (at - 64, 64), (at, u64::MAX)] {
        assert!(who(&h, 2, &[bad]).is_err(), "{bad:?}");
    }
    // Committed space is no longer reserved: the writer's later reports on it are refused,
    // while the rest of its reservation (split around the commit) is still its own.
    assert_eq!(h.commit(2, g.id, &[("k", 4096, 4096)]), vec![Ok(())]);
    assert_eq!(
        who(&h, 2, &[(at + 4096, 64)]),
        Err(LandingRefusal::NotReserved)
    );
    assert_eq!(
        who(&h, 2, &[(at, 4096), (at + 8192, 64)]),
        Ok(LandingReporter::Writer)
    );
    assert_eq!(
        who(&h, 2, &[(at, 8192 + 64)]),
        Err(LandingRefusal::NotReserved),
        "a range across the committed value"
    );
    // An expired reservation vouches for nothing.
    h.advance(2 * MasterConfig::default().reservation_ttl_ms);
    h.heartbeat(1);
    h.heartbeat(2);
    h.heartbeat(3);
    h.tick();
    assert_eq!(who(&h, 2, &[(at, 64)]), Err(LandingRefusal::NotReserved));
    assert_eq!(who(&h, 1, &[(at, 64)]), Ok(LandingReporter::SegmentOwner));
}
