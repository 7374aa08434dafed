//! Host memory and CPU placement: `MooncakeHostMemAllocator` and `bind_to_numa_node`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use mooncake::{AlignedBuffer, ErrorCode};
use pyo3::prelude::*;

/// Buffers handed out by every allocator instance, by address.
fn allocations() -> &'static Mutex<HashMap<u64, AlignedBuffer>> {
    static ALLOCATIONS: OnceLock<Mutex<HashMap<u64, AlignedBuffer>>> = OnceLock::new();
    ALLOCATIONS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Page-aligned, zeroed host memory for zero-copy buffers. Memory stays allocated until `free`
/// (or the end of the process).
#[pyclass(module = "mooncake.store", frozen)]
pub(crate) struct MooncakeHostMemAllocator;

#[pymethods]
impl MooncakeHostMemAllocator {
    #[new]
    fn new() -> Self {
        MooncakeHostMemAllocator
    }

    /// Allocates `size` bytes; the address, or 0 on failure.
    fn alloc(&self, py: Python<'_>, size: u64) -> u64 {
        let r = py.detach(|| {
            let len = usize::try_from(size).ok()?;
            AlignedBuffer::new(len).ok()
        });
        match r {
            Some(buf) => {
                let addr = buf.addr();
                allocations()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(addr, buf);
                addr
            }
            None => {
                tracing::warn!("MooncakeHostMemAllocator.alloc({size}) failed");
                0
            }
        }
    }

    /// Frees memory from `alloc`: 0, or -600 for an address this allocator did not hand out.
    fn free(&self, py: Python<'_>, ptr: u64) -> i64 {
        let buf = allocations()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ptr);
        match buf {
            Some(b) => {
                py.detach(move || drop(b));
                0
            }
            None => {
                tracing::warn!("MooncakeHostMemAllocator.free({ptr:#x}): not allocated here");
                i64::from(ErrorCode::INVALID_PARAMS.code())
            }
        }
    }
}

/// Parses a kernel CPU list (`0-3,8,10-11`).
fn parse_cpulist(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (
                    a.trim().parse::<usize>().ok()?,
                    b.trim().parse::<usize>().ok()?,
                );
                if b < a {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.trim().parse().ok()?),
        }
    }
    Some(cpus)
}

/// Binds the calling thread to the CPUs of NUMA node `node` and prefers that node for its future
/// allocations. 0 on success; -600 (with a warning) for a node that does not exist; 0 with a
/// warning when the system has no NUMA information (binding skipped, as upstream).
#[pyfunction]
pub(crate) fn bind_to_numa_node(node: i64) -> i64 {
    let invalid = i64::from(ErrorCode::INVALID_PARAMS.code());
    let base = std::path::Path::new("/sys/devices/system/node");
    if !base.exists() {
        tracing::warn!("NUMA is not available on this system; binding skipped");
        return 0;
    }
    let Ok(n) = u32::try_from(node) else {
        tracing::warn!("invalid NUMA node {node}");
        return invalid;
    };
    let list = match std::fs::read_to_string(base.join(format!("node{n}/cpulist"))) {
        Ok(l) => l,
        Err(_) => {
            tracing::warn!("NUMA node {n} does not exist");
            return invalid;
        }
    };
    let Some(cpus) = parse_cpulist(&list) else {
        tracing::warn!("cannot parse the CPU list of NUMA node {n}: {list:?}");
        return invalid;
    };
    if cpus.is_empty() {
        tracing::warn!("NUMA node {n} has no CPUs");
        return invalid;
    }
    // SAFETY: cpu_set_t is plain bits; CPU_ZERO/CPU_SET only write inside it, and
    // sched_setaffinity(0, ..) reads it for the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        tracing::warn!("sched_setaffinity to NUMA node {n} failed: {err}");
        return -1;
    }
    // Prefer the node for allocations (MPOL_PREFERRED = 1), best effort.
    if n < 64 {
        let mask: libc::c_ulong = 1 << n;
        // SAFETY: set_mempolicy reads `maxnode` bits from `mask`, a live c_ulong.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_set_mempolicy,
                1 as libc::c_int,
                &mask as *const libc::c_ulong,
                64 as libc::c_ulong,
            )
        };
        if rc != 0 {
            tracing::debug!(
                "set_mempolicy(preferred node {n}) failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    0
}
