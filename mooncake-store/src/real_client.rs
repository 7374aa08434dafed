//! The dummy-client mode: a standalone "real client" process (`mooncake_client`) owns a [`Store`](crate::store::Store)
//! and serves the store API to "dummy clients" in other processes on the same host
//! (`MooncakeDistributedStore.setup_dummy(mem_pool_size, local_buffer_size, "host:port")`).
//!
//! ```text
//!  dummy process                              real client process (mooncake_client)
//!  DummyClient ── RPC over TCP (host:port) ──► RealClient ── Store ── master / peers
//!      │   memfd (pool + staging), sealed         ▲ maps the same memfd, registers it with
//!      └── SCM_RIGHTS over a Unix socket ─────────┘ its transfer engine (one session)
//! ```
//!
//! A dummy creates one memfd of `mem_pool_size + local_buffer_size` bytes, maps it, seals it
//! against shrinking and sends the descriptor to the real client over a Unix socket (its name comes
//! from the `Hello` call). The real client maps it too and registers the mapping with its transfer
//! engine: that is the dummy's *session*, alive as long as the Unix socket stays open. A dummy that
//! disconnects (or dies) has its pool unregistered and unmapped as soon as the calls using it end.
//!
//! The first `mem_pool_size` bytes are the pool `alloc_from_mem_pool` hands out: zero-copy calls
//! (`put_from`, `get_into`, their batch forms) on pointers inside it move bytes straight between
//! the shared pages and the replicas; the real client translates the dummy's addresses into its own
//! mapping (`offset = ptr - dummy_base`) and refuses any range not wholly inside the pool with
//! `INVALID_PARAMS` (-600) without touching memory. The last `local_buffer_size` bytes stage the
//! byte-oriented calls (`put`, `get`, ...): values are copied into the shared staging area and
//! moved from there; a value that does not fit (or when staging is busy) travels inline in the RPC
//! instead, up to the RPC frame limit.

mod api;
mod cli;
mod dummy;
mod server;
mod shm;
mod wire;

pub use cli::{main_with_args, parse_args, parse_size, run, ClientOptions, Parsed, USAGE};
pub use dummy::DummyClient;
pub use server::{RealClient, RealClientConfig};
pub use wire::PROTOCOL_VERSION;
