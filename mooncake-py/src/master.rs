//! The `mooncake_master` console script: the Rust master, run inside the Python process.

use pyo3::prelude::*;

/// Runs `mooncake_master` with `args` (the flags, without the program name) until SIGINT or
/// SIGTERM; returns the exit code. The GIL is released while it runs.
#[pyfunction]
pub(crate) fn run_master(py: Python<'_>, args: Vec<String>) -> i32 {
    crate::runtime::detached(py, move || mooncake::master_cli::main_with_args(args)).unwrap_or(1)
}
