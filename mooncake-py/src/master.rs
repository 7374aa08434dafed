//! The `mooncake_master` and `mooncake_client` console scripts: the Rust master and real client,
//! run inside the Python process.

use pyo3::prelude::*;

/// Runs `mooncake_master` with `args` (the flags, without the program name) until SIGINT or
/// SIGTERM; returns the exit code. The GIL is released while it runs.
#[pyfunction]
pub(crate) fn run_master(py: Python<'_>, args: Vec<String>) -> i32 {
    crate::runtime::detached(py, move || {
        mooncake::master_service::master_cli::main_with_args(args)
    })
    .unwrap_or(1)
}

/// Runs `mooncake_client` (the real client that dummy clients forward to) with `args` until
/// SIGINT or SIGTERM; returns the exit code. The GIL is released while it runs.
#[pyfunction]
pub(crate) fn run_client(py: Python<'_>, args: Vec<String>) -> i32 {
    crate::runtime::detached(py, move || mooncake::real_client::main_with_args(args)).unwrap_or(1)
}
