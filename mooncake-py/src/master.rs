//! The `mooncake_master`, `mooncake_client` and `mooncake_certs` console scripts: the Rust
//! master, real client and certificate maker, run inside the Python process.

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

/// Runs `mooncake_certs` with `args` (without the program name): makes a cluster CA or a node
/// certificate; returns the exit code.
#[pyfunction]
pub(crate) fn run_certs(py: Python<'_>, args: Vec<String>) -> i32 {
    crate::runtime::detached(py, move || {
        let argv = std::iter::once("mooncake_certs".to_owned()).chain(args);
        mooncake_tls::cli::main_with_args(argv)
    })
    .unwrap_or(1)
}
