//! Core of mooncake-rs, a distributed KV-cache store and transfer engine.
//!
//! This crate holds what every deployment shares and contains no networking code (only the
//! passing of memfd descriptors over a Unix socket, in [`memfd`]):
//! - the [`Transport`] trait (one-sided reads and writes of another process's registered memory,
//!   in batches), implemented by the `mooncake-transport-*` crates, with its [`Capabilities`] and
//!   its registration hooks ([`Transport::on_register`], [`Transport::on_unregister`]), through
//!   which a transport publishes keys for each buffer and keeps what it needs with it;
//! - the [`MetadataStore`] trait (cluster metadata with per-key revisions), the [`CommandLog`]
//!   trait (ordered commands for a state machine, and who leads) and an in-memory
//!   implementation of both;
//! - the [`Clock`] services take time from: the system's, or a [`VirtualClock`] for tests;
//! - the [`Allocator`] trait and a best-fit [`RangeAllocator`] for segment space;
//! - registered memory ([`MemoryRegistry`]), where every access is bounds-checked and
//!   unregistering returns a future ([`Unregistering`]) that completes once no transfer uses the
//!   buffer; buffers of a kind a transport needs come from its [`MemoryProvider`];
//! - a small memfd utility ([`memfd`]: sealed memfds, their mappings and descriptor passing);
//! - the [`TransferEngine`], which owns a process's segment and runs batches over transports;
//! - the error-code table ([`ErrorCode`]) shared with the Python API;
//! - [`parse_size`], the one reading of sizes like `4GB` for flags and configs.
//!
//! It does not know any transport's specifics: same-host shared memory (buffers in memfds, the
//! revocation table peers check) lives in `mooncake-transport-shm`, which supplies those buffers
//! and attaches what it needs to each one through the registration hooks.
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

pub mod admission;
pub mod allocator;
#[cfg(feature = "engine")]
pub mod clock;
#[cfg(all(feature = "engine", any(test, feature = "conformance")))]
pub mod conformance;
#[cfg(feature = "engine")]
pub mod engine;
pub mod error;
pub mod mapped;
#[cfg(all(feature = "engine", any(test, feature = "conformance")))]
pub mod mem_transport;
pub mod memfd;
pub mod memory;
pub mod metadata;
pub mod size;
#[cfg(feature = "engine")]
pub mod transport;

pub use allocator::{Allocation, Allocator, RangeAllocator};
#[cfg(feature = "engine")]
pub use clock::{Clock, SystemClock, VirtualClock};
#[cfg(feature = "engine")]
pub use engine::{
    past_deadline, Batch, Discovery, EngineConfig, SegmentHandle, TransferEngine, TransferRequest,
};
pub use error::{Error, ErrorCode, Result};
pub use memory::{
    AlignedBuffer, BufferDesc, BufferKey, Location, MemRegion, MemoryProvider, MemoryRegistry,
    ProvidedMemory, RegisteredBuffer, Registration, RegistrationHook, Unregistering,
};
pub use metadata::{
    CommandLog, GroupMember, GroupMembers, Leadership, LogGroup, MemoryMetadataStore,
    MetadataStore, StateMachine, Versioned,
};
pub use size::{parse_size, SizeError};
#[cfg(feature = "engine")]
pub use transport::{
    BatchState, Capabilities, Endpoint, LandingObserver, LocalSegment, OpCode, SegmentDesc,
    TransferOp, TransferStatus, Transport,
};
