//! Value classes of `mooncake.store`: `ReplicateConfig`, the enums, replica descriptors and
//! `QueryTaskResponse`. Conversions from the Rust types only.

use mooncake::master as core;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// Per-put replication options, with upstream's fields and defaults.
#[pyclass(module = "mooncake.store", name = "ReplicateConfig", from_py_object)]
#[derive(Clone)]
pub(crate) struct PyReplicateConfig {
    /// Replicas wanted (default 1).
    #[pyo3(get, set)]
    replica_num: u32,
    /// Evict only when nothing else is evictable.
    #[pyo3(get, set)]
    with_soft_pin: bool,
    /// Never evict.
    #[pyo3(get, set)]
    with_hard_pin: bool,
    /// A segment (`host:port`) to try first.
    #[pyo3(get, set)]
    preferred_segment: String,
    /// Segments to try first, in order.
    #[pyo3(get, set)]
    preferred_segments: Vec<String>,
    /// Keep replicas on the same node.
    prefer_alloc_in_same_node: bool,
    /// Soft-pin handling on upsert.
    #[pyo3(get, set)]
    soft_pin_action: SoftPinAction,
    /// Soft-pin lifetime in ms; `None` (the default): the master's default.
    #[pyo3(get, set)]
    soft_pin_ttl_ms: Option<u64>,
    /// What the object holds (`ObjectDataType`, default `UNKNOWN`); kept with the config, it
    /// does not change placement.
    #[pyo3(get, set)]
    data_type: ObjectDataType,
    /// Groups the object belongs to (`None` by default); kept with the config, it does not
    /// change placement.
    #[pyo3(get, set)]
    group_ids: Option<Vec<String>>,
    /// Replicas on a DFS tier (default 0). This store has no DFS tier: a positive value is
    /// logged and no such replica is made.
    #[pyo3(get, set)]
    dfs_replica_num: u32,
    /// Replicas on NVMe-oF segments (default 0). This store has no NVMe-oF tier: a positive
    /// value is logged and no such replica is made.
    #[pyo3(get, set)]
    nof_replica_num: u32,
    /// NVMe-oF segments to try first (default empty; see `nof_replica_num`).
    #[pyo3(get, set)]
    preferred_nof_segments: Vec<String>,
}

impl PyReplicateConfig {
    /// The Rust config.
    pub(crate) fn to_core(&self) -> core::ReplicateConfig {
        if self.dfs_replica_num > 0 || self.nof_replica_num > 0 {
            tracing::warn!(
                "ReplicateConfig: dfs_replica_num={} nof_replica_num={} ignored: this store has \
                 no DFS or NVMe-oF tier (memory replicas only)",
                self.dfs_replica_num,
                self.nof_replica_num
            );
        }
        core::ReplicateConfig {
            replica_num: self.replica_num,
            with_soft_pin: self.with_soft_pin,
            with_hard_pin: self.with_hard_pin,
            preferred_segment: self.preferred_segment.clone(),
            preferred_segments: self.preferred_segments.clone(),
            prefer_alloc_in_same_node: self.prefer_alloc_in_same_node,
            soft_pin_action: match self.soft_pin_action {
                SoftPinAction::PRESERVE => core::SoftPinAction::Preserve,
                SoftPinAction::ENABLE => core::SoftPinAction::Enable,
                SoftPinAction::DISABLE => core::SoftPinAction::Disable,
            },
            soft_pin_ttl_ms: self.soft_pin_ttl_ms.unwrap_or(0),
        }
    }
}

/// The Rust config for an optional Python one (`None`: the defaults).
pub(crate) fn core_config(config: Option<PyRef<'_, PyReplicateConfig>>) -> core::ReplicateConfig {
    config.map(|c| c.to_core()).unwrap_or_default()
}

#[pymethods]
impl PyReplicateConfig {
    #[new]
    #[pyo3(signature = (**kwargs))]
    fn new(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let d = core::ReplicateConfig::default();
        let me = PyReplicateConfig {
            replica_num: d.replica_num,
            with_soft_pin: d.with_soft_pin,
            with_hard_pin: d.with_hard_pin,
            preferred_segment: d.preferred_segment,
            preferred_segments: d.preferred_segments,
            prefer_alloc_in_same_node: d.prefer_alloc_in_same_node,
            soft_pin_action: SoftPinAction::PRESERVE,
            soft_pin_ttl_ms: (d.soft_pin_ttl_ms > 0).then_some(d.soft_pin_ttl_ms),
            data_type: ObjectDataType::UNKNOWN,
            group_ids: None,
            dfs_replica_num: 0,
            nof_replica_num: 0,
            preferred_nof_segments: Vec::new(),
        };
        if let Some(kwargs) = kwargs {
            let py = kwargs.py();
            let obj = Bound::new(py, me)?;
            for (k, v) in kwargs.iter() {
                let name: String = k.extract()?;
                if !FIELDS.contains(&name.as_str()) {
                    return Err(PyTypeError::new_err(format!(
                        "ReplicateConfig() got an unexpected keyword argument {name:?}"
                    )));
                }
                obj.setattr(name.as_str(), v)?;
            }
            return Ok(obj.borrow().clone());
        }
        Ok(me)
    }

    /// Keep replicas on the same node (accepts a bool, or the strings "true"/"false").
    #[getter]
    fn get_prefer_alloc_in_same_node(&self) -> bool {
        self.prefer_alloc_in_same_node
    }

    #[setter]
    fn set_prefer_alloc_in_same_node(&mut self, value: &Bound<'_, PyAny>) -> PyResult<()> {
        self.prefer_alloc_in_same_node = if let Ok(s) = value.extract::<String>() {
            match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" | "" => false,
                other => {
                    return Err(PyValueError::new_err(format!(
                        "prefer_alloc_in_same_node: {other:?} is not a boolean"
                    )))
                }
            }
        } else {
            value.is_truthy()?
        };
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!(
            "ReplicateConfig(replica_num={}, with_soft_pin={}, with_hard_pin={}, preferred_segment={:?}, preferred_segments={:?}, prefer_alloc_in_same_node={}, soft_pin_action={}, soft_pin_ttl_ms={}, data_type={})",
            self.replica_num,
            py_bool(self.with_soft_pin),
            py_bool(self.with_hard_pin),
            self.preferred_segment,
            self.preferred_segments,
            py_bool(self.prefer_alloc_in_same_node),
            self.soft_pin_action.name(),
            self.soft_pin_ttl_ms
                .map_or_else(|| "None".to_owned(), |v| v.to_string()),
            self.data_type.name()
        )
    }

    fn __str__(&self) -> String {
        self.__repr__()
    }
}

const FIELDS: &[&str] = &[
    "replica_num",
    "with_soft_pin",
    "with_hard_pin",
    "preferred_segment",
    "preferred_segments",
    "prefer_alloc_in_same_node",
    "soft_pin_action",
    "soft_pin_ttl_ms",
    "data_type",
    "group_ids",
    "dfs_replica_num",
    "nof_replica_num",
    "preferred_nof_segments",
];

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// Defines a simple int-valued enum class with upstream's names, `.name`, `.value` and `int()`.
macro_rules! py_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $value:expr),* $(,)? }) => {
        $(#[$doc])*
        #[pyclass(module = "mooncake.store", eq, eq_int, hash, frozen, from_py_object)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        pub(crate) enum $name {
            $($variant = $value),*
        }

        impl $name {
            /// Every value, in declaration order.
            #[allow(dead_code)]
            pub(crate) const ALL: &'static [$name] = &[$($name::$variant),*];

            /// Upstream's name of the value.
            pub(crate) fn name(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant)),* }
            }
        }

        #[pymethods]
        impl $name {
            /// The value's name.
            #[getter(name)]
            fn py_name(&self) -> &'static str {
                self.name()
            }

            /// The numeric value.
            #[getter]
            fn value(&self) -> i64 {
                *self as i64
            }

            fn __index__(&self) -> i64 {
                *self as i64
            }

            fn __str__(&self) -> String {
                format!("{}.{}", stringify!($name), self.name())
            }
        }
    };
}

py_enum! {
    /// Lifecycle of a replica.
    ReplicaStatus { UNDEFINED = 0, INITIALIZED = 1, PROCESSING = 2, COMPLETE = 3, REMOVED = 4, FAILED = 5 }
}

py_enum! {
    /// Kind of copy/move task.
    TaskType { REPLICA_COPY = 0, REPLICA_MOVE = 1 }
}

py_enum! {
    /// Status of a copy/move task. `COMPLETED` is an alias of `SUCCESS`.
    TaskStatus { PENDING = 0, PROCESSING = 1, FAILED = 2, SUCCESS = 3 }
}

py_enum! {
    /// What an object holds (`ReplicateConfig.data_type`), with upstream's values.
    ObjectDataType { UNKNOWN = 0, KVCACHE = 1, TENSOR = 2, WEIGHT = 3, SAMPLE = 4, ACTIVATION = 5, GRADIENT = 6, OPTIMIZER_STATE = 7, METADATA = 8, GENERAL = 9 }
}

py_enum! {
    /// What an upsert does to the soft pin of the value it replaces.
    SoftPinAction { PRESERVE = 0, ENABLE = 1, DISABLE = 2 }
}

#[pymethods]
impl TaskStatus {
    /// Alias of `SUCCESS`, as some upstream examples spell it.
    #[classattr]
    #[allow(non_snake_case)]
    fn COMPLETED() -> TaskStatus {
        TaskStatus::SUCCESS
    }
}

impl From<core::ReplicaStatus> for ReplicaStatus {
    fn from(s: core::ReplicaStatus) -> Self {
        match s {
            core::ReplicaStatus::Undefined => ReplicaStatus::UNDEFINED,
            core::ReplicaStatus::Initialized => ReplicaStatus::INITIALIZED,
            core::ReplicaStatus::Processing => ReplicaStatus::PROCESSING,
            core::ReplicaStatus::Complete => ReplicaStatus::COMPLETE,
            core::ReplicaStatus::Removed => ReplicaStatus::REMOVED,
            core::ReplicaStatus::Failed => ReplicaStatus::FAILED,
        }
    }
}

impl From<core::TaskStatus> for TaskStatus {
    fn from(s: core::TaskStatus) -> Self {
        match s {
            core::TaskStatus::Pending => TaskStatus::PENDING,
            core::TaskStatus::Processing => TaskStatus::PROCESSING,
            core::TaskStatus::Failed => TaskStatus::FAILED,
            core::TaskStatus::Success => TaskStatus::SUCCESS,
        }
    }
}

impl From<core::TaskType> for TaskType {
    fn from(s: core::TaskType) -> Self {
        match s {
            core::TaskType::ReplicaCopy => TaskType::REPLICA_COPY,
            core::TaskType::ReplicaMove => TaskType::REPLICA_MOVE,
        }
    }
}

/// Where an in-memory replica's bytes are (upstream's `AllocatedBuffer::Descriptor`).
#[pyclass(
    module = "mooncake.store",
    name = "Descriptor",
    get_all,
    set_all,
    from_py_object
)]
#[derive(Clone)]
pub(crate) struct BufferDescriptor {
    size: u64,
    buffer_address: u64,
    transport_endpoint: String,
}

#[pymethods]
impl BufferDescriptor {
    #[new]
    #[pyo3(signature = (size=0, buffer_address=0, transport_endpoint=String::new()))]
    fn new(size: u64, buffer_address: u64, transport_endpoint: String) -> Self {
        BufferDescriptor {
            size,
            buffer_address,
            transport_endpoint,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "<Descriptor size={} buffer_address={} transport_endpoint={}>",
            self.size, self.buffer_address, self.transport_endpoint
        )
    }
}

/// An in-memory replica.
#[pyclass(module = "mooncake.store", get_all, from_py_object)]
#[derive(Clone)]
pub(crate) struct MemoryDescriptor {
    buffer_descriptor: BufferDescriptor,
}

#[pymethods]
impl MemoryDescriptor {
    fn __repr__(&self) -> String {
        format!(
            "MemoryDescriptor(buffer_descriptor={})",
            self.buffer_descriptor.__repr__()
        )
    }
}

/// An on-disk replica.
#[pyclass(module = "mooncake.store", get_all, from_py_object)]
#[derive(Clone)]
pub(crate) struct DiskDescriptor {
    file_path: String,
    object_size: u64,
}

#[pymethods]
impl DiskDescriptor {
    fn __repr__(&self) -> String {
        format!(
            "DiskDescriptor(file_path={:?}, object_size={})",
            self.file_path, self.object_size
        )
    }
}

/// A replica of an object (upstream's `Replica::Descriptor`).
#[pyclass(module = "mooncake.store", frozen)]
pub(crate) struct ReplicaDescriptor {
    /// Status when the descriptor was made.
    #[pyo3(get)]
    status: ReplicaStatus,
    memory: Option<MemoryDescriptor>,
    disk: Option<DiskDescriptor>,
}

impl From<&core::ReplicaDescriptor> for ReplicaDescriptor {
    fn from(d: &core::ReplicaDescriptor) -> Self {
        ReplicaDescriptor {
            status: d.status.into(),
            memory: d.memory().map(|m| MemoryDescriptor {
                buffer_descriptor: BufferDescriptor {
                    size: m.size,
                    buffer_address: m.buffer_address,
                    transport_endpoint: if m.transport_endpoint.is_empty() {
                        m.segment_name.clone()
                    } else {
                        m.transport_endpoint.clone()
                    },
                },
            }),
            disk: d.disk().map(|x| DiskDescriptor {
                file_path: x.file_path.clone(),
                object_size: x.object_size,
            }),
        }
    }
}

#[pymethods]
impl ReplicaDescriptor {
    fn is_memory_replica(&self) -> bool {
        self.memory.is_some()
    }

    fn is_disk_replica(&self) -> bool {
        self.disk.is_some()
    }

    /// Whether this is a replica on this client's local disk (SSD offload). This store keeps
    /// memory replicas only, so never.
    fn is_local_disk_replica(&self) -> bool {
        false
    }

    /// The memory descriptor; `ValueError` for a disk replica.
    fn get_memory_descriptor(&self) -> PyResult<MemoryDescriptor> {
        self.memory
            .clone()
            .ok_or_else(|| PyValueError::new_err("not a memory replica (see is_memory_replica())"))
    }

    /// The disk descriptor; `ValueError` for a memory replica.
    fn get_disk_descriptor(&self) -> PyResult<DiskDescriptor> {
        self.disk
            .clone()
            .ok_or_else(|| PyValueError::new_err("not a disk replica (see is_disk_replica())"))
    }

    fn __repr__(&self) -> String {
        match (&self.memory, &self.disk) {
            (Some(m), _) => format!(
                "ReplicaDescriptor(status={}, memory={})",
                self.status.__str__(),
                m.buffer_descriptor.__repr__()
            ),
            (_, Some(d)) => format!(
                "ReplicaDescriptor(status={}, disk={})",
                self.status.__str__(),
                d.__repr__()
            ),
            _ => format!("ReplicaDescriptor(status={})", self.status.__str__()),
        }
    }
}

/// A task's state as `query_task` reports it.
#[pyclass(module = "mooncake.store", frozen, get_all)]
pub(crate) struct QueryTaskResponse {
    /// The task id (a `uuid.UUID`).
    id: Py<PyAny>,
    /// Copy or move.
    r#type: TaskType,
    /// Status.
    status: TaskStatus,
    /// Creation time, ms since the Unix epoch.
    created_at_ms_epoch: u64,
    /// Last status change, ms since the Unix epoch.
    last_updated_at_ms_epoch: u64,
    /// The executing client's id while PROCESSING, else "".
    assigned_client: String,
    /// The last error, or "".
    message: String,
    /// The object's key.
    key: String,
    /// Source segment of a move ("" for a copy).
    source: String,
    /// Target segments.
    targets: Vec<String>,
    /// Failed attempts so far.
    attempts: u32,
}

impl QueryTaskResponse {
    pub(crate) fn new(py: Python<'_>, t: &core::TaskInfo) -> PyResult<Self> {
        Ok(QueryTaskResponse {
            id: uuid(py, t.id.0)?,
            r#type: t.kind.into(),
            status: t.status.into(),
            created_at_ms_epoch: t.created_at.as_millis(),
            last_updated_at_ms_epoch: t.updated_at.as_millis(),
            assigned_client: t.assigned_client.map(|c| c.to_string()).unwrap_or_default(),
            message: t.error.map(|c| c.to_string()).unwrap_or_default(),
            key: t.key.clone(),
            source: t.source.clone().unwrap_or_default(),
            targets: t.targets.clone(),
            attempts: t.attempts,
        })
    }
}

#[pymethods]
impl QueryTaskResponse {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "QueryTaskResponse(id={}, type={}, status={}, created_at={}, last_updated_at={}, assigned_client={}, message={:?})",
            self.id.bind(py).str()?,
            self.r#type.__str__(),
            self.status.__str__(),
            self.created_at_ms_epoch,
            self.last_updated_at_ms_epoch,
            self.assigned_client,
            self.message
        ))
    }
}

/// A `uuid.UUID` with the value `v`.
pub(crate) fn uuid(py: Python<'_>, v: u128) -> PyResult<Py<PyAny>> {
    let kwargs = PyDict::new(py);
    kwargs.set_item("int", v)?;
    Ok(py
        .import("uuid")?
        .getattr("UUID")?
        .call((), Some(&kwargs))?
        .unbind())
}

/// A task id from a `uuid.UUID` (or anything with an `int` attribute), an int, a UUID string or
/// upstream's `(high, low)` pair.
pub(crate) fn task_id_from(obj: &Bound<'_, PyAny>) -> PyResult<u128> {
    if let Ok(v) = obj.extract::<u128>() {
        return Ok(v);
    }
    if let Ok(s) = obj.extract::<String>() {
        return s
            .parse::<core::TaskId>()
            .map(|t| t.0)
            .map_err(|e| PyValueError::new_err(e.to_string()));
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        if let Ok((hi, lo)) = t.extract::<(u64, u64)>() {
            return Ok(core::TaskId::from_parts(hi, lo).0);
        }
    }
    if let Ok(v) = obj.getattr("int").and_then(|i| i.extract::<u128>()) {
        return Ok(v);
    }
    Err(PyTypeError::new_err(format!(
        "task_id must be a uuid.UUID, an int, a UUID string or a (high, low) pair, not {}",
        obj.get_type().name()?
    )))
}
