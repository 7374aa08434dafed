//! Which raft messages a member steps: only messages for it, from another member (or, while
//! joining, a node of its address book), over a connection from an IP address that member's
//! configured raft address resolves to. Sans-IO (the source address is an input), so the raft
//! loop and deterministic tests and fuzzing run the same check.

use std::collections::HashMap;
use std::net::IpAddr;

use raft::prelude::Message;

use crate::node::RaftNode;
use crate::state::PeerInfo;

/// The sender check of one member: its address book and the addresses resolved so far.
#[derive(Debug, Default)]
pub struct SenderCheck {
    /// The raft addresses of the initial voters (for a joining node: the members it was told
    /// of), used for ids the replicated peer directory does not have yet.
    address_book: HashMap<u64, String>,
    /// The IP addresses each raft address resolved to (resolved once).
    resolved: HashMap<String, Vec<IpAddr>>,
}

impl SenderCheck {
    /// A check whose address book holds `initial_voters`.
    pub fn new(initial_voters: &[PeerInfo]) -> Self {
        SenderCheck {
            address_book: initial_voters
                .iter()
                .map(|p| (p.id, p.raft_addr.clone()))
                .collect(),
            resolved: HashMap::new(),
        }
    }

    /// The ids of the address book.
    pub fn address_book_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.address_book.keys().copied()
    }

    /// The raft address of node `id` in the address book.
    pub fn booked(&self, id: u64) -> Option<String> {
        self.address_book.get(&id).cloned()
    }

    /// The raft address of node `id` as `node` knows it: its peer directory, else the address
    /// book.
    pub fn address_of(&self, node: &RaftNode, id: u64) -> Option<String> {
        address_of(node, &self.address_book, id)
    }

    /// Whether `node` may step `m`, which came over a connection from `source`; the error says
    /// why not.
    pub fn admit(&mut self, node: &RaftNode, m: &Message, source: IpAddr) -> Result<(), String> {
        let me = node.id();
        if m.to != me {
            return Err(format!("addressed to node {}, this is node {me}", m.to));
        }
        if m.from == me {
            return Err(format!("claims to come from node {me}, this node"));
        }
        let addr = address_of(node, &self.address_book, m.from)
            .ok_or_else(|| format!("from node {}, which is not a member", m.from))?;
        if self.resolved.len() > 1024 {
            // Addresses of nodes long gone; the directory is far smaller.
            self.resolved.clear();
        }
        let ips = self.resolved.entry(addr.clone()).or_insert_with(|| {
            use std::net::ToSocketAddrs;
            addr.to_socket_addrs()
                .map(|a| a.map(|s| s.ip()).collect())
                .unwrap_or_default()
        });
        if ips.contains(&source) {
            Ok(())
        } else {
            Err(format!(
                "from node {}, whose raft address is {addr}, over a connection from {source}",
                m.from
            ))
        }
    }
}

fn address_of(node: &RaftNode, book: &HashMap<u64, String>, id: u64) -> Option<String> {
    node.peers()
        .get(&id)
        .map(|p| p.raft_addr.clone())
        .or_else(|| book.get(&id).cloned())
}
