//! `mooncake.engine.TransferEngine`: upstream's transfer-engine binding, the one vLLM's and
//! SGLang's prefill/decode disaggregation drive, over `mooncake_core::TransferEngine`.
//!
//! Conversions only, with upstream's conventions: integer results (0 or a negative code,
//! addresses and batch ids as ints, 0 for "none"), failures logged (`MC_LOG_LEVEL`), never an
//! exception for a failed operation. Every wait releases the GIL and catches panics
//! ([`crate::runtime`]). Raw addresses from Python are checked before this process touches them:
//! against the engine's registered memory, else against this process's mappings
//! ([`crate::mapped`]), so a wrong pointer is an error code, not a crash.
//!
//! A peer is named by its segment name, `host:port`, which is `local_hostname` with the port
//! of the engine's TCP endpoint (`get_rpc_port`). The transports are TCP plus same-host shared
//! memory for buffers the engine allocates (`allocate_managed_buffer`), as
//! [`mooncake::start_engine`] sets them up (`MC_SAME_HOST_SHM=0` turns shared memory off).

mod batches;
mod transfer;
mod types;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use mooncake::{Discovery, Error, Location, MetadataStore, TransferEngine};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString, PyType};

use crate::mapped::{check_mapped, check_readable};
use crate::runtime::{block_on, detached};
pub(crate) use types::{PyTransferNotify, PyTransferOpcode};

/// Upstream's transfer-engine codes (their own table, apart from the store's).
pub(crate) const ERR_INVALID_ARGUMENT: i64 = -1;
/// No buffer is registered at that address.
pub(crate) const ERR_ADDRESS_NOT_REGISTERED: i64 = -3;
/// The range overlaps a registered buffer.
pub(crate) const ERR_ADDRESS_OVERLAPPED: i64 = -7;
/// The peer could not be reached.
pub(crate) const ERR_SOCKET: i64 = -102;

/// The code upstream's engine returns for a registration error.
fn code_of(e: &Error) -> i64 {
    match e {
        Error::AddressOverlapped { .. } => ERR_ADDRESS_OVERLAPPED,
        Error::NotRegistered(_) => ERR_ADDRESS_NOT_REGISTERED,
        _ => ERR_INVALID_ARGUMENT,
    }
}

/// Adds the classes to the extension module.
pub(crate) fn add(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTransferEngine>()?;
    m.add_class::<PyTransferOpcode>()?;
    m.add_class::<PyTransferNotify>()?;
    Ok(())
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A started engine and the process that started it.
struct Live {
    pid: u32,
    engine: Arc<TransferEngine>,
}

/// A transfer engine (see `mooncake.engine`).
#[pyclass(
    module = "mooncake.engine",
    name = "TransferEngine",
    subclass,
    frozen,
    weakref
)]
pub(crate) struct PyTransferEngine {
    live: RwLock<Option<Live>>,
    /// Buffers of `allocate_managed_buffer` not freed yet: address to length.
    managed: Mutex<HashMap<u64, u64>>,
    /// Batches of the asynchronous calls not collected yet.
    batches: Mutex<batches::Batches>,
}

impl PyTransferEngine {
    /// The engine, or (logged) the code to return: not initialized, or initialized in the
    /// parent of this forked process.
    pub(crate) fn engine(&self, call: &str) -> Result<Arc<TransferEngine>, i64> {
        let guard = self.live.read().unwrap_or_else(|p| p.into_inner());
        match &*guard {
            Some(l) if l.pid == std::process::id() => Ok(l.engine.clone()),
            Some(l) => {
                tracing::error!(
                    "{call}: this TransferEngine was initialized in process {}, before a fork; \
                     create and initialize one in this process",
                    l.pid
                );
                Err(ERR_INVALID_ARGUMENT)
            }
            None => {
                tracing::error!("{call}: the TransferEngine is not initialized (call initialize)");
                Err(ERR_INVALID_ARGUMENT)
            }
        }
    }

    /// The engine of this process, if any, without logging.
    fn engine_quiet(&self) -> Option<Arc<TransferEngine>> {
        let guard = self.live.read().unwrap_or_else(|p| p.into_inner());
        guard
            .as_ref()
            .filter(|l| l.pid == std::process::id())
            .map(|l| l.engine.clone())
    }

    /// Swaps the engine; the previous one if this process started it (a forked child forgets
    /// its parent's engine: its threads and sockets are the parent's).
    fn replace(&self, new: Option<Arc<TransferEngine>>) -> Option<Arc<TransferEngine>> {
        let pid = std::process::id();
        let old = std::mem::replace(
            &mut *self.live.write().unwrap_or_else(|p| p.into_inner()),
            new.map(|engine| Live { pid, engine }),
        );
        lock(&self.managed).clear();
        lock(&self.batches).clear();
        match old {
            Some(l) if l.pid == pid => Some(l.engine),
            Some(l) => {
                std::mem::forget(l);
                None
            }
            None => None,
        }
    }

    /// Starts an engine on `local_hostname` with the metadata connection string `conn`.
    fn start(
        &self,
        py: Python<'_>,
        local_hostname: &str,
        conn: &str,
        protocol: &str,
        device_name: &str,
    ) -> i64 {
        let discovery = match discovery(conn) {
            Ok(d) => d,
            Err(msg) => {
                tracing::error!("initialize: {msg}");
                return ERR_INVALID_ARGUMENT;
            }
        };
        match protocol {
            "tcp" => {}
            "rdma" => tracing::warn!(
                "initialize: protocol rdma: this build has no RDMA transport; using TCP (and \
                 same-host shared memory), as an engine on a host without RDMA devices does"
            ),
            other => {
                tracing::error!(
                    "initialize: protocol {other:?} is not supported by this build (it needs \
                     hardware or a transport it lacks); use \"tcp\""
                );
                return ERR_INVALID_ARGUMENT;
            }
        }
        if !device_name.is_empty() {
            tracing::info!("initialize: device_name {device_name:?} ignored (no RDMA transport)");
        }
        if let Some(old) = self.replace(None) {
            let _ = block_on(py, async move { old.shutdown().await });
        }
        let host = local_hostname.to_owned();
        match block_on(
            py,
            async move { mooncake::start_engine(&host, discovery).await },
        ) {
            Ok(Ok(engine)) => {
                tracing::info!("transfer engine {} started", engine.segment_name());
                self.replace(Some(engine));
                0
            }
            Ok(Err(e)) | Err(e) => {
                tracing::error!("initialize on {local_hostname:?} (metadata {conn}) failed: {e}");
                ERR_INVALID_ARGUMENT
            }
        }
    }

    /// Publishes the segment's descriptor after a registration change (a no-op without a
    /// metadata service); a failure is logged, the registration stands.
    fn publish(py: Python<'_>, engine: &Arc<TransferEngine>) {
        let e = engine.clone();
        match block_on(py, async move { e.publish().await }) {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                tracing::warn!("publishing the segment descriptor to the metadata service: {e}")
            }
        }
    }
}

/// How peers are found, from upstream's connection string: `P2PHANDSHAKE`, or the URL of an
/// HTTP metadata service.
fn discovery(conn: &str) -> Result<Discovery, String> {
    if conn == "P2PHANDSHAKE" {
        return Ok(Discovery::P2PHandshake);
    }
    if conn.starts_with("http://") || conn.starts_with("https://") {
        return mooncake::http::HttpMetadataStore::new(conn)
            .map(|s| Discovery::Metadata(Arc::new(s) as Arc<dyn MetadataStore>))
            .map_err(|e| format!("metadata server {conn:?}: {e}"));
    }
    Err(format!(
        "metadata server {conn:?} is not supported: use \"P2PHANDSHAKE\" (peers ask each other) \
         or \"http(s)://host:port/metadata\" (mooncake_master --enable_http_metadata_server; \
         https with the MC_TLS_* certificate)"
    ))
}

/// Registers caller-owned memory (the engine refuses a range that is not mapped readable and
/// writable in this process: ERR_INVALID_ARGUMENT).
fn register(engine: &TransferEngine, addr: u64, len: u64, location: &str) -> Result<(), i64> {
    if len == 0 || addr == 0 {
        tracing::error!("register_memory({addr:#x}, {len}): empty buffer or null address");
        return Err(ERR_INVALID_ARGUMENT);
    }
    let location = match location {
        "" | "*" => Location::default(),
        l => Location(l.to_owned()),
    };
    // SAFETY: the registry checks that the range is mapped readable and writable in this
    // process before registering it. The caller keeps it valid until `unregister_memory`,
    // which the API requires, as upstream's.
    match unsafe { engine.register_memory(addr, len, location) } {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::error!("register_memory({addr:#x}, {len}): {e}");
            Err(code_of(&e))
        }
    }
}

/// Unregisters `addr`, waiting (GIL released) until no transfer uses it.
fn unregister(py: Python<'_>, engine: &Arc<TransferEngine>, addr: u64) -> i64 {
    match detached(py, || engine.unregister_memory(addr)) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            tracing::error!("unregister_memory({addr:#x}): {e}");
            code_of(&e)
        }
        Err(e) => {
            tracing::error!("unregister_memory({addr:#x}): {e}");
            ERR_INVALID_ARGUMENT
        }
    }
}

/// The bytes of a `write_bytes_to_buffer` source: `bytes`, `bytearray` or `str` (UTF-8).
fn source_bytes(src: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(b) = src.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    if let Ok(b) = src.cast::<PyByteArray>() {
        return Ok(b.to_vec());
    }
    if let Ok(s) = src.cast::<PyString>() {
        return Ok(s.to_str()?.as_bytes().to_vec());
    }
    Err(PyTypeError::new_err(format!(
        "src must be bytes, bytearray or str, not {}",
        src.get_type().name()?
    )))
}

/// JSON naming this host's NUMA nodes, each with its (empty: no RDMA) device lists.
fn topology() -> String {
    let mut nodes: Vec<u32> = std::fs::read_dir("/sys/devices/system/node")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if nodes.is_empty() {
        nodes.push(0);
    }
    nodes.sort_unstable();
    let entries: Vec<String> = nodes
        .iter()
        .map(|n| format!("\"cpu:{n}\": [[], []]"))
        .collect();
    format!("{{{}}}", entries.join(", "))
}

#[pymethods]
impl PyTransferEngine {
    #[new]
    fn new() -> Self {
        PyTransferEngine {
            live: RwLock::new(None),
            managed: Mutex::new(HashMap::new()),
            batches: Mutex::new(batches::Batches::default()),
        }
    }

    /// `TransferEngine.TransferOpcode`, as upstream nests the enum.
    #[classattr]
    #[pyo3(name = "TransferOpcode")]
    fn transfer_opcode(py: Python<'_>) -> Py<PyType> {
        py.get_type::<PyTransferOpcode>().unbind()
    }

    /// Starts the engine. `metadata_server`: `"P2PHANDSHAKE"` or `"http://host:port/metadata"`;
    /// `protocol`: `"tcp"` (`"rdma"` runs on TCP too). 0, or -1 (logged).
    fn initialize(
        &self,
        py: Python<'_>,
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: &str,
    ) -> i64 {
        self.start(py, local_hostname, metadata_server, protocol, device_name)
    }

    /// `initialize` with the metadata service's type apart (`"http"`, with `metadata_server`
    /// `"host:port/metadata"`).
    fn initialize_ext(
        &self,
        py: Python<'_>,
        local_hostname: &str,
        metadata_server: &str,
        protocol: &str,
        device_name: &str,
        metadata_type: &str,
    ) -> i64 {
        let conn = if metadata_server == "P2PHANDSHAKE" || metadata_server.contains("://") {
            metadata_server.to_owned()
        } else {
            format!("{metadata_type}://{metadata_server}")
        };
        self.start(py, local_hostname, &conn, protocol, device_name)
    }

    /// The port peers reach this engine on (the port of its segment name `host:port`).
    fn get_rpc_port(&self) -> i64 {
        let Ok(engine) = self.engine("get_rpc_port") else {
            return ERR_INVALID_ARGUMENT;
        };
        let name = engine.segment_name();
        match name
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
        {
            Some(port) => i64::from(port),
            None => {
                tracing::error!("get_rpc_port: segment name {name:?} has no port");
                ERR_INVALID_ARGUMENT
            }
        }
    }

    /// Registers `capacity` bytes at `buffer_addr` for peers to read and write. 0, -7 when it
    /// overlaps a registered buffer, -1 for memory that is not mapped readable and writable.
    #[pyo3(signature = (buffer_addr, capacity, location = "*"))]
    fn register_memory(
        &self,
        py: Python<'_>,
        buffer_addr: u64,
        capacity: u64,
        location: &str,
    ) -> i64 {
        let engine = match self.engine("register_memory") {
            Ok(e) => e,
            Err(code) => return code,
        };
        match register(&engine, buffer_addr, capacity, location) {
            Ok(()) => {
                Self::publish(py, &engine);
                0
            }
            Err(code) => code,
        }
    }

    /// Unregisters the buffer at `buffer_addr`, once no transfer uses it. 0, or -3.
    fn unregister_memory(&self, py: Python<'_>, buffer_addr: u64) -> i64 {
        let engine = match self.engine("unregister_memory") {
            Ok(e) => e,
            Err(code) => return code,
        };
        let code = unregister(py, &engine, buffer_addr);
        if code == 0 {
            Self::publish(py, &engine);
        }
        code
    }

    /// Registers several buffers: all or (on the first failure, whose code is returned) none.
    #[pyo3(signature = (buffer_addresses, capacities, location = "*"))]
    fn batch_register_memory(
        &self,
        py: Python<'_>,
        buffer_addresses: Vec<u64>,
        capacities: Vec<u64>,
        location: &str,
    ) -> i64 {
        let engine = match self.engine("batch_register_memory") {
            Ok(e) => e,
            Err(code) => return code,
        };
        if buffer_addresses.len() != capacities.len() {
            tracing::error!(
                "batch_register_memory: {} addresses but {} capacities",
                buffer_addresses.len(),
                capacities.len()
            );
            return ERR_INVALID_ARGUMENT;
        }
        for (i, (&addr, &len)) in buffer_addresses.iter().zip(&capacities).enumerate() {
            if let Err(code) = register(&engine, addr, len, location) {
                for &done in &buffer_addresses[..i] {
                    unregister(py, &engine, done);
                }
                return code;
            }
        }
        Self::publish(py, &engine);
        0
    }

    /// Unregisters several buffers; 0, or the code of the first that was not registered (the
    /// others are unregistered all the same).
    fn batch_unregister_memory(&self, py: Python<'_>, buffer_addresses: Vec<u64>) -> i64 {
        let engine = match self.engine("batch_unregister_memory") {
            Ok(e) => e,
            Err(code) => return code,
        };
        let mut first = 0;
        for addr in buffer_addresses {
            let code = unregister(py, &engine, addr);
            if first == 0 {
                first = code;
            }
        }
        Self::publish(py, &engine);
        first
    }

    /// Allocates and registers a zeroed buffer of `length` bytes owned by the engine (shared
    /// memory that same-host peers map, where available). Its address, or 0.
    fn allocate_managed_buffer(&self, py: Python<'_>, length: u64) -> u64 {
        let Ok(engine) = self.engine("allocate_managed_buffer") else {
            return 0;
        };
        let Ok(len) = usize::try_from(length) else {
            tracing::error!("allocate_managed_buffer({length}): too large");
            return 0;
        };
        let e = engine.clone();
        match detached(py, move || e.allocate_buffer(len, Location::default())) {
            Ok(Ok(addr)) => {
                lock(&self.managed).insert(addr, length);
                Self::publish(py, &engine);
                addr
            }
            Ok(Err(e)) | Err(e) => {
                tracing::error!("allocate_managed_buffer({length}): {e}");
                0
            }
        }
    }

    /// Frees a buffer of `allocate_managed_buffer` (once no transfer uses it). 0, or -1 for an
    /// address it did not return.
    fn free_managed_buffer(&self, py: Python<'_>, buffer_addr: u64, length: u64) -> i64 {
        let engine = match self.engine("free_managed_buffer") {
            Ok(e) => e,
            Err(code) => return code,
        };
        let Some(len) = lock(&self.managed).remove(&buffer_addr) else {
            tracing::error!(
                "free_managed_buffer({buffer_addr:#x}): not a buffer of allocate_managed_buffer"
            );
            return ERR_INVALID_ARGUMENT;
        };
        if len != length {
            tracing::warn!(
                "free_managed_buffer({buffer_addr:#x}, {length}): the buffer has {len} bytes"
            );
        }
        let code = unregister(py, &engine, buffer_addr);
        if code == 0 {
            Self::publish(py, &engine);
        }
        code
    }

    /// Copies the first `length` bytes of `src` to `dest_address`, which must be memory this
    /// engine registered or else memory of this process mapped writable. 0, or -1 (logged).
    fn write_bytes_to_buffer(
        &self,
        py: Python<'_>,
        dest_address: u64,
        src: &Bound<'_, PyAny>,
        length: u64,
    ) -> PyResult<i64> {
        let mut data = source_bytes(src)?;
        if length > data.len() as u64 {
            tracing::error!(
                "write_bytes_to_buffer: length {length} is more than the {} bytes given",
                data.len()
            );
            return Ok(ERR_INVALID_ARGUMENT);
        }
        data.truncate(length as usize);
        let engine = self.engine_quiet();
        let r = detached(py, move || write_to(engine.as_deref(), dest_address, &data));
        Ok(match r {
            Ok(Ok(())) => 0,
            Ok(Err(msg)) => {
                tracing::error!("write_bytes_to_buffer: {msg}");
                ERR_INVALID_ARGUMENT
            }
            Err(e) => {
                tracing::error!("write_bytes_to_buffer: {e}");
                ERR_INVALID_ARGUMENT
            }
        })
    }

    /// `length` bytes at `source_address` (memory this engine registered, or else memory of
    /// this process mapped readable; `ValueError` otherwise).
    fn read_bytes_from_buffer(
        &self,
        py: Python<'_>,
        source_address: u64,
        length: u64,
    ) -> PyResult<Py<PyBytes>> {
        let engine = self.engine_quiet();
        let len = usize::try_from(length)
            .map_err(|_| PyValueError::new_err(format!("length {length} is too large")))?;
        let region = engine
            .as_ref()
            .and_then(|e| e.memory().resolve(source_address, length).ok());
        if region.is_none() && length > 0 {
            check_readable(source_address, length).map_err(PyValueError::new_err)?;
        }
        let bytes = PyBytes::new_with(py, len, |out| {
            match &region {
                Some(r) => r
                    .read_into(out)
                    .map_err(|e| PyValueError::new_err(e.to_string()))?,
                // SAFETY: `[source_address, +len)` is mapped readable in this process (checked
                // above) and `out` is a fresh buffer of `len` bytes.
                None if len > 0 => unsafe {
                    std::ptr::copy_nonoverlapping(
                        source_address as *const u8,
                        out.as_mut_ptr(),
                        len,
                    )
                },
                None => {}
            }
            Ok(())
        })?;
        Ok(bytes.unbind())
    }

    /// The address of the first (lowest) buffer `segment_name` has registered, or 0.
    fn get_first_buffer_address(&self, py: Python<'_>, segment_name: &str) -> u64 {
        let Ok(engine) = self.engine("get_first_buffer_address") else {
            return 0;
        };
        let name = segment_name.to_owned();
        match block_on(py, async move { engine.refresh_segment(&name).await }) {
            Ok(Ok(desc)) => desc.buffers.first().map_or(0, |b| b.addr),
            Ok(Err(e)) | Err(e) => {
                tracing::error!("get_first_buffer_address({segment_name:?}): {e}");
                0
            }
        }
    }

    /// This host's topology as JSON: its NUMA nodes, each with no RDMA devices.
    #[pyo3(signature = (device_name = None))]
    fn get_local_topology(&self, device_name: Option<&str>) -> String {
        let _ = device_name;
        topology()
    }

    /// Notifications received from peers' transfers. This build sends none (`transfer_sync`
    /// with a `notify` fails), so none arrive: always empty.
    fn get_notifies(&self) -> Vec<PyTransferNotify> {
        Vec::new()
    }

    /// Asks `peer_server_name` (`host:port`) for its segment over the transport handshake: 0
    /// when it answers, -102 when it cannot be reached, -1 otherwise.
    fn send_probe(&self, py: Python<'_>, peer_server_name: &str) -> i64 {
        let engine = match self.engine("send_probe") {
            Ok(e) => e,
            Err(code) => return code,
        };
        let name = peer_server_name.to_owned();
        let probe = async move {
            let mut last = None;
            for t in engine.transports() {
                match t.handshake(&name).await {
                    Ok(_) => return Ok(()),
                    Err(Error::NotSupported(_)) => {}
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| Error::NotSupported("no transport has a handshake".into())))
        };
        match block_on(py, probe) {
            Ok(Ok(())) => 0,
            Ok(Err(e)) => {
                tracing::warn!("send_probe({peer_server_name:?}): {e}");
                match e {
                    Error::PeerUnreachable { .. } | Error::Timeout(_) | Error::Io(_) => ERR_SOCKET,
                    _ => ERR_INVALID_ARGUMENT,
                }
            }
            Err(e) => {
                tracing::error!("send_probe({peer_server_name:?}): {e}");
                ERR_INVALID_ARGUMENT
            }
        }
    }

    /// Opens `segment_name` ahead of the first transfer to it (the handshake, or the metadata
    /// look-up, done now). 0, or -1 when the peer cannot be found (logged).
    fn warmup_efa_segment(&self, py: Python<'_>, segment_name: &str) -> i64 {
        let engine = match self.engine("warmup_efa_segment") {
            Ok(e) => e,
            Err(code) => return code,
        };
        let name = segment_name.to_owned();
        match block_on(py, async move { engine.open_segment(&name).await }) {
            Ok(Ok(_)) => 0,
            Ok(Err(e)) | Err(e) => {
                tracing::error!("warmup_efa_segment({segment_name:?}): {e}");
                ERR_INVALID_ARGUMENT
            }
        }
    }

    fn __repr__(&self) -> String {
        match self.engine_quiet() {
            Some(e) => format!("TransferEngine({:?})", e.segment_name()),
            None => "TransferEngine(not initialized)".to_owned(),
        }
    }
}

/// Copies `data` to `addr`: through the engine's registered memory when the range is inside a
/// registered buffer, else into memory of this process checked to be mapped writable.
fn write_to(engine: Option<&TransferEngine>, addr: u64, data: &[u8]) -> Result<(), String> {
    let len = data.len() as u64;
    if len == 0 {
        return Ok(());
    }
    if let Some(region) = engine.and_then(|e| e.memory().resolve(addr, len).ok()) {
        return region.write_from(data).map_err(|e| e.to_string());
    }
    check_mapped(addr, len)?;
    // SAFETY: `[addr, addr + len)` is mapped readable and writable in this process (checked
    // above); `data` is a separate allocation of `len` bytes.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
    Ok(())
}

impl Drop for PyTransferEngine {
    fn drop(&mut self) {
        // Stop serving without blocking: the engine's sockets close, its buffers are released
        // once no transfer holds them.
        if let Some(engine) = self.replace(None) {
            if let Ok(rt) = crate::runtime::runtime() {
                rt.spawn(async move { engine.shutdown().await });
            }
        }
    }
}
