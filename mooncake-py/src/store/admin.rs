//! Existence checks, removal, replica descriptors and copy/move tasks.

use mooncake::master::TaskId;
use mooncake::ErrorCode;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::PyStore;
use crate::runtime::{block_on, code_of, status};
use crate::types::{task_id_from, uuid, QueryTaskResponse, ReplicaDescriptor};

fn count(r: Result<u64, mooncake::Error>) -> i64 {
    match r {
        Ok(n) => i64::try_from(n).unwrap_or(i64::MAX),
        Err(e) => code_of(&e),
    }
}

impl PyStore {
    fn task_result(
        &self,
        py: Python<'_>,
        r: Result<TaskId, mooncake::Error>,
        what: &str,
    ) -> PyResult<(Py<PyAny>, i64)> {
        match r {
            Ok(id) => Ok((uuid(py, id.0)?, 0)),
            Err(e) => {
                tracing::warn!("{what}: {e}");
                Ok((uuid(py, 0)?, code_of(&e)))
            }
        }
    }
}

#[pymethods]
impl PyStore {
    /// 0 when set up and the master answers, 1 when not set up (or closed), 2 when the master
    /// does not answer.
    fn health_check(&self, py: Python<'_>) -> i64 {
        let Ok(s) = self.live() else { return 1 };
        match block_on(py, async move { s.master_metrics().await }) {
            Ok(Ok(_)) => 0,
            Ok(Err(e)) | Err(e) => {
                tracing::warn!("health_check: the master does not answer: {e}");
                2
            }
        }
    }

    /// 1 when `key` has a readable value, 0 when not, a negative code on error.
    fn is_exist(&self, py: Python<'_>, key: String) -> i64 {
        let r = self
            .live()
            .and_then(|s| block_on(py, async move { s.is_exist(&key).await })?);
        match r {
            Ok(b) => i64::from(b),
            Err(e) => code_of(&e),
        }
    }

    /// [`is_exist`] for each key.
    fn batch_is_exist(&self, py: Python<'_>, keys: Vec<String>) -> Vec<i64> {
        let n = keys.len();
        if n == 0 {
            return Vec::new();
        }
        let r = self.live().and_then(|s| {
            block_on(py, async move {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                s.batch_is_exist(&keys).await
            })?
        });
        match r {
            Ok(v) => v.into_iter().map(i64::from).collect(),
            Err(e) => vec![code_of(&e); n],
        }
    }

    /// Removes `key`: 0, -704 when missing, -706 while a read lease holds it (unless `force`).
    #[pyo3(signature = (key, force=false))]
    fn remove(&self, py: Python<'_>, key: String, force: bool) -> i64 {
        let r = self
            .live()
            .and_then(|s| block_on(py, async move { s.remove(&key, force).await })?);
        status(&r)
    }

    /// Removes each key; one code per key.
    #[pyo3(signature = (keys, force=false))]
    fn batch_remove(&self, py: Python<'_>, keys: Vec<String>, force: bool) -> Vec<i64> {
        let n = keys.len();
        if n == 0 {
            return Vec::new();
        }
        let r = self.live().and_then(|s| {
            block_on(py, async move {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                s.batch_remove(&keys, force).await
            })?
        });
        match r {
            Ok(v) => v.iter().map(status).collect(),
            Err(e) => vec![code_of(&e); n],
        }
    }

    /// Removes the keys matching `regex_pattern` (leased ones are skipped unless `force`): the
    /// number removed, or a negative code.
    #[pyo3(signature = (regex_pattern, force=false))]
    fn remove_by_regex(&self, py: Python<'_>, regex_pattern: String, force: bool) -> i64 {
        count(self.live().and_then(|s| {
            block_on(
                py,
                async move { s.remove_by_regex(&regex_pattern, force).await },
            )?
        }))
    }

    /// Removes every object (leased ones are skipped unless `force`): the number removed.
    #[pyo3(signature = (force=false))]
    fn remove_all(&self, py: Python<'_>, force: bool) -> i64 {
        count(
            self.live()
                .and_then(|s| block_on(py, async move { s.remove_all(force).await })?),
        )
    }

    /// Descriptors of `key`'s replicas (`[]` when missing).
    fn get_replica_desc(&self, py: Python<'_>, key: String) -> Vec<ReplicaDescriptor> {
        let r = self
            .live()
            .and_then(|s| block_on(py, async move { s.get_replica_desc(&key).await })?);
        match r {
            Ok(v) => v.iter().map(ReplicaDescriptor::from).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// `{key: [ReplicaDescriptor]}`; keys without a readable value are left out.
    fn batch_get_replica_desc<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<String>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        if keys.is_empty() {
            return Ok(out);
        }
        let r = self.live().and_then(|s| {
            block_on(py, async move {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                s.batch_get_replica_desc(&keys).await
            })?
        });
        if let Ok(map) = r {
            for (k, v) in map {
                let list = PyList::empty(py);
                for d in &v {
                    list.append(ReplicaDescriptor::from(d))?;
                }
                out.set_item(k, list)?;
            }
        }
        Ok(out)
    }

    /// Queues a copy of `key` to `targets`: `(task_id, 0)`, or `(UUID(int=0), code)`.
    fn create_copy_task(
        &self,
        py: Python<'_>,
        key: String,
        targets: Vec<String>,
    ) -> PyResult<(Py<PyAny>, i64)> {
        let r = self
            .live()
            .and_then(|s| block_on(py, async move { s.create_copy_task(&key, &targets).await })?);
        self.task_result(py, r, "create_copy_task")
    }

    /// Queues a move of `key`'s replica from `source` to `target`: `(task_id, 0)` or
    /// `(UUID(int=0), code)`.
    fn create_move_task(
        &self,
        py: Python<'_>,
        key: String,
        source: String,
        target: String,
    ) -> PyResult<(Py<PyAny>, i64)> {
        let r = self.live().and_then(|s| {
            block_on(py, async move {
                s.create_move_task(&key, &source, &target).await
            })?
        });
        self.task_result(py, r, "create_move_task")
    }

    /// `(QueryTaskResponse, 0)`, or `(None, -1400)` for an unknown task.
    fn query_task(
        &self,
        py: Python<'_>,
        task_id: &Bound<'_, PyAny>,
    ) -> PyResult<(Option<QueryTaskResponse>, i64)> {
        let id = TaskId(task_id_from(task_id)?);
        let r = self
            .live()
            .and_then(|s| block_on(py, async move { s.query_task(id).await })?);
        match r {
            Ok(info) => Ok((Some(QueryTaskResponse::new(py, &info)?), 0)),
            Err(e) => {
                let code = match e.code() {
                    ErrorCode::OK => i64::from(ErrorCode::TASK_NOT_FOUND.code()),
                    _ => code_of(&e),
                };
                Ok((None, code))
            }
        }
    }
}
