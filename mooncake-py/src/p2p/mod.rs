//! `mooncake.p2p.P2PStore`: the seed's P2P store API over `mooncake_p2p::P2PStore`.
//!
//! Conversions only: the metadata URI picks a metadata store, buffers are checked and
//! registered with the store's engine ([`buffers`]), every call waits with the GIL released,
//! and errors become exceptions ([`error`]).

mod buffers;
mod error;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use mooncake::{MemoryMetadataStore, MetadataStore};
use mooncake_p2p::{CancelToken, P2PConfig, P2PStore, PayloadInfo, PullOptions};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::runtime::block_on;
use buffers::{Held, Pins};
pub(crate) use error::P2PError;
use error::{internal, p2p_error, to_py};

/// The catalog shared by every store of this process created with `metadata_uri="memory"`.
fn process_catalog() -> Arc<dyn MetadataStore> {
    static CATALOG: OnceLock<Arc<MemoryMetadataStore>> = OnceLock::new();
    CATALOG
        .get_or_init(|| Arc::new(MemoryMetadataStore::new()))
        .clone()
}

fn metadata_store(uri: &str) -> PyResult<Arc<dyn MetadataStore>> {
    match uri {
        "memory" | "local" => Ok(process_catalog()),
        u if u.starts_with("http://") || u.starts_with("https://") => {
            mooncake::http::HttpMetadataStore::new(u)
                .map(|s| Arc::new(s) as Arc<dyn MetadataStore>)
                .map_err(|e| PyValueError::new_err(format!("metadata_uri {u:?}: {e}")))
        }
        u => Err(PyValueError::new_err(format!(
            "metadata_uri {u:?} is not supported: use \"http(s)://host:port/metadata\" (a \
             mooncake_master --enable_http_metadata_server) or \"memory\" (one catalog for the \
             stores of this process)"
        ))),
    }
}

/// How often a waiting `get_replica` looks for signals (Ctrl-C).
const SIGNAL_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// What this binding registered with the engine, per payload and replica.
#[derive(Default)]
struct State {
    pins: Pins,
    registered: HashMap<String, Held>,
    replicas: HashMap<String, Held>,
    /// The pulls in progress, for `cancel`.
    pulling: HashMap<String, CancelToken>,
}

/// A P2P store instance (see `mooncake.p2p`).
#[pyclass(module = "mooncake.p2p", name = "P2PStore", subclass, frozen, weakref)]
pub(crate) struct PyP2PStore {
    /// The store and the pid that made it; `None` once closed.
    store: Mutex<Option<(u32, Arc<P2PStore>)>>,
    state: Mutex<State>,
}

/// A payload as `P2PStore.list` returns it.
#[pyclass(module = "mooncake.p2p", name = "PayloadInfo", frozen, eq)]
#[derive(PartialEq)]
pub(crate) struct PyPayloadInfo {
    #[pyo3(get)]
    name: String,
    #[pyo3(get)]
    max_shard_size: u64,
    #[pyo3(get)]
    total_size: u64,
    #[pyo3(get)]
    size_list: Vec<u64>,
}

#[pymethods]
impl PyPayloadInfo {
    fn __repr__(&self) -> String {
        format!(
            "PayloadInfo(name={:?}, max_shard_size={}, total_size={}, size_list={:?})",
            self.name, self.max_shard_size, self.total_size, self.size_list
        )
    }
}

impl From<PayloadInfo> for PyPayloadInfo {
    fn from(p: PayloadInfo) -> Self {
        PyPayloadInfo {
            name: p.name,
            max_shard_size: p.max_shard_size,
            total_size: p.total_size,
            size_list: p.size_list,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PyP2PStore {
    /// The open store of this process.
    fn live(&self, py: Python<'_>) -> PyResult<Arc<P2PStore>> {
        match &*lock(&self.store) {
            Some((pid, s)) if *pid == std::process::id() => Ok(s.clone()),
            Some((pid, _)) => Err(p2p_error(
                py,
                "closed",
                None,
                format!("this P2PStore was created in process {pid}, before a fork"),
            )),
            None => Err(to_py(py, mooncake_p2p::Error::Closed)),
        }
    }

    /// Waits (GIL released) for `fut`, mapping both error layers.
    fn wait<T: Send>(
        py: Python<'_>,
        fut: impl std::future::Future<Output = mooncake_p2p::Result<T>> + Send,
    ) -> PyResult<T> {
        match block_on(py, fut) {
            Ok(r) => r.map_err(|e| to_py(py, e)),
            Err(e) => Err(internal(py, e)),
        }
    }

    /// Registers `buffers` with the engine for one call.
    fn pin(
        &self,
        store: &P2PStore,
        buffers: &Bound<'_, PyAny>,
        location: &str,
    ) -> PyResult<(Vec<mooncake_p2p::Buffer>, Held)> {
        let args = buffers::parse(buffers)?;
        let r = lock(&self.state).pins.pin(store.engine(), args, location);
        match r {
            Ok(v) => Ok(v),
            Err((msg, held)) => {
                self.unpin(buffers.py(), store, held);
                Err(PyValueError::new_err(msg))
            }
        }
    }

    /// Releases the registrations of `held` that nothing else uses (waiting, without the GIL,
    /// until no transfer uses them), then the objects that kept the memory alive.
    fn unpin(&self, py: Python<'_>, store: &P2PStore, held: Held) {
        let free = lock(&self.state).pins.unpin(&held);
        if !free.is_empty() {
            let engine = store.engine().clone();
            let _ = block_on(py, async move { buffers::release(&engine, free).await });
        }
        drop(held);
    }
}

impl Drop for PyP2PStore {
    fn drop(&mut self) {
        // A store nobody closed: close it in the background, and keep the buffers' objects
        // until the engine no longer uses their memory.
        let store = lock(&self.store).take();
        let Some((pid, store)) = store else { return };
        let state = std::mem::take(&mut *lock(&self.state));
        if pid != std::process::id() {
            std::mem::forget(state);
            return;
        }
        if let Ok(rt) = crate::runtime::runtime() {
            rt.spawn(async move {
                let _ = store.close().await;
                let State {
                    pins,
                    registered,
                    replicas,
                    pulling: _,
                } = state;
                let regions: Vec<u64> = pins.regions().collect();
                buffers::release(store.engine(), regions).await;
                drop((registered, replicas));
            });
        }
    }
}

#[pymethods]
impl PyP2PStore {
    /// `P2PStore(metadata_uri, local_segment_name, nic_priority_matrix="", *,
    /// pull_timeout=600.0)`: starts a transfer engine (TCP) on `local_segment_name` (`host` or
    /// `host:port`). A `get_replica` not done after `pull_timeout` seconds fails (kind
    /// `"timeout"`) and withdraws its partial replica.
    #[new]
    #[pyo3(signature = (metadata_uri, local_segment_name, nic_priority_matrix="", *, pull_timeout=600.0, protocol="tcp"))]
    fn new(
        py: Python<'_>,
        metadata_uri: &str,
        local_segment_name: &str,
        nic_priority_matrix: &str,
        pull_timeout: f64,
        protocol: &str,
    ) -> PyResult<Self> {
        if !nic_priority_matrix.is_empty() {
            tracing::info!("P2PStore: nic_priority_matrix ignored (TCP transport)");
        }
        let pull_timeout = std::time::Duration::try_from_secs_f64(pull_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "pull_timeout must be a positive number of seconds, not {pull_timeout}"
                ))
            })?;
        let quic = match protocol {
            "tcp" => None,
            "quic" => Some(
                mooncake_transport_quic::TlsIdentity::from_env()
                    .map_err(|e| PyValueError::new_err(e.to_string()))?,
            ),
            other => {
                return Err(PyValueError::new_err(format!(
                    "protocol {other:?}: expected \"tcp\" or \"quic\""
                )))
            }
        };
        // Over TCP, a node given certificates (MC_TLS_*) authenticates every connection.
        let tcp_auth = match &quic {
            Some(_) => None,
            None => mooncake_tls::TlsIdentity::from_env_opt()
                .map_err(|e| PyValueError::new_err(e.to_string()))?,
        };
        let config = P2PConfig {
            pull_timeout,
            quic,
            tcp_auth,
            ..P2PConfig::default()
        };
        let metadata = metadata_store(metadata_uri)?;
        let local = local_segment_name.to_owned();
        let store = Self::wait(
            py,
            async move { P2PStore::new(metadata, &local, config).await },
        )?;
        Ok(PyP2PStore {
            store: Mutex::new(Some((std::process::id(), Arc::new(store)))),
            state: Mutex::new(State::default()),
        })
    }

    /// This instance's segment name (`host:port`).
    #[getter]
    fn segment_name(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.live(py)?.segment_name().to_owned())
    }

    /// Publishes the concatenation of `buffers` under `name`.
    #[pyo3(signature = (name, buffers, max_shard_size=64 << 20, location="cpu:0", force_create=false))]
    fn register(
        &self,
        py: Python<'_>,
        name: &str,
        buffers: &Bound<'_, PyAny>,
        max_shard_size: u64,
        location: &str,
        force_create: bool,
    ) -> PyResult<()> {
        let store = self.live(py)?;
        let loc = if location.is_empty() {
            "cpu:0"
        } else {
            location
        };
        let (bufs, held) = self.pin(&store, buffers, loc)?;
        let s = store.clone();
        let n = name.to_owned();
        let l = location.to_owned();
        let r = Self::wait(py, async move {
            s.register(&n, &bufs, max_shard_size, &l, force_create)
                .await
        });
        if r.is_ok() {
            let old = lock(&self.state).registered.insert(name.to_owned(), held);
            if let Some(old) = old {
                self.unpin(py, &store, old);
            }
        } else {
            self.unpin(py, &store, held);
        }
        r
    }

    /// Stops serving `name` from the buffers passed to `register` (which may then be reused).
    fn unregister(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        let store = self.live(py)?;
        let s = store.clone();
        let n = name.to_owned();
        let r = match block_on(py, async move { s.unregister(&n).await }) {
            Ok(r) => r,
            Err(e) => return Err(internal(py, e)),
        };
        // Replaced by another's force_create meanwhile: not ours to serve any more either.
        if matches!(r, Ok(()) | Err(mooncake_p2p::Error::NotRegisteredHere(_))) {
            let held = lock(&self.state).registered.remove(name);
            if let Some(held) = held {
                self.unpin(py, &store, held);
            }
        }
        r.map_err(|e| to_py(py, e))
    }

    /// Payloads whose names start with `prefix`, by name.
    #[pyo3(signature = (prefix=""))]
    fn list(&self, py: Python<'_>, prefix: &str) -> PyResult<Vec<PyPayloadInfo>> {
        let store = self.live(py)?;
        let p = prefix.to_owned();
        let list = Self::wait(py, async move { store.list(&p).await })?;
        Ok(list.into_iter().map(PyPayloadInfo::from).collect())
    }

    /// `get_replica(name, buffers, timeout=None)`: pulls `name` into `buffers` (their
    /// concatenation receives it, verified), then serves it to others until `delete_replica`.
    /// Fails with kind `"timeout"` after `timeout` seconds (default: the store's
    /// `pull_timeout`), with kind `"cancelled"` once `cancel(name)` is called from another
    /// thread, and with `KeyboardInterrupt` on Ctrl-C; each withdraws the partial replica first.
    #[pyo3(signature = (name, buffers, timeout=None))]
    fn get_replica(
        &self,
        py: Python<'_>,
        name: &str,
        buffers: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let timeout = timeout
            .map(|t| {
                std::time::Duration::try_from_secs_f64(t)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        PyValueError::new_err(format!(
                            "timeout must be a positive number of seconds, not {t}"
                        ))
                    })
            })
            .transpose()?;
        let store = self.live(py)?;
        let (bufs, held) = self.pin(&store, buffers, "cpu:0")?;
        let token = CancelToken::new();
        // A second pull of the name fails in the store; it must not take the first's token.
        let mine = {
            let mut state = lock(&self.state);
            let free = !state.pulling.contains_key(name);
            if free {
                state.pulling.insert(name.to_owned(), token.clone());
            }
            free
        };
        let s = store.clone();
        let n = name.to_owned();
        let options = PullOptions {
            timeout,
            cancel: Some(token.clone()),
            progress: None,
        };
        // A signal (Ctrl-C) seen while waiting cancels the pull, which then withdraws cleanly;
        // its exception is raised once the pull has ended.
        let interrupt: Mutex<Option<PyErr>> = Mutex::new(None);
        let r = Self::wait(py, async {
            let pull = s.get_replica_with(&n, &bufs, &options);
            tokio::pin!(pull);
            loop {
                tokio::select! {
                    r = &mut pull => return r,
                    _ = tokio::time::sleep(SIGNAL_CHECK), if !token.is_cancelled() => {
                        if let Err(e) = Python::attach(|py| py.check_signals()) {
                            *lock(&interrupt) = Some(e);
                            token.cancel();
                        }
                    }
                }
            }
        });
        if mine {
            lock(&self.state).pulling.remove(name);
        }
        let r = match interrupt.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => r,
        };
        match r {
            Ok(_) => {
                let old = lock(&self.state).replicas.insert(name.to_owned(), held);
                if let Some(old) = old {
                    self.unpin(py, &store, old);
                }
                Ok(())
            }
            Err(e) => {
                self.unpin(py, &store, held);
                Err(e)
            }
        }
    }

    /// Cancels the `get_replica` of `name` in progress (in another thread): it fails with kind
    /// `"cancelled"` once its partial replica is withdrawn. Returns whether one was in progress.
    fn cancel(&self, name: &str) -> bool {
        match lock(&self.state).pulling.get(name) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Stops serving the local replica of `name`; its buffers may then be reused.
    fn delete_replica(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        let store = self.live(py)?;
        let s = store.clone();
        let n = name.to_owned();
        Self::wait(py, async move { s.delete_replica(&n).await })?;
        let held = lock(&self.state).replicas.remove(name);
        if let Some(held) = held {
            self.unpin(py, &store, held);
        }
        Ok(())
    }

    /// Withdraws everything this instance registered or holds, stops its engine and releases
    /// the buffers. Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let taken = lock(&self.store).take();
        let Some((pid, store)) = taken else {
            return Ok(());
        };
        if pid != std::process::id() {
            std::mem::forget(std::mem::take(&mut *lock(&self.state)));
            return Ok(());
        }
        let s = store.clone();
        let r = Self::wait(py, async move { s.close().await });
        // Pulls still waiting end with "closed" as the store closes.
        let State {
            pins,
            registered,
            replicas,
            pulling: _,
        } = std::mem::take(&mut *lock(&self.state));
        let regions: Vec<u64> = pins.regions().collect();
        let engine = store.engine().clone();
        let _ = block_on(py, async move { buffers::release(&engine, regions).await });
        drop((registered, replicas));
        r
    }

    fn __repr__(&self) -> String {
        match &*lock(&self.store) {
            Some((_, s)) => format!("<P2PStore {}>", s.segment_name()),
            None => "<P2PStore (closed)>".into(),
        }
    }
}

/// Adds the P2P classes to the extension module.
pub(crate) fn add(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyP2PStore>()?;
    m.add_class::<PyPayloadInfo>()?;
    m.add("P2PError", m.py().get_type::<P2PError>())?;
    Ok(())
}
