//! Core of mooncake-rs, a distributed KV-cache store and transfer engine.
//!
//! This crate holds what every deployment shares and contains no networking code (only the
//! passing of memfd descriptors over a Unix socket, in [`shm`]):
//! - the [`Transport`] trait (one-sided reads and writes of another process's registered memory,
//!   in batches), implemented by the `mooncake-transport-*` crates;
//! - the [`MetadataStore`] trait (cluster metadata with per-key revisions), the [`CommandLog`]
//!   trait (ordered commands for a state machine, and who leads) and an in-memory
//!   implementation of both;
//! - the [`Clock`] services take time from: the system's, or a [`VirtualClock`] for tests;
//! - the [`Allocator`] trait and a best-fit [`RangeAllocator`] for segment space;
//! - registered memory ([`MemoryRegistry`]), where every access is bounds-checked, and memory
//!   shared with processes of the same host ([`shm`]: memfds and their revocation table);
//! - the [`TransferEngine`], which owns a process's segment and runs batches over transports;
//! - the error-code table ([`ErrorCode`]) shared with the Python API;
//! - [`parse_size`], the one reading of sizes like `4GB` for flags and configs.
//!
//! With the `conformance` feature it also exports the transport conformance suite and an
//! in-memory transport for tests.
//!
//! ```
//! use mooncake_core::{EngineConfig, Location, TransferEngine, TransferRequest};
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! // An engine with no transports still serves its own segment by memcpy.
//! let engine = TransferEngine::start(EngineConfig::new("localhost:1"), vec![]).await.unwrap();
//! let src = engine.allocate_buffer(4096, Location::cpu(0)).unwrap();
//! let dst = engine.allocate_buffer(4096, Location::cpu(0)).unwrap();
//! let me = engine.open_segment("localhost:1").await.unwrap();
//! let results = engine.transfer(vec![TransferRequest::write(&me, dst, src, 4096)]).await;
//! assert!(results[0].is_ok());
//! # });
//! ```

pub mod allocator;
#[cfg(feature = "engine")]
pub mod clock;
#[cfg(all(feature = "engine", any(test, feature = "conformance")))]
pub mod conformance;
#[cfg(feature = "engine")]
pub mod engine;
pub mod error;
#[cfg(all(feature = "engine", any(test, feature = "conformance")))]
pub mod mem_transport;
pub mod memory;
pub mod metadata;
pub mod shm;
pub mod size;
#[cfg(feature = "engine")]
pub mod transport;

pub use allocator::{Allocation, Allocator, RangeAllocator};
#[cfg(feature = "engine")]
pub use clock::{Clock, SystemClock, VirtualClock};
#[cfg(feature = "engine")]
pub use engine::{Batch, Discovery, EngineConfig, SegmentHandle, TransferEngine, TransferRequest};
pub use error::{Error, ErrorCode, Result};
pub use memory::{AlignedBuffer, BufferDesc, Location, MemRegion, MemoryRegistry};
pub use metadata::{
    CommandLog, GroupMember, GroupMembers, Leadership, LogGroup, MemoryMetadataStore,
    MetadataStore, StateMachine, Versioned,
};
pub use size::{parse_size, SizeError};
#[cfg(feature = "engine")]
pub use transport::{
    BatchState, Endpoint, LandingObserver, LocalSegment, OpCode, SegmentDesc, TransferOp,
    TransferStatus, Transport,
};
