//! get and its batch, buffer and zero-copy forms, and get_size. Misses and errors follow
//! upstream: `b""` / `None` for byte results, negative codes for zero-copy reads.

use mooncake::store::StagedValue;
use mooncake::Error;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use super::write::multi_items;
use super::PyStore;
use crate::buffer::BufferHandle;
use crate::runtime::{block_on, code_of, detached};

fn byte_counts(r: Result<Vec<Result<u64, Error>>, Error>, n: usize) -> Vec<i64> {
    match r {
        Ok(v) => v
            .iter()
            .map(|r| match r {
                Ok(n) => i64::try_from(*n).unwrap_or(i64::MAX),
                Err(e) => code_of(e),
            })
            .collect(),
        Err(e) => vec![code_of(&e); n],
    }
}

impl PyStore {
    fn get_one(&self, py: Python<'_>, key: &str) -> Result<StagedValue, Error> {
        let s = self.live()?;
        let r = block_on(py, async move { s.get_staged(key).await })?;
        if let Err(e) = &r {
            tracing::debug!("get {key:?}: {e}");
        }
        r
    }

    /// The value of `key` as a vector, copied out with the GIL released.
    fn get_vec(&self, py: Python<'_>, key: &str) -> Result<Vec<u8>, Error> {
        let s = self.live()?;
        block_on(py, async move { s.get(key).await })?
    }

    /// The values of `keys` as vectors, copied out with the GIL released.
    fn get_vecs(&self, py: Python<'_>, keys: &[String]) -> Vec<Result<Vec<u8>, Error>> {
        let r = self.live().and_then(|s| {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            block_on(py, async move { s.get_batch(&keys).await })
        });
        match r {
            Ok(v) => v,
            Err(e) => keys.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    fn get_many(&self, py: Python<'_>, keys: &[String]) -> Vec<Result<StagedValue, Error>> {
        let r = self.live().and_then(|s| {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            block_on(py, async move { s.get_batch_staged(&keys).await })
        });
        match r {
            Ok(v) => v,
            Err(e) => keys.iter().map(|_| Err(e.clone())).collect(),
        }
    }
}

/// A `bytes` object holding `value` (`b""` for an error), filled with the GIL released.
fn to_bytes<'py>(py: Python<'py>, value: Result<StagedValue, Error>) -> Bound<'py, PyBytes> {
    let filled = value.and_then(|v| filled_bytes(py, v.len(), |buf| v.read_into(buf)));
    filled.unwrap_or_else(|e| {
        tracing::debug!("get: {e}");
        PyBytes::new(py, b"")
    })
}

/// A new `bytes` object of `len` bytes written by `fill` with the GIL released. Unlike
/// `PyBytes::new_with` it does not zero the object first, which for a large value would be a
/// second pass over its pages with the GIL held.
fn filled_bytes<'py>(
    py: Python<'py>,
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), Error> + Send,
) -> Result<Bound<'py, PyBytes>, Error> {
    let size = ffi::Py_ssize_t::try_from(len)
        .map_err(|_| Error::InvalidArgument(format!("a value of {len} bytes")))?;
    // SAFETY: with a null source CPython returns a new, uninitialised object of `size` bytes
    // (or null with an exception set, which becomes the error).
    let obj = unsafe {
        Bound::from_owned_ptr_or_err(py, ffi::PyBytes_FromStringAndSize(std::ptr::null(), size))
    }
    .map_err(|e| Error::Io(format!("allocating a bytes object of {len} bytes: {e}")))?;
    // SAFETY: `obj` is a bytes object, so this is its buffer of `len` bytes.
    let buf = unsafe { ffi::PyBytes_AsString(obj.as_ptr()) } as usize;
    detached(py, move || {
        // SAFETY: the object is referenced only here until returned, so no Python code can
        // see the buffer while it is written without the GIL; it outlives this call.
        fill(unsafe { std::slice::from_raw_parts_mut(buf as *mut u8, len) })
    })??;
    // SAFETY: created above as a bytes object.
    Ok(unsafe { obj.cast_into_unchecked() })
}

#[pymethods]
impl PyStore {
    /// The value of `key`, or `b""` when it is missing or on any error.
    fn get<'py>(&self, py: Python<'py>, key: &str) -> Bound<'py, PyBytes> {
        to_bytes(py, self.get_one(py, key))
    }

    /// The values of `keys` (`b""` for each miss or error).
    fn get_batch<'py>(&self, py: Python<'py>, keys: Vec<String>) -> Vec<Bound<'py, PyBytes>> {
        self.get_many(py, &keys)
            .into_iter()
            .map(|r| to_bytes(py, r))
            .collect()
    }

    /// The value of `key` as a `BufferHandle` (buffer protocol), or `None`.
    fn get_buffer(&self, py: Python<'_>, key: &str) -> Option<BufferHandle> {
        self.get_vec(py, key).ok().map(BufferHandle::new)
    }

    /// `BufferHandle`s for `keys`, `None` for each miss.
    /// Not supported for a dummy client (as upstream): `None` for every key.
    fn batch_get_buffer(&self, py: Python<'_>, keys: Vec<String>) -> Vec<Option<BufferHandle>> {
        if self.live().is_ok_and(|s| s.is_dummy()) {
            tracing::error!("batch_get_buffer is not supported for dummy client");
            return keys.iter().map(|_| None).collect();
        }
        self.get_vecs(py, &keys)
            .into_iter()
            .map(|r| r.ok().map(BufferHandle::new))
            .collect()
    }

    /// Reads `key` into `size` bytes of registered memory at `buffer_ptr`: bytes read, -704 for
    /// a miss, -600 when the buffer is too small or not registered.
    fn get_into(&self, py: Python<'_>, key: String, buffer_ptr: u64, size: u64) -> i64 {
        byte_counts(
            self.live().and_then(|s| {
                block_on(py, async move {
                    s.batch_get_into(&[(key.as_str(), buffer_ptr, size)]).await
                })
            }),
            1,
        )[0]
    }

    /// Zero-copy batch read; bytes read or a negative code per key.
    fn batch_get_into(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        buffer_ptrs: Vec<u64>,
        sizes: Vec<u64>,
    ) -> Vec<i64> {
        let n = keys.len();
        let r = (|| {
            if keys.len() != buffer_ptrs.len() || keys.len() != sizes.len() {
                return Err(Error::with_code(
                    mooncake::ErrorCode::INVALID_PARAMS,
                    "keys, buffer_ptrs and sizes: lengths differ",
                ));
            }
            let items: Vec<(&str, u64, u64)> = keys
                .iter()
                .zip(buffer_ptrs.iter().zip(&sizes))
                .map(|(k, (p, s))| (k.as_str(), *p, *s))
                .collect();
            let s = self.live()?;
            block_on(py, async move { s.batch_get_into(&items).await })
        })();
        byte_counts(r, n)
    }

    /// Zero-copy batch read where each object fills several registered buffers in order. The
    /// optional 4th argument (upstream's `prefer_alloc_in_same_node`) is accepted and ignored.
    #[pyo3(signature = (keys, all_buffer_ptrs, all_sizes, prefer_alloc_in_same_node=false))]
    fn batch_get_into_multi_buffers(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        all_buffer_ptrs: Vec<Vec<u64>>,
        all_sizes: Vec<Vec<u64>>,
        prefer_alloc_in_same_node: bool,
    ) -> Vec<i64> {
        let _ = prefer_alloc_in_same_node;
        let n = keys.len();
        let r = (|| {
            let items = multi_items(&keys, &all_buffer_ptrs, &all_sizes)?;
            let s = self.live()?;
            block_on(
                py,
                async move { s.batch_get_into_multi_buffers(&items).await },
            )
        })();
        byte_counts(r, n)
    }

    /// Copies byte ranges of `key`'s value into memory of this process: one
    /// `(dst_address, src_offset, size)` per range; the bytes copied per range, or a negative
    /// code (-704 missing key, -600 a range outside the value or a destination that is not
    /// writable memory of this process). The value is read once for all its ranges.
    fn _read_ranges(&self, py: Python<'_>, key: String, ranges: Vec<(u64, u64, u64)>) -> Vec<i64> {
        let value = match self.get_vec(py, &key) {
            Ok(v) => v,
            Err(e) => return vec![code_of(&e); ranges.len()],
        };
        let invalid = i64::from(mooncake::ErrorCode::INVALID_PARAMS.code());
        ranges
            .iter()
            .map(|&(dst, off, len)| {
                let end = off.checked_add(len);
                if end.is_none_or(|e| e > value.len() as u64) {
                    tracing::warn!(
                        "range [{off}, +{len}) is outside {key:?} ({} bytes)",
                        value.len()
                    );
                    return invalid;
                }
                if len == 0 {
                    return 0;
                }
                if let Err(why) = crate::mapped::check_mapped(dst, len) {
                    tracing::warn!("destination {dst:#x} (+{len}): {why}");
                    return invalid;
                }
                let src = &value[off as usize..(off + len) as usize];
                // SAFETY: `[dst, dst + len)` was just checked to be writable memory of this
                // process; the caller owns it (as for get_into), and `src` is our own vector.
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len());
                }
                i64::try_from(len).unwrap_or(i64::MAX)
            })
            .collect()
    }

    /// The size of `key`'s value, or a negative code (-704 when missing).
    fn get_size(&self, py: Python<'_>, key: String) -> i64 {
        let r = self
            .live()
            .and_then(|s| block_on(py, async move { s.get_size(&key).await })?);
        match r {
            Ok(n) => i64::try_from(n).unwrap_or(i64::MAX),
            Err(e) => code_of(&e),
        }
    }
}
