//! The Mooncake master service: the master state machine (`mooncake-master`) run behind a
//! command log, with its timers and its RPC server.
//!
//! - [`service`]: [`MasterService`], which stamps each state change with the time, applies it
//!   through the command log (in memory, or a Raft group's with feature `raft`), answers reads
//!   from the applied state and serves store clients in-process or over RPC;
//! - [`landing`]: landing reports of storage nodes, for commits that wait on them;
//! - [`master_cli`]: the `mooncake_master` program and its upstream-compatible flags;
//! - [`admin_cli`]: `mooncake_master admin`, which changes the members of a Raft master group
//!   (the leader serves those requests in the service);
//! - [`cli`]: what the programs share (exit codes, shutdown signals, `--raft_peers`, the TLS
//!   identity of `--tls_*` or `MC_TLS_*`).
//!
//! The master role can run inside any process: a [`MasterService`] is a value, and the store's
//! embedded mode makes one next to its client.
//!
//! ```no_run
//! # async fn demo() -> mooncake_core::Result<()> {
//! use mooncake_master::MasterConfig;
//! use mooncake_master_service::{MasterService, ServiceConfig};
//! let service = MasterService::new(MasterConfig::default(), ServiceConfig::default())?;
//! let addr = service.serve_rpc("127.0.0.1:0".parse().unwrap()).await?;
//! println!("master listening on {addr}");
//! # Ok(()) }
//! ```

#![deny(unsafe_code)]

pub mod admin_cli;
pub mod admin_http;
pub mod cli;
pub mod landing;
pub mod master_cli;
pub mod master_flags;
pub mod master_group;
pub mod service;

pub use master_group::MasterGroup;
pub use service::{MasterService, ServiceConfig};
