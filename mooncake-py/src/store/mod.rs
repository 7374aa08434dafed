//! `MooncakeDistributedStore`: setup, lifecycle and memory registration. The data calls are in
//! `write.rs`, `read.rs` and `admin.rs`; every call releases the GIL while it waits.

mod admin;
mod backend;
mod read;
mod write;

use std::sync::{Arc, RwLock};

use mooncake::real_client::DummyClient;
use mooncake::store::{Store, StoreConfig};
use mooncake::{Error, ErrorCode};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::runtime::{block_on, code_of, detached};
use crate::setup_args::{init_all_config, size_arg, SetupArgs};
pub(crate) use backend::Backend;

/// A client of a Mooncake store (see the module docs of `mooncake.store`).
#[pyclass(
    module = "mooncake.store",
    name = "MooncakeDistributedStore",
    subclass,
    frozen,
    weakref
)]
pub(crate) struct PyStore {
    /// The client, with the pid of the process that set it up.
    store: RwLock<Option<(u32, Backend)>>,
}

fn not_ready() -> Error {
    Error::with_code(
        ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS,
        "the store is not set up (call setup()) or was closed",
    )
}

impl PyStore {
    /// The live store, or `UNAVAILABLE_IN_CURRENT_STATUS` before setup and after close.
    /// In a child made by `fork()` after setup, the parent's client is unusable (its threads did
    /// not survive the fork and its connections are the parent's): `UNAVAILABLE_IN_CURRENT_STATUS`
    /// with a hint, rather than a call that waits forever.
    pub(crate) fn live(&self) -> Result<Backend, Error> {
        let guard = self.store.read().unwrap_or_else(|p| p.into_inner());
        let (pid, backend) = guard.as_ref().ok_or_else(not_ready)?;
        if *pid != std::process::id() {
            return Err(Error::with_code(
                ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS,
                format!(
                    "this store was set up in process {pid}, before a fork; set up a new \
                     MooncakeDistributedStore in this process"
                ),
            ));
        }
        Ok(backend.clone())
    }

    /// Swaps the client; the previous one if it belongs to this process (a forked child never
    /// touches its parent's client: it is forgotten, not closed).
    fn replace(&self, new: Option<Backend>) -> Option<Backend> {
        let pid = std::process::id();
        let old = std::mem::replace(
            &mut *self.store.write().unwrap_or_else(|p| p.into_inner()),
            new.map(|b| (pid, b)),
        );
        match old {
            Some((owner, b)) if owner == pid => Some(b),
            Some((_, b)) => {
                std::mem::forget(b);
                None
            }
            None => None,
        }
    }

    fn start(&self, py: Python<'_>, mut config: StoreConfig) -> i64 {
        if let Some(named) = with_free_port(&config.local_hostname) {
            config.local_hostname = named;
        }
        if let Err(e) = config.validate() {
            tracing::error!("setup: {e}");
            return code_of(&e);
        }
        if !config.device_name.is_empty() {
            tracing::info!(
                "setup: rdma_devices {:?} ignored for protocol {}",
                config.device_name,
                config.protocol
            );
        }
        // Setting up again replaces the previous client, as upstream does.
        if let Some(old) = self.replace(None) {
            let _ = block_on(py, async move { old.close().await });
        }
        let master = config.master_server_addr.clone();
        match block_on(py, Store::setup(config)) {
            Ok(Ok(store)) => {
                self.replace(Some(Backend::store(store)));
                0
            }
            Ok(Err(e)) | Err(e) => {
                tracing::error!("setup (master {master}) failed: {e}");
                match e.code() {
                    c @ (ErrorCode::INVALID_PARAMS | ErrorCode::NOT_SUPPORTED) => {
                        i64::from(c.code())
                    }
                    _ => -1,
                }
            }
        }
    }
}

/// Upstream's range for the port of a client named without one.
const AUTO_PORTS: std::ops::RangeInclusive<u16> = 12300..=14300;

/// `host:port` with a port of [`AUTO_PORTS`] free on `host` now, for a `local_hostname` without
/// a port (as upstream names such a client); `None` when it has one (or is an IPv6 literal, or
/// no port of the range can be bound).
fn with_free_port(host: &str) -> Option<String> {
    if host.is_empty() || host.contains(':') {
        return None;
    }
    let span = u64::from(AUTO_PORTS.end() - AUTO_PORTS.start()) + 1;
    let seed = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    };
    (0..64u64).find_map(|i| {
        let port = AUTO_PORTS.start() + u16::try_from((seed.wrapping_add(i * 97)) % span).ok()?;
        std::net::TcpListener::bind((host, port))
            .ok()
            .map(|_| format!("{host}:{port}"))
    })
}

impl Drop for PyStore {
    fn drop(&mut self) {
        // Unmount the segment of a store the program forgot to close, without blocking.
        if let Some(store) = self.replace(None) {
            if let Ok(rt) = crate::runtime::runtime() {
                rt.spawn(async move {
                    let _ = store.close().await;
                });
            }
        }
    }
}

#[pymethods]
impl PyStore {
    #[new]
    #[pyo3(signature = (*_args, **_kwargs))]
    fn new(_args: &Bound<'_, pyo3::types::PyTuple>, _kwargs: Option<&Bound<'_, PyDict>>) -> Self {
        PyStore {
            store: RwLock::new(None),
        }
    }

    /// Sets up the client: `setup(local_hostname, metadata_server, global_segment_size=16MiB,
    /// local_buffer_size=1GiB, protocol="tcp", rdma_devices="", master_server_addr=...)`, or
    /// `setup(config_dict)` whose sizes may be strings like "16MB". 0 on success.
    ///
    /// Upstream's optional settings are accepted: `enable_ssd_offload`,
    /// `enable_client_http_server` (when false), `tenant_id` (when "default"), and
    /// `ssd_offload_path`, `client_http_port` (no effect). Turning on a feature this store does
    /// not have returns -1012 (NOT_SUPPORTED) with a log line naming it. Without a port in
    /// `local_hostname`, a free one in 12300-14300 is picked, as upstream does.
    #[pyo3(signature = (local_hostname=None, metadata_server=None, global_segment_size=None, local_buffer_size=None, protocol=None, rdma_devices=None, master_server_addr=None, engine=None, enable_ssd_offload=None, ssd_offload_path=None, tenant_id=None, enable_client_http_server=None, client_http_port=None))]
    #[allow(clippy::too_many_arguments)]
    fn setup<'py>(
        &self,
        py: Python<'py>,
        local_hostname: Option<Bound<'py, PyAny>>,
        metadata_server: Option<Bound<'py, PyAny>>,
        global_segment_size: Option<Bound<'py, PyAny>>,
        local_buffer_size: Option<Bound<'py, PyAny>>,
        protocol: Option<Bound<'py, PyAny>>,
        rdma_devices: Option<Bound<'py, PyAny>>,
        master_server_addr: Option<Bound<'py, PyAny>>,
        engine: Option<Bound<'py, PyAny>>,
        enable_ssd_offload: Option<Bound<'py, PyAny>>,
        ssd_offload_path: Option<Bound<'py, PyAny>>,
        tenant_id: Option<Bound<'py, PyAny>>,
        enable_client_http_server: Option<Bound<'py, PyAny>>,
        client_http_port: Option<Bound<'py, PyAny>>,
    ) -> PyResult<i64> {
        let _ = (ssd_offload_path, client_http_port);
        if engine.as_ref().is_some_and(|e| !e.is_none()) {
            tracing::warn!(
                "setup: a shared transfer engine is not supported; using the store's own"
            );
        }
        let args = match local_hostname.as_ref().map(|a| a.cast::<PyDict>()) {
            Some(Ok(d)) => {
                if metadata_server.is_some() || global_segment_size.is_some() {
                    return Err(PyTypeError::new_err(
                        "setup(config_dict) takes no further arguments",
                    ));
                }
                SetupArgs::from_dict(d)?
            }
            _ => SetupArgs {
                local_hostname,
                metadata_server,
                global_segment_size,
                local_buffer_size,
                protocol,
                rdma_devices,
                master_server_addr,
                enable_ssd_offload,
                tenant_id,
                enable_client_http_server,
            },
        };
        if let Err(why) = args.unsupported()? {
            tracing::error!("setup: {why}");
            return Ok(i64::from(ErrorCode::NOT_SUPPORTED.code()));
        }
        match args.into_config()? {
            Ok(config) => Ok(self.start(py, config)),
            Err(e) => {
                tracing::error!("setup: {e}");
                Ok(i64::from(ErrorCode::INVALID_PARAMS.code()))
            }
        }
    }

    /// Upstream's legacy initialiser: sets up with `protocol`, `device_name` and a segment of
    /// `mount_segment_size` bytes; the rest comes from the environment (`MOONCAKE_MASTER`,
    /// `MOONCAKE_LOCAL_HOSTNAME`, `MOONCAKE_TE_META_DATA_SERVER`, ...).
    #[pyo3(signature = (protocol, device_name, mount_segment_size=None))]
    fn init_all(
        &self,
        py: Python<'_>,
        protocol: String,
        device_name: String,
        mount_segment_size: Option<Bound<'_, PyAny>>,
    ) -> PyResult<i64> {
        let size = match mount_segment_size
            .map(|m| size_arg(&m, "mount_segment_size"))
            .transpose()?
        {
            None => Ok(16 << 20),
            Some(r) => r,
        };
        let size = match size {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("init_all: {e}");
                return Ok(i64::from(ErrorCode::INVALID_PARAMS.code()));
            }
        };
        match init_all_config(protocol, device_name, size) {
            Ok(c) => Ok(self.start(py, c)),
            Err(e) => {
                tracing::error!("init_all: {e}");
                Ok(i64::from(ErrorCode::INVALID_PARAMS.code()))
            }
        }
    }

    /// Sets up as a dummy client of the real client (`mooncake_client`) at `server_address`
    /// (`host:port`, on this host): calls are forwarded to it, and a memory pool of
    /// `mem_pool_size` bytes (`alloc_from_mem_pool`) plus `local_buffer_size` bytes of staging is
    /// shared with it, so zero-copy calls on pool buffers move no bytes through this process.
    /// 0 on success, else an error code.
    fn setup_dummy(
        &self,
        py: Python<'_>,
        mem_pool_size: u64,
        local_buffer_size: u64,
        server_address: String,
    ) -> i64 {
        if let Some(old) = self.replace(None) {
            let _ = block_on(py, async move { old.close().await });
        }
        let addr = server_address.clone();
        let r = block_on(py, async move {
            DummyClient::connect(&addr, mem_pool_size, local_buffer_size).await
        });
        match r {
            Ok(Ok(d)) => {
                self.replace(Some(Backend::dummy(Arc::new(d))));
                0
            }
            Ok(Err(e)) | Err(e) => {
                tracing::error!(
                    "setup_dummy({mem_pool_size}, {local_buffer_size}, {server_address:?}): {e}"
                );
                // As setup(): bad arguments say so, any other failure is -1.
                match e.code() {
                    c @ ErrorCode::INVALID_PARAMS => i64::from(c.code()),
                    _ => -1,
                }
            }
        }
    }

    /// Unmounts this client's segment and stops it. 0; later calls return error codes.
    fn close(&self, py: Python<'_>) -> i64 {
        match self.replace(None) {
            Some(store) => match block_on(py, async move { store.close().await }) {
                Ok(Ok(())) => 0,
                Ok(Err(e)) | Err(e) => {
                    tracing::warn!("close: {e}");
                    0
                }
            },
            None => 0,
        }
    }

    /// This client's segment name (`host:port`); "" when not set up.
    fn get_hostname(&self) -> String {
        self.live()
            .map(|s| s.hostname().to_owned())
            .unwrap_or_default()
    }

    /// Registers `[buffer_ptr, buffer_ptr + size)` for zero-copy calls. The memory must stay
    /// valid until `unregister_buffer`. 0 or an error code.
    fn register_buffer(&self, buffer_ptr: u64, size: u64) -> i64 {
        match self.live() {
            // SAFETY: the caller promises the range is valid memory until unregister_buffer, as
            // upstream's API requires; ranges overlapping a registration, or not mapped read-write
            // in this process, are refused (INVALID_PARAMS).
            Ok(s) => match unsafe { s.register_buffer(buffer_ptr, size) } {
                Ok(()) => 0,
                Err(e) => {
                    tracing::warn!("register_buffer({buffer_ptr:#x}, {size}): {e}");
                    code_of(&e)
                }
            },
            Err(e) => code_of(&e),
        }
    }

    /// Unregisters the buffer registered at `buffer_ptr`, waiting for transfers that use it.
    fn unregister_buffer(&self, py: Python<'_>, buffer_ptr: u64) -> i64 {
        let r = self
            .live()
            .and_then(|s| detached(py, move || s.unregister_buffer(buffer_ptr))?);
        match r {
            Ok(()) => 0,
            Err(e) => {
                tracing::warn!("unregister_buffer({buffer_ptr:#x}): {e}");
                code_of(&e)
            }
        }
    }

    /// Allocates `size` bytes of page-aligned memory owned and registered by this client (usable
    /// with put_from/get_into at once); freed at close(). The address, or 0 on failure.
    fn alloc_from_mem_pool(&self, py: Python<'_>, size: u64) -> u64 {
        let r = self
            .live()
            .and_then(|s| detached(py, move || s.alloc_from_mem_pool(size))?);
        match r {
            Ok(addr) => addr,
            Err(e) => {
                tracing::warn!("alloc_from_mem_pool({size}): {e}");
                0
            }
        }
    }

    fn __repr__(&self) -> String {
        match self.live() {
            Ok(s) => format!("<MooncakeDistributedStore {}>", s.hostname()),
            Err(_) => "<MooncakeDistributedStore (not set up)>".into(),
        }
    }
}
