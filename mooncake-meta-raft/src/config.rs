//! Configuration of a raft node ([`NodeConfig`]) and of its network driver ([`StoreConfig`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::state::PeerInfo;

/// Told of every role change of a node (`(node id, event)`), in order, on the raft loop's
/// thread: it must return quickly and never block (hand the event to a channel).
#[derive(Clone)]
pub struct RoleObserver(pub Arc<RoleFn>);

/// The function a [`RoleObserver`] calls.
pub type RoleFn = dyn Fn(u64, &RoleEvent) + Send + Sync;

impl std::fmt::Debug for RoleObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoleObserver")
    }
}

/// Configuration of the sans-IO [`RaftNode`](crate::RaftNode).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's raft id (non-zero, unique in the group).
    pub id: u64,
    /// Directory for the log, hard state and snapshot (created if missing).
    pub data_dir: PathBuf,
    /// Members of the group at bootstrap. Every initial voter must be given the same list. A
    /// node joining later (`join = true`) lists the members it can reach, as an address book.
    pub initial_voters: Vec<PeerInfo>,
    /// `true` for a node added at run time: it never bootstraps a group and waits for the
    /// leader's snapshot. Default `false`.
    pub join: bool,
    /// Ticks without a leader before a follower campaigns (randomised up to twice this).
    /// Default 10 (1 s at the default 100 ms tick, as etcd's 10× heartbeat rule suggests).
    pub election_ticks: usize,
    /// Ticks between leader heartbeats. Default 2. Must be below `election_ticks`.
    pub heartbeat_ticks: usize,
    /// Take a snapshot and compact the log every this many applied entries. Default 10,000.
    pub snapshot_threshold: u64,
    /// Also wait until the entries applied since the last snapshot weigh as much as that
    /// snapshot did, so the cost of snapshots stays in proportion to the log written however
    /// large the state is (a big master is not serialized again every `snapshot_threshold`
    /// small entries). Default `true`; `false` snapshots on the entry count alone.
    pub snapshot_by_size: bool,
    /// Most proposals handed to raft per ready cycle (one fsync). Default 8,192.
    pub max_batch: usize,
    /// Soft cap on the entry bytes of one append message. Default 1 MiB (raft-rs's advice).
    pub max_size_per_msg: u64,
    /// Append messages in flight per follower. Default 256.
    pub max_inflight_msgs: usize,
    /// Largest command or KV value accepted, in bytes. Default 4 MiB.
    pub max_proposal_bytes: usize,
    /// Largest log record or wire frame read, in bytes (caps allocations on untrusted lengths;
    /// RUSTSEC-2024-0437). Must hold the largest snapshot. Default 256 MiB.
    pub max_record_bytes: usize,
    /// Mutual TLS between the members (default `None`: plain TCP, exactly as without it). With
    /// it, every member-to-member connection runs TLS 1.3 with the ALPN protocol
    /// [`RAFT_ALPN`](crate::network::RAFT_ALPN), both ends presenting a certificate of the
    /// cluster CA, and:
    /// - member N's certificate has the `master` role and the common name `master-N`
    ///   ([`member_cert_name`](crate::network::member_cert_name)), and its subject alternative
    ///   names cover the host of N's raft address (peers check it when they connect). Make it
    ///   with `mooncake_certs issue master-N --role master --name <N's raft IP>`;
    /// - an inbound connection is admitted only when its certificate has the `master` role and
    ///   names a member of the group (else it is closed after the handshake, with a log line);
    /// - every message read on it must come `from` the member its certificate names (others are
    ///   dropped, with a rate-limited log line naming the certificate and the claimed id);
    /// - an outbound connection is used only when the peer's certificate names the member
    ///   dialled.
    ///
    /// The admission by member and source address, the connection caps and the frame limits
    /// apply as without TLS. Every member of a group needs TLS, or none: a member without it
    /// cannot talk to members with it. [`validate`](Self::validate) checks that this node's own
    /// certificate follows the rule.
    pub tls: Option<mooncake_tls::TlsIdentity>,
}

impl NodeConfig {
    /// A configuration with the documented defaults.
    pub fn new(id: u64, data_dir: impl Into<PathBuf>, initial_voters: Vec<PeerInfo>) -> Self {
        NodeConfig {
            id,
            data_dir: data_dir.into(),
            initial_voters,
            join: false,
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_threshold: 10_000,
            snapshot_by_size: true,
            max_batch: 8192,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_proposal_bytes: 4 << 20,
            max_record_bytes: 256 << 20,
            tls: None,
        }
    }

    /// Rejects nonsense with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.id == 0 {
            return bad("id must be non-zero".into());
        }
        if self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return bad(format!(
                "need 0 < heartbeat_ticks ({}) < election_ticks ({})",
                self.heartbeat_ticks, self.election_ticks
            ));
        }
        if self.snapshot_threshold == 0 || self.max_batch == 0 || self.max_inflight_msgs == 0 {
            return bad("snapshot_threshold, max_batch and max_inflight_msgs must be > 0".into());
        }
        if self.max_proposal_bytes * 2 > self.max_record_bytes {
            return bad("max_record_bytes must be at least twice max_proposal_bytes".into());
        }
        let mut ids: Vec<u64> = self.initial_voters.iter().map(|p| p.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.initial_voters.len() || ids.contains(&0) {
            return bad("initial_voters ids must be unique and non-zero".into());
        }
        if !self.join && !ids.contains(&self.id) {
            return bad(format!(
                "node {} is not among the initial voters {ids:?}; set join = true to add it later",
                self.id
            ));
        }
        if let Some(tls) = &self.tls {
            crate::network::check_own_certificate(self.id, tls).map_err(Error::Config)?;
        }
        Ok(())
    }
}

/// Configuration of [`RaftMetadataStore::start`](crate::RaftMetadataStore::start).
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The node itself.
    pub node: NodeConfig,
    /// Address the raft transport listens on (loopback in tests).
    pub raft_addr: String,
    /// Duration of one raft tick. Default 100 ms (etcd's default heartbeat interval).
    pub tick_interval: Duration,
    /// Messages queued per peer before new ones are dropped (raft retries). Default 4,096.
    pub peer_queue: usize,
    /// Messages from the network queued for the raft loop before new ones are dropped.
    /// Default 16,384.
    pub inbound_queue: usize,
    /// First reconnect delay to a peer; doubles up to `max_backoff`. Default 50 ms.
    pub min_backoff: Duration,
    /// Largest reconnect delay. Default 2 s.
    pub max_backoff: Duration,
    /// Told of every role change (becoming or ceasing to be leader, a new known leader), none
    /// missed. Default `None`.
    pub on_role: Option<RoleObserver>,
}

impl StoreConfig {
    /// A configuration with the documented defaults.
    pub fn new(node: NodeConfig, raft_addr: impl Into<String>) -> Self {
        StoreConfig {
            node,
            raft_addr: raft_addr.into(),
            tick_interval: Duration::from_millis(100),
            peer_queue: 4096,
            inbound_queue: 16_384,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            on_role: None,
        }
    }

    /// Rejects nonsense with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        self.node.validate()?;
        if self.tick_interval.is_zero() || self.peer_queue == 0 || self.inbound_queue == 0 {
            return Err(Error::Config(
                "tick_interval, peer_queue and inbound_queue must be non-zero".into(),
            ));
        }
        if self.min_backoff.is_zero() || self.min_backoff > self.max_backoff {
            return Err(Error::Config("need 0 < min_backoff <= max_backoff".into()));
        }
        Ok(())
    }
}

/// Role changes seen during one `RaftNode::advance`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoleEvent {
    /// This node became leader of `term`.
    BecameLeader {
        /// The term.
        term: u64,
    },
    /// This node stopped being leader (it was leader of `term`).
    SteppedDown {
        /// The term it led.
        term: u64,
    },
    /// The known leader changed (`None`: unknown).
    LeaderChanged {
        /// The new leader's id.
        leader: Option<u64>,
    },
}
