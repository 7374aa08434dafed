//! `mooncake._store`: Python bindings of the Rust store client, re-exported by the pure-Python
//! package as `mooncake.store` (a drop-in for upstream Mooncake's `mooncake.store`), and of the
//! P2P store (`mooncake-p2p`), re-exported as `mooncake.p2p`, and of the transfer engine alone
//! (`mooncake_core::TransferEngine`), re-exported as `mooncake.engine`.
//!
//! This crate holds conversions only: arguments in, results out, errors mapped to upstream's
//! integer codes, the GIL released around every wait. The logic lives in the `mooncake` and
//! `mooncake-core` crates, including the dummy-client mode (`setup_dummy`, forwarding to a
//! `mooncake_client` process).
//!
//! Every call runs on one global tokio runtime (two worker threads) with the GIL released, and
//! catches panics at the boundary: a Rust panic becomes an error code, never a Python crash.

mod buffer;
mod engine;
mod host;
use mooncake_core::mapped;
mod master;
mod p2p;
mod runtime;
mod setup_args;
mod store;
mod types;

use pyo3::prelude::*;

fn init_logging() {
    let filter = std::env::var("MC_LOG_LEVEL")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter.to_ascii_lowercase())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

#[pymodule]
fn _store(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    m.add_class::<store::PyStore>()?;
    m.add_class::<types::PyReplicateConfig>()?;
    m.add_class::<buffer::BufferHandle>()?;
    m.add_class::<types::ReplicaStatus>()?;
    m.add_class::<types::TaskType>()?;
    m.add_class::<types::TaskStatus>()?;
    m.add_class::<types::SoftPinAction>()?;
    m.add_class::<types::ObjectDataType>()?;
    m.add_class::<types::BufferDescriptor>()?;
    m.add("BufferDescriptor", m.getattr("Descriptor")?)?;
    m.add_class::<types::MemoryDescriptor>()?;
    m.add_class::<types::DiskDescriptor>()?;
    m.add_class::<types::ReplicaDescriptor>()?;
    m.add_class::<types::QueryTaskResponse>()?;
    m.add_class::<host::MooncakeHostMemAllocator>()?;
    m.add_function(wrap_pyfunction!(host::bind_to_numa_node, m)?)?;
    m.add_function(wrap_pyfunction!(host::get_alloc_func_addr, m)?)?;
    m.add_function(wrap_pyfunction!(host::get_free_func_addr, m)?)?;
    m.add_function(wrap_pyfunction!(host::_copy_from_ptr, m)?)?;
    m.add_function(wrap_pyfunction!(host::_copy_to_ptr, m)?)?;
    p2p::add(m)?;
    engine::add(m)?;
    m.add_function(wrap_pyfunction!(master::run_master, m)?)?;
    m.add_function(wrap_pyfunction!(master::run_client, m)?)?;
    m.add_function(wrap_pyfunction!(master::run_certs, m)?)?;
    // Upstream exports the enum values at module level (ReplicaStatus, then TaskType, then
    // TaskStatus, so FAILED and PROCESSING name the TaskStatus values).
    for v in types::ReplicaStatus::ALL {
        m.add(v.name(), *v)?;
    }
    for v in types::TaskType::ALL {
        m.add(v.name(), *v)?;
    }
    for v in types::TaskStatus::ALL {
        m.add(v.name(), *v)?;
    }
    for v in types::ObjectDataType::ALL {
        m.add(v.name(), *v)?;
    }
    Ok(())
}
