//! The staging buffer: registered memory that byte-oriented puts and gets copy through, because
//! transports move data between registered buffers only. Zero-copy calls skip it.
//!
//! Performance-critical: every `put`/`get` of bytes takes a slot here.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mooncake_core::{Allocation, Allocator, Error, ErrorCode, RangeAllocator, Result};
use tokio::sync::Notify;

/// A range allocator over the staging buffer; callers wait for space when it is full.
#[derive(Debug)]
pub(crate) struct Staging {
    base: u64,
    size: u64,
    alloc: Mutex<RangeAllocator>,
    freed: Notify,
}

/// A reserved range of the staging buffer, returned on drop.
#[derive(Debug)]
pub(crate) struct Slot {
    staging: Arc<Staging>,
    allocation: Allocation,
    /// Address of the first byte.
    pub(crate) addr: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let freed = self
            .staging
            .alloc
            .lock()
            .expect("staging lock")
            .free(self.allocation);
        debug_assert!(freed.is_ok());
        self.staging.freed.notify_waiters();
    }
}

impl Staging {
    /// A staging buffer of `size` bytes at `base`; `size` 0 is a client without one (every
    /// reservation is refused).
    pub(crate) fn new(base: u64, size: u64) -> Result<Arc<Self>> {
        Ok(Arc::new(Staging {
            base,
            size,
            // An allocator needs some space; with `size` 0, `reserve` refuses before using it.
            alloc: Mutex::new(RangeAllocator::new(size.max(64), 64)?),
            freed: Notify::new(),
        }))
    }

    /// Total size.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Reserves `len` bytes if they are free now.
    pub(crate) fn try_reserve(self: &Arc<Self>, len: u64) -> Option<Slot> {
        if len > self.size {
            return None;
        }
        let allocation = self.alloc.lock().expect("staging lock").allocate(len)?;
        Some(Slot {
            staging: self.clone(),
            addr: self.base + allocation.offset,
            allocation,
        })
    }

    /// Reserves `len` bytes (`len` ≤ the staging size), waiting up to `wait` for concurrent calls
    /// to return space.
    pub(crate) async fn reserve(self: &Arc<Self>, len: u64, wait: Duration) -> Result<Slot> {
        if len == 0 || len > self.size {
            return Err(Error::with_code(
                ErrorCode::INVALID_PARAMS,
                format!(
                    "{len} bytes do not fit the {}-byte local buffer (local_buffer_size)",
                    self.size
                ),
            ));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.freed.notified();
            if let Some(slot) = self.try_reserve(len) {
                return Ok(slot);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::with_code(
                    ErrorCode::NO_AVAILABLE_HANDLE,
                    format!("no {len} bytes free in the local buffer within {wait:?}"),
                ));
            }
        }
    }
}
