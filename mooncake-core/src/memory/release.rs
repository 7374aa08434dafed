//! Waiting for an unregistered buffer to be released: the [`Unregistering`] future, completed
//! from the buffer's drop (no polling, no sleeping).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Completion of an unregistered buffer's release, shared by the buffer and its waiters.
#[derive(Debug, Default)]
pub(super) struct Release {
    state: Mutex<ReleaseState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct ReleaseState {
    done: bool,
    waker: Option<Waker>,
}

impl Release {
    pub(super) fn complete(&self) {
        let waker = {
            let mut s = self.state.lock().expect("release lock");
            s.done = true;
            s.waker.take()
        };
        self.cond.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Returned by [`MemoryRegistry::unregister`]: the buffer is already unregistered (no new
/// access can start, transports were told); this future completes once no transfer holds a
/// region of it any more, after which its memory is released (registry-owned) or the caller may
/// free it (caller-owned). Dropping it does not undo anything; it just stops waiting.
#[derive(Debug)]
pub struct Unregistering {
    addr: u64,
    release: Arc<Release>,
}

impl Unregistering {
    pub(super) fn new(addr: u64, release: Arc<Release>) -> Self {
        Unregistering { addr, release }
    }

    /// True once every region of the buffer is gone.
    pub fn is_done(&self) -> bool {
        self.release.state.lock().expect("release lock").done
    }

    /// Blocks the calling thread until every region of the buffer is gone, for at most
    /// `timeout`. For callers outside async code only: it parks the thread.
    pub fn wait_blocking(self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut s = self.release.state.lock().expect("release lock");
        while !s.done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::with_code(
                    crate::ErrorCode::OBJECT_REPLICA_BUSY,
                    format!(
                        "buffer {:#x} still in use by transfers after {timeout:?}",
                        self.addr
                    ),
                ));
            }
            s = self
                .release
                .cond
                .wait_timeout(s, left)
                .expect("release lock")
                .0;
        }
        Ok(())
    }
}

impl Future for Unregistering {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.release.state.lock().expect("release lock");
        if s.done {
            return Poll::Ready(());
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}
