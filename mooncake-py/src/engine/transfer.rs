//! Transfers: the synchronous calls (0 or -1), the asynchronous ones (a batch id, 0 when
//! nothing was submitted) and the collection of their batches.
//!
//! Bytes move between registered buffers directly (READ/WRITE of the engine): the local
//! range must lie inside a buffer this engine registered, the remote one inside a buffer the
//! peer registered; the peer checks its side, so a wrong remote address fails the request and
//! touches nothing. The `transport_hint` argument is accepted and ignored (one transport is
//! chosen per request: same-host shared memory where it reaches, else TCP), as upstream builds
//! without the hint-aware runtime do.

use std::sync::Arc;
use std::time::Instant;

use mooncake::{Error, OpCode, SegmentHandle, TransferEngine, TransferRequest, TransferStatus};
use pyo3::prelude::*;

use super::batches::Pending;
use super::types::{opcode_arg, PyTransferNotify};
use super::{lock, PyTransferEngine, ERR_INVALID_ARGUMENT};
use crate::runtime::block_on;

/// One request: local address, peer address, length.
#[derive(Clone, Copy, Debug)]
struct Item {
    local: u64,
    remote: u64,
    len: u64,
}

impl Item {
    fn request(&self, target: &SegmentHandle, op: OpCode) -> TransferRequest {
        match op {
            OpCode::Read => TransferRequest::read(target, self.remote, self.local, self.len),
            OpCode::Write => TransferRequest::write(target, self.remote, self.local, self.len),
        }
    }
}

/// Zips the three lists of a batch call, which must be of one length.
fn items(
    call: &str,
    buffers: Vec<u64>,
    peer_buffer_addresses: Vec<u64>,
    lengths: Vec<u64>,
) -> Option<Vec<Item>> {
    if buffers.len() != peer_buffer_addresses.len() || buffers.len() != lengths.len() {
        tracing::error!(
            "{call}: buffers, peer_buffer_addresses and lengths differ in length ({}, {}, {})",
            buffers.len(),
            peer_buffer_addresses.len(),
            lengths.len()
        );
        return None;
    }
    Some(
        buffers
            .into_iter()
            .zip(peer_buffer_addresses)
            .zip(lengths)
            .map(|((local, remote), len)| Item { local, remote, len })
            .collect(),
    )
}

/// Forgets the cached descriptor of a peer that could not be reached, so that the next call
/// looks it up again (it may have restarted under the same name).
fn forget_if_gone(engine: &TransferEngine, target: &str, e: &Error) {
    if matches!(
        e,
        Error::PeerUnreachable { .. } | Error::NoTransport { .. } | Error::Shutdown
    ) {
        engine.close_segment(target);
    }
}

/// Runs `items` against `target` to completion; the first failure, with its index.
async fn run(
    engine: &TransferEngine,
    target: &str,
    op: OpCode,
    items: &[Item],
) -> Result<(), (Option<usize>, Error)> {
    let segment = engine.open_segment(target).await.map_err(|e| (None, e))?;
    let requests = items.iter().map(|i| i.request(&segment, op)).collect();
    let mut results = engine.transfer(requests).await;
    // A same-host mapping of the peer's memory went stale (the peer re-registered that
    // buffer): look the peer up again and retry those requests once.
    let stale: Vec<usize> = (0..results.len())
        .filter(|&i| matches!(results[i], Err(Error::StaleMapping(_))))
        .collect();
    if !stale.is_empty() {
        let segment = engine
            .refresh_segment(target)
            .await
            .map_err(|e| (None, e))?;
        let retry = stale.iter().map(|&i| items[i].request(&segment, op));
        let again = engine.transfer(retry.collect()).await;
        for (i, r) in stale.into_iter().zip(again) {
            results[i] = r;
        }
    }
    match results
        .into_iter()
        .enumerate()
        .find_map(|(i, r)| r.err().map(|e| (i, e)))
    {
        None => Ok(()),
        Some((i, e)) => {
            forget_if_gone(engine, target, &e);
            Err((Some(i), e))
        }
    }
}

impl PyTransferEngine {
    /// A synchronous transfer: 0, or -1 (logged).
    fn sync(
        &self,
        py: Python<'_>,
        call: &str,
        target: &str,
        op: OpCode,
        items: Vec<Item>,
        notify: Option<&PyTransferNotify>,
    ) -> i64 {
        let engine = match self.engine(call) {
            Ok(e) => e,
            Err(code) => return code,
        };
        if notify.is_some() {
            tracing::error!(
                "{call}: transfer notifications (notify=TransferNotify) are not supported by \
                 this build; nothing was transferred"
            );
            return ERR_INVALID_ARGUMENT;
        }
        let name = target.to_owned();
        let done = block_on(py, async move {
            let r = run(&engine, &name, op, &items).await;
            (r, items)
        });
        match done {
            Ok((Ok(()), _)) => 0,
            Ok((Err((Some(i), e)), items)) => {
                let it = items[i];
                tracing::error!(
                    "{call} to {target}: request {i} of {} ({:?} local {:#x}, peer {:#x}, {} \
                     bytes) failed: {e}",
                    items.len(),
                    op,
                    it.local,
                    it.remote,
                    it.len
                );
                ERR_INVALID_ARGUMENT
            }
            Ok((Err((None, e)), _)) => {
                tracing::error!("{call}: cannot open segment {target}: {e}");
                ERR_INVALID_ARGUMENT
            }
            Err(e) => {
                tracing::error!("{call} to {target}: {e}");
                ERR_INVALID_ARGUMENT
            }
        }
    }

    /// An asynchronous transfer: the batch id, or 0 (logged) when nothing was submitted.
    fn submit(
        &self,
        py: Python<'_>,
        call: &str,
        target: &str,
        op: OpCode,
        items: Vec<Item>,
    ) -> u64 {
        let Ok(engine) = self.engine(call) else {
            return 0;
        };
        let name = target.to_owned();
        let len = items.len();
        let bytes = items.iter().map(|i| i.len).fold(0u64, u64::saturating_add);
        let submitted = block_on(py, async move {
            let segment = engine.open_segment(&name).await?;
            let requests = items.iter().map(|i| i.request(&segment, op)).collect();
            Ok::<_, Error>(engine.submit(requests))
        });
        match submitted {
            Ok(Ok(batch)) => lock(&self.batches).insert(Pending {
                batch,
                len,
                bytes,
                target: target.to_owned(),
                started: Instant::now(),
            }),
            Ok(Err(e)) | Err(e) => {
                tracing::error!("{call}: cannot open segment {target}: {e}");
                0
            }
        }
    }
}

/// The first failure of a finished batch, logged; whether it timed out.
fn failure(engine: Option<&Arc<TransferEngine>>, id: u64, p: &Pending) -> Option<bool> {
    let (i, status) = (0..p.len)
        .map(|i| (i, p.batch.status(i)))
        .find(|(_, s)| !matches!(s, TransferStatus::Completed))?;
    let e = p.batch.error(i);
    if let (Some(engine), Some(e)) = (engine, &e) {
        forget_if_gone(engine, &p.target, e);
    }
    tracing::error!(
        "batch {id} to {}: request {i} of {} failed: {}",
        p.target,
        p.len,
        e.map_or_else(|| format!("{status:?}"), |e| e.to_string())
    );
    Some(status == TransferStatus::TimedOut)
}

#[pymethods]
impl PyTransferEngine {
    /// Writes `length` bytes from local `buffer` to `peer_buffer_address` of
    /// `target_hostname`. 0, or -1 (logged).
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint = ""))]
    fn transfer_sync_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: u64,
        transport_hint: &str,
    ) -> i64 {
        let _ = transport_hint;
        let item = Item {
            local: buffer,
            remote: peer_buffer_address,
            len: length,
        };
        let call = "transfer_sync_write";
        self.sync(py, call, target_hostname, OpCode::Write, vec![item], None)
    }

    /// Reads `length` bytes at `peer_buffer_address` of `target_hostname` into local
    /// `buffer`. 0, or -1 (logged).
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint = ""))]
    fn transfer_sync_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: u64,
        transport_hint: &str,
    ) -> i64 {
        let _ = transport_hint;
        let item = Item {
            local: buffer,
            remote: peer_buffer_address,
            len: length,
        };
        let call = "transfer_sync_read";
        self.sync(py, call, target_hostname, OpCode::Read, vec![item], None)
    }

    /// One transfer in the direction of `opcode`. A `notify` is not supported (-1, logged).
    #[pyo3(signature = (
        target_hostname, buffer, peer_buffer_address, length, opcode, notify = None,
        transport_hint = ""
    ))]
    #[allow(clippy::too_many_arguments)]
    fn transfer_sync(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: u64,
        opcode: &Bound<'_, PyAny>,
        notify: Option<PyRef<'_, PyTransferNotify>>,
        transport_hint: &str,
    ) -> PyResult<i64> {
        let _ = transport_hint;
        let op = opcode_arg(opcode)?;
        let item = Item {
            local: buffer,
            remote: peer_buffer_address,
            len: length,
        };
        let call = "transfer_sync";
        Ok(self.sync(py, call, target_hostname, op, vec![item], notify.as_deref()))
    }

    /// Writes each local buffer to the peer address at the same index. 0 when all succeeded,
    /// else -1 (logged).
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint = ""))]
    fn batch_transfer_sync_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        transport_hint: &str,
    ) -> i64 {
        let _ = transport_hint;
        let call = "batch_transfer_sync_write";
        match items(call, buffers, peer_buffer_addresses, lengths) {
            Some(items) => self.sync(py, call, target_hostname, OpCode::Write, items, None),
            None => ERR_INVALID_ARGUMENT,
        }
    }

    /// Reads each peer address into the local buffer at the same index. 0 when all
    /// succeeded, else -1 (logged).
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint = ""))]
    fn batch_transfer_sync_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        transport_hint: &str,
    ) -> i64 {
        let _ = transport_hint;
        let call = "batch_transfer_sync_read";
        match items(call, buffers, peer_buffer_addresses, lengths) {
            Some(items) => self.sync(py, call, target_hostname, OpCode::Read, items, None),
            None => ERR_INVALID_ARGUMENT,
        }
    }

    /// A batch in the direction of `opcode`. A `notify` is not supported (-1, logged).
    #[pyo3(signature = (
        target_hostname, buffers, peer_buffer_addresses, lengths, opcode, notify = None,
        transport_hint = ""
    ))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_sync(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        opcode: &Bound<'_, PyAny>,
        notify: Option<PyRef<'_, PyTransferNotify>>,
        transport_hint: &str,
    ) -> PyResult<i64> {
        let _ = transport_hint;
        let op = opcode_arg(opcode)?;
        let call = "batch_transfer_sync";
        Ok(match items(call, buffers, peer_buffer_addresses, lengths) {
            Some(items) => self.sync(py, call, target_hostname, op, items, notify.as_deref()),
            None => ERR_INVALID_ARGUMENT,
        })
    }

    /// Submits a batch of writes and returns its id at once (0 when nothing was submitted);
    /// `get_batch_transfer_status` waits for it.
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint = ""))]
    fn batch_transfer_async_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        transport_hint: &str,
    ) -> u64 {
        let _ = transport_hint;
        let call = "batch_transfer_async_write";
        match items(call, buffers, peer_buffer_addresses, lengths) {
            Some(items) => self.submit(py, call, target_hostname, OpCode::Write, items),
            None => 0,
        }
    }

    /// Submits a batch of reads and returns its id at once (0 when nothing was submitted).
    #[pyo3(signature = (target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint = ""))]
    fn batch_transfer_async_read(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        transport_hint: &str,
    ) -> u64 {
        let _ = transport_hint;
        let call = "batch_transfer_async_read";
        match items(call, buffers, peer_buffer_addresses, lengths) {
            Some(items) => self.submit(py, call, target_hostname, OpCode::Read, items),
            None => 0,
        }
    }

    /// Submits a batch in the direction of `opcode`; its id, or 0.
    #[pyo3(signature = (
        target_hostname, buffers, peer_buffer_addresses, lengths, opcode, transport_hint = ""
    ))]
    #[allow(clippy::too_many_arguments)]
    fn batch_transfer_async(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffers: Vec<u64>,
        peer_buffer_addresses: Vec<u64>,
        lengths: Vec<u64>,
        opcode: &Bound<'_, PyAny>,
        transport_hint: &str,
    ) -> PyResult<u64> {
        let _ = transport_hint;
        let op = opcode_arg(opcode)?;
        let call = "batch_transfer_async";
        Ok(match items(call, buffers, peer_buffer_addresses, lengths) {
            Some(items) => self.submit(py, call, target_hostname, op, items),
            None => 0,
        })
    }

    /// Waits (GIL released) for the batches `batch_ids` and collects them: 0 when every
    /// request of every batch completed, -1 (logged) at the first failure, timeout or unknown
    /// id. Every listed id is collected either way.
    fn get_batch_transfer_status(&self, py: Python<'_>, batch_ids: Vec<u64>) -> i64 {
        let taken: Vec<(u64, Option<Pending>)> = {
            let mut batches = lock(&self.batches);
            batch_ids.iter().map(|&id| (id, batches.take(id))).collect()
        };
        let mut pending = Vec::with_capacity(taken.len());
        for (id, p) in taken {
            match p {
                Some(p) => pending.push((id, p)),
                None => {
                    tracing::error!("get_batch_transfer_status: unknown batch id {id}");
                    return ERR_INVALID_ARGUMENT;
                }
            }
        }
        let waited = block_on(py, async {
            for (id, p) in &pending {
                let deadline = tokio::time::Instant::from_std(p.deadline());
                if tokio::time::timeout_at(deadline, p.batch.wait())
                    .await
                    .is_err()
                {
                    return Err(*id);
                }
                if !p.batch.is_done()
                    || (0..p.len).any(|i| !matches!(p.batch.status(i), TransferStatus::Completed))
                {
                    return Err(*id);
                }
            }
            Ok(())
        });
        match waited {
            Ok(Ok(())) => 0,
            Ok(Err(id)) => {
                let engine = self.engine_quiet();
                let (_, p) = pending
                    .iter()
                    .find(|(i, _)| *i == id)
                    .expect("the failed batch is listed");
                if failure(engine.as_ref(), id, p).is_none() {
                    tracing::error!(
                        "batch {id} to {}: not finished after {:?}",
                        p.target,
                        p.started.elapsed()
                    );
                }
                ERR_INVALID_ARGUMENT
            }
            Err(e) => {
                tracing::error!("get_batch_transfer_status: {e}");
                ERR_INVALID_ARGUMENT
            }
        }
    }

    /// Submits one write and returns its batch id at once (0 when nothing was submitted);
    /// `transfer_check_status` polls it.
    #[pyo3(signature = (target_hostname, buffer, peer_buffer_address, length, transport_hint = ""))]
    fn transfer_submit_write(
        &self,
        py: Python<'_>,
        target_hostname: &str,
        buffer: u64,
        peer_buffer_address: u64,
        length: u64,
        transport_hint: &str,
    ) -> u64 {
        let _ = transport_hint;
        let item = Item {
            local: buffer,
            remote: peer_buffer_address,
            len: length,
        };
        let call = "transfer_submit_write";
        self.submit(py, call, target_hostname, OpCode::Write, vec![item])
    }

    /// Polls a batch without waiting: 0 while it runs, 1 once it completed, -1 when it failed
    /// (logged) or the id is unknown, -2 when it timed out. A finished batch is collected.
    fn transfer_check_status(&self, batch_id: u64) -> i64 {
        let mut batches = lock(&self.batches);
        let Some(p) = batches.get(batch_id) else {
            tracing::error!("transfer_check_status: unknown batch id {batch_id}");
            return ERR_INVALID_ARGUMENT;
        };
        if !p.batch.is_done() {
            return 0;
        }
        let p = batches.take(batch_id).expect("the batch is listed");
        drop(batches);
        match failure(self.engine_quiet().as_ref(), batch_id, &p) {
            None => 1,
            Some(true) => -2,
            Some(false) => ERR_INVALID_ARGUMENT,
        }
    }
}
