//! The extension's tokio runtime (one per process) and the boundary helper every call goes through: it releases
//! the GIL, drives a future to completion and turns a Rust panic into an error code, so no panic
//! ever unwinds into Python.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::sync::Mutex;

use mooncake::{Error, ErrorCode};
use pyo3::prelude::*;

/// The runtime of this process, with the pid it was started in. A child made by `fork()` has
/// none of its parent's threads, so it gets a runtime of its own (the parent's copy is left
/// alone: dropping it would wait for threads that do not exist here).
static RUNTIME: Mutex<Option<(u32, &'static tokio::runtime::Runtime)>> = Mutex::new(None);
/// Lock-free copy of `RUNTIME` for the common case (every call): its pid, then the runtime.
static OWNER: AtomicU32 = AtomicU32::new(0);
static CURRENT: AtomicPtr<tokio::runtime::Runtime> = AtomicPtr::new(std::ptr::null_mut());

/// The process's runtime (2 worker threads), started on first use in each process.
pub(crate) fn runtime() -> Result<&'static tokio::runtime::Runtime, Error> {
    let pid = std::process::id();
    if OWNER.load(Ordering::Acquire) == pid {
        // SAFETY: CURRENT is stored (from a leaked, never freed runtime) before OWNER.
        if let Some(rt) = unsafe { CURRENT.load(Ordering::Acquire).as_ref() } {
            return Ok(rt);
        }
    }
    let mut slot = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((owner, rt)) = *slot {
        if owner == pid {
            return Ok(rt);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mooncake-py")
        .enable_all()
        .build()
        .map_err(|e| {
            Error::with_code(
                ErrorCode::INTERNAL_ERROR,
                format!("starting the tokio runtime: {e}"),
            )
        })?;
    let rt: &'static tokio::runtime::Runtime = Box::leak(Box::new(rt));
    *slot = Some((pid, rt));
    CURRENT.store(std::ptr::from_ref(rt).cast_mut(), Ordering::Release);
    OWNER.store(pid, Ordering::Release);
    Ok(rt)
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

/// Drives `fut` on the calling thread without the GIL, catching panics.
pub(crate) fn block_on<F>(py: Python<'_>, fut: F) -> Result<F::Output, Error>
where
    F: Future + Send,
    F::Output: Send,
{
    detached(py, move || runtime().map(|rt| rt.block_on(fut)))?
}

/// Runs `fut` as a task on the runtime's workers and waits for it without the GIL, catching
/// panics: for small writes.
///
/// A put makes two or three round trips (the storage node and the master, or the master before
/// and after the storage node). Driven from the calling thread, each answer wakes the worker
/// that watches the sockets and then this thread; run on a worker, the answers resume the call where they arrive and only the finished
/// call wakes this thread. Reads make one round trip and gain nothing; large writes are mostly
/// copying, which is better spread over the calling threads than queued on the workers.
pub(crate) fn block_on_worker<F>(py: Python<'_>, fut: F) -> Result<F::Output, Error>
where
    F: Future + Send,
    F::Output: Send,
{
    detached(py, move || run_on_worker(runtime()?, fut))?
}

/// Aborts the process if dropped armed: a wait that unwinds while a task may still use the
/// waiting frame's borrows would otherwise let that task write into freed stack.
struct AbortUnlessDisarmed;

impl Drop for AbortUnlessDisarmed {
    fn drop(&mut self) {
        eprintln!("mooncake: a wait for a running call unwound; aborting");
        std::process::abort();
    }
}

fn run_on_worker<F>(rt: &tokio::runtime::Runtime, fut: F) -> Result<F::Output, Error>
where
    F: Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(Error::with_code(
            ErrorCode::INTERNAL_ERROR,
            "called from inside a tokio runtime",
        ));
    }
    let mut out = None;
    let slot = &mut out;
    let task: Pin<Box<dyn Future<Output = ()> + Send + '_>> = Box::pin(async move {
        *slot = Some(fut.await);
    });
    // SAFETY: the task borrows `fut`'s captures and `out` from this frame. It is waited for
    // below until tokio reports it finished, which happens only after the task's future has
    // been dropped (completed, or panicked and dropped); nothing aborts or cancels it (the
    // runtime is never shut down), and if the wait unwound the guard aborts the process
    // rather than let the frame go while the task runs.
    let task: Pin<Box<dyn Future<Output = ()> + Send + 'static>> =
        unsafe { std::mem::transmute(task) };
    let handle = rt.spawn(task);
    let guard = AbortUnlessDisarmed;
    let joined = rt.block_on(handle);
    std::mem::forget(guard);
    match joined {
        Ok(()) => out.ok_or_else(|| {
            Error::with_code(
                ErrorCode::INTERNAL_ERROR,
                "a call finished without a result",
            )
        }),
        Err(e) if e.is_panic() => Err(panic_error(e.into_panic())),
        Err(e) => Err(Error::with_code(
            ErrorCode::INTERNAL_ERROR,
            format!("call cancelled: {e}"),
        )),
    }
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
