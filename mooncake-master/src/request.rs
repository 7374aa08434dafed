//! Requests that are applied at most once: a retry is answered with the first attempt's outcome.
//!
//! A client that loses a master's answer (a leader dies after applying its command and before
//! replying, a reply is dropped, an attempt times out) cannot tell whether the command was
//! applied, so it sends it again, to the same master or to the next leader. Applied twice, a
//! remove answers `OBJECT_NOT_FOUND` to a caller whose remove succeeded, a copy task is created
//! twice, a reservation is granted twice. So a client names each mutating request with a
//! [`RequestId`] (its [`ClientId`] and a sequence number of its own) and sends
//! [`Command::Once`](super::Command::Once); the master remembers each id's response, in the
//! replicated state (so in snapshots too), and answers a repeat of the id with it without
//! applying the command again. A retry that reaches a new leader after a failover meets the
//! first attempt's entry in the log before its own, and gets its outcome.
//!
//! Memory stays bounded:
//! - a client tells, with each request, the sequence number below which all its requests have
//!   been answered (`done_below`); those are forgotten at once, so a client's remembered
//!   outcomes are about the requests it has in flight;
//! - an outcome is forgotten [`REQUEST_MEMORY_MS`] after its first apply (long after the
//!   client's retries have given up), when its client expires, and, beyond
//!   [`REQUESTS_PER_CLIENT`] outcomes of one client, the lowest sequence numbers first;
//! - all outcomes together weigh at most [`REQUEST_MEMORY_WEIGHT`] (one per response plus one
//!   per item or replica it lists); past that the oldest go first.
//!
//! A response that hands out space (PutStart and UpsertStart with their batch forms, Reserve)
//! or tasks to execute (FetchTasks) is only as good as what it names: between the first
//! attempt and its retry the write may have been removed, the reservation dropped with its
//! segment, the task timed out, and the space given to another object. So such a response is
//! given again only while every range it hands out is still held for the requester; otherwise
//! the request is applied again (PutStart then returns the write in progress if there still is
//! one), and a FetchTasks gets the assignments of the first answer that are still its own.
//! Nobody is ever handed space that is someone else's.
//!
//! A request whose id was forgotten is applied as new, as a request without an id always is;
//! the bounds are set so that a client's retries end long before that. Clients that send no ids
//! keep working: PutStart, PutEnd and RemountSegments are idempotent for their writer on their
//! own (see [`put`](super::put)), the rest is applied once per arrival.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer, Serialize};

use super::command::{Command, Response};
use super::put::{PutItem, PutStartResponse};
use super::task::TaskStatus;
use super::types::{ClientId, Timestamp};
use super::Master;

/// How long an outcome is remembered after its first apply, in ms: well past how long a client
/// keeps retrying one request (a few election timeouts).
pub const REQUEST_MEMORY_MS: u64 = 60_000;

/// Most outcomes remembered for one client; the lowest sequence numbers are forgotten first.
pub const REQUESTS_PER_CLIENT: usize = 1024;

/// Most weight of all remembered outcomes (a response weighs one plus one per item or replica
/// it lists); the oldest are forgotten first.
pub const REQUEST_MEMORY_WEIGHT: u64 = 1 << 18;

/// Names one request of a client across its retries.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct RequestId {
    /// The client that issues the request (a store client's id, fresh in every process).
    pub client: ClientId,
    /// The client's sequence number for the request, counting up from 1.
    pub seq: u64,
}

/// One remembered outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Outcome {
    /// When it was first applied.
    at: Timestamp,
    /// [`fingerprint`] of the command.
    command: u64,
    response: Response,
}

/// A stable 64-bit digest of `command` (FNV-1a over its encoding): a repeat of an id must
/// repeat its command.
pub(crate) fn fingerprint(command: &Command) -> u64 {
    let bytes = postcard::to_allocvec(command).expect("commands always serialize");
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The remembered outcomes, part of the replicated state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct Remembered {
    by_client: BTreeMap<ClientId, BTreeMap<u64, Outcome>>,
    /// `(first applied, client, seq)` of every outcome: the order they are forgotten in.
    /// Derived (rebuilt on restore).
    #[serde(skip)]
    order: BTreeSet<(Timestamp, ClientId, u64)>,
    /// Sum of the outcomes' weights. Derived.
    #[serde(skip)]
    weight: u64,
}

/// What an outcome counts against [`REQUEST_MEMORY_WEIGHT`].
fn weight(r: &Response) -> u64 {
    let items = match r {
        Response::UnitBatch(v) => v.len(),
        Response::PutStart(Ok(p)) => p.replicas.len(),
        Response::PutStartBatch(v) => v
            .iter()
            .map(|p| 1 + p.as_ref().map_or(0, |p| p.replicas.len()))
            .sum(),
        Response::Replicas(Ok(l)) => l.replicas.len(),
        Response::ReplicasBatch(v) => v
            .iter()
            .map(|l| 1 + l.as_ref().map_or(0, |l| l.replicas.len()))
            .sum(),
        Response::ExistsBatch(v) => v.len(),
        Response::Tasks(v) => v.len(),
        _ => 0,
    };
    1 + items as u64
}

impl Remembered {
    /// The fingerprint of the command first applied for `id` and its response, if remembered.
    pub(crate) fn get(&self, id: RequestId) -> Option<(u64, &Response)> {
        self.by_client
            .get(&id.client)
            .and_then(|m| m.get(&id.seq))
            .map(|o| (o.command, &o.response))
    }

    /// Forgets what has aged out at `now` and what `client` says it has been answered for
    /// (sequence numbers below `done_below`).
    pub(crate) fn forget_done(&mut self, now: Timestamp, client: ClientId, done_below: u64) {
        while let Some(&(at, c, seq)) = self.order.first() {
            if at.plus(REQUEST_MEMORY_MS) > now {
                break;
            }
            self.forget(c, seq);
        }
        let Some(m) = self.by_client.get(&client) else {
            return;
        };
        let done: Vec<u64> = m.range(..done_below).map(|(s, _)| *s).collect();
        for seq in done {
            self.forget(client, seq);
        }
    }

    /// Remembers `response` as the outcome of `id`, first applied at `now`, then forgets what
    /// the bounds ask.
    pub(crate) fn remember(
        &mut self,
        now: Timestamp,
        id: RequestId,
        command: u64,
        response: Response,
    ) {
        // A grant that no longer held was applied again: its new outcome replaces the first.
        self.forget(id.client, id.seq);
        self.weight += weight(&response);
        self.order.insert((now, id.client, id.seq));
        self.by_client.entry(id.client).or_default().insert(
            id.seq,
            Outcome {
                at: now,
                command,
                response,
            },
        );
        while self
            .by_client
            .get(&id.client)
            .is_some_and(|m| m.len() > REQUESTS_PER_CLIENT)
        {
            let lowest = *self.by_client[&id.client].keys().next().expect("non-empty");
            self.forget(id.client, lowest);
        }
        while self.weight > REQUEST_MEMORY_WEIGHT {
            let &(_, c, seq) = self.order.first().expect("weight comes from outcomes");
            self.forget(c, seq);
        }
    }

    /// Forgets every outcome of `client` (it expired).
    pub(crate) fn forget_client(&mut self, client: ClientId) {
        let Some(m) = self.by_client.remove(&client) else {
            return;
        };
        for (seq, o) in m {
            self.order.remove(&(o.at, client, seq));
            self.weight -= weight(&o.response);
        }
    }

    fn forget(&mut self, client: ClientId, seq: u64) {
        let Some(m) = self.by_client.get_mut(&client) else {
            return;
        };
        if let Some(o) = m.remove(&seq) {
            self.order.remove(&(o.at, client, seq));
            self.weight -= weight(&o.response);
        }
        if m.is_empty() {
            self.by_client.remove(&client);
        }
    }

    /// Rebuilds the derived order and weight (after a restore).
    pub(crate) fn rebuild(&mut self) {
        let (order, weight) = self.derived();
        self.order = order;
        self.weight = weight;
    }

    fn derived(&self) -> (BTreeSet<(Timestamp, ClientId, u64)>, u64) {
        let mut order = BTreeSet::new();
        let mut total = 0;
        for (c, m) in &self.by_client {
            for (seq, o) in m {
                order.insert((o.at, *c, *seq));
                total += weight(&o.response);
            }
        }
        (order, total)
    }

    /// How many outcomes are remembered, and their weight.
    pub(crate) fn size(&self) -> (usize, u64) {
        (self.order.len(), self.weight)
    }

    /// Checks the derived order and weight and the bounds.
    pub(crate) fn check(&self) -> Result<(), String> {
        let (order, total) = self.derived();
        if order != self.order || total != self.weight {
            return Err(format!(
                "remembered requests: index of {} at weight {} disagrees with {} outcomes at \
                 weight {total}",
                self.order.len(),
                self.weight,
                order.len()
            ));
        }
        if self.weight > REQUEST_MEMORY_WEIGHT {
            return Err(format!(
                "remembered requests weigh {} > {REQUEST_MEMORY_WEIGHT}",
                self.weight
            ));
        }
        if let Some((c, m)) = self
            .by_client
            .iter()
            .find(|(_, m)| m.len() > REQUESTS_PER_CLIENT || m.is_empty())
        {
            return Err(format!("client {c} has {} remembered requests", m.len()));
        }
        Ok(())
    }
}

impl Master {
    /// What to answer a repeat of `command`, first answered `first`: `first` itself, or what is
    /// left of it that still holds, or `None` when the command must be applied again (see the
    /// [module docs](self)).
    pub(crate) fn replayable(
        &self,
        now: Timestamp,
        command: &Command,
        first: &Response,
    ) -> Option<Response> {
        match (command, first) {
            (
                Command::PutStart { client_id, key, .. }
                | Command::UpsertStart { client_id, key, .. },
                Response::PutStart(Ok(granted)),
            ) => self
                .still_writing(*client_id, key, granted)
                .then(|| first.clone()),
            (
                Command::BatchPutStart {
                    client_id, items, ..
                }
                | Command::BatchUpsertStart {
                    client_id, items, ..
                },
                Response::PutStartBatch(results),
            ) => (items.len() == results.len()
                && items.iter().zip(results).all(|(PutItem { key, .. }, r)| {
                    r.as_ref()
                        .map_or(true, |g| self.still_writing(*client_id, key, g))
                }))
            .then(|| first.clone()),
            (Command::Reserve { client_id, .. }, Response::Reserved(Ok(grant))) => self
                .reservations
                .get(&grant.id)
                .is_some_and(|r| r.client == *client_id && now < r.expires_at)
                .then(|| first.clone()),
            (Command::FetchTasks { client_id, .. }, Response::Tasks(assignments)) => {
                Some(Response::Tasks(
                    assignments
                        .iter()
                        .filter(|a| {
                            self.tasks.get(&a.task_id).is_some_and(|t| {
                                t.status == TaskStatus::Processing
                                    && t.assigned.is_some_and(|(c, _)| c == *client_id)
                                    && self.descriptors(&t.dests, a.size) == a.destinations
                            })
                        })
                        .cloned()
                        .collect(),
                ))
            }
            _ => Some(first.clone()),
        }
    }

    /// Whether `client`'s write of `key` that was handed `granted` is still in progress, on the
    /// same ranges.
    fn still_writing(&self, client: ClientId, key: &str, granted: &PutStartResponse) -> bool {
        self.objects
            .get(key)
            .and_then(|o| o.pending.as_ref())
            .is_some_and(|p| {
                p.client == client && self.descriptors(&p.replicas, p.size) == granted.replicas
            })
    }
}

thread_local! {
    /// Depth of [`Command::Once`](super::Command::Once) decodes on this thread.
    static ONCE_DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Decodes the command inside a [`Command::Once`](super::Command::Once), refusing another
/// `Once` inside it before decoding further: a peer's bytes cannot nest commands deep enough to
/// exhaust the stack.
pub(crate) fn deserialize_inner<'de, D: Deserializer<'de>>(d: D) -> Result<Box<Command>, D::Error> {
    struct Depth;
    impl Drop for Depth {
        fn drop(&mut self) {
            ONCE_DEPTH.with(|c| c.set(c.get() - 1));
        }
    }
    let depth = ONCE_DEPTH.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    let _depth = Depth;
    if depth > 1 {
        return Err(serde::de::Error::custom(
            "a Once command inside a Once command",
        ));
    }
    Command::deserialize(d).map(Box::new)
}
