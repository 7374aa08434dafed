//! Arguments of `setup`: the positional/keyword form, the single-dict form with size strings, and
//! `init_all`'s defaults from the environment.

use mooncake::store::StoreConfig;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

/// Parses a byte size string (`16MB`, `1.5 GiB`, `512k`, `4096`) by the rules of
/// [`mooncake_core::size`]: units are powers of 1024 (`KB` = `KiB` = 1024), as upstream's configs
/// mean them.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    mooncake_core::parse_size(text).map_err(|e| e.to_string())
}

/// A size argument: an int (bytes) or a size string. `Ok(Err(..))` is a bad value (the call
/// returns a code), `Err` a wrong type (`TypeError`).
pub(crate) fn size_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Result<u64, String>> {
    if obj.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be an int or a size string"
        )));
    }
    if let Ok(n) = obj.extract::<i128>() {
        return Ok(u64::try_from(n).map_err(|_| format!("{name} = {n} is out of range")));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(parse_size(s.to_str()?).map_err(|e| format!("{name}: {e}")));
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be an int or a size string like \"16MB\", not {}",
        obj.get_type().name()?
    )))
}

fn str_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<String> {
    obj.extract::<String>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a str, not {}",
            obj.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))
    })
}

/// Raw `setup` arguments by name (each optional).
#[derive(Default)]
pub(crate) struct SetupArgs<'py> {
    pub(crate) local_hostname: Option<Bound<'py, PyAny>>,
    pub(crate) metadata_server: Option<Bound<'py, PyAny>>,
    pub(crate) global_segment_size: Option<Bound<'py, PyAny>>,
    pub(crate) local_buffer_size: Option<Bound<'py, PyAny>>,
    pub(crate) protocol: Option<Bound<'py, PyAny>>,
    pub(crate) rdma_devices: Option<Bound<'py, PyAny>>,
    pub(crate) master_server_addr: Option<Bound<'py, PyAny>>,
    /// Upstream's SSD offload switch: accepted when off; this store has no SSD tier.
    pub(crate) enable_ssd_offload: Option<Bound<'py, PyAny>>,
    /// Upstream's tenant: accepted when `"default"`; this store has no tenant isolation.
    pub(crate) tenant_id: Option<Bound<'py, PyAny>>,
    /// Upstream's per-client HTTP server switch: accepted when off; this store has none.
    pub(crate) enable_client_http_server: Option<Bound<'py, PyAny>>,
}

/// A boolean setting: a bool, an int, or a string such as "true"/"false" (config files and
/// environment variables carry them as strings).
fn bool_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Result<bool, String>> {
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(match s.to_str()?.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" | "" => Ok(false),
            other => Err(format!("{name}: {other:?} is not a boolean")),
        });
    }
    Ok(Ok(obj.is_truthy()?))
}

/// Keys of upstream's `setup(dict)` that configure something this store has no use for (the
/// settings of upstream's SSD tier and client HTTP server when those are off, the real
/// client's IPC socket): accepted with no effect.
const NO_EFFECT_KEYS: &[&str] = &[
    "ssd_offload_path",
    "client_http_port",
    "ipc_socket_path",
    "mem_pool_size",
    "cluster_id",
];

impl<'py> SetupArgs<'py> {
    /// The arguments of the dict form. Unknown keys are a `TypeError`.
    pub(crate) fn from_dict(d: &Bound<'py, PyDict>) -> PyResult<Self> {
        let mut a = SetupArgs::default();
        for (k, v) in d.iter() {
            let key: String = k.extract()?;
            if v.is_none() {
                continue;
            }
            let slot = match key.as_str() {
                "local_hostname" => &mut a.local_hostname,
                "metadata_server" | "te_meta_data_server" => &mut a.metadata_server,
                "global_segment_size" => &mut a.global_segment_size,
                "local_buffer_size" => &mut a.local_buffer_size,
                "protocol" => &mut a.protocol,
                "rdma_devices" | "device_name" => &mut a.rdma_devices,
                "master_server_addr" | "master_server_address" | "master_address" => {
                    &mut a.master_server_addr
                }
                "enable_ssd_offload" => &mut a.enable_ssd_offload,
                "tenant_id" => &mut a.tenant_id,
                "enable_client_http_server" => &mut a.enable_client_http_server,
                other if NO_EFFECT_KEYS.contains(&other) => {
                    tracing::debug!("setup(): {other:?} has no effect in this store");
                    continue;
                }
                other => {
                    // As upstream: keys it does not know are ignored.
                    tracing::warn!("setup(): unknown config key {other:?} ignored");
                    continue;
                }
            };
            *slot = Some(v);
        }
        Ok(a)
    }

    /// Refuses settings that turn on a feature this store does not have (upstream's SSD
    /// offload, tenants, client HTTP server), naming it: `Ok(Err(..))`.
    pub(crate) fn unsupported(&self) -> PyResult<Result<(), String>> {
        for (value, name) in [
            (&self.enable_ssd_offload, "enable_ssd_offload"),
            (&self.enable_client_http_server, "enable_client_http_server"),
        ] {
            if let Some(v) = value {
                match bool_arg(v, name)? {
                    Ok(false) => {}
                    Ok(true) => {
                        return Ok(Err(format!(
                            "{name}=True: this store has no such feature (memory replicas only)"
                        )))
                    }
                    Err(e) => return Ok(Err(e)),
                }
            }
        }
        if let Some(v) = &self.tenant_id {
            let t = str_arg(v, "tenant_id")?;
            if !t.is_empty() && t != "default" {
                return Ok(Err(format!(
                    "tenant_id={t:?}: this store has no tenants (only \"default\")"
                )));
            }
        }
        Ok(Ok(()))
    }

    /// The store configuration. `Ok(Err(..))`: a bad value; `Err`: a wrong type.
    pub(crate) fn into_config(self) -> PyResult<Result<StoreConfig, String>> {
        let mut c = StoreConfig::default();
        match self.local_hostname {
            Some(v) => c.local_hostname = str_arg(&v, "local_hostname")?,
            None => return Ok(Err("local_hostname is required".into())),
        }
        match self.metadata_server {
            Some(v) => c.metadata_server = str_arg(&v, "metadata_server")?,
            None => return Ok(Err("metadata_server is required".into())),
        }
        if let Some(v) = self.global_segment_size {
            match size_arg(&v, "global_segment_size")? {
                Ok(n) => c.global_segment_size = n,
                Err(e) => return Ok(Err(e)),
            }
        }
        if let Some(v) = self.local_buffer_size {
            match size_arg(&v, "local_buffer_size")? {
                Ok(n) => c.local_buffer_size = n,
                Err(e) => return Ok(Err(e)),
            }
        }
        if let Some(v) = self.protocol {
            c.protocol = str_arg(&v, "protocol")?.trim().to_ascii_lowercase();
        }
        if let Some(v) = self.rdma_devices {
            c.device_name = str_arg(&v, "rdma_devices")?;
        }
        if let Some(v) = self.master_server_addr {
            c.master_server_addr = str_arg(&v, "master_server_addr")?;
        }
        Ok(Ok(c))
    }
}

/// `init_all`'s configuration: the protocol, device and segment size given, the rest from the
/// environment as upstream's integrations read it (`MOONCAKE_LOCAL_HOSTNAME`,
/// `MOONCAKE_TE_META_DATA_SERVER`/`MC_METADATA_SERVER`, `MOONCAKE_MASTER`,
/// `MOONCAKE_LOCAL_BUFFER_SIZE`), with the defaults `localhost`, `P2PHANDSHAKE`,
/// `localhost:50051` and 16 MiB.
pub(crate) fn init_all_config(
    protocol: String,
    device_name: String,
    mount_segment_size: u64,
) -> Result<StoreConfig, String> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let local_buffer_size = match env("MOONCAKE_LOCAL_BUFFER_SIZE") {
        Some(s) => parse_size(&s).map_err(|e| format!("MOONCAKE_LOCAL_BUFFER_SIZE: {e}"))?,
        None => 16 << 20,
    };
    Ok(StoreConfig {
        local_hostname: env("MOONCAKE_LOCAL_HOSTNAME").unwrap_or_else(|| "localhost".into()),
        metadata_server: env("MOONCAKE_TE_META_DATA_SERVER")
            .or_else(|| env("MC_METADATA_SERVER"))
            .unwrap_or_else(|| "P2PHANDSHAKE".into()),
        global_segment_size: mount_segment_size,
        local_buffer_size,
        protocol,
        device_name,
        master_server_addr: env("MOONCAKE_MASTER").unwrap_or_else(|| "localhost:50051".into()),
        ..StoreConfig::default()
    })
}
