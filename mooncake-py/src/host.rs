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

/// C entry point of the host allocator, with the signature of a pluggable allocator's `malloc`
/// (`void* alloc(size_t size, int device, void* stream)`): page-aligned zeroed host memory, or
/// null. The device and stream are ignored (host memory only).
extern "C" fn host_alloc(
    size: usize,
    _device: std::ffi::c_int,
    _stream: *mut std::ffi::c_void,
) -> *mut std::ffi::c_void {
    // No panic may unwind into the C caller.
    std::panic::catch_unwind(|| match AlignedBuffer::new(size) {
        Ok(buf) => {
            let addr = buf.addr();
            allocations()
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(addr, buf);
            addr as *mut std::ffi::c_void
        }
        Err(e) => {
            tracing::warn!("host allocator: {size} bytes: {e}");
            std::ptr::null_mut()
        }
    })
    .unwrap_or(std::ptr::null_mut())
}

/// C entry point freeing memory of [`host_alloc`], with the signature of a pluggable
/// allocator's `free` (`void free(void* ptr, size_t size, int device, void* stream)`); an
/// address it did not hand out is logged and left alone.
extern "C" fn host_free(
    ptr: *mut std::ffi::c_void,
    _size: usize,
    _device: std::ffi::c_int,
    _stream: *mut std::ffi::c_void,
) {
    let _ = std::panic::catch_unwind(|| {
        let buf = allocations()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(ptr as u64));
        if buf.is_none() && !ptr.is_null() {
            tracing::warn!("host allocator: free({ptr:?}): not allocated here");
        }
    });
}

/// The address of the host allocator's C `alloc` function (for a pluggable allocator, e.g.
/// `torch.cuda.memory.CUDAPluggableAllocator`).
#[pyfunction]
pub(crate) fn get_alloc_func_addr() -> u64 {
    host_alloc as *const () as u64
}

/// The address of the host allocator's C `free` function (see `get_alloc_func_addr`).
#[pyfunction]
pub(crate) fn get_free_func_addr() -> u64 {
    host_free as *const () as u64
}

/// A copy of `size` bytes of this process's memory at `ptr` (for the range calls of
/// `mooncake.store`); `ValueError` when the range is not readable memory of this process.
#[pyfunction]
pub(crate) fn _copy_from_ptr<'py>(
    py: Python<'py>,
    ptr: u64,
    size: u64,
) -> PyResult<Bound<'py, pyo3::types::PyBytes>> {
    if size == 0 {
        return Ok(pyo3::types::PyBytes::new(py, b""));
    }
    crate::mapped::check_readable(ptr, size).map_err(pyo3::exceptions::PyValueError::new_err)?;
    let len = usize::try_from(size)
        .map_err(|_| pyo3::exceptions::PyValueError::new_err("size too large"))?;
    // SAFETY: `[ptr, ptr + len)` was just checked to be readable memory of this process; the
    // caller owns it (as for put_from) and keeps it alive during this call.
    let src = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
    Ok(pyo3::types::PyBytes::new(py, src))
}

/// Copies the bytes of `data` (any bytes-like object) to `ptr` in this process's memory (for the
/// tensor calls of `mooncake.store` that fill a caller's buffer); `ValueError` when the
/// destination is not writable memory of this process. The number of bytes copied.
#[pyfunction]
pub(crate) fn _copy_to_ptr(ptr: u64, data: &Bound<'_, PyAny>) -> PyResult<u64> {
    let view = crate::buffer::ByteView::new(data, "data")?;
    let src = view.as_slice();
    if src.is_empty() {
        return Ok(0);
    }
    crate::mapped::check_mapped(ptr, src.len() as u64)
        .map_err(pyo3::exceptions::PyValueError::new_err)?;
    // SAFETY: the destination was just checked to be writable memory of this process, which the
    // caller owns; `src` is a held buffer export that cannot overlap a range it did not give.
    unsafe { std::ptr::copy(src.as_ptr(), ptr as *mut u8, src.len()) };
    Ok(src.len() as u64)
}
