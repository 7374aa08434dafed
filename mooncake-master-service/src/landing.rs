//! Landed writes, as storage nodes report them, so the master can commit a reserved put the
//! moment its bytes are in place.
//!
//! Performance-critical: every overlapped commit waits here, every landing notice records here.
//!
//! A client writing into its reservation asks the storage node to report the WRITE's landing
//! ([`TransferRequest::with_landing_notice`](mooncake_core::TransferRequest::with_landing_notice))
//! and sends its commit to the master at the same time, instead of after the WRITE's
//! acknowledgement. The master applies the commit once every range it names has been reported
//! landed on its segment, or answers that they were not within the wait the client allowed (the
//! client then commits the ordinary way). The critical path of a put goes from WRITE, its
//! acknowledgement, commit and answer (four one-way trips) to WRITE, notice and answer (three;
//! two when the master runs inside the storage node).
//!
//! Soundness: a range counts as landed only through a report made after its bytes were in
//! memory, by who may know that: the service records a report only from the segment's owner (its
//! storage node) or from the writer whose reservation holds every range it names (see
//! `MasterService`'s handling of `Landed`); an in-process storage node's reports are function
//! calls. Reports are consumed by the commit that uses them, forgotten when the master grants
//! their space as a new reservation (a report of an earlier, uncommitted write never vouches for
//! a later one) and when a member becomes leader (reports it missed while following went
//! elsewhere), and dropped after [`KEEP`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mooncake_core::{Clock, SystemClock};
use tokio::time::Instant;

/// How long an unclaimed report is kept.
pub const KEEP: Duration = Duration::from_secs(5);

/// Most reported pieces kept per segment; past this, the stale ones go, then all of them.
const MAX_PIECES: usize = 16_384;

/// Most segments with reports kept at once (reports name their segment); past this, segments with nothing fresh go, and then new segments' reports are
/// dropped (their commits wait, then commit the ordinary way).
const MAX_SEGMENTS: usize = 4_096;

/// Longest a commit may wait for its writes to be reported.
pub const MAX_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug)]
struct Piece {
    end: u64,
    at: Instant,
}

/// Disjoint reported ranges per segment, by start address.
#[derive(Debug)]
pub struct Landings {
    segments: Mutex<HashMap<String, BTreeMap<u64, Piece>>>,
    changed: tokio::sync::Notify,
    /// Segments whose storage node runs in this process (reports are function calls).
    local: Mutex<std::collections::HashSet<String>>,
    /// Ages reports and times waits.
    clock: Arc<dyn Clock>,
}

impl Default for Landings {
    /// On the system clock.
    fn default() -> Self {
        Landings::with_clock(Arc::new(SystemClock))
    }
}

/// Removes every reported byte in `[start, end)`, keeping the parts of pieces outside it.
fn cut(map: &mut BTreeMap<u64, Piece>, start: u64, end: u64) {
    if let Some((&s, &p)) = map.range(..start).next_back() {
        if p.end > start {
            map.insert(s, Piece { end: start, ..p });
            if p.end > end {
                map.insert(end, p);
            }
        }
    }
    let inside: Vec<(u64, Piece)> = map.range(start..end).map(|(&s, &p)| (s, p)).collect();
    for (s, p) in inside {
        map.remove(&s);
        if p.end > end {
            map.insert(end, p);
        }
    }
}

/// Whether `[start, end)` is wholly reported.
fn covered(map: &BTreeMap<u64, Piece>, start: u64, end: u64) -> bool {
    let mut at = start;
    while at < end {
        match map.range(..=at).next_back() {
            Some((_, p)) if p.end > at => at = p.end,
            _ => return false,
        }
    }
    true
}

impl Landings {
    /// No reports yet; reports age and waits end by `clock`'s monotonic time.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Landings {
            segments: Mutex::default(),
            changed: tokio::sync::Notify::new(),
            local: Mutex::default(),
            clock,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeMap<u64, Piece>>> {
        self.segments.lock().expect("landings lock")
    }

    /// Records that `(address, length)` ranges of `segment` landed, and wakes the waiters.
    pub fn record(&self, segment: &str, ranges: &[(u64, u64)]) {
        let now = self.clock.monotonic();
        {
            let mut segments = self.lock();
            if !segments.contains_key(segment) && segments.len() >= MAX_SEGMENTS {
                segments.retain(|_, m| m.values().any(|p| now.duration_since(p.at) < KEEP));
                if segments.len() >= MAX_SEGMENTS {
                    tracing::warn!(segment, "landing reports of too many segments; dropped");
                    return;
                }
            }
            let map = match segments.get_mut(segment) {
                Some(m) => m,
                None => segments.entry(segment.to_owned()).or_default(),
            };
            for &(addr, len) in ranges {
                let Some(end) = addr.checked_add(len).filter(|_| len > 0) else {
                    continue;
                };
                cut(map, addr, end);
                map.insert(addr, Piece { end, at: now });
            }
            if map.len() > MAX_PIECES {
                map.retain(|_, p| now.duration_since(p.at) < KEEP);
                if map.len() > MAX_PIECES {
                    tracing::warn!(segment, "too many unclaimed landing reports; dropping them");
                    map.clear();
                }
            }
        }
        self.changed.notify_waiters();
    }

    /// [`Landings::record`] for a storage node in this process, which also marks its segment as
    /// local.
    pub fn record_local(&self, segment: &str, ranges: &[(u64, u64)]) {
        {
            let mut local = self.local.lock().expect("landings lock");
            if !local.contains(segment) {
                local.insert(segment.to_owned());
            }
        }
        if !ranges.is_empty() {
            self.record(segment, ranges);
        }
    }

    /// Whether `segment`'s storage node reports from this process: a commit waiting for its
    /// reports waits for no network hop, so committing on landing pays there.
    pub fn is_local(&self, segment: &str) -> bool {
        self.local.lock().expect("landings lock").contains(segment)
    }

    /// When every range of `ranges` on `segment` has been reported, consumes the reports and
    /// returns true; otherwise changes nothing.
    pub fn take_if_landed(&self, segment: &str, ranges: &[(u64, u64)]) -> bool {
        let mut segments = self.lock();
        let Some(map) = segments.get_mut(segment) else {
            return ranges.iter().all(|&(_, len)| len == 0);
        };
        let all = ranges.iter().all(|&(addr, len)| {
            addr.checked_add(len)
                .is_some_and(|end| covered(map, addr, end))
        });
        if all {
            for &(addr, len) in ranges {
                cut(map, addr, addr + len);
            }
        }
        all
    }

    /// Waits up to `wait` (at most [`MAX_WAIT`]) for every range to be reported, then consumes
    /// the reports; false when they were not all reported in time.
    pub async fn wait_landed(&self, segment: &str, ranges: &[(u64, u64)], wait: Duration) -> bool {
        let deadline = self.clock.monotonic() + wait.min(MAX_WAIT);
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.take_if_landed(segment, ranges) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Forgets reports on `[addr, addr + len)` of `segment`: its space was handed out anew.
    pub fn forget(&self, segment: &str, addr: u64, len: u64) {
        if let Some(map) = self.lock().get_mut(segment) {
            cut(map, addr, addr.saturating_add(len));
        }
    }

    /// Forgets every report.
    pub fn clear(&self) {
        self.lock().clear();
    }

    #[cfg(test)]
    fn pieces(&self) -> usize {
        self.lock().values().map(BTreeMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pieces_in_any_order_cover_a_range_once() {
        let l = Landings::default();
        assert!(!l.take_if_landed("s", &[(100, 50)]));
        l.record("s", &[(125, 25)]);
        assert!(!l.take_if_landed("s", &[(100, 50)]), "half of it");
        l.record("other", &[(100, 25)]);
        assert!(!l.take_if_landed("s", &[(100, 50)]), "another segment");
        l.record("s", &[(100, 25)]);
        assert!(
            !l.take_if_landed("s", &[(100, 50), (300, 1)]),
            "all or nothing"
        );
        assert!(l.take_if_landed("s", &[(100, 50)]));
        assert!(!l.take_if_landed("s", &[(100, 50)]), "consumed");
        assert!(!l.take_if_landed("s", &[(100, 1)]));
        l.record("s", &[(0, 1000)]);
        l.forget("s", 400, 100);
        assert!(l.take_if_landed("s", &[(0, 400), (500, 500)]));
        assert!(!l.take_if_landed("s", &[(450, 10)]), "forgotten");
        l.record("s", &[(0, 10)]);
        l.clear();
        assert!(!l.take_if_landed("s", &[(0, 10)]));
        assert!(l.take_if_landed("s", &[]));
        l.record("s", &[(u64::MAX - 1, 5), (7, 0)]);
        assert_eq!(l.pieces(), 0, "overflowing and empty reports are ignored");
    }

    #[tokio::test(start_paused = true)]
    async fn reports_naming_many_segments_stay_bounded() {
        let l = Landings::with_clock(Arc::new(mooncake_core::VirtualClock::new(0)));
        for i in 0..MAX_SEGMENTS + 10 {
            l.record(&format!("junk-{i}"), &[(0, 8)]);
        }
        assert_eq!(l.lock().len(), MAX_SEGMENTS);
        // While every kept report is fresh, a new segment's reports are dropped (its commit
        // then goes the ordinary way)...
        l.record("real", &[(0, 8)]);
        assert!(!l.take_if_landed("real", &[(0, 8)]));
        // ... and once they are stale, they make room.
        tokio::time::advance(KEEP).await;
        l.record("real", &[(0, 8)]);
        assert!(l.take_if_landed("real", &[(0, 8)]));
        assert!(l.lock().len() <= 1);
    }

    #[tokio::test]
    async fn a_waiting_commit_wakes_on_the_last_piece_or_gives_up() {
        let l = Arc::new(Landings::default());
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move {
                l.wait_landed("s", &[(0, 8192)], Duration::from_secs(10))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        l.record("s", &[(4096, 4096)]);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        l.record("s", &[(0, 4096)]);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap());
        let started = std::time::Instant::now();
        assert!(
            !l.wait_landed("s", &[(0, 1)], Duration::from_millis(50))
                .await
        );
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    proptest! {
        /// Against a byte-set model: after any records, forgets and takes, a range is
        /// reported landed exactly when every byte of it is in the model.
        #[test]
        fn matches_a_byte_model(ops in proptest::collection::vec((0u8..3, 0u64..64, 1u64..24), 1..60)) {
            let l = Landings::default();
            let mut model = [false; 96];
            for (kind, addr, len) in ops {
                let r = addr as usize..(addr + len) as usize;
                match kind {
                    0 => {
                        l.record("s", &[(addr, len)]);
                        model[r].iter_mut().for_each(|b| *b = true);
                    }
                    1 => {
                        l.forget("s", addr, len);
                        model[r].iter_mut().for_each(|b| *b = false);
                    }
                    _ => {
                        let want = model[r.clone()].iter().all(|&b| b);
                        prop_assert_eq!(l.take_if_landed("s", &[(addr, len)]), want);
                        if want {
                            model[r].iter_mut().for_each(|b| *b = false);
                        }
                    }
                }
                let map = l.lock();
                if let Some(m) = map.get("s") {
                    let mut last = 0;
                    for (&s, p) in m {
                        prop_assert!(s >= last && p.end > s, "disjoint, non-empty pieces");
                        last = p.end;
                    }
                }
            }
        }
    }
}
