//! Where recently read objects were: lets a repeated read start its transfer while the master
//! call that grants its lease is still in flight, so a warm get costs one round trip, not two.
//!
//! Performance-critical: every get looks here.
//!
//! A cached location is only a guess. The read goes out at once, together with the usual
//! GetReplicaList; its bytes are used only if that answer lists the very replica that was read
//! (same replica id, segment, address, size and status), from the same master session as the
//! answer the guess came from. That is enough: a replica's bytes never change while it exists
//! (an upsert writes new replicas), replica ids are never reused by one master state, and a
//! replica listed both when the guess was made and after the read existed in between, so its
//! range held its bytes throughout. Any other answer discards the read and the object is read
//! again from the answer's replicas, as without the cache.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use mooncake_master::{ReplicaDescriptor, ReplicaList};

/// A guess: the replica a read of the key used last, and the session of the answer naming it.
#[derive(Clone, Debug)]
pub(crate) struct Located {
    pub(crate) session: u64,
    pub(crate) size: u64,
    pub(crate) replica: ReplicaDescriptor,
}

impl Located {
    /// Whether `list`, answered in `session`, confirms this guess.
    pub(crate) fn confirmed_by(&self, session: u64, list: &ReplicaList) -> bool {
        self.session == session && list.size == self.size && list.replicas.contains(&self.replica)
    }
}

/// How reads sent ahead of the master's answer fared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadAheadStats {
    /// Reads whose bytes the master's answer confirmed.
    pub confirmed: u64,
    /// Reads discarded (the object moved, changed or went away, or the transfer failed); the
    /// object was then read from the answer's replicas.
    pub discarded: u64,
}

/// Bounded map from key to [`Located`] that keeps the keys read recently.
///
/// Two generations approximate least-recently-used eviction in O(1): new and used keys go into
/// the young generation; when it is full it becomes the old one and the previous old generation
/// is dropped. A key survives as long as it is used at least once per generation.
#[derive(Debug)]
pub(crate) struct LocationCache {
    capacity: usize,
    map: Mutex<Generations>,
    confirmed: AtomicU64,
    discarded: AtomicU64,
}

#[derive(Debug)]
struct Generations {
    young: HashMap<String, Located>,
    old: HashMap<String, Located>,
    /// Keys per generation.
    young_max: usize,
    /// Whether a full young generation becomes the old one (false for a one-key cache).
    keep_old: bool,
}

impl Generations {
    fn new(capacity: usize) -> Self {
        Generations {
            young: HashMap::new(),
            old: HashMap::new(),
            young_max: (capacity / 2).max(1),
            keep_old: capacity >= 2,
        }
    }

    /// Moves `key` from the old generation into the young one, if it is there.
    fn promote(&mut self, key: &str) {
        if let Some((k, l)) = self.old.remove_entry(key) {
            self.insert(k, l);
        }
    }

    /// Inserts a key not yet held.
    fn insert(&mut self, key: String, located: Located) {
        if self.young.len() >= self.young_max {
            let young = std::mem::take(&mut self.young);
            self.old = if self.keep_old { young } else { HashMap::new() };
        }
        self.young.insert(key, located);
    }

    fn remove(&mut self, key: &str) {
        self.young.remove(key);
        self.old.remove(key);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

impl LocationCache {
    /// A cache of at most `capacity` keys (0: disabled).
    pub(crate) fn new(capacity: usize) -> Self {
        LocationCache {
            capacity,
            map: Mutex::new(Generations::new(capacity)),
            confirmed: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.map.lock().expect("location cache lock")
    }

    /// The guess for `key` made in `session`, if any.
    pub(crate) fn get(&self, key: &str, session: u64) -> Option<Located> {
        if self.capacity == 0 {
            return None;
        }
        let mut map = self.map();
        if let Some(l) = map.young.get(key) {
            return Some(l).filter(|l| l.session == session).cloned();
        }
        map.promote(key);
        map.young.get(key).filter(|l| l.session == session).cloned()
    }

    /// Records that reads of `key` use `replica` of `list`, as answered in `session`; `None`
    /// forgets the key (no such object, or a replica this client reads without a transfer).
    pub(crate) fn learn(
        &self,
        key: &str,
        session: u64,
        list: Option<(&ReplicaList, &ReplicaDescriptor)>,
    ) {
        if self.capacity == 0 {
            return;
        }
        let mut map = self.map();
        let Some((list, replica)) = list else {
            map.remove(key);
            return;
        };
        map.promote(key);
        if let Some(l) = map.young.get_mut(key) {
            l.session = session;
            l.size = list.size;
            if l.replica != *replica {
                l.replica = replica.clone();
            }
            return;
        }
        map.insert(
            key.to_owned(),
            Located {
                session,
                size: list.size,
                replica: replica.clone(),
            },
        );
    }

    /// Counts a read ahead as confirmed or discarded.
    pub(crate) fn count(&self, confirmed: bool) {
        let c = if confirmed {
            &self.confirmed
        } else {
            &self.discarded
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub(crate) fn stats(&self) -> ReadAheadStats {
        ReadAheadStats {
            confirmed: self.confirmed.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
        }
    }

    /// Forgets `key`.
    pub(crate) fn forget(&self, key: &str) {
        if self.capacity > 0 {
            self.map().remove(key);
        }
    }

    /// Forgets every guess on the segment named `segment` (a transfer from it failed: the
    /// next reads of its keys wait for the master's answer instead of trying it again).
    pub(crate) fn forget_segment(&self, segment: &str) {
        if self.capacity > 0 {
            let keep = |_: &String, l: &mut Located| {
                l.replica.memory().is_none_or(|m| m.segment_name != segment)
            };
            let mut map = self.map();
            map.young.retain(keep);
            map.old.retain(keep);
        }
    }

    /// Number of keys held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mooncake_master::{
        LeaseDeadline, MemoryDescriptor, ReplicaId, ReplicaLocation, ReplicaStatus, Timestamp,
    };

    fn replica(id: u64, addr: u64) -> ReplicaDescriptor {
        ReplicaDescriptor {
            id: ReplicaId(id),
            status: ReplicaStatus::Complete,
            location: ReplicaLocation::Memory(MemoryDescriptor {
                segment_name: "127.0.0.1:1".into(),
                transport_endpoint: String::new(),
                buffer_address: addr,
                size: 4096,
            }),
        }
    }

    fn list(replicas: Vec<ReplicaDescriptor>) -> ReplicaList {
        ReplicaList {
            size: 4096,
            replicas,
            lease: LeaseDeadline(Timestamp::from_millis(10)),
            checksum: None,
        }
    }

    #[test]
    fn a_guess_holds_only_for_the_same_replica_in_the_same_session() {
        let cache = LocationCache::new(2);
        let r = replica(7, 0x1000);
        let l = list(vec![r.clone()]);
        cache.learn("k", 1, Some((&l, &r)));
        let guess = cache.get("k", 1).expect("cached");
        assert!(guess.confirmed_by(1, &l));
        assert!(!guess.confirmed_by(2, &l), "another session");
        assert!(cache.get("k", 2).is_none(), "another session");
        // Same place, new replica (the key was removed and put again).
        assert!(!guess.confirmed_by(1, &list(vec![replica(8, 0x1000)])));
        // Same replica id, other address (a different master state).
        assert!(!guess.confirmed_by(1, &list(vec![replica(7, 0x2000)])));
        let mut resized = l;
        resized.size = 1;
        assert!(!guess.confirmed_by(1, &resized));
        // One of several replicas.
        assert!(guess.confirmed_by(1, &list(vec![replica(9, 0), r])));
        cache.learn("k", 1, None);
        assert!(cache.get("k", 1).is_none());
    }

    #[test]
    fn bounded_and_can_be_disabled() {
        let cache = LocationCache::new(2);
        let r = replica(1, 0);
        let l = list(vec![r.clone()]);
        for k in ["a", "b", "c", "d"] {
            cache.learn(k, 1, Some((&l, &r)));
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.get("d", 1).is_some(), "the newest key stays");
        cache.forget("d");
        assert!(cache.get("d", 1).is_none());
        let elsewhere = ReplicaDescriptor {
            location: ReplicaLocation::Memory(MemoryDescriptor {
                segment_name: "127.0.0.1:2".into(),
                transport_endpoint: String::new(),
                buffer_address: 0,
                size: 4096,
            }),
            ..replica(2, 0)
        };
        let cache = LocationCache::new(8);
        cache.learn("e", 1, Some((&l, &elsewhere)));
        cache.learn("f", 1, Some((&l, &r)));
        cache.forget_segment("127.0.0.1:1");
        assert!(cache.get("f", 1).is_none(), "on the failed segment");
        assert!(cache.get("e", 1).is_some(), "on another segment");
        let off = LocationCache::new(0);
        off.learn("a", 1, Some((&l, &r)));
        assert!(off.get("a", 1).is_none());
    }

    #[test]
    fn keys_read_recently_stay_while_others_make_room() {
        let cache = LocationCache::new(8);
        let r = replica(1, 0);
        let l = list(vec![r.clone()]);
        cache.learn("hot", 1, Some((&l, &r)));
        cache.learn("cold", 1, Some((&l, &r)));
        for i in 0..100 {
            cache.learn(&format!("k{i}"), 1, Some((&l, &r)));
            assert!(
                cache.get("hot", 1).is_some(),
                "hot key dropped after {i} inserts"
            );
            assert!(cache.len() <= 8, "{} keys held", cache.len());
        }
        assert!(cache.get("cold", 1).is_none(), "an unused key is dropped");
        // The most recent keys are held.
        assert!(cache.get("k99", 1).is_some());
        assert!(cache.get("k98", 1).is_some());
        let one = LocationCache::new(1);
        for k in ["a", "b", "c"] {
            one.learn(k, 1, Some((&l, &r)));
            assert_eq!(one.len(), 1);
            assert!(one.get(k, 1).is_some());
        }
    }
}
