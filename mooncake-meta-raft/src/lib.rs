//! A [`MetadataStore`](mooncake_core::MetadataStore) and
//! [`CommandLog`](mooncake_core::CommandLog) replicated by an embedded
//! [raft-rs](https://github.com/tikv/raft-rs) group, so a Mooncake deployment needs no etcd.
//!
//! What it does: orders opaque commands in a Raft log, replicates it durably (fsync before
//! acknowledging), and applies committed entries to an attached
//! [`StateMachine`](mooncake_core::StateMachine) and to its own versioned KV map. Snapshots
//! compact the log and catch up lagging or new members; membership changes at run time.
//!
//! What it does not do: it contains no master logic and never decodes commands; it does not
//! serve clients (the master's RPC server does, redirecting to [`LeaderInfo::service_addr`]).
//!
//! Layers:
//! - [`RaftNode`]: the sans-IO core (no sockets, no clock): `tick`, `step`, `propose`,
//!   `advance`. Deterministic tests drive it directly.
//! - [`DiskStorage`]: raft-rs `Storage` over a CRC-framed log, a hard-state file and a snapshot
//!   file.
//! - [`RaftMetadataStore`]: a thread running the ready loop, a TCP transport between peers, and
//!   the [`MetadataStore`](mooncake_core::MetadataStore) and
//!   [`CommandLog`](mooncake_core::CommandLog) implementations.
//!
//! Members accept raft messages only from members, over connections from their configured
//! addresses. With [`NodeConfig::tls`] they also talk over mutual TLS: only a certificate of the
//! cluster CA with the `master` role named `master-N` ([`network::member_cert_name`]) is
//! admitted, and only for messages from member N.
//!
//! ```no_run
//! use mooncake_meta_raft::{NodeConfig, PeerInfo, RaftMetadataStore, StoreConfig};
//! use mooncake_core::CommandLog;
//! # struct Machine;
//! # impl mooncake_core::StateMachine for Machine {
//! #     fn apply(&mut self, c: &[u8]) -> Vec<u8> { c.to_vec() }
//! #     fn snapshot(&self) -> mooncake_core::Result<Vec<u8>> { Ok(vec![]) }
//! #     fn restore(&mut self, _: &[u8]) -> mooncake_core::Result<()> { Ok(()) }
//! # }
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let voters = vec![PeerInfo { id: 1, raft_addr: "127.0.0.1:7001".into(), service_addr: "127.0.0.1:50051".into() }];
//! let config = StoreConfig::new(NodeConfig::new(1, "/tmp/raft-1", voters), "127.0.0.1:7001");
//! let store = RaftMetadataStore::start(config, Box::new(Machine)).await?;
//! store.wait_for_leader(std::time::Duration::from_secs(5)).await?;
//! let response = store.apply_command(b"command".to_vec()).await?;
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]
// raft-rs's protobuf types are built with `Default` and then filled in field by field (their
// generated structs carry private bookkeeping fields); raft-rs allows this lint for the same
// reason.
#![allow(clippy::field_reassign_with_default)]

pub mod admit;
mod codec;
pub mod config;
pub mod error;
pub mod incarnation;
pub mod lease;
pub mod network;
pub mod node;
pub mod state;
pub mod storage;
pub mod store;
pub mod wal;

pub use admit::SenderCheck;
pub use config::{NodeConfig, RoleObserver, StoreConfig};
pub use error::{leader_hint, Error, Result};
pub use node::{
    Applied, Membership, MembershipChange, Output, ProposalError, ProposalId, RaftNode, RoleEvent,
};
pub use raft;
pub use raft::prelude::Message;
pub use raft::StateRole;
pub use state::{KvOp, KvResult, KvState, PeerInfo};
pub use storage::{DiskStorage, RecoveryReport};
pub use store::{RaftMetadataStore, RaftStatus};

/// The leader of the group as a node knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderInfo {
    /// Raft id.
    pub id: u64,
    /// The leader's client-facing service address (empty if the directory lacks it).
    pub service_addr: String,
}
