//! How store clients, storage nodes and administrators talk to a Mooncake master.
//!
//! - [`rpc`]: length-prefixed, versioned postcard frames over TCP, a multiplexing client and a
//!   per-connection server loop; optionally over mutual TLS ([`serve_tls`],
//!   [`RpcClient::with_tls`]), where handlers learn each request's [`Caller`] (its verified
//!   certificate) to authorize it;
//! - [`master`]: the master's requests and replies ([`MasterRequest`], [`MasterReply`]), the
//!   [`MasterApi`] trait a master answers them through (the service in-process, or
//!   [`RemoteMaster`] over RPC, which follows the leader of a master group);
//! - [`RequestIds`]: naming a client's state-changing commands, so that a retry (after a
//!   failover, say) is answered with the first attempt's outcome;
//! - [`admin`]: membership requests of a Raft master group and a client that sends them.
//!
//! This crate does not run a master: the service is `mooncake-master-service`, the state machine
//! `mooncake-master`.
//!
//! ```no_run
//! # async fn demo() -> mooncake_core::Result<()> {
//! use mooncake_rpc::{MasterApi, MasterReply, MasterRequest, RemoteMaster, RpcClientConfig};
//! let master = RemoteMaster::new("127.0.0.1:50051", RpcClientConfig::default());
//! if let MasterReply::Metrics(m) = master.call(MasterRequest::Metrics).await? {
//!     println!("{m:?}");
//! }
//! # Ok(()) }
//! ```

#![deny(unsafe_code)]

mod addr;
pub mod admin;
pub mod master;
mod request_ids;
pub mod rpc;

pub use addr::bind_address;
pub use master::{
    apply_via, call_admin, call_admin_with, MasterApi, MasterReply, MasterRequest, RemoteMaster,
};
/// Re-exported: what a TLS server or client of this crate is configured with.
pub use mooncake_tls::{PeerIdentity, Role, TlsAcceptor, TlsConnector, TlsIdentity};
pub use request_ids::{apply_named, InFlight, RequestIds};
pub use rpc::{
    bind, serve, serve_tls, serve_with, tls_acceptor, tls_connector, Caller, Handler, RefusalLog,
    RpcClient, RpcClientConfig, ServeLimits, MAX_FRAME, RPC_ALPN,
};
