//! Replica placement: which segments receive the replicas of a put or a copy.
//!
//! Candidates are the mounted segments with a free range large enough. They are ordered by the
//! configured [`AllocationStrategy`], then the put's preferred segments are moved to the front.
//! Replicas then go, in that order, to (1) the preferred segments, (2) segments on hosts that
//! hold no replica yet, (3) any other segment — so replicas always land on distinct segments, and
//! on distinct hosts whenever enough hosts have room (upstream only guarantees distinct
//! segments). With `prefer_alloc_in_same_node`, segments on the anchor host (the first preferred
//! segment's, else the requester's) come first and the distinct-host rule is off.

use std::collections::BTreeSet;

use super::config::{AllocationStrategy, ReplicateConfig};
use super::replica::Replica;
use super::types::{ClientId, ReplicaId, SegmentId};
use super::Master;
use mooncake_core::allocator::{Allocation, Allocator};

/// One placement request.
#[derive(Debug)]
pub(crate) struct Placement<'a> {
    /// Bytes per replica.
    pub(crate) size: u64,
    /// Replicas wanted.
    pub(crate) count: usize,
    /// The client asking (for `local_first` and same-node placement).
    pub(crate) requester: Option<ClientId>,
    /// The put's options (preferred segments, same node), if any.
    pub(crate) config: Option<&'a ReplicateConfig>,
    /// Segments that must not be used (they hold a replica already).
    pub(crate) exclude: &'a BTreeSet<SegmentId>,
    /// Hosts that hold a replica already.
    pub(crate) avoid_hosts: BTreeSet<String>,
}

impl Master {
    /// New replicas, still being written, in the ranges `placed` gave (each takes the next
    /// replica id).
    pub(crate) fn processing_replicas(
        &mut self,
        placed: Vec<(SegmentId, Allocation)>,
    ) -> Vec<Replica> {
        placed
            .into_iter()
            .map(|(seg, alloc)| {
                let id = ReplicaId(self.next_replica_id);
                self.next_replica_id += 1;
                Replica::processing(id, seg, alloc)
            })
            .collect()
    }

    /// Allocates up to `req.count` ranges on distinct segments; fewer (possibly none) when space
    /// is short. Consumes randomness from the master's RNG.
    pub(crate) fn place(&mut self, req: Placement<'_>) -> Vec<(SegmentId, Allocation)> {
        let g = self.config.allocation_granularity;
        let Some(rounded) = req.size.checked_add(g - 1).map(|v| v & !(g - 1)) else {
            return Vec::new();
        };
        if req.count == 0 || rounded == 0 {
            return Vec::new();
        }
        let mut order: Vec<SegmentId> = self
            .segments
            .values()
            .filter(|s| {
                !req.exclude.contains(&s.id)
                    && s.allocator.largest_free() >= rounded
                    && s.no_alloc_before <= self.now
            })
            .map(|s| s.id)
            .collect();
        match self.config.allocation_strategy {
            AllocationStrategy::Random => self.rng.shuffle(&mut order),
            AllocationStrategy::FreeRatioFirst => {
                let segs = &self.segments;
                let free = |id: &SegmentId| {
                    let a = &segs[id].allocator;
                    (a.capacity() - a.used(), a.capacity().max(1))
                };
                // free_a / cap_a > free_b / cap_b, compared without floats.
                order.sort_by(|a, b| {
                    let (fa, ca) = free(a);
                    let (fb, cb) = free(b);
                    (fb as u128 * ca as u128)
                        .cmp(&(fa as u128 * cb as u128))
                        .then(a.cmp(b))
                });
            }
            AllocationStrategy::LocalFirst => {
                self.rng.shuffle(&mut order);
                let segs = &self.segments;
                order.sort_by_key(|id| Some(segs[id].client) != req.requester);
            }
        }

        let preferred: Vec<SegmentId> = req
            .config
            .map(|c| c.preferred())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|name| self.segment_names.get(name).copied())
            .filter(|id| order.contains(id))
            .collect();
        order.retain(|id| !preferred.contains(id));
        let mut order: Vec<SegmentId> = preferred.iter().copied().chain(order).collect();

        let same_node = req.config.is_some_and(|c| c.prefer_alloc_in_same_node);
        if same_node {
            let anchor = req
                .config
                .and_then(|c| {
                    c.preferred()
                        .into_iter()
                        .find_map(|name| self.segment_names.get(name))
                })
                .or_else(|| {
                    let client = req.requester?;
                    self.clients.get(&client)?.segments.iter().next()
                })
                .map(|id| self.segments[id].host.clone());
            if let Some(anchor) = anchor {
                let segs = &self.segments;
                order.sort_by_key(|id| segs[id].host != anchor);
            }
        }

        let mut chosen: Vec<(SegmentId, Allocation)> = Vec::with_capacity(req.count);
        let mut hosts = req.avoid_hosts;
        for pass in 0..3 {
            for id in &order {
                if chosen.len() == req.count {
                    return chosen;
                }
                if chosen.iter().any(|(c, _)| c == id) {
                    continue;
                }
                let seg = self.segments.get_mut(id).expect("candidates are mounted");
                let eligible = match pass {
                    0 => preferred.contains(id),
                    1 => same_node || !hosts.contains(&seg.host),
                    _ => true,
                };
                if !eligible {
                    continue;
                }
                if let Some(a) = seg.allocator.allocate(req.size) {
                    hosts.insert(seg.host.clone());
                    chosen.push((*id, a));
                }
            }
        }
        chosen
    }
}
