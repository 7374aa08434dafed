//! The Mooncake store client: objects put into and read from the memory of storage nodes, with
//! a master deciding where replicas go.
//!
//! - [`Store`]: put/get/upsert, batches, zero-copy `put_from`/`get_into` on registered memory,
//!   removal, replica descriptors, copy and move tasks. It reaches its master in-process
//!   (embedded mode, [`Store::setup_embedded`]: the master role runs inside this process) or over
//!   RPC (one master or a Raft master group);
//! - [`real_client`]: a standalone client process (`mooncake_client`) serving the store to
//!   "dummy clients" of the same host, which share a memfd pool with it;
//! - [`start_engine`]: a transfer engine with the transports chosen by this crate's features
//!   (`tcp`, same-host `shm`), also usable alone.
//!
//! It does not hold the master's logic (`mooncake-master`) nor its service
//! (`mooncake-master-service`, which it embeds for the embedded mode).
//!
//! ```no_run
//! # async fn demo() -> mooncake_core::Result<()> {
//! use mooncake_store::{ReplicateConfig, Store, StoreConfig};
//! let mut config = StoreConfig::default();
//! config.master_server_addr = "127.0.0.1:50051".into();
//! let store = Store::setup(config).await?;
//! store.put("key", b"value", &ReplicateConfig::default()).await?;
//! assert_eq!(store.get("key").await?, b"value");
//! # Ok(()) }
//! ```

mod engine;
pub mod real_client;
mod store;

#[cfg(feature = "quic")]
pub use engine::tls_identity_from_env;
pub use engine::{
    available_protocols, same_host_shm_allowed, start_engine, start_engine_for, start_engine_with,
    TLS_ENV,
};
pub use store::*;
