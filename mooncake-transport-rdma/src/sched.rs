//! The scheduler: queue pairs per peer and NIC pair, slices posted within limits, completion
//! queues (one per NIC, shared by all its queue pairs) polled by whichever transfer is running,
//! completions routed to the batch that owns them, broken queue pairs torn down.
//!
//! Performance-critical: every slice goes through [`Core::post`] and [`Core::poll`].
//!
//! All of it sits behind one mutex that is never held across an await: posting and polling are
//! short and non-blocking, and a transfer drives progress itself (no thread per queue pair, no
//! poller thread). A work request's id is its slot in a slab plus the slot's generation, so a
//! late completion of a torn-down queue pair never reaches a slot's next owner.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::plan::MAX_NICS;
use crate::verbs::{Completion, CompletionQueue, Device, QueuePair, WcStatus, WorkRequest, WrOp};

/// Where completions of one batch's slices are delivered: (slice index, status).
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    items: Mutex<Vec<(u32, WcStatus)>>,
}

impl Inbox {
    fn push(&self, slice: u32, status: WcStatus) {
        self.items.lock().expect("inbox").push((slice, status));
    }
    /// Moves the delivered completions into `out` (cleared first).
    pub(crate) fn take(&self, out: &mut Vec<(u32, WcStatus)>) {
        out.clear();
        std::mem::swap(&mut *self.items.lock().expect("inbox"), out);
    }
}

/// A slice ready to post, as the scheduler sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Outgoing {
    /// The batch's index of the slice.
    pub slice: u32,
    /// Local NIC and peer's NIC.
    pub local_nic: u16,
    /// The peer's NIC.
    pub remote_nic: u16,
    /// The work request (its `wr_id` is filled in by the scheduler).
    pub op: WrOp,
    /// Local address and key.
    pub local_addr: u64,
    /// Local key.
    pub lkey: u32,
    /// Remote address.
    pub remote_addr: u64,
    /// Remote key.
    pub rkey: u32,
    /// Length.
    pub len: u32,
}

/// Why a slice could not be posted now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Blocked {
    /// The path has no connected queue pair: connect it, then try again.
    Unconnected,
    /// A limit (peer, queue pair or completion queue) is reached: try after completions.
    Full,
}

/// Limits on what is in flight.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub peer_slices: usize,
    pub peer_bytes: u64,
    pub cq_depth: u32,
    pub qp_depth: u32,
}

#[derive(Debug)]
struct QpSlot {
    qp: Box<dyn QueuePair>,
    outstanding: u32,
    gen: u32,
}

#[derive(Debug, Default)]
struct PeerState {
    /// Indexed `local_nic * MAX_NICS + remote_nic`.
    paths: Vec<Option<QpSlot>>,
    inflight_slices: usize,
    inflight_bytes: u64,
}

#[derive(Debug)]
struct Live {
    inbox: Arc<Inbox>,
    slice: u32,
    peer: u32,
    path: u16,
    qp_gen: u32,
    bytes: u32,
}

#[derive(Debug, Default)]
struct Slot {
    gen: u32,
    live: Option<Live>,
}

#[derive(Debug)]
struct State {
    cqs: Vec<Arc<dyn CompletionQueue>>,
    nic_inflight: Vec<u32>,
    peers: Vec<PeerState>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    wcs: Vec<Completion>,
    /// Work requests gathered per path during one `post` call.
    staging: Vec<(u16, Vec<WorkRequest>)>,
    next_qp_gen: u32,
}

/// The devices and everything in flight on them.
#[derive(Debug)]
pub(crate) struct Core {
    pub nics: Vec<Arc<dyn Device>>,
    limits: Limits,
    state: Mutex<State>,
    /// Queue pairs this end keeps for peers, per side-channel connection; cleared at once at
    /// shutdown, so peers are cut off before `shutdown` returns.
    served: Mutex<Served>,
}

#[derive(Debug, Default)]
struct Served {
    closed: bool,
    next: u64,
    connections: HashMap<u64, HashMap<u32, Box<dyn QueuePair>>>,
}

/// One side-channel connection's queue pairs; dropping it destroys them.
#[derive(Debug)]
pub(crate) struct ServedConnection<'a> {
    core: &'a Core,
    id: u64,
}

impl ServedConnection<'_> {
    /// Keeps `qp` under `key`, replacing (destroying) the one kept before. Refused after
    /// shutdown or beyond `max` queue pairs.
    pub(crate) fn keep(&self, key: u32, qp: Box<dyn QueuePair>, max: usize) -> Result<(), String> {
        let mut served = self.core.served.lock().unwrap_or_else(|p| p.into_inner());
        if served.closed {
            return Err("shutting down".into());
        }
        let qps = served.connections.entry(self.id).or_default();
        if !qps.contains_key(&key) && qps.len() >= max {
            return Err(format!("more than {max} queue pairs"));
        }
        qps.insert(key, qp);
        Ok(())
    }

    /// Destroys the queue pair kept under `key`, if any.
    pub(crate) fn forget(&self, key: u32) {
        let old = {
            let mut served = self.core.served.lock().unwrap_or_else(|p| p.into_inner());
            served
                .connections
                .get_mut(&self.id)
                .and_then(|q| q.remove(&key))
        };
        drop(old);
    }
}

impl Drop for ServedConnection<'_> {
    fn drop(&mut self) {
        let qps = {
            let mut served = self.core.served.lock().unwrap_or_else(|p| p.into_inner());
            served.connections.remove(&self.id)
        };
        drop(qps);
    }
}

/// Completions taken from a completion queue per poll call.
const POLL_BATCH: usize = 64;
/// Most completion-queue polls per queue per [`Core::poll`] call.
const POLL_ROUNDS: usize = 16;

impl Core {
    pub(crate) fn new(nics: Vec<Arc<dyn Device>>, limits: Limits) -> mooncake_core::Result<Self> {
        let cqs = nics
            .iter()
            .map(|d| d.create_cq(limits.cq_depth))
            .collect::<mooncake_core::Result<Vec<_>>>()?;
        Ok(Core {
            state: Mutex::new(State {
                nic_inflight: vec![0; nics.len()],
                cqs,
                peers: Vec::new(),
                slots: Vec::new(),
                free: Vec::new(),
                wcs: Vec::with_capacity(POLL_BATCH),
                staging: Vec::new(),
                next_qp_gen: 1,
            }),
            nics,
            limits,
            served: Mutex::default(),
        })
    }

    /// Starts keeping queue pairs for a new side-channel connection.
    pub(crate) fn serve_connection(&self) -> ServedConnection<'_> {
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        served.next += 1;
        ServedConnection {
            core: self,
            id: served.next,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new peer's index.
    pub(crate) fn add_peer(&self) -> u32 {
        let mut s = self.lock();
        let paths = (0..self.nics.len() * MAX_NICS).map(|_| None).collect();
        s.peers.push(PeerState {
            paths,
            ..PeerState::default()
        });
        (s.peers.len() - 1) as u32
    }

    /// The completion queue of NIC `nic`, for queue pairs made outside the lock.
    pub(crate) fn cq(&self, nic: u16) -> Arc<dyn CompletionQueue> {
        self.lock().cqs[nic as usize].clone()
    }

    /// The send queue depth of queue pairs.
    pub(crate) fn qp_depth(&self) -> u32 {
        self.limits.qp_depth
    }

    /// Whether `peer` has a connected queue pair on `path`.
    pub(crate) fn connected(&self, peer: u32, path: u16) -> bool {
        self.lock().peers[peer as usize].paths[path as usize].is_some()
    }

    /// Installs a connected queue pair on `path`, tearing down the one it replaces.
    pub(crate) fn install(&self, peer: u32, path: u16, qp: Box<dyn QueuePair>) {
        let mut s = self.lock();
        let gen = s.next_qp_gen;
        s.next_qp_gen = s.next_qp_gen.wrapping_add(1);
        let old = s.peers[peer as usize].paths[path as usize].replace(QpSlot {
            qp,
            outstanding: 0,
            gen,
        });
        if let Some(old) = old {
            drop(old);
            flush_where(&mut s, |l| l.peer == peer && l.path == path);
        }
    }

    /// Posts as many of `slices` as the limits allow, in order, stopping at the first that
    /// cannot go. Returns how many were posted and, if not all, why the next one could not.
    pub(crate) fn post(
        &self,
        peer: u32,
        inbox: &Arc<Inbox>,
        slices: &[Outgoing],
    ) -> (usize, Option<Blocked>) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let mut posted = 0;
        let mut blocked = None;
        for o in slices {
            let o = *o;
            let path = o.local_nic as usize * MAX_NICS + o.remote_nic as usize;
            let p = &mut s.peers[peer as usize];
            let Some(qp) = p.paths[path].as_mut() else {
                blocked = Some(Blocked::Unconnected);
                break;
            };
            let staged = s
                .staging
                .iter()
                .find(|(sp, _)| *sp as usize == path)
                .map_or(0, |(_, v)| v.len()) as u32;
            if p.inflight_slices >= self.limits.peer_slices
                || (p.inflight_bytes > 0
                    && p.inflight_bytes + o.len as u64 > self.limits.peer_bytes)
                || qp.outstanding + staged >= self.limits.qp_depth
                || s.nic_inflight[o.local_nic as usize] >= self.limits.cq_depth
            {
                blocked = Some(Blocked::Full);
                break;
            }
            let slot = match s.free.pop() {
                Some(i) => i,
                None => {
                    s.slots.push(Slot::default());
                    (s.slots.len() - 1) as u32
                }
            };
            let entry = &mut s.slots[slot as usize];
            entry.gen = entry.gen.wrapping_add(1);
            entry.live = Some(Live {
                inbox: inbox.clone(),
                slice: o.slice,
                peer,
                path: path as u16,
                qp_gen: qp.gen,
                bytes: o.len,
            });
            let wr = WorkRequest {
                wr_id: (entry.gen as u64) << 32 | slot as u64,
                op: o.op,
                local_addr: o.local_addr,
                lkey: o.lkey,
                len: o.len,
                remote_addr: o.remote_addr,
                rkey: o.rkey,
            };
            p.inflight_slices += 1;
            p.inflight_bytes += o.len as u64;
            s.nic_inflight[o.local_nic as usize] += 1;
            match s.staging.iter_mut().find(|(sp, _)| *sp as usize == path) {
                Some((_, v)) => v.push(wr),
                None => s.staging.push((path as u16, vec![wr])),
            }
            posted += 1;
        }
        let mut staging = std::mem::take(&mut s.staging);
        for (path, wrs) in &mut staging {
            if wrs.is_empty() {
                continue;
            }
            let Some(qp) = s.peers[peer as usize].paths[*path as usize].as_mut() else {
                unreachable!("staged on a connected path");
            };
            qp.outstanding += wrs.len() as u32;
            if let Err(e) = qp.qp.post(wrs) {
                tracing::warn!(
                    path = *path,
                    posted = e.posted,
                    "posting to a queue pair failed: {}",
                    e.error
                );
                // The ones not posted never complete: fail them now, and the queue pair.
                for wr in &wrs[e.posted..] {
                    let slot = wr.wr_id as u32;
                    if let Some(live) = s.slots[slot as usize].live.take() {
                        release(s, slot, &live);
                        live.inbox.push(live.slice, WcStatus::Flushed);
                    }
                }
                break_path(s, peer, *path);
            }
            wrs.clear();
        }
        s.staging = staging;
        (posted, blocked)
    }

    /// Polls every completion queue once and routes what it finds. Returns how many
    /// completions it routed.
    pub(crate) fn poll(&self) -> usize {
        let mut guard = self.lock();
        let s = &mut *guard;
        let mut routed = 0;
        for nic in 0..s.cqs.len() {
            // Drain up to a bound per call, so one busy queue does not starve the caller.
            for _ in 0..POLL_ROUNDS {
                if s.nic_inflight[nic] == 0 {
                    break;
                }
                let mut wcs = std::mem::take(&mut s.wcs);
                wcs.clear();
                if let Err(e) = s.cqs[nic].poll(&mut wcs, POLL_BATCH) {
                    tracing::warn!(
                        nic = %self.nics[nic].attrs().name,
                        "completion queue lost completions ({e}): resetting its queue pairs"
                    );
                    self.reset_nic(s, nic);
                    s.wcs = wcs;
                    break;
                }
                for wc in &wcs {
                    routed += route(s, wc);
                }
                let full = wcs.len() == POLL_BATCH;
                s.wcs = wcs;
                if !full {
                    break;
                }
            }
        }
        routed
    }

    /// Replaces NIC `nic`'s completion queue after it lost completions: its queue pairs go
    /// (nothing more runs on them) and everything in flight on it is flushed for a retry.
    fn reset_nic(&self, s: &mut State, nic: usize) {
        for p in &mut s.peers {
            for path in (nic * MAX_NICS)..((nic + 1) * MAX_NICS) {
                p.paths[path] = None;
            }
        }
        flush_where(s, |l| l.path as usize / MAX_NICS == nic);
        match self.nics[nic].create_cq(self.limits.cq_depth) {
            Ok(cq) => s.cqs[nic] = cq,
            Err(e) => tracing::error!(
                nic = %self.nics[nic].attrs().name,
                "cannot replace a completion queue: {e}"
            ),
        }
    }

    /// Tears down the queue pairs carrying any slice of `inbox`'s batch (a timed-out or
    /// abandoned batch), so nothing of it runs any more; other batches' slices on them are
    /// flushed for a retry.
    pub(crate) fn abandon(&self, inbox: &Arc<Inbox>) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let paths: Vec<(u32, u16)> = s
            .slots
            .iter()
            .filter_map(|slot| slot.live.as_ref())
            .filter(|l| Arc::ptr_eq(&l.inbox, inbox))
            .map(|l| (l.peer, l.path))
            .collect();
        for (peer, path) in paths {
            break_path(s, peer, path);
        }
    }

    /// Tears down every queue pair (shutdown): everything in flight is flushed.
    pub(crate) fn close_all(&self) {
        let served = {
            let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
            served.closed = true;
            std::mem::take(&mut served.connections)
        };
        drop(served);
        let mut guard = self.lock();
        let s = &mut *guard;
        for p in &mut s.peers {
            p.paths.iter_mut().for_each(|q| *q = None);
        }
        flush_where(s, |_| true);
    }
}

/// Frees `slot` and gives back what `live` held of the limits.
fn release(s: &mut State, slot: u32, live: &Live) {
    let p = &mut s.peers[live.peer as usize];
    p.inflight_slices -= 1;
    p.inflight_bytes -= live.bytes as u64;
    if let Some(qp) = p.paths[live.path as usize].as_mut() {
        if qp.gen == live.qp_gen {
            qp.outstanding -= 1;
        }
    }
    s.nic_inflight[live.path as usize / MAX_NICS] -= 1;
    s.free.push(slot);
}

/// Routes one completion to its batch; a failed one breaks its queue pair. Returns 1 when the
/// completion was still awaited.
fn route(s: &mut State, wc: &Completion) -> usize {
    let slot = wc.wr_id as u32;
    let gen = (wc.wr_id >> 32) as u32;
    let Some(entry) = s.slots.get_mut(slot as usize) else {
        return 0;
    };
    if entry.gen != gen {
        return 0;
    }
    let Some(live) = entry.live.take() else {
        return 0;
    };
    release(s, slot, &live);
    live.inbox.push(live.slice, wc.status);
    if wc.status != WcStatus::Success {
        let current = s.peers[live.peer as usize].paths[live.path as usize]
            .as_ref()
            .is_some_and(|q| q.gen == live.qp_gen);
        if current {
            // The queue pair is in the error state now: replace it on the next use.
            break_path(s, live.peer, live.path);
        }
    }
    1
}

/// Destroys the queue pair of `path` and flushes what was in flight on it.
fn break_path(s: &mut State, peer: u32, path: u16) {
    s.peers[peer as usize].paths[path as usize] = None;
    flush_where(s, |l| l.peer == peer && l.path == path);
}

/// Completes every live slot matching `pred` as flushed (its queue pair is gone).
fn flush_where(s: &mut State, pred: impl Fn(&Live) -> bool) {
    let mut lives = Vec::new();
    for (i, slot) in s.slots.iter_mut().enumerate() {
        if slot.live.as_ref().is_some_and(&pred) {
            lives.push((i as u32, slot.live.take().expect("checked")));
        }
    }
    for (i, live) in lives {
        release(s, i, &live);
        live.inbox.push(live.slice, WcStatus::Flushed);
    }
}
