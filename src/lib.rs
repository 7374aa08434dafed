//! mooncake-rs: a distributed KV-cache store and transfer engine, as one dependency.
//!
//! This facade re-exports the crates of the system under one name, with the transports and the
//! master group chosen by Cargo features (`tcp`, same-host `shm` and `raft`, all on by default;
//! `quic`, off by default):
//!
//! | module | crate | what it owns |
//! |---|---|---|
//! | (root) | `mooncake-core` | the `Transport`, `MetadataStore` and `Allocator` traits, registered memory, the transfer engine, errors |
//! | [`master`] | `mooncake-master` | the master as a sans-IO state machine |
//! | [`rpc`] | `mooncake-rpc` | master requests and replies, framing, the remote-master client |
//! | [`master_service`] | `mooncake-master-service` | the master service, its RPC server, `mooncake_master` |
//! | [`store`] | `mooncake-store` | the store client, embedded mode, the real/dummy clients, `mooncake_client` |
//! | [`http`] | `mooncake-meta-http` | the HTTP metadata server and client |
//! | `raft` | `mooncake-meta-raft` | the command log replicated by a Raft group (feature `raft`) |
//! | `tcp`, `shm` | `mooncake-transport-tcp`, `-shm` | transports (features `tcp`, `shm`) |
//! | `quic` | `mooncake-transport-quic` | QUIC transport with mutual TLS (feature `quic`, off by default) |
//!
//! [`start_engine`] gives a running transfer engine with the transports enabled.
//!
//! ```no_run
//! # async fn demo() -> mooncake::Result<()> {
//! use mooncake::{Discovery, Location, TransferRequest};
//! let engine = mooncake::start_engine("127.0.0.1", Discovery::P2PHandshake).await?;
//! let buf = engine.allocate_buffer(1 << 20, Location::cpu(0))?;
//! let peer = engine.open_segment("127.0.0.1:12345").await?;
//! let results = engine.transfer(vec![TransferRequest::read(&peer, 0x7f00_0000_0000, buf, 4096)]).await;
//! # Ok(()) }
//! ```

#![deny(unsafe_code)]

pub use mooncake_core::*;
pub use mooncake_master as master;
pub use mooncake_master_service as master_service;
pub use mooncake_meta_http as http;
#[cfg(feature = "raft")]
pub use mooncake_meta_raft as raft;
pub use mooncake_rpc as rpc;
pub use mooncake_rpc::bind_address;
pub use mooncake_store as store;
pub use mooncake_store::real_client;
pub use mooncake_store::{same_host_shm_allowed, start_engine, start_engine_with};
#[cfg(feature = "quic")]
pub use mooncake_transport_quic as quic;
#[cfg(feature = "shm")]
pub use mooncake_transport_shm as shm;
#[cfg(feature = "tcp")]
pub use mooncake_transport_tcp as tcp;
