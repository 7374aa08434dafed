//! The extension's tokio runtime (one per process) and the boundary helper every call goes through: it releases
//! the GIL, drives a future to completion and turns a Rust panic into an error code, so no panic
//! ever unwinds into Python.

use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

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
///
/// Every call runs here rather than as a task on the workers: the calling thread does the call's
/// copies (several Python threads copy in parallel) and sends its requests itself, and with
/// [`wait_on`] an answer reaches it as fast as it would reach a task. Measured against running
/// writes as worker tasks: 4 KiB puts 58 us instead of 105 us over TCP, 1 MiB `put_from`
/// 90 us instead of 157 us through shared memory.
pub(crate) fn block_on<F>(py: Python<'_>, fut: F) -> Result<F::Output, Error>
where
    F: Future + Send,
    F::Output: Send,
{
    detached(py, move || runtime().map(|rt| wait_on(rt, fut)))?
}

/// How long a calling thread busy-waits for its call to finish before it sleeps.
///
/// A call's answer arrives on a runtime worker, which then wakes the calling thread; a sleeping
/// thread takes several microseconds to be woken and scheduled (more on a busy host), which a
/// same-host call of 50-60 us notices. A thread that spins instead sees the wake-up at once.
/// Only one thread spins at a time (the others sleep at once), so spinning never takes more than
/// one core from the workers, and only while its waits stay that short (see [`wait_on`]).
/// `MC_SPIN_WAIT_US` sets it (0: never spin).
fn spin_limit() -> Duration {
    static LIMIT: OnceLock<Duration> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let us = std::env::var("MC_SPIN_WAIT_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(50);
        Duration::from_micros(us)
    })
}

/// Threads spinning in [`wait_on`] now.
static SPINNERS: AtomicU32 = AtomicU32::new(0);

/// Wakes a thread waiting in [`wait_on`]: a flag it can see while spinning, and an unpark
/// (no system call unless it sleeps).
struct Signal {
    woken: AtomicBool,
    thread: Thread,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

thread_local! {
    /// Whether this thread's last wait was short enough for spinning to catch its wake-up.
    static SPIN_PAYS: Cell<bool> = const { Cell::new(true) };
}

/// Drives `fut` to completion on the calling thread (which is not a runtime worker), inside the
/// runtime's context. Each wait for a wake-up spins up to [`spin_limit`] first, when this
/// thread's previous wait was that short (a thread moving megabytes over TCP waits far longer,
/// and its spinning would only take a core from the transfer) and no other thread is spinning.
fn wait_on<F: Future>(rt: &tokio::runtime::Runtime, fut: F) -> F::Output {
    let _context = rt.enter();
    let signal = Arc::new(Signal {
        woken: AtomicBool::new(false),
        thread: std::thread::current(),
    });
    let waker = Waker::from(signal.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let limit = spin_limit();
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        let start = Instant::now();
        if !limit.is_zero() && SPIN_PAYS.get() {
            if SPINNERS.fetch_add(1, Ordering::AcqRel) == 0 {
                while !signal.woken.load(Ordering::Acquire) && start.elapsed() < limit {
                    std::hint::spin_loop();
                }
            }
            SPINNERS.fetch_sub(1, Ordering::AcqRel);
        }
        while !signal.woken.swap(false, Ordering::AcqRel) {
            std::thread::park();
        }
        SPIN_PAYS.set(start.elapsed() <= limit);
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
