//! P2P store: distributes a file (a checkpoint, typically) from the instance that registered it
//! to many others, as a swarm over the mooncake-rs transfer engine.
//!
//! What it does:
//! - the seed's API ([`P2PStore`]): `register` a file made of registered buffers under a unique
//!   name, `unregister`, `list` by prefix, `get_replica` (pull a copy into local buffers, then
//!   serve it), `delete_replica`, `close`;
//! - a catalog in any [`MetadataStore`](mooncake_core::MetadataStore) that supports
//!   compare-and-swap and listing ([`catalog`] documents the keys): the payload record with a
//!   BLAKE3 hash per piece, and one availability bitmap per (payload, peer), written only by that
//!   peer and batched, so the metadata service sees no contention;
//! - pulls as a swarm ([`scheduler`], sans-IO): pieces subdividing the shards (about 512 per
//!   payload, [`piece::auto_piece_size`]), random-first then rarest-first then endgame for late
//!   requests, requests pipelined per peer, timeouts and backoff for failing peers, only missing
//!   pieces fetched again when a source leaves; the origin is the source of last resort and
//!   sends each piece about once (readers pulling together split its pieces into stripes and
//!   publish what they fetch from it). Pieces are
//!   one-sided READs from any peer that holds them; each is verified against its hash before it
//!   is written to the destination and published, so nothing unverified is ever offered to
//!   others, and a corrupted piece is fetched again from another peer;
//! - a bound on each holder's concurrent uploads, by cooperation: READs are one-sided, so a
//!   holder cannot refuse one; it publishes how many uploads it admits
//!   ([`P2PConfig::upload_slots`]) and each reader keeps to its share
//!   ([`scheduler::fair_share`]). A reader that ignores the share is not stopped.
//!
//! - per-call timeouts and cancellation ([`P2PStore::get_replica_with`], [`CancelToken`]): a
//!   pull that ends early withdraws its partial copy;
//! - upstream Mooncake's pull behaviour as a switch ([`PullMode::Upstream`]), for benchmarks
//!   that show the difference on the same network.
//!
//! The catalog can live in the HTTP metadata server (`serve_http` of `mooncake-meta-http`, or
//! `mooncake_master --enable_http_metadata_server`) through `mooncake_meta_http::HttpMetadataStore`,
//! whose protocol extension carries revisions, conditional writes and prefix listing; upstream's
//! own HTTP metadata servers have neither, so they cannot hold it.
//!
//! The `mooncake_p2p` binary is the command-line tool: `publish NAME PATH` (a file or a
//! directory, memory-mapped, with a manifest as the payload's first buffer), `fetch NAME DEST`
//! (progress bar, then bytes, time and the verification result) and `list [PREFIX]`, with the
//! catalog in an HTTP metadata server (`--metadata http://host:port/metadata`).
//!
//! The Python binding is `mooncake.p2p` in `mooncake-py`.
//!
//! Benchmark: `p2p_bench` in the unpublished `mooncake-bench` crate runs the origin and N
//! receivers as processes in network namespaces shaped by `tbf`, with upstream's mode on the
//! same network in the same run (the README has how to run it and more shapes). Measured on a
//! 2-core machine, 256 MiB to 8 receivers at 200 Mbit/s per link each way (lower bound T_lb
//! 10.7 s, client-server 85.9 s), 5 runs: all 8 copies verified in 12.04 s median
//! [11.99-12.21] (1.12x T_lb), origin egress 1.05x the payload, bytes received 1.015x N·S;
//! upstream's mode in the same runs 55.3 s [45.7-61.0] (5.15x T_lb), origin egress 4.6x. With
//! a receiver SIGKILLed at half, the 7 others finish in the same 1.12x T_lb.
//!
//! What it does not do (yet): cut the catalog traffic at hundreds of peers (every reader lists
//! every availability record of the payload each refresh), and expire the availability record
//! of a reader that died.
//!
//! ```
//! use std::sync::Arc;
//! use mooncake_core::{Location, MemoryMetadataStore, MetadataStore};
//! use mooncake_p2p::{Buffer, P2PConfig, P2PStore};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let catalog: Arc<dyn MetadataStore> = Arc::new(MemoryMetadataStore::new());
//! // The trainer publishes 1 MiB (buffers registered with its store's engine).
//! let trainer = P2PStore::new(catalog.clone(), "127.0.0.1", P2PConfig::default()).await?;
//! let addr = trainer.engine().allocate_buffer(1 << 20, Location::cpu(0))?;
//! let weights = [Buffer::new(addr, 1 << 20)];
//! trainer.register("ckpt/step-100", &weights, 64 << 20, "cpu:0", false).await?;
//!
//! // An inference host pulls a verified copy, and serves it to others from then on.
//! let host = P2PStore::new(catalog, "127.0.0.1", P2PConfig::default()).await?;
//! let addr = host.engine().allocate_buffer(1 << 20, Location::cpu(0))?;
//! let report = host.get_replica("ckpt/step-100", &[Buffer::new(addr, 1 << 20)]).await?;
//! assert_eq!(report.bytes, 1 << 20);
//! assert_eq!(host.list("ckpt/").await?[0].total_size, 1 << 20);
//! host.close().await?;
//! trainer.close().await?;
//! # Ok::<(), mooncake_p2p::Error>(())
//! # }).unwrap();
//! ```
#![deny(unsafe_code)]

pub mod catalog;
pub mod error;
pub mod piece;
mod pull;
pub mod scheduler;
mod store;

pub use error::{Error, Result};
pub use piece::Buffer;
pub use pull::{CancelToken, PullOptions, PullReport};
pub use store::{P2PConfig, P2PStore, PayloadInfo, PullMode};
