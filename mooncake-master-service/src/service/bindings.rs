//! Over TLS, which certificate acts for each client id.
//!
//! A storage node's client id names it in every command that changes what it owns (its
//! segments, its puts, its tasks) and in its landing reports. With certificates, the first certificate that uses an id owns
//! it, and a request naming that id over another certificate is refused (`ILLEGAL_CLIENT`), so a
//! member that learns another node's id cannot unmount its segment, revoke its puts or take its
//! tasks. Members of the group (role `master`) act for anyone: they forward clients' requests.
//!
//! The table lives in the serving process's memory: after a leader change, the first
//! certificate to use an id on the new leader owns it (a storage node heartbeats within a second,
//! so an intruder would have to know the id and win that race). It is bounded: an id unused for
//! [`IDLE`] is forgotten, one certificate owns at most [`PER_CERTIFICATE`] ids, and the table at
//! most [`MAX_IDS`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mooncake_core::{Error, Result};
use mooncake_master::{ClientId, Command};
use mooncake_rpc::{MasterRequest, PeerIdentity, Role};

/// An id unused this long is forgotten (and may be owned by another certificate).
pub(crate) const IDLE: Duration = Duration::from_secs(600);
/// Most ids one certificate owns at once (a node runs a few stores, not thousands).
pub(crate) const PER_CERTIFICATE: usize = 256;
/// Most ids in the table.
pub(crate) const MAX_IDS: usize = 100_000;

/// The client ids a request acts for: the one its command names, if any, and, for a command
/// named with a request id ([`Command::Once`]), the id's client, whose remembered outcomes it
/// reads and tells the master to forget.
pub(crate) fn claimed_clients(request: &MasterRequest) -> Vec<ClientId> {
    let command = match request {
        MasterRequest::Apply(command) | MasterRequest::CommitWhenLanded { command, .. } => command,
        // A landing report acts for its reporter (the segment's owner, or a writer vouching
        // for its own reservation): another certificate may not report in its name.
        MasterRequest::Landed { client_id, .. } => return vec![*client_id],
        _ => return Vec::new(),
    };
    let mut ids = Vec::new();
    if let Command::Once { id, .. } = command {
        ids.push(id.client);
    }
    if let Some(c) = named_client(command.inner()) {
        if !ids.contains(&c) {
            ids.push(c);
        }
    }
    ids
}

/// The client id `command` names, if any.
fn named_client(command: &Command) -> Option<ClientId> {
    match command {
        Command::MountSegment { client_id, .. }
        | Command::RemountSegments { client_id, .. }
        | Command::UnmountSegment { client_id, .. }
        | Command::Heartbeat { client_id, .. }
        | Command::ExpireClient { client_id, .. }
        | Command::PutStart { client_id, .. }
        | Command::BatchPutStart { client_id, .. }
        | Command::UpsertStart { client_id, .. }
        | Command::BatchUpsertStart { client_id, .. }
        | Command::PutEnd { client_id, .. }
        | Command::PutEndChecked { client_id, .. }
        | Command::BatchPutEnd { client_id, .. }
        | Command::BatchPutEndChecked { client_id, .. }
        | Command::PutRevoke { client_id, .. }
        | Command::BatchPutRevoke { client_id, .. }
        | Command::ReplaceReplicas { client_id, .. }
        | Command::FetchTasks { client_id, .. }
        | Command::FinishTask { client_id, .. }
        | Command::Reserve { client_id, .. }
        | Command::CommitReserved { client_id, .. }
        | Command::CommitReservedChecked { client_id, .. } => Some(*client_id),
        _ => None,
    }
}

struct Owner {
    certificate: Arc<[u8]>,
    name: String,
    last_used: Instant,
}

/// The table of owners (see the module's documentation).
#[derive(Default)]
pub(crate) struct ClientBindings {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    owners: HashMap<ClientId, Owner>,
    /// How many ids each certificate owns.
    held: HashMap<Arc<[u8]>, usize>,
}

impl Table {
    fn forget(&mut self, client: ClientId) {
        if let Some(owner) = self.owners.remove(&client) {
            if let Some(n) = self.held.get_mut(&owner.certificate) {
                *n -= 1;
                if *n == 0 {
                    self.held.remove(&owner.certificate);
                }
            }
        }
    }
}

impl ClientBindings {
    /// `Ok` when `peer` may act for `client` (binding the id to it when no certificate owns it);
    /// a permission error naming both otherwise.
    pub(crate) fn admit(&self, peer: &PeerIdentity, client: ClientId, now: Instant) -> Result<()> {
        if peer.has_role(Role::Master) {
            return Ok(());
        }
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(owner) = table.owners.get_mut(&client) {
            if now.duration_since(owner.last_used) < IDLE {
                if *owner.certificate != *peer.certificate_der {
                    return Err(Error::PermissionDenied(format!(
                        "{} may not act for client {client}: it belongs to {}",
                        peer.name(),
                        owner.name
                    )));
                }
                owner.last_used = now;
                return Ok(());
            }
            table.forget(client);
        }
        if table.owners.len() >= MAX_IDS {
            let idle: Vec<ClientId> = table
                .owners
                .iter()
                .filter(|(_, o)| now.duration_since(o.last_used) >= IDLE)
                .map(|(id, _)| *id)
                .collect();
            for id in idle {
                table.forget(id);
            }
        }
        let certificate: Arc<[u8]> = Arc::from(peer.certificate_der.as_slice());
        let held = table.held.get(&certificate).copied().unwrap_or(0);
        if table.owners.len() >= MAX_IDS || held >= PER_CERTIFICATE {
            return Err(Error::PermissionDenied(format!(
                "{} may not act for another client id: {held} ids in use (of {PER_CERTIFICATE} \
                 per certificate, {MAX_IDS} in all)",
                peer.name(),
            )));
        }
        *table.held.entry(certificate.clone()).or_insert(0) += 1;
        table.owners.insert(
            client,
            Owner {
                certificate,
                name: peer.name(),
                last_used: now,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mooncake_master::RequestId;
    use mooncake_tls::certs;

    fn peer(ca: &certs::CertifiedPem, name: &str, roles: &[Role]) -> PeerIdentity {
        certs::issue_role_cert(ca, name, &["127.0.0.1"], roles)
            .unwrap()
            .identity(ca)
            .own()
            .unwrap()
    }

    #[test]
    fn the_first_certificate_owns_an_id_until_it_goes_unused() {
        let ca = certs::new_ca("bindings CA").unwrap();
        let (a, b) = (peer(&ca, "node-a", &[]), peer(&ca, "node-b", &[]));
        let member = peer(&ca, "master-1", &[Role::Master]);
        let table = ClientBindings::default();
        let t0 = Instant::now();
        let id = ClientId(7);
        table.admit(&a, id, t0).unwrap();
        table.admit(&a, id, t0 + Duration::from_secs(1)).unwrap();
        let e = table
            .admit(&b, id, t0 + Duration::from_secs(2))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("node-b may not act for client 00000000-0000-0000-0000-000000000007: it belongs to node-a"),
            "{e}"
        );
        // Members forward for anyone.
        table.admit(&member, id, t0).unwrap();
        // Unused for IDLE: forgotten, and another certificate may take it.
        let later = t0 + Duration::from_secs(1) + IDLE;
        table.admit(&b, id, later).unwrap();
        assert!(table.admit(&a, id, later).is_err());
    }

    #[test]
    fn one_certificate_owns_a_bounded_number_of_ids() {
        let ca = certs::new_ca("bindings CA").unwrap();
        let a = peer(&ca, "node-a", &[]);
        let b = peer(&ca, "node-b", &[]);
        let table = ClientBindings::default();
        let t0 = Instant::now();
        for i in 0..PER_CERTIFICATE as u128 {
            table.admit(&a, ClientId(i), t0).unwrap();
        }
        let e = table
            .admit(&a, ClientId(PER_CERTIFICATE as u128), t0)
            .unwrap_err();
        assert!(e.to_string().contains("ids in use"), "{e}");
        // Another certificate is unaffected.
        table.admit(&b, ClientId(1 << 64), t0).unwrap();
    }

    #[test]
    fn requests_name_the_client_they_act_for() {
        let id = ClientId(3);
        let heartbeat = MasterRequest::Apply(Command::Heartbeat { client_id: id });
        assert_eq!(claimed_clients(&heartbeat), [id]);
        assert!(claimed_clients(&MasterRequest::Segments).is_empty());
        assert!(claimed_clients(&MasterRequest::Metrics).is_empty());
        let landed = MasterRequest::Landed {
            client_id: id,
            segment: "s".into(),
            ranges: vec![(0, 8)],
        };
        assert_eq!(claimed_clients(&landed), [id]);
        // A command named with a request id acts for the id's client too.
        let once = |client, command| {
            MasterRequest::Apply(Command::Once {
                id: RequestId { client, seq: 1 },
                done_below: 0,
                command: Box::new(command),
            })
        };
        let remove = Command::Remove {
            key: "k".into(),
            force: false,
        };
        assert_eq!(claimed_clients(&once(ClientId(4), remove)), [ClientId(4)]);
        let end = Command::PutEnd {
            client_id: id,
            key: "k".into(),
        };
        assert_eq!(claimed_clients(&once(id, end.clone())), [id]);
        assert_eq!(claimed_clients(&once(ClientId(4), end)), [ClientId(4), id]);
    }
}
