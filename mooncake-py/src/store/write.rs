//! put, upsert and their batch, multi-part and zero-copy forms. Return codes as upstream: 0, or
//! a negative code (-600 invalid arguments, -200 no space, ...).

use mooncake::master::{ReplicateConfig, WriteKind};
use mooncake::{Error, ErrorCode};
use pyo3::prelude::*;

use super::PyStore;
use crate::buffer::{views, ByteView};
use crate::runtime::{block_on, code_of, status};
use crate::types::{core_config, PyReplicateConfig};

fn mismatch(what: &str) -> Error {
    Error::with_code(ErrorCode::INVALID_PARAMS, format!("{what}: lengths differ"))
}

fn codes(results: Result<Vec<Result<(), Error>>, Error>, n: usize) -> Vec<i64> {
    match results {
        Ok(v) => v.iter().map(status).collect(),
        Err(e) => vec![code_of(&e); n],
    }
}

/// 0 when every item succeeded, else the first failure's code.
fn first_failure(results: Result<Vec<Result<(), Error>>, Error>) -> i64 {
    match results {
        Ok(v) => v.iter().map(status).find(|c| *c != 0).unwrap_or(0),
        Err(e) => code_of(&e),
    }
}

impl PyStore {
    fn write_bytes(
        &self,
        py: Python<'_>,
        kind: WriteKind,
        key: &str,
        parts: &[ByteView],
        config: ReplicateConfig,
    ) -> i64 {
        let slices: Vec<&[u8]> = parts.iter().map(ByteView::as_slice).collect();
        let r = self.live().and_then(|s| {
            block_on(py, async move {
                s.write_parts(kind, key, &slices, &config).await
            })?
        });
        log_failure("put", key, &r);
        status(&r)
    }

    fn write_batch(
        &self,
        py: Python<'_>,
        kind: WriteKind,
        keys: &[String],
        values: &[Bound<'_, PyAny>],
        config: ReplicateConfig,
    ) -> PyResult<Result<Vec<Result<(), Error>>, Error>> {
        let held = views(values, "values")?;
        if keys.len() != held.len() {
            return Ok(Err(mismatch("keys and values")));
        }
        let items: Vec<(&str, &[u8])> = keys
            .iter()
            .map(String::as_str)
            .zip(held.iter().map(ByteView::as_slice))
            .collect();
        Ok(self.live().and_then(|s| {
            block_on(
                py,
                async move { s.write_batch(kind, &items, &config).await },
            )
        }))
    }

    fn write_from(
        &self,
        py: Python<'_>,
        kind: WriteKind,
        keys: &[String],
        ptrs: &[u64],
        sizes: &[u64],
        config: ReplicateConfig,
    ) -> Result<Vec<Result<(), Error>>, Error> {
        if keys.len() != ptrs.len() || keys.len() != sizes.len() {
            return Err(mismatch("keys, buffer_ptrs and sizes"));
        }
        let items: Vec<(&str, u64, u64)> = keys
            .iter()
            .zip(ptrs.iter().zip(sizes))
            .map(|(k, (p, s))| (k.as_str(), *p, *s))
            .collect();
        let s = self.live()?;
        block_on(py, async move {
            s.batch_write_from(kind, &items, &config).await
        })
    }
}

fn log_failure(what: &str, key: &str, r: &Result<(), Error>) {
    if let Err(e) = r {
        tracing::debug!("{what} {key:?}: {e}");
    }
}

#[pymethods]
impl PyStore {
    /// Stores `value` (any bytes-like object) under `key`. A key that exists is left as it is.
    #[pyo3(signature = (key, value, config=None))]
    fn put(
        &self,
        py: Python<'_>,
        key: &str,
        value: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> PyResult<i64> {
        let v = [ByteView::new(value, "value")?];
        Ok(self.write_bytes(py, WriteKind::Put, key, &v, core_config(config)))
    }

    /// Stores the concatenation of `parts` under `key`.
    #[pyo3(signature = (key, *parts, config=None))]
    fn put_parts(
        &self,
        py: Python<'_>,
        key: &str,
        parts: Vec<Bound<'_, PyAny>>,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> PyResult<i64> {
        let v = views(&parts, "parts")?;
        Ok(self.write_bytes(py, WriteKind::Put, key, &v, core_config(config)))
    }

    /// Stores each value under its key; 0 when all succeeded, else the first failure's code.
    #[pyo3(signature = (keys, values, config=None))]
    fn put_batch(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        values: Vec<Bound<'_, PyAny>>,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> PyResult<i64> {
        Ok(first_failure(self.write_batch(
            py,
            WriteKind::Put,
            &keys,
            &values,
            core_config(config),
        )?))
    }

    /// [`put_batch`] with one code per key (used by the tensor helpers).
    #[pyo3(signature = (keys, values, config=None))]
    fn _put_batch_codes(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        values: Vec<Bound<'_, PyAny>>,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> PyResult<Vec<i64>> {
        let n = keys.len();
        Ok(codes(
            self.write_batch(py, WriteKind::Put, &keys, &values, core_config(config))?,
            n,
        ))
    }

    /// Stores `value` under `key`, replacing any current value.
    #[pyo3(signature = (key, value, config=None))]
    fn upsert(
        &self,
        py: Python<'_>,
        key: &str,
        value: &Bound<'_, PyAny>,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> PyResult<i64> {
        let v = [ByteView::new(value, "value")?];
        Ok(self.write_bytes(py, WriteKind::Upsert, key, &v, core_config(config)))
    }

    /// Stores the concatenation of `parts` under `key`, replacing any current value.
    #[pyo3(signature = (key, *parts, config=None))]
    fn upsert_parts(
        &self,
        py: Python<'_>,
        key: &str,
        parts: Vec<Bound<'_, PyAny>>,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> PyResult<i64> {
        let v = views(&parts, "parts")?;
        Ok(self.write_bytes(py, WriteKind::Upsert, key, &v, core_config(config)))
    }

    /// Upserts each value; 0 when all succeeded, else the first failure's code.
    #[pyo3(signature = (keys, values, config=None))]
    fn upsert_batch(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        values: Vec<Bound<'_, PyAny>>,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> PyResult<i64> {
        Ok(first_failure(self.write_batch(
            py,
            WriteKind::Upsert,
            &keys,
            &values,
            core_config(config),
        )?))
    }

    /// Stores `size` bytes of registered memory at `buffer_ptr` under `key`, with no copy.
    /// -600 when the range is not inside a registered buffer (no memory is touched).
    #[pyo3(signature = (key, buffer_ptr, size, config=None))]
    fn put_from(
        &self,
        py: Python<'_>,
        key: String,
        buffer_ptr: u64,
        size: u64,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> i64 {
        let r = self.write_from(
            py,
            WriteKind::Put,
            &[key],
            &[buffer_ptr],
            &[size],
            core_config(config),
        );
        first_failure(r)
    }

    /// [`put_from`], replacing any current value.
    #[pyo3(signature = (key, buffer_ptr, size, config=None))]
    fn upsert_from(
        &self,
        py: Python<'_>,
        key: String,
        buffer_ptr: u64,
        size: u64,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> i64 {
        let r = self.write_from(
            py,
            WriteKind::Upsert,
            &[key],
            &[buffer_ptr],
            &[size],
            core_config(config),
        );
        first_failure(r)
    }

    /// Zero-copy batch put; one code per key.
    #[pyo3(signature = (keys, buffer_ptrs, sizes, config=None))]
    fn batch_put_from(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        buffer_ptrs: Vec<u64>,
        sizes: Vec<u64>,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> Vec<i64> {
        let r = self.write_from(
            py,
            WriteKind::Put,
            &keys,
            &buffer_ptrs,
            &sizes,
            core_config(config),
        );
        codes(r, keys.len())
    }

    /// Zero-copy batch upsert; one code per key.
    #[pyo3(signature = (keys, buffer_ptrs, sizes, config=None))]
    fn batch_upsert_from(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        buffer_ptrs: Vec<u64>,
        sizes: Vec<u64>,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> Vec<i64> {
        let r = self.write_from(
            py,
            WriteKind::Upsert,
            &keys,
            &buffer_ptrs,
            &sizes,
            core_config(config),
        );
        codes(r, keys.len())
    }

    /// Zero-copy batch put where each value is the concatenation of several registered
    /// buffers; one code per key.
    #[pyo3(signature = (keys, all_buffer_ptrs, all_sizes, config=None))]
    fn batch_put_from_multi_buffers(
        &self,
        py: Python<'_>,
        keys: Vec<String>,
        all_buffer_ptrs: Vec<Vec<u64>>,
        all_sizes: Vec<Vec<u64>>,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> Vec<i64> {
        let n = keys.len();
        let config = core_config(config);
        let r = (|| {
            let items = multi_items(&keys, &all_buffer_ptrs, &all_sizes)?;
            let s = self.live()?;
            block_on(py, async move {
                s.batch_put_from_multi_buffers(&items, &config).await
            })
        })();
        codes(r, n)
    }

    /// Stores the metadata buffer followed by the data buffer (both registered) under `key`,
    /// as upstream lays them out. Not supported for a dummy client (-600, as upstream).
    #[pyo3(signature = (key, buffer_ptr, metadata_buffer_ptr, size, metadata_size, config=None))]
    #[allow(clippy::too_many_arguments)]
    fn put_from_with_metadata(
        &self,
        py: Python<'_>,
        key: String,
        buffer_ptr: u64,
        metadata_buffer_ptr: u64,
        size: u64,
        metadata_size: u64,
        config: Option<PyRef<'_, PyReplicateConfig>>,
    ) -> i64 {
        if self.live().is_ok_and(|s| s.is_dummy()) {
            tracing::error!("put_from_with_metadata is not supported for dummy client");
            return i64::from(ErrorCode::INVALID_PARAMS.code());
        }
        let config = core_config(config);
        let mut parts = Vec::with_capacity(2);
        if metadata_size > 0 {
            parts.push((metadata_buffer_ptr, metadata_size));
        }
        parts.push((buffer_ptr, size));
        let r = self.live().and_then(|s| {
            block_on(py, async move {
                s.batch_put_from_multi_buffers(&[(key.as_str(), parts)], &config)
                    .await
            })
        });
        first_failure(r)
    }
}

/// One item of the multi-buffer calls: a key and its `(address, size)` parts.
pub(super) type MultiItem<'k> = (&'k str, Vec<(u64, u64)>);

/// The items of the multi-buffer calls.
pub(super) fn multi_items<'k>(
    keys: &'k [String],
    all_ptrs: &[Vec<u64>],
    all_sizes: &[Vec<u64>],
) -> Result<Vec<MultiItem<'k>>, Error> {
    if keys.len() != all_ptrs.len() || keys.len() != all_sizes.len() {
        return Err(mismatch("keys, all_buffer_ptrs and all_sizes"));
    }
    keys.iter()
        .zip(all_ptrs.iter().zip(all_sizes))
        .map(|(k, (p, s))| {
            if p.len() != s.len() {
                return Err(mismatch("buffer_ptrs and sizes of one key"));
            }
            Ok((
                k.as_str(),
                p.iter().copied().zip(s.iter().copied()).collect(),
            ))
        })
        .collect()
}
