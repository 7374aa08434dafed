//! An in-process fake of the verbs ([`crate::verbs`]), for running the transport without RDMA
//! hardware: several "hosts" (one [`FakeProvider`] each, with any number of NICs) share a
//! [`FakeFabric`], and a WRITE or READ posted on a connected queue pair is a bounds- and
//! key-checked memcpy between memory regions of the two devices, completed at once into the
//! queue pair's completion queue.
//!
//! What is checked as a NIC would: a local key must belong to the posting device and cover the
//! local range, a remote key must belong to the connected peer's device and cover the remote
//! range (else a local protection or remote access error), the peer queue pair must still exist
//! and be ready (else retry exceeded), the path MTU must not exceed either end's, a queue pair
//! that saw an error goes into the error state and flushes everything posted afterwards, a
//! queue pair's send queue and a completion queue have bounded depth.
//!
//! Faults are injected per device ([`FakeNic::inject`]): completion errors for the next
//! requests, all queue pairs into the error state, a completion queue overrun, a dead link.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use mooncake_core::{Error, Result};

use crate::verbs::{
    Completion, CompletionQueue, Device, DeviceAttrs, MemoryRegion, PostError, Provider, QpAddress,
    QueuePair, WcStatus, WorkRequest, WrOp, MTUS,
};

/// A fault to inject into a fake NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next `count` work requests posted on the device complete with `status` (and move
    /// nothing); their queue pairs go into the error state.
    Completions {
        /// Status to complete with.
        status: WcStatus,
        /// How many requests.
        count: usize,
    },
    /// Every queue pair of the device goes into the error state now.
    QpsToError,
    /// The device's completion queues overrun: their next poll fails (completions are lost).
    CqOverrun,
    /// The link is down: from now on every request fails with retry exceeded, until
    /// [`FakeNic::link_up`].
    LinkDown,
    /// The next `count` work requests posted on the device hang: they move nothing and never
    /// complete (until their queue pair is destroyed).
    Stall {
        /// How many requests.
        count: usize,
    },
}

/// Settings of one fake NIC.
#[derive(Clone, Debug)]
pub struct FakeNicConfig {
    /// Name (`fake_0`).
    pub name: String,
    /// Active MTU in bytes.
    pub mtu: u32,
    /// Largest region it registers.
    pub max_mr_size: u64,
    /// Send queue depth limit.
    pub max_qp_wr: u32,
    /// NUMA node it sits on.
    pub numa_node: Option<u32>,
}

impl FakeNicConfig {
    /// A NIC named `name` with a 4096-byte MTU, 1 GiB regions, on no particular node.
    pub fn new(name: impl Into<String>) -> Self {
        FakeNicConfig {
            name: name.into(),
            mtu: 4096,
            max_mr_size: 1 << 30,
            max_qp_wr: 16384,
            numa_node: None,
        }
    }
}

/// A registered region as the fabric knows it.
#[derive(Clone, Copy, Debug)]
struct MrEntry {
    device: u32,
    addr: u64,
    len: u64,
}

#[derive(Debug, Default)]
struct Tables {
    /// By key (lkey and rkey are the same value, unique on the fabric).
    mrs: HashMap<u32, MrEntry>,
    /// By (device id, qpn).
    qps: HashMap<(u32, u32), Weak<QpShared>>,
}

/// The shared "wire": devices of every host, their regions and queue pairs.
#[derive(Debug)]
pub struct FakeFabric {
    tables: RwLock<Tables>,
    next_key: AtomicU32,
    next_qpn: AtomicU32,
    next_device: AtomicU32,
    /// Whether posts copy bytes (on by default; off to measure the scheduler alone).
    copy: AtomicBool,
    /// Every NIC by id, to find a peer's device when connecting.
    nics: Mutex<HashMap<u32, Weak<NicShared>>>,
}

impl FakeFabric {
    /// An empty fabric.
    pub fn new() -> Arc<Self> {
        Arc::new(FakeFabric {
            tables: RwLock::new(Tables::default()),
            next_key: AtomicU32::new(0x100),
            next_qpn: AtomicU32::new(0x10),
            next_device: AtomicU32::new(1),
            copy: AtomicBool::new(true),
            nics: Mutex::new(HashMap::new()),
        })
    }

    /// A host with `n` NICs named `fake_0` ... with default settings.
    pub fn host(self: &Arc<Self>, n: usize) -> Arc<FakeProvider> {
        self.host_with(
            (0..n)
                .map(|i| FakeNicConfig::new(format!("fake_{i}")))
                .collect(),
        )
    }

    /// A host with the given NICs.
    pub fn host_with(self: &Arc<Self>, nics: Vec<FakeNicConfig>) -> Arc<FakeProvider> {
        let nics = nics
            .into_iter()
            .map(|config| {
                let id = self.next_device.fetch_add(1, Ordering::Relaxed);
                let mut gid = [0u8; 16];
                gid[0] = 0xfe;
                gid[1] = 0x80;
                gid[12..].copy_from_slice(&id.to_be_bytes());
                let shared = Arc::new(NicShared {
                    id,
                    fabric: self.clone(),
                    attrs: DeviceAttrs {
                        name: config.name,
                        max_mr_size: config.max_mr_size,
                        max_qp_wr: config.max_qp_wr,
                        max_cqe: 1 << 20,
                        active_mtu: config.mtu,
                        lid: id as u16,
                        gid,
                        numa_node: config.numa_node,
                    },
                    faults: Mutex::new(Faults::default()),
                    fault_pending: AtomicBool::new(false),
                    link_down: AtomicBool::new(false),
                    posted: AtomicU64::new(0),
                    reached: AtomicU64::new(0),
                    qps: Mutex::new(Vec::new()),
                    cqs: Mutex::new(Vec::new()),
                });
                let mut known = self.nics.lock().expect("nics");
                known.retain(|_, w| w.strong_count() > 0);
                known.insert(id, Arc::downgrade(&shared));
                Arc::new(FakeNic { shared })
            })
            .collect();
        Arc::new(FakeProvider { nics })
    }

    /// Whether posts copy bytes. Off, requests still go through every check and completion,
    /// but move nothing: for measuring the scheduler's own cost.
    pub fn set_copy(&self, copy: bool) {
        self.copy.store(copy, Ordering::Relaxed);
    }

    /// Regions registered on the fabric now (all hosts).
    pub fn registered_regions(&self) -> usize {
        self.tables.read().expect("fabric").mrs.len()
    }

    /// Queue pairs alive on the fabric now (all hosts).
    pub fn live_qps(&self) -> usize {
        self.tables
            .read()
            .expect("fabric")
            .qps
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}

/// One fake host's verbs: its NICs.
#[derive(Debug)]
pub struct FakeProvider {
    nics: Vec<Arc<FakeNic>>,
}

impl FakeProvider {
    /// NIC `i` of this host, to inject faults into.
    pub fn nic(&self, i: usize) -> &Arc<FakeNic> {
        &self.nics[i]
    }
}

impl Provider for FakeProvider {
    fn devices(&self) -> Result<Vec<String>> {
        if self.nics.is_empty() {
            return Err(crate::verbs::no_devices("the fake host has no NICs"));
        }
        Ok(self
            .nics
            .iter()
            .map(|n| n.shared.attrs.name.clone())
            .collect())
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Device>> {
        self.nics
            .iter()
            .find(|n| n.shared.attrs.name == name)
            .map(|n| n.clone() as Arc<dyn Device>)
            .ok_or_else(|| Error::InvalidArgument(format!("no RDMA device named {name:?}")))
    }
}

#[derive(Debug, Default)]
struct Faults {
    /// `None`: a stall.
    completions: VecDeque<Option<WcStatus>>,
}

#[derive(Debug)]
struct NicShared {
    id: u32,
    fabric: Arc<FakeFabric>,
    attrs: DeviceAttrs,
    faults: Mutex<Faults>,
    /// Fast check for `faults` on the post path.
    fault_pending: AtomicBool,
    link_down: AtomicBool,
    /// Work requests posted on this NIC, and ones that reached it from a peer.
    posted: AtomicU64,
    reached: AtomicU64,
    qps: Mutex<Vec<Weak<QpShared>>>,
    cqs: Mutex<Vec<Weak<FakeCq>>>,
}

/// A fake NIC (also the opened device: the fake has no separate context).
#[derive(Debug)]
pub struct FakeNic {
    shared: Arc<NicShared>,
}

impl FakeNic {
    /// Injects a fault.
    pub fn inject(&self, fault: Fault) {
        let s = &self.shared;
        match fault {
            Fault::Completions { status, count } => {
                let mut f = s.faults.lock().expect("faults");
                f.completions
                    .extend(std::iter::repeat_n(Some(status), count));
                s.fault_pending.store(true, Ordering::Release);
            }
            Fault::QpsToError => {
                for qp in s.qps.lock().expect("qps").iter().filter_map(Weak::upgrade) {
                    qp.state.store(QP_ERROR, Ordering::Release);
                }
            }
            Fault::CqOverrun => {
                for cq in s.cqs.lock().expect("cqs").iter().filter_map(Weak::upgrade) {
                    cq.overrun.store(true, Ordering::Release);
                }
            }
            Fault::LinkDown => s.link_down.store(true, Ordering::Release),
            Fault::Stall { count } => {
                let mut f = s.faults.lock().expect("faults");
                f.completions.extend(std::iter::repeat_n(None, count));
                s.fault_pending.store(true, Ordering::Release);
            }
        }
    }

    /// Brings the link back after [`Fault::LinkDown`].
    pub fn link_up(&self) {
        self.shared.link_down.store(false, Ordering::Release);
    }

    /// Work requests posted on this NIC so far (whatever their outcome).
    pub fn posted(&self) -> u64 {
        self.shared.posted.load(Ordering::Relaxed)
    }

    /// Work requests from peers that reached this NIC so far (checked against its regions,
    /// whatever the outcome).
    pub fn reached(&self) -> u64 {
        self.shared.reached.load(Ordering::Relaxed)
    }

    /// Work requests still to fail or stall from [`Fault::Completions`] and [`Fault::Stall`].
    pub fn pending_faults(&self) -> usize {
        self.shared.faults.lock().expect("faults").completions.len()
    }

    fn take_fault(&self) -> Option<Option<WcStatus>> {
        if !self.shared.fault_pending.load(Ordering::Acquire) {
            return None;
        }
        let mut f = self.shared.faults.lock().expect("faults");
        let s = f.completions.pop_front();
        if f.completions.is_empty() {
            self.shared.fault_pending.store(false, Ordering::Release);
        }
        s
    }
}

#[derive(Debug)]
struct FakeMr {
    key: u32,
    fabric: Arc<FakeFabric>,
}

impl MemoryRegion for FakeMr {
    fn lkey(&self) -> u32 {
        self.key
    }
    fn rkey(&self) -> u32 {
        self.key
    }
}

impl Drop for FakeMr {
    fn drop(&mut self) {
        // Under the write lock: no copy through this key runs while it goes, none after.
        self.fabric
            .tables
            .write()
            .expect("fabric")
            .mrs
            .remove(&self.key);
    }
}

/// A fake completion queue.
#[derive(Debug)]
pub struct FakeCq {
    entries: Mutex<VecDeque<Completion>>,
    depth: usize,
    overrun: AtomicBool,
}

impl FakeCq {
    fn push(&self, c: Completion) {
        let mut e = self.entries.lock().expect("cq");
        if e.len() >= self.depth {
            self.overrun.store(true, Ordering::Release);
        }
        e.push_back(c);
    }
}

impl CompletionQueue for FakeCq {
    fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<()> {
        if self.overrun.load(Ordering::Acquire) {
            self.entries.lock().expect("cq").clear();
            return Err(Error::Io("completion queue overrun".into()));
        }
        let mut e = self.entries.lock().expect("cq");
        let n = max.min(e.len());
        out.extend(e.drain(..n));
        Ok(())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

const QP_RESET: u8 = 0;
const QP_RTS: u8 = 1;
const QP_ERROR: u8 = 2;
const QP_DESTROYED: u8 = 3;

#[derive(Debug)]
struct QpShared {
    qpn: u32,
    state: AtomicU8,
}

#[derive(Debug)]
struct FakeQp {
    shared: Arc<QpShared>,
    nic: Arc<FakeNic>,
    cq: Arc<FakeCq>,
    psn: u32,
    depth: u32,
    /// The connected peer: its queue pair and device id.
    remote: Option<(Weak<QpShared>, u32, Arc<NicShared>)>,
}

impl Drop for FakeQp {
    fn drop(&mut self) {
        self.shared.state.store(QP_DESTROYED, Ordering::Release);
        let fabric = &self.nic.shared.fabric;
        fabric
            .tables
            .write()
            .expect("fabric")
            .qps
            .remove(&(self.nic.shared.id, self.shared.qpn));
    }
}

impl Device for FakeNic {
    fn attrs(&self) -> &DeviceAttrs {
        &self.shared.attrs
    }

    unsafe fn register(&self, addr: u64, len: u64) -> Result<Box<dyn MemoryRegion>> {
        if len == 0 || len > self.shared.attrs.max_mr_size {
            return Err(Error::InvalidArgument(format!(
                "{}: cannot register {len} bytes (max {})",
                self.shared.attrs.name, self.shared.attrs.max_mr_size
            )));
        }
        let fabric = &self.shared.fabric;
        let key = fabric.next_key.fetch_add(1, Ordering::Relaxed);
        fabric.tables.write().expect("fabric").mrs.insert(
            key,
            MrEntry {
                device: self.shared.id,
                addr,
                len,
            },
        );
        Ok(Box::new(FakeMr {
            key,
            fabric: fabric.clone(),
        }))
    }

    fn create_cq(&self, depth: u32) -> Result<Arc<dyn CompletionQueue>> {
        let cq = Arc::new(FakeCq {
            entries: Mutex::new(VecDeque::new()),
            depth: depth as usize,
            overrun: AtomicBool::new(false),
        });
        let mut cqs = self.shared.cqs.lock().expect("cqs");
        cqs.retain(|w| w.strong_count() > 0);
        cqs.push(Arc::downgrade(&cq));
        Ok(cq)
    }

    fn create_qp(&self, cq: &Arc<dyn CompletionQueue>, depth: u32) -> Result<Box<dyn QueuePair>> {
        // The fake's queues are the only kind this device makes: find ours by address.
        let cq = self
            .shared
            .cqs
            .lock()
            .expect("cqs")
            .iter()
            .filter_map(Weak::upgrade)
            .find(|c| std::ptr::addr_eq(Arc::as_ptr(c), Arc::as_ptr(cq)))
            .ok_or_else(|| Error::InvalidArgument("completion queue of another device".into()))?;
        if depth == 0 || depth > self.shared.attrs.max_qp_wr {
            return Err(Error::InvalidArgument(format!(
                "queue pair depth {depth} outside 1..={}",
                self.shared.attrs.max_qp_wr
            )));
        }
        let fabric = &self.shared.fabric;
        let qpn = fabric.next_qpn.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
        let shared = Arc::new(QpShared {
            qpn,
            state: AtomicU8::new(QP_RESET),
        });
        fabric
            .tables
            .write()
            .expect("fabric")
            .qps
            .insert((self.shared.id, qpn), Arc::downgrade(&shared));
        let mut qps = self.shared.qps.lock().expect("qps");
        qps.retain(|w| w.strong_count() > 0);
        qps.push(Arc::downgrade(&shared));
        let nic = Arc::new(FakeNic {
            shared: self.shared.clone(),
        });
        Ok(Box::new(FakeQp {
            shared,
            nic,
            cq,
            psn: qpn.wrapping_mul(2654435761) & 0xff_ffff,
            depth,
            remote: None,
        }))
    }
}

impl QueuePair for FakeQp {
    fn address(&self) -> QpAddress {
        let a = &self.nic.shared.attrs;
        QpAddress {
            qpn: self.shared.qpn,
            psn: self.psn,
            lid: a.lid,
            gid: a.gid,
            mtu: a.active_mtu,
        }
    }

    fn connect(&mut self, remote: &QpAddress, mtu: u32) -> Result<()> {
        if !MTUS.contains(&mtu) || mtu > self.nic.shared.attrs.active_mtu || mtu > remote.mtu {
            return Err(Error::InvalidArgument(format!(
                "path MTU {mtu} invalid for ports of {} and {}",
                self.nic.shared.attrs.active_mtu, remote.mtu
            )));
        }
        let device = u32::from_be_bytes(remote.gid[12..].try_into().expect("4 bytes"));
        let fabric = &self.nic.shared.fabric;
        let peer = fabric
            .tables
            .read()
            .expect("fabric")
            .qps
            .get(&(device, remote.qpn))
            .cloned()
            .filter(|w| w.strong_count() > 0)
            .ok_or_else(|| Error::PeerUnreachable {
                peer: format!("qpn {:#x}", remote.qpn),
                reason: "no such queue pair on the fabric".into(),
            })?;
        // The peer's device, to check its link on every request.
        let peer_nic = fabric
            .nics
            .lock()
            .expect("nics")
            .get(&device)
            .and_then(Weak::upgrade)
            .ok_or_else(|| Error::PeerUnreachable {
                peer: format!("device {device}"),
                reason: "no such device on the fabric".into(),
            })?;
        self.remote = Some((peer, device, peer_nic));
        self.shared.state.store(QP_RTS, Ordering::Release);
        Ok(())
    }

    fn post(&mut self, wrs: &[WorkRequest]) -> std::result::Result<(), PostError> {
        let state = self.shared.state.load(Ordering::Acquire);
        if state == QP_RESET {
            return Err(PostError {
                posted: 0,
                error: Error::InvalidArgument("post on a queue pair that is not connected".into()),
            });
        }
        if wrs.len() > self.depth as usize {
            return Err(PostError {
                posted: 0,
                error: Error::InvalidArgument("more requests than the send queue holds".into()),
            });
        }
        let fabric = &self.nic.shared.fabric;
        let copy = fabric.copy.load(Ordering::Relaxed);
        let Some((peer, peer_device, peer_nic)) = &self.remote else {
            unreachable!("connected queue pairs have a peer");
        };
        let tables = fabric.tables.read().expect("fabric");
        for wr in wrs {
            let Some(status) = self.run(wr, &tables, peer, *peer_device, peer_nic, copy) else {
                continue; // stalled: never completes
            };
            if status != WcStatus::Success {
                self.shared.state.store(QP_ERROR, Ordering::Release);
            }
            self.cq.push(Completion {
                wr_id: wr.wr_id,
                status,
            });
        }
        Ok(())
    }
}

impl FakeQp {
    fn run(
        &self,
        wr: &WorkRequest,
        tables: &Tables,
        peer: &Weak<QpShared>,
        peer_device: u32,
        peer_nic: &NicShared,
        copy: bool,
    ) -> Option<WcStatus> {
        self.nic.shared.posted.fetch_add(1, Ordering::Relaxed);
        if self.shared.state.load(Ordering::Acquire) != QP_RTS {
            return Some(WcStatus::Flushed);
        }
        if let Some(s) = self.nic.take_fault() {
            return s;
        }
        if self.nic.shared.link_down.load(Ordering::Acquire)
            || peer_nic.link_down.load(Ordering::Acquire)
        {
            return Some(WcStatus::RetryExceeded);
        }
        match peer.upgrade() {
            Some(p) if p.state.load(Ordering::Acquire) == QP_RTS => {}
            _ => return Some(WcStatus::RetryExceeded),
        }
        peer_nic.reached.fetch_add(1, Ordering::Relaxed);
        let within = |e: &MrEntry, addr: u64| {
            addr >= e.addr
                && addr
                    .checked_add(wr.len as u64)
                    .is_some_and(|end| end <= e.addr + e.len)
        };
        match tables.mrs.get(&wr.lkey) {
            Some(e) if e.device == self.nic.shared.id && within(e, wr.local_addr) => {}
            _ => return Some(WcStatus::LocalProtection),
        }
        match tables.mrs.get(&wr.rkey) {
            Some(e) if e.device == peer_device && within(e, wr.remote_addr) => {}
            _ => return Some(WcStatus::RemoteAccess),
        }
        if copy {
            let (src, dst) = match wr.op {
                WrOp::Write => (wr.local_addr, wr.remote_addr),
                WrOp::Read => (wr.remote_addr, wr.local_addr),
            };
            // SAFETY: both ranges lie inside registered regions (checked above), whose memory
            // stays valid while they are registered; deregistration takes the fabric's write
            // lock, which waits for this read lock, so neither goes during the copy. `ptr::copy`
            // allows overlap.
            unsafe {
                std::ptr::copy(
                    src as usize as *const u8,
                    dst as usize as *mut u8,
                    wr.len as usize,
                )
            };
        }
        Some(WcStatus::Success)
    }
}
