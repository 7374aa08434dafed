//! The extension's one tokio runtime and the boundary helper every call goes through: it releases
//! the GIL, drives a future to completion and turns a Rust panic into an error code, so no panic
//! ever unwinds into Python.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

use mooncake::{Error, ErrorCode};
use pyo3::prelude::*;

static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();

/// The global runtime (2 worker threads), started on first use.
pub(crate) fn runtime() -> Result<&'static tokio::runtime::Runtime, Error> {
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("mooncake-py")
                .enable_all()
                .build()
                .map_err(|e| format!("starting the tokio runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| Error::with_code(ErrorCode::INTERNAL_ERROR, e.clone()))
}

fn panic_error(payload: Box<dyn std::any::Any + Send>) -> Error {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    tracing::error!("internal error (panic) in mooncake: {what}");
    Error::with_code(ErrorCode::INTERNAL_ERROR, format!("internal panic: {what}"))
}

/// Runs `f` without the GIL, catching panics.
pub(crate) fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
    py.detach(|| std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(panic_error))
}

/// Drives `fut` on the runtime without the GIL, catching panics.
pub(crate) fn block_on<F>(py: Python<'_>, fut: F) -> Result<F::Output, Error>
where
    F: Future + Send,
    F::Output: Send,
{
    detached(py, move || runtime().map(|rt| rt.block_on(fut)))?
}

/// The Python-visible status code of an error.
pub(crate) fn code_of(e: &Error) -> i64 {
    i64::from(e.code().code())
}

/// 0 for success, else the error's code.
pub(crate) fn status(r: &Result<(), Error>) -> i64 {
    match r {
        Ok(()) => 0,
        Err(e) => code_of(e),
    }
}
