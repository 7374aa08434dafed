//! The verbs the transport uses, as a small trait family with two implementations: real devices
//! through `sideway` (feature `rdma`, [`crate::sideway_verbs`]) and an in-process fake
//! ([`crate::fake`]) on which the whole transport runs in tests.
//!
//! One opened [`Device`] is a device context with its one protection domain: memory regions and
//! queue pairs are made from it. Queue pairs are reliable-connected (RC); a work request is a
//! one-sided READ or WRITE of one contiguous local range to or from one remote range. Every work
//! request is signaled, and its completion carries its `wr_id` back through the completion queue
//! the queue pair was created with.

use std::fmt;
use std::sync::Arc;

use mooncake_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// What an opened device tells about itself (port 1, the port the transport uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceAttrs {
    /// Device name (`mlx5_0`).
    pub name: String,
    /// Largest memory region the device registers, in bytes.
    pub max_mr_size: u64,
    /// Most work requests a queue pair's send queue holds.
    pub max_qp_wr: u32,
    /// Most entries a completion queue holds.
    pub max_cqe: u32,
    /// Active MTU of the port, in bytes (256 to 4096).
    pub active_mtu: u32,
    /// The port's LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The GID the transport addresses the port by.
    pub gid: [u8; 16],
    /// NUMA node the device is attached to, when known: auto-selection prefers devices on the
    /// node of a buffer's location.
    pub numa_node: Option<u32>,
}

/// How the peer reaches one queue pair: exchanged between the ends before connecting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QpAddress {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number of its send queue.
    pub psn: u32,
    /// Port LID.
    pub lid: u16,
    /// Port GID.
    pub gid: [u8; 16],
    /// Active MTU of its port, in bytes; the connection uses the smaller of the two ends'.
    pub mtu: u32,
}

/// Direction of a work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WrOp {
    /// Remote memory into local memory.
    Read,
    /// Local memory into remote memory.
    Write,
}

/// One signaled one-sided work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkRequest {
    /// Returned in the completion.
    pub wr_id: u64,
    /// Direction.
    pub op: WrOp,
    /// Local start address, inside the memory region of `lkey`.
    pub local_addr: u64,
    /// Local key of the region holding the local range.
    pub lkey: u32,
    /// Bytes to move.
    pub len: u32,
    /// Remote start address, inside the memory region of `rkey`.
    pub remote_addr: u64,
    /// Remote key of the region holding the remote range.
    pub rkey: u32,
}

/// How a work request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WcStatus {
    /// The bytes moved.
    Success,
    /// The local key does not cover the local range (the local region was deregistered).
    LocalProtection,
    /// The remote end refused: its key does not cover the range (deregistered, wrong key).
    RemoteAccess,
    /// The remote end did not answer within the transport retries (dead link or peer).
    RetryExceeded,
    /// Flushed: the queue pair went into the error state before the request ran.
    Flushed,
    /// Any other failure, with the device's status code.
    Other(u32),
}

/// One entry of a completion queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The work request's id.
    pub wr_id: u64,
    /// How it ended.
    pub status: WcStatus,
}

/// The verbs library: lists and opens devices.
pub trait Provider: Send + Sync + fmt::Debug {
    /// Names of the devices present. No device (or a kernel without RDMA, `ENOSYS`) is an
    /// error saying so ([`no_devices`]).
    fn devices(&self) -> Result<Vec<String>>;
    /// Opens a device (its context and one protection domain).
    fn open(&self, name: &str) -> Result<Arc<dyn Device>>;
}

/// An opened device with its protection domain.
pub trait Device: Send + Sync + fmt::Debug {
    /// What it tells about itself.
    fn attrs(&self) -> &DeviceAttrs;
    /// Registers `[addr, addr + len)` for local access and remote READ and WRITE.
    ///
    /// # Safety
    /// The range must stay valid memory until the returned region is dropped (deregistered).
    unsafe fn register(&self, addr: u64, len: u64) -> Result<Box<dyn MemoryRegion>>;
    /// A completion queue of `depth` entries.
    fn create_cq(&self, depth: u32) -> Result<Arc<dyn CompletionQueue>>;
    /// An RC queue pair whose send queue holds `depth` work requests and completes into `cq`
    /// (made by this device). It is not connected yet.
    fn create_qp(&self, cq: &Arc<dyn CompletionQueue>, depth: u32) -> Result<Box<dyn QueuePair>>;
}

/// A registered memory region; dropping it deregisters it, after which its keys are refused.
pub trait MemoryRegion: Send + Sync + fmt::Debug {
    /// Key for local access.
    fn lkey(&self) -> u32;
    /// Key peers present.
    fn rkey(&self) -> u32;
}

/// An RC queue pair; dropping it destroys it (nothing it was given runs afterwards).
pub trait QueuePair: Send + Sync + fmt::Debug {
    /// How the peer reaches it.
    fn address(&self) -> QpAddress;
    /// Connects to the peer's queue pair (INIT, then RTR with the peer's QPN, LID, GID, PSN and
    /// the path MTU, then RTS). `mtu` is the path MTU in bytes, at most both ends' active MTU.
    fn connect(&mut self, remote: &QpAddress, mtu: u32) -> Result<()>;
    /// Posts work requests in order. On an error, the ones before index `posted` were posted
    /// and will complete; the rest were not.
    fn post(&mut self, wrs: &[WorkRequest]) -> std::result::Result<(), PostError>;
}

/// A refused post: how many requests were posted before the refusal, and why.
#[derive(Clone, Debug)]
pub struct PostError {
    /// Requests posted before the refusal.
    pub posted: usize,
    /// Why.
    pub error: Error,
}

/// A completion queue shared by many queue pairs of one device.
pub trait CompletionQueue: Send + Sync + fmt::Debug {
    /// Appends available completions to `out`, about `max` (a backend may return more rather
    /// than lose some). An error means the queue is broken (overrun): completions were lost and
    /// the queue must be replaced.
    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<()>;
    /// The backend's own type, for the device that made it.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// The error for a host without RDMA devices, or whose kernel has no RDMA support.
pub fn no_devices(detail: &str) -> Error {
    Error::NotSupported(format!("no RDMA devices: {detail}"))
}

/// MTU sizes a port may have, in bytes.
pub const MTUS: [u32; 5] = [256, 512, 1024, 2048, 4096];

/// The MTU both ends can use: the smaller of the two active MTUs, snapped down to a valid size.
pub fn negotiate_mtu(local: u32, remote: u32) -> u32 {
    let m = local.min(remote);
    MTUS.iter().rev().copied().find(|&v| v <= m).unwrap_or(256)
}
