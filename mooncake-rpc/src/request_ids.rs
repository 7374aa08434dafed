//! [`RequestIds`]: naming a client's state-changing commands, so that their retries are
//! answered with the first outcome (see [`Command::Once`]).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use mooncake_core::Result;
use mooncake_master::{ClientId, Command, RequestId, Response, Timestamp};

use crate::master::{apply_via, MasterApi};

/// Names one client's commands with request ids: its client id and a sequence number counting
/// up from 1. Each named command also tells the master which earlier ids it may forget (every
/// id below the lowest still in flight). Use one per client id, shared by all its calls.
#[derive(Debug)]
pub struct RequestIds {
    client: ClientId,
    next: AtomicU64,
    /// Sequence numbers whose calls have not returned.
    in_flight: Mutex<BTreeSet<u64>>,
}

/// A named command's sequence number, counted in flight until dropped (when its call has
/// returned, whatever the outcome).
#[derive(Debug)]
pub struct InFlight<'a> {
    ids: &'a RequestIds,
    seq: Option<u64>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(seq) = self.seq {
            self.ids.in_flight.lock().expect("request ids").remove(&seq);
        }
    }
}

impl RequestIds {
    /// Ids of `client` (it must be unique to this process: a store's id is).
    pub fn new(client: ClientId) -> Self {
        RequestIds {
            client,
            next: AtomicU64::new(1),
            in_flight: Mutex::new(BTreeSet::new()),
        }
    }

    /// `command` as [`Command::Once`] with a fresh id when it wants one
    /// ([`Command::wants_request_id`]), else unchanged. Send it, retries included, before
    /// dropping the guard.
    pub fn name(&self, command: Command) -> (Command, InFlight<'_>) {
        if !command.wants_request_id() {
            return (
                command,
                InFlight {
                    ids: self,
                    seq: None,
                },
            );
        }
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let done_below = {
            let mut in_flight = self.in_flight.lock().expect("request ids");
            in_flight.insert(seq);
            *in_flight.first().expect("just inserted")
        };
        let command = Command::Once {
            id: RequestId {
                client: self.client,
                seq,
            },
            done_below,
            command: Box::new(command),
        };
        (
            command,
            InFlight {
                ids: self,
                seq: Some(seq),
            },
        )
    }
}

/// [`apply_via`] with `command` named by `ids` when it changes state: a retry inside the call
/// (at another member of a group, after a failover) is answered with the first attempt's
/// outcome.
pub async fn apply_named(
    master: &dyn MasterApi,
    ids: &RequestIds,
    command: Command,
) -> Result<(Timestamp, Response)> {
    let (command, _in_flight) = ids.name(command);
    apply_via(master, command).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_state_changes_and_tells_what_is_done() {
        let ids = RequestIds::new(ClientId(7));
        let remove = || Command::Remove {
            key: "k".into(),
            force: false,
        };
        let (get, g) = ids.name(Command::GetReplicaList { key: "k".into() });
        assert!(matches!(get, Command::GetReplicaList { .. }));
        drop(g);
        let (a, ga) = ids.name(remove());
        let (b, gb) = ids.name(remove());
        let Command::Once { id, done_below, .. } = &a else {
            panic!("{a:?}")
        };
        assert_eq!((id.client, id.seq, *done_below), (ClientId(7), 1, 1));
        let Command::Once { id, done_below, .. } = &b else {
            panic!("{b:?}")
        };
        assert_eq!((id.seq, *done_below), (2, 1), "1 is still in flight");
        drop(ga);
        let (c, _gc) = ids.name(remove());
        let Command::Once { id, done_below, .. } = &c else {
            panic!("{c:?}")
        };
        assert_eq!((id.seq, *done_below), (3, 2));
        drop(gb);
        let (d, _gd) = ids.name(remove());
        let Command::Once { done_below, .. } = &d else {
            panic!("{d:?}")
        };
        assert_eq!(*done_below, 3);
    }
}
