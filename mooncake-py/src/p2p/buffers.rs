//! The buffers of `register` and `get_replica`: Python objects in, checked address ranges out,
//! and the registrations with the store's engine that let peers read them.
//!
//! A buffer is a `(ptr, size)` pair, an object with the buffer protocol (numpy arrays,
//! bytearray, memoryview) or a CPU torch tensor (anything with `data_ptr()`). The binding keeps
//! the object (and its buffer export) alive while the store may touch its memory; raw pairs are
//! the caller's promise, checked against this process's mappings so that a wrong address raises
//! instead of crashing.
//!
//! Every buffer must be writable memory, for `register` too: the engine lets peers WRITE into
//! registered memory as well as read it (as RDMA registrations with remote write do), and a
//! write into a read-only mapping would crash this process, into `bytes` corrupt an immutable
//! object.

use std::collections::HashMap;

use mooncake::{Location, TransferEngine};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

/// What keeps a buffer's memory alive while it is registered.
pub(crate) enum Keep {
    /// A `(ptr, size)` pair: the caller's promise.
    Raw,
    /// A held buffer export (the object cannot be resized or freed while it exists).
    Export(#[allow(dead_code)] PyUntypedBuffer),
    /// A reference to a tensor-like object.
    Object(#[allow(dead_code)] Py<PyAny>),
}

/// One buffer argument, checked.
pub(crate) struct ArgBuffer {
    pub(crate) addr: u64,
    pub(crate) len: u64,
    pub(crate) keep: Keep,
}

/// Converts the `buffers` argument: a list or tuple of buffers, or one buffer object.
pub(crate) fn parse(arg: &Bound<'_, PyAny>) -> PyResult<Vec<ArgBuffer>> {
    let items: Vec<Bound<'_, PyAny>> = if let Ok(l) = arg.cast::<PyList>() {
        l.iter().collect()
    } else if let Ok(t) = arg.cast::<PyTuple>() {
        if is_pair(arg) {
            return Err(PyTypeError::new_err(
                "buffers must be a list of buffers: wrap a (ptr, size) pair in a list",
            ));
        }
        t.iter().collect()
    } else if arg.is_instance_of::<pyo3::types::PyString>() || arg.is_none() {
        return Err(PyTypeError::new_err(format!(
            "buffers must be a list of (ptr, size) pairs, numpy arrays or tensors, not {}",
            type_name(arg)
        )));
    } else {
        vec![arg.clone()]
    };
    if items.is_empty() {
        return Err(PyValueError::new_err("buffers is empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, o)| one(o).map_err(|e| prefix(o.py(), e, i)))
        .collect()
}

fn prefix(py: Python<'_>, e: PyErr, i: usize) -> PyErr {
    let msg = format!("buffers[{i}]: {}", e.value(py));
    if e.is_instance_of::<PyTypeError>(py) {
        PyTypeError::new_err(msg)
    } else {
        PyValueError::new_err(msg)
    }
}

fn type_name(o: &Bound<'_, PyAny>) -> String {
    o.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn is_pair(o: &Bound<'_, PyAny>) -> bool {
    o.cast::<PyTuple>()
        .is_ok_and(|t| t.len() == 2 && t.iter().all(|x| x.is_instance_of::<pyo3::types::PyInt>()))
}

fn checked_len(addr: u64, len: u64) -> PyResult<()> {
    if len == 0 {
        return Err(PyValueError::new_err("empty buffer"));
    }
    if addr == 0 {
        return Err(PyValueError::new_err("null pointer"));
    }
    if addr.checked_add(len).is_none() {
        return Err(PyValueError::new_err(format!(
            "{addr:#x}+{len} wraps the address space"
        )));
    }
    Ok(())
}

fn one(o: &Bound<'_, PyAny>) -> PyResult<ArgBuffer> {
    let two = o.cast::<PyTuple>().is_ok_and(|t| t.len() == 2)
        || o.cast::<PyList>().is_ok_and(|l| l.len() == 2);
    if two {
        let (addr, len): (i128, i128) = o
            .extract()
            .map_err(|_| PyTypeError::new_err("a (ptr, size) pair must hold two integers"))?;
        let (Ok(addr), Ok(len)) = (u64::try_from(addr), u64::try_from(len)) else {
            return Err(PyValueError::new_err(format!(
                "({addr}, {len}): pointer and size must be non-negative 64-bit integers"
            )));
        };
        checked_len(addr, len)?;
        crate::mapped::check_mapped(addr, len).map_err(PyValueError::new_err)?;
        return Ok(ArgBuffer {
            addr,
            len,
            keep: Keep::Raw,
        });
    }
    if o.hasattr("data_ptr")? && o.hasattr("element_size")? {
        return tensor(o);
    }
    let view = PyUntypedBuffer::get(o).map_err(|_| {
        PyTypeError::new_err(format!(
            "expected a (ptr, size) pair, a numpy array, a bytes-like object or a torch tensor, not {}",
            type_name(o)
        ))
    })?;
    if !view.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{} is not contiguous",
            type_name(o)
        )));
    }
    if view.readonly() {
        return Err(PyValueError::new_err(format!(
            "{} is read-only: peers may write registered memory, so buffers must be writable",
            type_name(o)
        )));
    }
    let (addr, len) = (view.buf_ptr() as u64, view.len_bytes() as u64);
    checked_len(addr, len)?;
    Ok(ArgBuffer {
        addr,
        len,
        keep: Keep::Export(view),
    })
}

/// A torch tensor (duck-typed: `data_ptr()`, `element_size()`, `numel()`, `is_contiguous()`,
/// `device.type`).
fn tensor(o: &Bound<'_, PyAny>) -> PyResult<ArgBuffer> {
    let device: String = o.getattr("device")?.getattr("type")?.extract()?;
    if device != "cpu" {
        return Err(PyValueError::new_err(format!(
            "a tensor on {device}: only CPU tensors can be shared (the transport is TCP)"
        )));
    }
    if !o.call_method0("is_contiguous")?.extract::<bool>()? {
        return Err(PyValueError::new_err(
            "the tensor is not contiguous (call .contiguous() first)",
        ));
    }
    let addr: u64 = o.call_method0("data_ptr")?.extract()?;
    let numel: u64 = o.call_method0("numel")?.extract()?;
    let elem: u64 = o.call_method0("element_size")?.extract()?;
    let len = numel
        .checked_mul(elem)
        .ok_or_else(|| PyValueError::new_err("tensor size overflows"))?;
    checked_len(addr, len)?;
    Ok(ArgBuffer {
        addr,
        len,
        keep: Keep::Object(o.clone().unbind()),
    })
}

/// The ranges this binding registered with the engine, by start address, with how many
/// payloads or replicas use each.
#[derive(Default)]
pub(crate) struct Pins {
    regions: HashMap<u64, usize>,
}

/// Buffers registered for one payload or replica, released together.
#[derive(Default)]
pub(crate) struct Held {
    pub(crate) regions: Vec<u64>,
    pub(crate) keep: Vec<Keep>,
}

impl Pins {
    /// Registers each buffer with `engine` (or counts one more use of the registration that
    /// contains it). On failure undoes what it did and returns the reason (the caller's
    /// mistake, a `ValueError`).
    pub(crate) fn pin(
        &mut self,
        engine: &TransferEngine,
        buffers: Vec<ArgBuffer>,
        location: &str,
    ) -> Result<(Vec<mooncake_p2p::Buffer>, Held), (String, Held)> {
        let mut held = Held::default();
        let mut out = Vec::with_capacity(buffers.len());
        for b in buffers {
            out.push(mooncake_p2p::Buffer::new(b.addr, b.len));
            let start = match engine.memory().resolve(b.addr, b.len) {
                Ok(region) if self.regions.contains_key(&region.buffer().addr()) => {
                    region.buffer().addr()
                }
                Ok(_) => {
                    return Err((
                        format!("{:#x}+{} lies in memory the store owns", b.addr, b.len),
                        held,
                    ))
                }
                Err(_) => {
                    // SAFETY: the range is mapped memory of this process (checked for raw
                    // pairs), kept alive by `keep` for objects; the caller promises that raw
                    // memory stays valid while registered (as the seed's API requires).
                    // `held` unregisters it before `keep` is dropped.
                    let r = unsafe {
                        engine.register_memory(b.addr, b.len, Location(location.to_owned()))
                    };
                    if let Err(e) = r {
                        return Err((format!("{:#x}+{}: {e}", b.addr, b.len), held));
                    }
                    b.addr
                }
            };
            *self.regions.entry(start).or_default() += 1;
            held.regions.push(start);
            held.keep.push(b.keep);
        }
        Ok((out, held))
    }

    /// Every region registered, for a final release.
    pub(crate) fn regions(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.keys().copied()
    }

    /// Drops one use of each region of `held`; returns the regions no longer used, to be
    /// unregistered from the engine (before `held.keep` is dropped).
    pub(crate) fn unpin(&mut self, held: &Held) -> Vec<u64> {
        let mut free = Vec::new();
        for r in &held.regions {
            if let Some(n) = self.regions.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    self.regions.remove(r);
                    free.push(*r);
                }
            }
        }
        free
    }
}

/// Unregisters `regions` from the engine and waits until no transfer uses them.
pub(crate) async fn release(engine: &TransferEngine, regions: Vec<u64>) {
    for r in regions {
        match engine.unregister_memory_async(r) {
            Ok(wait) => {
                if tokio::time::timeout(mooncake::memory::UNREGISTER_WAIT, wait)
                    .await
                    .is_err()
                {
                    tracing::warn!("buffer {r:#x} still in use after unregistering it");
                }
            }
            Err(e) => tracing::warn!("unregistering buffer {r:#x}: {e}"),
        }
    }
}
