//! Eviction triggers and ordering.

use super::*;

const KIB: u64 = 1024;

fn evictions(ticked: &[(Command, Response)]) -> Vec<EvictionReport> {
    ticked
        .iter()
        .filter_map(|(_, r)| match r {
            Response::Evicted(e) => Some(*e),
            _ => None,
        })
        .collect()
}

#[test]
fn watermark_eviction_takes_oldest_lease_first_and_skips_protected() {
    let mut h = H::new();
    h.mount(1, "a:1", 64 * KIB);
    for i in 0..58u64 {
        let cfg = ReplicateConfig {
            with_hard_pin: i == 2,
            with_soft_pin: i == 3,
            ..Default::default()
        };
        h.at(i).put_cfg(1, &format!("k{i}"), KIB, cfg);
    }
    // Read k0 and k1 late: they are leased when eviction runs.
    h.at(4_000);
    h.get("k0").unwrap();
    h.get("k1").unwrap();
    assert!(!h.m.handle_timeout(Timestamp(4_000)).is_empty());
    h.at(5_000).heartbeat(1);
    let ticked = h.tick();
    let reports = evictions(&ticked);
    assert_eq!(reports.len(), 1, "{ticked:?}");
    let r = reports[0];
    assert_eq!(r.target_bytes, (64.0 * 1024.0 * 0.05f64).ceil() as u64);
    assert_eq!((r.objects, r.bytes, r.soft_pinned), (4, 4 * KIB, 0));
    for i in 0..58 {
        let evicted = (4..8).contains(&i);
        assert_eq!(h.exists(&format!("k{i}")), !evicted, "k{i}");
    }
    // Back under the watermark: nothing more to do.
    h.advance(100).heartbeat(1);
    assert!(evictions(&h.tick()).is_empty());
    assert_eq!(h.m.metrics().counters.evicted_objects, 4);
}

#[test]
fn failed_allocation_triggers_eviction_without_waiting() {
    let mut h = H::new();
    h.mount(1, "a:1", 64 * KIB);
    h.put(1, "old", 40 * KIB, 1);
    assert!(
        h.m.handle_timeout(h.t()).is_empty(),
        "62% used: below the watermark"
    );
    // A put that finds no space fails at once ...
    assert_eq!(
        h.put_start(1, "new", 40 * KIB, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    // ... and the next tick evicts.
    h.advance(1);
    let reports = evictions(&h.tick());
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].objects, 1);
    assert!(!h.exists("old"));
    h.put(1, "new", 40 * KIB, 1);
    // The request flag was cleared by the run.
    h.advance(1);
    assert!(evictions(&h.tick()).is_empty());
}

#[test]
fn soft_pinned_only_when_nothing_else_and_never_hard_or_leased() {
    let mut h = H::new();
    h.mount(1, "a:1", 16 * KIB);
    let soft = ReplicateConfig {
        with_soft_pin: true,
        ..Default::default()
    };
    let hard = ReplicateConfig {
        with_hard_pin: true,
        ..Default::default()
    };
    h.at(1).put_cfg(1, "soft-old", 4 * KIB, soft.clone());
    h.at(2)
        .put_cfg(1, "plain", 2 * KIB, ReplicateConfig::default());
    h.at(3).put_cfg(1, "hard", 4 * KIB, hard);
    h.at(4).put_cfg(1, "soft-new", 4 * KIB, soft);
    h.at(5)
        .put_cfg(1, "leased", 2 * KIB, ReplicateConfig::default());
    h.get("leased").unwrap();
    // Full. Needs 5% of 16 KiB = 820 bytes: the plain object is enough.
    assert_eq!(
        h.put_start(1, "x", KIB, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    h.at(10);
    let r = evictions(&h.tick());
    assert_eq!((r[0].objects, r[0].soft_pinned), (1, 0));
    assert!(!h.exists("plain"));
    h.put(1, "x", 2 * KIB, 1);
    h.at(20);
    // Full again; only pinned, leased and young objects remain; "x" goes first, and still
    // short of nothing (2 KiB >= 820) so no soft-pinned object is touched.
    assert_eq!(
        h.put_start(1, "y", 4 * KIB, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    let r = evictions(&h.tick());
    assert_eq!((r[0].objects, r[0].soft_pinned), (1, 0));
    assert!(!h.exists("x"));
    // Now nothing unpinned is evictable: the oldest soft-pinned object goes.
    h.put(1, "z", 2 * KIB, 1);
    h.get("z").unwrap();
    assert_eq!(
        h.put_start(1, "y", 4 * KIB, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    h.at(30);
    let r = evictions(&h.tick());
    assert_eq!((r[0].objects, r[0].soft_pinned), (1, 1));
    assert!(!h.exists("soft-old") && h.exists("soft-new"));
    assert!(h.exists("hard") && h.exists("leased") && h.exists("z"));
    h.put(1, "y", 4 * KIB, 1);
    // Only hard-pinned and leased objects left, plus y: evicting y and soft-new, never the rest.
    h.get("y").unwrap();
    assert_eq!(
        h.put_start(1, "w", 8 * KIB, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    h.at(40);
    let r = evictions(&h.tick());
    assert_eq!((r[0].objects, r[0].soft_pinned), (1, 1));
    h.at(50);
    assert_eq!(
        h.put_start(1, "w", 8 * KIB, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    let r = evictions(&h.tick());
    assert_eq!(
        r[0].objects, 0,
        "only hard-pinned and leased objects are left"
    );
    assert!(h.exists("hard") && h.exists("leased") && h.exists("y") && h.exists("z"));
}

#[test]
fn expired_soft_pin_is_plain_and_eviction_is_rate_limited() {
    let mut h = H::with(MasterConfig {
        eviction_interval_ms: 1_000,
        ..Default::default()
    });
    h.mount(1, "a:1", 4 * KIB);
    h.put_cfg(
        1,
        "soft",
        4 * KIB,
        ReplicateConfig {
            with_soft_pin: true,
            soft_pin_ttl_ms: 100,
            ..Default::default()
        },
    );
    // 100% used: above the watermark.
    assert!(h.m.handle_timeout(Timestamp(0)).contains(&Command::Evict));
    h.at(200);
    let r = evictions(&h.tick());
    assert_eq!(
        (r[0].objects, r[0].soft_pinned),
        (1, 0),
        "the pin expired at 100"
    );
    h.put(1, "leased", 4 * KIB, 1);
    h.get("leased").unwrap();
    h.at(201);
    assert!(
        !h.m.handle_timeout(h.t()).contains(&Command::Evict),
        "ran at 200"
    );
    assert_eq!(h.m.next_timeout(), Some(Timestamp(1_200)));
    h.at(1_200);
    assert!(h.m.handle_timeout(h.t()).contains(&Command::Evict));
}

#[test]
fn soft_pinned_objects_stay_when_their_eviction_is_off() {
    let mut h = H::with(MasterConfig {
        allow_evict_soft_pinned_objects: false,
        ..Default::default()
    });
    h.mount(1, "a:1", 8 * KIB);
    let soft = ReplicateConfig {
        with_soft_pin: true,
        ..Default::default()
    };
    h.at(1).put_cfg(1, "soft", 4 * KIB, soft);
    h.at(2).put(1, "plain", 4 * KIB, 1);
    assert_eq!(
        h.put_start(1, "x", 4 * KIB, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    h.at(10);
    let r = evictions(&h.tick());
    assert_eq!((r[0].objects, r[0].soft_pinned), (1, 0));
    assert!(h.exists("soft") && !h.exists("plain"));
    // Full again with only the soft-pinned object evictable ("x" is under a read lease): it
    // stays, where with the default it would go.
    h.put(1, "x", 4 * KIB, 1);
    h.get("x").unwrap();
    h.at(20);
    assert_eq!(
        h.put_start(1, "y", 4 * KIB, 1),
        Err(ErrorCode::NO_AVAILABLE_HANDLE)
    );
    h.at(30);
    let r = evictions(&h.tick());
    assert_eq!((r[0].objects, r[0].soft_pinned), (0, 0));
    assert!(h.exists("soft") && h.exists("x"));
}
