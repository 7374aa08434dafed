//! The verbs on real devices, through `sideway` (rdma-core's libibverbs, loaded at run time).
//!
//! Port 1 of each device is used. The GID index is `MC_GID_INDEX` when set (as upstream reads
//! it), else the first RoCE v2 entry of the port's GID table, else 0 (InfiniBand). A kernel
//! without RDMA support makes listing devices fail with `ENOSYS`; that, like an empty list, is
//! the error "no RDMA devices".

use std::any::Any;
use std::sync::Arc;

use mooncake_core::{Error, Result};
use sideway::ibverbs::address::{AddressHandleAttribute, Gid, GidType};
use sideway::ibverbs::completion::{BasicCompletionQueue, WorkCompletionStatus};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, LinkLayer, Mtu};
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair as _, QueuePairAttribute, QueuePairState,
    QueuePairType, SetScatterGatherEntry, WorkRequestFlags,
};
use sideway::ibverbs::AccessFlags;

use crate::verbs::{
    no_devices, Completion, CompletionQueue, Device, DeviceAttrs, MemoryRegion, PostError,
    Provider, QpAddress, QueuePair, WcStatus, WorkRequest, WrOp,
};

/// The port the transport uses on every device.
const PORT: u8 = 1;

/// The host's devices through `sideway`.
#[derive(Debug, Default)]
pub struct SidewayProvider;

impl SidewayProvider {
    /// The provider (devices are listed when asked).
    pub fn new() -> Self {
        SidewayProvider
    }
}

/// Whether an error from listing devices means "this kernel has no RDMA at all".
fn is_enosys(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc_enosys())
}

const fn libc_enosys() -> i32 {
    38 // ENOSYS on Linux
}

fn list() -> Result<DeviceList> {
    DeviceList::new().map_err(|e| {
        let io = match &e.0 {
            sideway::ibverbs::device::GetDeviceListErrorKind::Ibverbs(io) => Some(io),
            #[allow(unreachable_patterns)]
            _ => None,
        };
        match io {
            Some(io) if is_enosys(io) => {
                no_devices("the kernel has no RDMA support (ENOSYS listing devices)")
            }
            Some(io) => no_devices(&format!("listing devices failed: {io}")),
            None => no_devices(&format!("listing devices failed: {e}")),
        }
    })
}

impl Provider for SidewayProvider {
    fn devices(&self) -> Result<Vec<String>> {
        let list = list()?;
        let names: Vec<String> = list.iter().map(|d| d.name()).collect();
        if names.is_empty() {
            return Err(no_devices("the device list is empty"));
        }
        Ok(names)
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Device>> {
        let list = list()?;
        let device = list
            .iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| Error::InvalidArgument(format!("no RDMA device named {name:?}")))?;
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            Error::Io(format!("RDMA device {name}: {what}: {e}"))
        };
        let ctx = device.open().map_err(|e| fail("open", &e))?;
        let attr = ctx.query_device().map_err(|e| fail("query device", &e))?;
        let port = ctx.query_port(PORT).map_err(|e| fail("query port", &e))?;
        let gid_index = gid_index(&ctx, port.link_layer());
        let gid = ctx
            .query_gid(PORT, gid_index)
            .map_err(|e| fail("query gid", &e))?;
        let pd = ctx.alloc_pd().map_err(|e| fail("allocate PD", &e))?;
        let numa_node =
            std::fs::read_to_string(format!("/sys/class/infiniband/{name}/device/numa_node"))
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .and_then(|n| u32::try_from(n).ok());
        Ok(Arc::new(SidewayDevice {
            attrs: DeviceAttrs {
                name: name.to_owned(),
                max_mr_size: attr.max_mr_size(),
                max_qp_wr: attr.max_qp_wr().max(1) as u32,
                max_cqe: attr.max_cqe().max(1) as u32,
                active_mtu: mtu_bytes(port.active_mtu()),
                lid: port.lid(),
                gid: gid.raw,
                numa_node,
            },
            gid_index: gid_index as u8,
            pd,
            ctx,
        }))
    }
}

/// `MC_GID_INDEX`, or the first RoCE v2 GID on Ethernet, or 0.
fn gid_index(ctx: &DeviceContext, link: LinkLayer) -> u32 {
    if let Some(i) = std::env::var("MC_GID_INDEX")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return i;
    }
    if link == LinkLayer::Ethernet {
        if let Ok(table) = ctx.query_gid_table() {
            if let Some(e) = table
                .iter()
                .find(|e| e.port_num() == PORT as u32 && e.gid_type() == GidType::RoceV2)
            {
                return e.gid_index();
            }
        }
    }
    0
}

fn mtu_bytes(m: Mtu) -> u32 {
    match m {
        Mtu::Mtu256 => 256,
        Mtu::Mtu512 => 512,
        Mtu::Mtu1024 => 1024,
        Mtu::Mtu2048 => 2048,
        Mtu::Mtu4096 => 4096,
    }
}

fn mtu_enum(bytes: u32) -> Mtu {
    match bytes {
        4096.. => Mtu::Mtu4096,
        2048.. => Mtu::Mtu2048,
        1024.. => Mtu::Mtu1024,
        512.. => Mtu::Mtu512,
        _ => Mtu::Mtu256,
    }
}

/// An opened device with its protection domain.
struct SidewayDevice {
    attrs: DeviceAttrs,
    gid_index: u8,
    pd: Arc<ProtectionDomain>,
    ctx: Arc<DeviceContext>,
}

impl std::fmt::Debug for SidewayDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidewayDevice")
            .field("attrs", &self.attrs)
            .finish()
    }
}

struct SidewayMr(Arc<sideway::ibverbs::memory_region::MemoryRegion>);

impl std::fmt::Debug for SidewayMr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SidewayMr(lkey {:#x})", self.0.lkey())
    }
}

impl MemoryRegion for SidewayMr {
    fn lkey(&self) -> u32 {
        self.0.lkey()
    }
    fn rkey(&self) -> u32 {
        self.0.rkey()
    }
}

struct SidewayCq(Arc<BasicCompletionQueue>);

impl std::fmt::Debug for SidewayCq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SidewayCq")
    }
}

impl CompletionQueue for SidewayCq {
    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<()> {
        use sideway::ibverbs::completion::PollCompletionQueueError;
        match self.0.start_poll() {
            Ok(poller) => {
                // The poller holds a batch already taken from the queue: stopping early would
                // lose completions, so all of it is taken (`max` is a hint here).
                let _ = max;
                for wc in poller {
                    out.push(Completion {
                        wr_id: wc.wr_id(),
                        status: status(wc.status()),
                    });
                }
                Ok(())
            }
            Err(PollCompletionQueueError::CompletionQueueEmpty) => Ok(()),
            Err(e) => Err(Error::Io(format!("polling a completion queue: {e}"))),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn status(code: u32) -> WcStatus {
    match WorkCompletionStatus::from(code) {
        WorkCompletionStatus::Success => WcStatus::Success,
        WorkCompletionStatus::LocalProtectionError | WorkCompletionStatus::LocalAccessError => {
            WcStatus::LocalProtection
        }
        WorkCompletionStatus::RemoteAccessError
        | WorkCompletionStatus::RemoteInvalidRequestError => WcStatus::RemoteAccess,
        WorkCompletionStatus::RetryCounterExceededError
        | WorkCompletionStatus::ResponderNotReadyRetryCounterExceededError => {
            WcStatus::RetryExceeded
        }
        WorkCompletionStatus::WorkRequestFlushedError => WcStatus::Flushed,
        _ => WcStatus::Other(code),
    }
}

struct SidewayQp {
    qp: BasicQueuePair,
    port_attrs: (u16, [u8; 16], u32),
    gid_index: u8,
    psn: u32,
}

impl std::fmt::Debug for SidewayQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SidewayQp({:#x})", self.qp.qp_number())
    }
}

impl Device for SidewayDevice {
    fn attrs(&self) -> &DeviceAttrs {
        &self.attrs
    }

    unsafe fn register(&self, addr: u64, len: u64) -> Result<Box<dyn MemoryRegion>> {
        // SAFETY: forwarded contract: the range stays valid until the region is dropped.
        let mr = unsafe {
            self.pd.reg_mr(
                addr as usize,
                len as usize,
                AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
            )
        }
        .map_err(|e| {
            Error::Io(format!(
                "{}: registering {len} bytes at {addr:#x}: {e}",
                self.attrs.name
            ))
        })?;
        Ok(Box::new(SidewayMr(mr)))
    }

    fn create_cq(&self, depth: u32) -> Result<Arc<dyn CompletionQueue>> {
        let cq = self
            .ctx
            .create_cq_builder()
            .setup_cqe(depth)
            .build()
            .map_err(|e| Error::Io(format!("{}: creating a CQ: {e}", self.attrs.name)))?;
        Ok(Arc::new(SidewayCq(cq)))
    }

    fn create_qp(&self, cq: &Arc<dyn CompletionQueue>, depth: u32) -> Result<Box<dyn QueuePair>> {
        let cq = cq
            .as_any()
            .downcast_ref::<SidewayCq>()
            .ok_or_else(|| Error::InvalidArgument("completion queue of another backend".into()))?
            .0
            .clone();
        let mut qp = self
            .pd
            .create_qp_builder()
            .setup_qp_type(QueuePairType::ReliableConnection)
            .setup_max_send_wr(depth)
            .setup_max_recv_wr(1)
            .setup_max_send_sge(1)
            .setup_max_recv_sge(1)
            .setup_send_cq(cq.clone())
            .setup_recv_cq(cq)
            .build()
            .map_err(|e| Error::Io(format!("{}: creating a QP: {e}", self.attrs.name)))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::Init)
            .setup_pkey_index(0)
            .setup_port(PORT)
            .setup_access_flags(
                AccessFlags::LocalWrite | AccessFlags::RemoteWrite | AccessFlags::RemoteRead,
            );
        qp.modify(&attr)
            .map_err(|e| Error::Io(format!("{}: QP to INIT: {e}", self.attrs.name)))?;
        let psn = qp.qp_number().wrapping_mul(2654435761) & 0xff_ffff;
        Ok(Box::new(SidewayQp {
            qp,
            port_attrs: (self.attrs.lid, self.attrs.gid, self.attrs.active_mtu),
            gid_index: self.gid_index,
            psn,
        }))
    }
}

impl QueuePair for SidewayQp {
    fn address(&self) -> QpAddress {
        QpAddress {
            qpn: self.qp.qp_number(),
            psn: self.psn,
            lid: self.port_attrs.0,
            gid: self.port_attrs.1,
            mtu: self.port_attrs.2,
        }
    }

    fn connect(&mut self, remote: &QpAddress, mtu: u32) -> Result<()> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(mtu_enum(mtu))
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(16)
            .setup_min_rnr_timer(12);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(remote.lid)
            .setup_port(PORT)
            .setup_service_level(0)
            .setup_grh_src_gid_index(self.gid_index)
            .setup_grh_dest_gid(&Gid { raw: remote.gid })
            .setup_grh_hop_limit(64);
        attr.setup_address_vector(&ah);
        self.qp
            .modify(&attr)
            .map_err(|e| Error::Io(format!("QP to RTR: {e}")))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(14)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(16);
        self.qp
            .modify(&attr)
            .map_err(|e| Error::Io(format!("QP to RTS: {e}")))
    }

    fn post(&mut self, wrs: &[WorkRequest]) -> std::result::Result<(), PostError> {
        let mut guard = self.qp.start_post_send();
        for wr in wrs {
            let handle = guard.construct_wr(wr.wr_id, WorkRequestFlags::Signaled);
            let local = match wr.op {
                WrOp::Write => handle.setup_write(wr.rkey, wr.remote_addr),
                WrOp::Read => handle.setup_read(wr.rkey, wr.remote_addr),
            };
            // SAFETY: the local range lies in a registered region that the caller keeps
            // registered (and its memory alive) until the request completes or its queue pair
            // is destroyed.
            unsafe { local.setup_sge(wr.lkey, wr.local_addr, wr.len) };
        }
        guard.post().map_err(|e| PostError {
            // Requests before the bad one may have been posted; the scheduler destroys the
            // queue pair on any post error, so none of them runs on after this, and counting
            // none as posted only retries them.
            posted: 0,
            error: Error::Io(format!("posting work requests: {e}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a host without RDMA (or whose kernel has none: ENOSYS), listing devices is the error
    /// "no RDMA devices", never a panic; on a host with devices, each opens.
    #[test]
    fn listing_devices_never_panics() {
        let p = SidewayProvider::new();
        match p.devices() {
            Ok(names) => {
                for n in names {
                    let d = p.open(&n).expect("a listed device opens");
                    assert!(crate::verbs::MTUS.contains(&d.attrs().active_mtu));
                }
            }
            Err(e) => assert!(e.to_string().contains("no RDMA devices"), "{e}"),
        }
        assert_eq!(mtu_bytes(mtu_enum(3000)), 2048);
        assert_eq!(
            status(WorkCompletionStatus::RemoteAccessError as u32),
            WcStatus::RemoteAccess
        );
    }
}
