//! The dummy client: forwards the store API to a real client and shares a memory pool with it.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use mooncake_core::{Error, ErrorCode, Result};
use mooncake_master::{
    MasterMetrics, ReplicaDescriptor, ReplicateConfig, TaskId, TaskInfo, WriteKind,
};

use super::server::{REGISTER_LEN, REGISTER_MAGIC, REGISTER_REPLY_LEN};
use super::shm::{create_memfd, send_with_fds, Mapping, RangeAlloc};
use super::wire::{from_wire, Blob, PoolItem, Reply, Request, MAX_INLINE, PROTOCOL_VERSION};
use mooncake_rpc::rpc::{RpcClient, RpcClientConfig};

/// Alignment of `alloc_from_mem_pool` buffers.
const POOL_ALIGN: u64 = 4096;
/// Alignment of staging chunks.
const STAGING_ALIGN: u64 = 64;

/// A client of a real client (`mooncake_client`) on this host. Its methods mirror
/// [`Store`](crate::store::Store)'s, and both implement [`StoreApi`](crate::store::StoreApi);
/// zero-copy calls take addresses inside the shared pool
/// ([`alloc_from_mem_pool`](Self::alloc_from_mem_pool)).
pub struct DummyClient {
    rpc: RpcClient,
    hostname: String,
    /// The session the pool is registered under at the real client; renewed when the real
    /// client restarted.
    session: AtomicU64,
    /// The pool's memfd, kept to register it again with a restarted real client.
    pool_fd: OwnedFd,
    /// Serializes re-registration.
    reregister: tokio::sync::Mutex<()>,
    map: Mapping,
    pool_len: u64,
    pool: RangeAlloc,
    pool_allocs: Mutex<HashMap<u64, u64>>,
    staging: RangeAlloc,
    ipc: Mutex<Option<UnixStream>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for DummyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DummyClient")
            .field("real_client", &self.rpc.address())
            .field(
                "session",
                &format_args!("{:#x}", self.session.load(Ordering::Relaxed)),
            )
            .field(
                "pool",
                &format_args!("{:#x}+{}", self.map.addr(), self.pool_len),
            )
            .finish()
    }
}

/// A staging chunk, freed on drop.
struct Chunk<'a> {
    client: &'a DummyClient,
    offset: u64,
    size: u64,
}

impl Chunk<'_> {
    fn addr(&self) -> u64 {
        self.client.map.addr() + self.client.pool_len + self.offset
    }

    /// Keeps the chunk allocated for good: the real client may still be using it (a call whose
    /// answer never came).
    fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for Chunk<'_> {
    fn drop(&mut self) {
        self.client
            .staging
            .free(self.offset, self.size, STAGING_ALIGN);
    }
}

fn unexpected(reply: Reply) -> Error {
    Error::Protocol(format!("real client answered {reply:?}"))
}

impl DummyClient {
    /// Connects to the real client at `server_address` (`host:port`), creates a shared pool of
    /// `mem_pool_size` bytes for zero-copy buffers plus `local_buffer_size` bytes that stage
    /// byte-oriented calls, and registers it with the real client.
    pub async fn connect(
        server_address: &str,
        mem_pool_size: u64,
        local_buffer_size: u64,
    ) -> Result<DummyClient> {
        let total = mem_pool_size
            .checked_add(local_buffer_size)
            .ok_or_else(|| Error::with_code(ErrorCode::INVALID_PARAMS, "pool sizes overflow"))?;
        // A real client of a node with a certificate requires one: present this node's.
        let tls = mooncake_tls::TlsIdentity::from_env_opt()?
            .as_ref()
            .map(mooncake_rpc::tls_connector)
            .transpose()?;
        let rpc = RpcClient::with_tls(
            server_address,
            RpcClientConfig {
                call_timeout: Duration::from_secs(60),
                connect_timeout: Duration::from_secs(3),
            },
            tls,
        );
        let fd = create_memfd("mooncake-dummy-pool", total)?;
        let map = Mapping::map(&fd, total)?;
        let (ipc, session, hostname) = register(&rpc, &fd, total, map.addr()).await?;
        Ok(DummyClient {
            rpc,
            hostname,
            session: AtomicU64::new(session),
            pool_fd: fd,
            reregister: tokio::sync::Mutex::new(()),
            map,
            pool_len: mem_pool_size,
            pool: RangeAlloc::new(mem_pool_size),
            pool_allocs: Mutex::new(HashMap::new()),
            staging: RangeAlloc::new(local_buffer_size),
            ipc: Mutex::new(Some(ipc)),
            closed: AtomicBool::new(false),
        })
    }

    async fn call(&self, mut request: Request) -> Result<Reply> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::with_code(
                ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS,
                "the dummy client is closed",
            ));
        }
        if let Some(session) = request.session_mut() {
            *session = self.live_session().await?;
        }
        match self.rpc.call::<_, Reply>(&request).await? {
            Reply::Failed(e) => Err(e.into()),
            r => Ok(r),
        }
    }

    /// The pool's session, registering the pool again first if the real client closed the
    /// session's socket (it restarted, or dropped the session).
    async fn live_session(&self) -> Result<u64> {
        if self.ipc_alive() {
            return Ok(self.session.load(Ordering::Acquire));
        }
        let _one = self.reregister.lock().await;
        if self.ipc_alive() {
            return Ok(self.session.load(Ordering::Acquire));
        }
        // A restarted real client also closed the RPC connection; its reader may not have seen
        // that yet, and a call sent on it now would be lost. Connect afresh.
        self.rpc.disconnect().await;
        let (ipc, session, _) =
            register(&self.rpc, &self.pool_fd, self.map.len(), self.map.addr()).await?;
        tracing::info!(
            real_client = self.rpc.address(),
            "registered the shared pool again (session {session:#x})"
        );
        *self.ipc.lock().expect("ipc") = Some(ipc);
        self.session.store(session, Ordering::Release);
        Ok(session)
    }

    /// Whether the pool's socket to the real client is still open. The real client never writes
    /// on it after registering, so readable means closed.
    fn ipc_alive(&self) -> bool {
        let ipc = self.ipc.lock().expect("ipc");
        let Some(sock) = ipc.as_ref() else {
            return false;
        };
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n == 0
    }

    /// The real client's segment name (`host:port`).
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The real client's address.
    pub fn server_address(&self) -> &str {
        self.rpc.address()
    }

    /// Start address and length of the zero-copy pool in this process.
    pub fn pool_range(&self) -> (u64, u64) {
        (self.map.addr(), self.pool_len)
    }

    /// Whether `[addr, addr + len)` lies inside the zero-copy pool.
    pub fn pool_contains(&self, addr: u64, len: u64) -> bool {
        addr.checked_sub(self.map.addr())
            .and_then(|off| off.checked_add(len))
            .is_some_and(|end| end <= self.pool_len)
    }

    /// Allocates `size` bytes (page-aligned) of the shared pool; the address in this process.
    pub fn alloc_from_mem_pool(&self, size: u64) -> Result<u64> {
        if size == 0 {
            return Err(Error::with_code(ErrorCode::INVALID_PARAMS, "size 0"));
        }
        let off = self.pool.alloc(size, POOL_ALIGN).ok_or_else(|| {
            Error::with_code(
                ErrorCode::NO_AVAILABLE_HANDLE,
                format!(
                    "the shared pool ({} bytes) has no free {size} bytes",
                    self.pool_len
                ),
            )
        })?;
        let addr = self.map.addr() + off;
        self.pool_allocs
            .lock()
            .expect("pool allocations")
            .insert(addr, size);
        Ok(addr)
    }

    /// Returns a buffer from [`alloc_from_mem_pool`](Self::alloc_from_mem_pool) to the pool.
    pub fn free_from_mem_pool(&self, addr: u64) -> Result<()> {
        let size = self
            .pool_allocs
            .lock()
            .expect("pool allocations")
            .remove(&addr)
            .ok_or(Error::NotRegistered(addr))?;
        self.pool.free(addr - self.map.addr(), size, POOL_ALIGN);
        Ok(())
    }

    fn staging_chunk(&self, size: u64) -> Option<Chunk<'_>> {
        let offset = self.staging.alloc(size, STAGING_ALIGN)?;
        Some(Chunk {
            client: self,
            offset,
            size,
        })
    }

    /// Ends the session (the real client releases the pool) and disconnects. Later calls fail
    /// with `UNAVAILABLE_IN_CURRENT_STATUS`. This process's mapping stays until the client drops.
    pub async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.ipc.lock().expect("ipc").take();
        self.rpc.disconnect().await;
        Ok(())
    }

    // --- writes --------------------------------------------------------------------------------

    /// Stores the concatenation of `parts` under `key`: a put leaves a key that exists as it is
    /// (success), an upsert replaces its value.
    pub async fn write_parts(
        &self,
        kind: WriteKind,
        key: &str,
        parts: &[&[u8]],
        config: &ReplicateConfig,
    ) -> Result<()> {
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        if total > 0 {
            if let Some(chunk) = self.staging_chunk(total) {
                let mut at = chunk.addr();
                for p in parts {
                    // SAFETY: the chunk is `total` bytes of our mapping, reserved for this call.
                    unsafe {
                        std::ptr::copy_nonoverlapping(p.as_ptr(), at as *mut u8, p.len());
                    }
                    at += p.len() as u64;
                }
                let r = self
                    .call(Request::PutFrom {
                        session: self.session.load(Ordering::Acquire),
                        kind,
                        items: vec![(key.to_owned(), vec![(chunk.addr(), total)])],
                        config: config.clone(),
                    })
                    .await;
                return self.finish_units(r, chunk, 1).pop().expect("one");
            }
        }
        if total as usize > MAX_INLINE {
            return Err(Error::with_code(
                ErrorCode::INVALID_PARAMS,
                format!(
                    "a {total}-byte value does not fit the staging buffer and is too large to \
                     send inline; use alloc_from_mem_pool and put_from"
                ),
            ));
        }
        let r = self
            .call(Request::PutInline {
                kind,
                key: key.to_owned(),
                parts: parts.iter().map(|p| Blob(p.to_vec())).collect(),
                config: config.clone(),
            })
            .await?;
        match r {
            Reply::Unit(u) => from_wire(u),
            other => Err(unexpected(other)),
        }
    }

    /// Unit results of a call that used `chunk`; the chunk is leaked when the call's fate is
    /// unknown (timeout).
    fn finish_units(&self, r: Result<Reply>, chunk: Chunk<'_>, n: usize) -> Vec<Result<()>> {
        match r {
            Ok(Reply::Units(v)) if v.len() == n => v.into_iter().map(from_wire).collect(),
            Ok(other) => vec![Err(unexpected(other)); n],
            Err(e) => {
                if e.code() == ErrorCode::RPC_TIMEOUT {
                    chunk.leak();
                }
                vec![Err(e); n]
            }
        }
    }

    /// Stores `value` under `key`. A key that exists already is left as it is (success).
    pub async fn put(&self, key: &str, value: &[u8], config: &ReplicateConfig) -> Result<()> {
        self.write_parts(WriteKind::Put, key, &[value], config)
            .await
    }

    /// Stores the concatenation of `parts` under `key`.
    pub async fn put_parts(
        &self,
        key: &str,
        parts: &[&[u8]],
        config: &ReplicateConfig,
    ) -> Result<()> {
        self.write_parts(WriteKind::Put, key, parts, config).await
    }

    /// Stores `value` under `key`, replacing any current value.
    pub async fn upsert(&self, key: &str, value: &[u8], config: &ReplicateConfig) -> Result<()> {
        self.write_parts(WriteKind::Upsert, key, &[value], config)
            .await
    }

    /// Stores the concatenation of `parts` under `key`, replacing any current value.
    pub async fn upsert_parts(
        &self,
        key: &str,
        parts: &[&[u8]],
        config: &ReplicateConfig,
    ) -> Result<()> {
        self.write_parts(WriteKind::Upsert, key, parts, config)
            .await
    }

    /// Puts or upserts each `(key, value)`; one result per item.
    pub async fn write_batch(
        &self,
        kind: WriteKind,
        items: &[(&str, &[u8])],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        let mut out: Vec<Option<Result<()>>> = (0..items.len()).map(|_| None).collect();
        let mut chunks = Vec::new();
        let mut staged = Vec::new();
        let mut inline = Vec::new();
        for (i, (key, value)) in items.iter().enumerate() {
            match (!value.is_empty())
                .then(|| self.staging_chunk(value.len() as u64))
                .flatten()
            {
                Some(chunk) => {
                    // SAFETY: the chunk is `value.len()` bytes of our mapping, reserved here.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            value.as_ptr(),
                            chunk.addr() as *mut u8,
                            value.len(),
                        );
                    }
                    staged.push((
                        i,
                        ((*key).to_owned(), vec![(chunk.addr(), value.len() as u64)]),
                    ));
                    chunks.push(chunk);
                }
                None => inline.push(i),
            }
        }
        if !staged.is_empty() {
            let (idx, items): (Vec<usize>, Vec<PoolItem>) = staged.into_iter().unzip();
            let r = self
                .call(Request::PutFrom {
                    session: self.session.load(Ordering::Acquire),
                    kind,
                    items,
                    config: config.clone(),
                })
                .await;
            let timed_out = matches!(&r, Err(e) if e.code() == ErrorCode::RPC_TIMEOUT);
            let results = match r {
                Ok(Reply::Units(v)) if v.len() == idx.len() => {
                    v.into_iter().map(from_wire).collect()
                }
                Ok(other) => vec![Err(unexpected(other)); idx.len()],
                Err(e) => vec![Err(e); idx.len()],
            };
            for (i, r) in idx.into_iter().zip(results) {
                out[i] = Some(r);
            }
            if timed_out {
                chunks.into_iter().for_each(Chunk::leak);
            } else {
                drop(chunks);
            }
        }
        // Values that did not fit the staging buffer go inline, in messages under the frame limit.
        let mut batch: Vec<(usize, (String, Blob))> = Vec::new();
        let mut bytes = 0usize;
        let mut pending = inline.into_iter().peekable();
        while let Some(i) = pending.next() {
            let (key, value) = items[i];
            if value.len() > MAX_INLINE {
                out[i] = Some(Err(Error::with_code(
                    ErrorCode::INVALID_PARAMS,
                    format!("a {}-byte value is too large to send inline", value.len()),
                )));
            } else {
                bytes += value.len() + key.len();
                batch.push((i, (key.to_owned(), Blob(value.to_vec()))));
            }
            let full = pending
                .peek()
                .is_none_or(|&j| bytes + items[j].1.len() + items[j].0.len() > MAX_INLINE);
            if full && !batch.is_empty() {
                let (idx, items): (Vec<usize>, Vec<(String, Blob)>) =
                    std::mem::take(&mut batch).into_iter().unzip();
                bytes = 0;
                let results = match self
                    .call(Request::PutBatchInline {
                        kind,
                        items,
                        config: config.clone(),
                    })
                    .await
                {
                    Ok(Reply::Units(v)) if v.len() == idx.len() => {
                        v.into_iter().map(from_wire).collect()
                    }
                    Ok(other) => vec![Err(unexpected(other)); idx.len()],
                    Err(e) => vec![Err(e); idx.len()],
                };
                for (i, r) in idx.into_iter().zip(results) {
                    out[i] = Some(r);
                }
            }
        }
        out.into_iter()
            .map(|r| r.expect("every item answered"))
            .collect()
    }

    /// Stores each `(key, value)`; one result per item.
    pub async fn put_batch(
        &self,
        items: &[(&str, &[u8])],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        self.write_batch(WriteKind::Put, items, config).await
    }

    /// Upserts each `(key, value)`; one result per item.
    pub async fn upsert_batch(
        &self,
        items: &[(&str, &[u8])],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        self.write_batch(WriteKind::Upsert, items, config).await
    }

    /// Splits user items into those wholly inside the pool (index, item) and refusals.
    fn checked<T>(
        &self,
        items: Vec<PoolItem>,
    ) -> (Vec<Option<Result<T>>>, Vec<usize>, Vec<PoolItem>) {
        let mut out = Vec::with_capacity(items.len());
        let mut idx = Vec::new();
        let mut ok = Vec::new();
        for (i, (key, parts)) in items.into_iter().enumerate() {
            match parts
                .iter()
                .find(|&&(a, n)| n == 0 || !self.pool_contains(a, n))
            {
                Some(&(a, n)) => out.push(Some(Err(Error::with_code(
                    ErrorCode::INVALID_PARAMS,
                    format!(
                        "range {a:#x}+{n} is not inside the shared memory pool; use \
                         alloc_from_mem_pool buffers"
                    ),
                )))),
                None if parts.is_empty() => out.push(Some(Err(Error::with_code(
                    ErrorCode::INVALID_PARAMS,
                    "no buffers",
                )))),
                None => {
                    out.push(None);
                    idx.push(i);
                    ok.push((key, parts));
                }
            }
        }
        (out, idx, ok)
    }

    async fn write_from(
        &self,
        kind: WriteKind,
        items: Vec<PoolItem>,
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        let (mut out, idx, items) = self.checked(items);
        if !items.is_empty() {
            let n = items.len();
            let results = match self
                .call(Request::PutFrom {
                    session: self.session.load(Ordering::Acquire),
                    kind,
                    items,
                    config: config.clone(),
                })
                .await
            {
                Ok(Reply::Units(v)) if v.len() == n => v.into_iter().map(from_wire).collect(),
                Ok(other) => vec![Err(unexpected(other)); n],
                Err(e) => vec![Err(e); n],
            };
            for (i, r) in idx.into_iter().zip(results) {
                out[i] = Some(r);
            }
        }
        out.into_iter()
            .map(|r| r.expect("every item answered"))
            .collect()
    }

    /// Stores `size` bytes of the shared pool at `addr` under `key`, with no copy.
    pub async fn put_from(
        &self,
        key: &str,
        addr: u64,
        size: u64,
        config: &ReplicateConfig,
    ) -> Result<()> {
        self.write_from(
            WriteKind::Put,
            vec![(key.to_owned(), vec![(addr, size)])],
            config,
        )
        .await
        .pop()
        .expect("one")
    }

    /// [`put_from`](Self::put_from), replacing any current value.
    pub async fn upsert_from(
        &self,
        key: &str,
        addr: u64,
        size: u64,
        config: &ReplicateConfig,
    ) -> Result<()> {
        self.write_from(
            WriteKind::Upsert,
            vec![(key.to_owned(), vec![(addr, size)])],
            config,
        )
        .await
        .pop()
        .expect("one")
    }

    /// Zero-copy batch put or upsert: `(key, address, size)` inside the shared pool each.
    pub async fn batch_write_from(
        &self,
        kind: WriteKind,
        items: &[(&str, u64, u64)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        self.write_from(kind, single_buffer_items(items), config)
            .await
    }

    /// Zero-copy batch put: `(key, address, size)` inside the shared pool each.
    pub async fn batch_put_from(
        &self,
        items: &[(&str, u64, u64)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        let items = single_buffer_items(items);
        self.write_from(WriteKind::Put, items, config).await
    }

    /// Zero-copy batch upsert: `(key, address, size)` inside the shared pool each.
    pub async fn batch_upsert_from(
        &self,
        items: &[(&str, u64, u64)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        let items = single_buffer_items(items);
        self.write_from(WriteKind::Upsert, items, config).await
    }

    /// Zero-copy batch put where each value is the concatenation of several pool buffers.
    pub async fn batch_put_from_multi_buffers(
        &self,
        items: &[(&str, Vec<(u64, u64)>)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        let items = items
            .iter()
            .map(|(k, p)| ((*k).to_owned(), p.clone()))
            .collect();
        self.write_from(WriteKind::Put, items, config).await
    }

    // --- reads ---------------------------------------------------------------------------------

    async fn sizes(&self, keys: &[&str]) -> Result<Vec<Result<u64>>> {
        match self
            .call(Request::GetSizes {
                keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            })
            .await?
        {
            Reply::Counts(v) if v.len() == keys.len() => Ok(v.into_iter().map(from_wire).collect()),
            other => Err(unexpected(other)),
        }
    }

    async fn get_inline(&self, key: &str) -> Result<Vec<u8>> {
        match self
            .call(Request::GetInline {
                key: key.to_owned(),
            })
            .await?
        {
            Reply::Bytes(b) => from_wire(b).map(|b| b.0),
            other => Err(unexpected(other)),
        }
    }

    /// Reads into the pool; `checked`: against the values' checksums whatever the real
    /// client's configuration says (for bytes returned as a value).
    async fn read_to_pool(&self, items: Vec<PoolItem>, checked: bool) -> Vec<Result<u64>> {
        let n = items.len();
        if n == 0 {
            return Vec::new();
        }
        let session = self.session.load(Ordering::Acquire);
        let request = match checked {
            true => Request::GetIntoChecked { session, items },
            false => Request::GetInto { session, items },
        };
        match self.call(request).await {
            Ok(Reply::Counts(v)) if v.len() == n => v.into_iter().map(from_wire).collect(),
            Ok(other) => vec![Err(unexpected(other)); n],
            Err(e) => vec![Err(e); n],
        }
    }

    /// [`read_to_pool`](Self::read_to_pool) for user buffers, which must lie inside the pool.
    async fn user_read_to_pool(&self, items: Vec<PoolItem>) -> Vec<Result<u64>> {
        let (mut out, idx, items) = self.checked(items);
        for (i, r) in idx.into_iter().zip(self.read_to_pool(items, false).await) {
            out[i] = Some(r);
        }
        out.into_iter()
            .map(|r| r.expect("every item answered"))
            .collect()
    }

    /// The value of `key`.
    pub async fn get(&self, key: &str) -> Result<Vec<u8>> {
        self.get_batch(&[key]).await.pop().expect("one")
    }

    /// The values of `keys`; one result per key. Values are read into the shared staging area
    /// (one call for their sizes, one for the bytes); those that do not fit come inline.
    pub async fn get_batch(&self, keys: &[&str]) -> Vec<Result<Vec<u8>>> {
        let sizes = match self.sizes(keys).await {
            Ok(s) => s,
            Err(e) => return vec![Err(e); keys.len()],
        };
        let mut out: Vec<Option<Result<Vec<u8>>>> = (0..keys.len()).map(|_| None).collect();
        let mut staged: Vec<(usize, Chunk<'_>)> = Vec::new();
        let mut inline = Vec::new();
        for (i, size) in sizes.into_iter().enumerate() {
            match size {
                Err(e) => out[i] = Some(Err(e)),
                Ok(0) => inline.push(i),
                Ok(n) => match self.staging_chunk(n) {
                    Some(c) => staged.push((i, c)),
                    None => inline.push(i),
                },
            }
        }
        let items: Vec<PoolItem> = staged
            .iter()
            .map(|(i, c)| (keys[*i].to_owned(), vec![(c.addr(), c.size)]))
            .collect();
        let results = self.read_to_pool(items, true).await;
        let mut leak = false;
        for ((i, chunk), r) in staged.into_iter().zip(results) {
            match r {
                Ok(n) => {
                    let n = n.min(chunk.size) as usize;
                    let mut v = vec![0u8; n];
                    // SAFETY: the chunk holds `chunk.size >= n` bytes of our mapping that the
                    // real client finished writing before it answered.
                    unsafe {
                        std::ptr::copy_nonoverlapping(chunk.addr() as *const u8, v.as_mut_ptr(), n);
                    }
                    out[i] = Some(Ok(v));
                }
                // The object grew since its size was read: read it inline instead.
                Err(e) if e.code() == ErrorCode::INVALID_PARAMS => inline.push(i),
                Err(e) => {
                    leak |= e.code() == ErrorCode::RPC_TIMEOUT;
                    out[i] = Some(Err(e));
                }
            }
            if leak {
                chunk.leak();
            }
        }
        for i in inline {
            out[i] = Some(self.get_inline(keys[i]).await);
        }
        out.into_iter()
            .map(|r| r.expect("every key answered"))
            .collect()
    }

    /// Reads `key` into `size` bytes of the shared pool at `addr`; returns the object's size.
    pub async fn get_into(&self, key: &str, addr: u64, size: u64) -> Result<u64> {
        self.user_read_to_pool(vec![(key.to_owned(), vec![(addr, size)])])
            .await
            .pop()
            .expect("one")
    }

    /// Zero-copy batch read: `(key, address, size)` inside the shared pool each.
    pub async fn batch_get_into(&self, items: &[(&str, u64, u64)]) -> Vec<Result<u64>> {
        self.user_read_to_pool(
            items
                .iter()
                .map(|(k, a, s)| ((*k).to_owned(), vec![(*a, *s)]))
                .collect(),
        )
        .await
    }

    /// Zero-copy batch read where each object fills several pool buffers in order.
    pub async fn batch_get_into_multi_buffers(
        &self,
        items: &[(&str, Vec<(u64, u64)>)],
    ) -> Vec<Result<u64>> {
        self.user_read_to_pool(
            items
                .iter()
                .map(|(k, p)| ((*k).to_owned(), p.clone()))
                .collect(),
        )
        .await
    }

    /// The size of `key`'s value.
    pub async fn get_size(&self, key: &str) -> Result<u64> {
        self.sizes(&[key]).await?.pop().expect("one")
    }

    // --- admin ---------------------------------------------------------------------------------

    /// Whether `key` has a readable value.
    pub async fn is_exist(&self, key: &str) -> Result<bool> {
        match self
            .call(Request::IsExist {
                key: key.to_owned(),
            })
            .await?
        {
            Reply::Bool(b) => from_wire(b),
            other => Err(unexpected(other)),
        }
    }

    /// [`is_exist`](Self::is_exist) for several keys.
    pub async fn batch_is_exist(&self, keys: &[&str]) -> Result<Vec<bool>> {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        match self.call(Request::BatchIsExist { keys }).await? {
            Reply::Bools(b) => from_wire(b),
            other => Err(unexpected(other)),
        }
    }

    /// Removes `key` (`OBJECT_HAS_LEASE` while leased, unless `force`).
    pub async fn remove(&self, key: &str, force: bool) -> Result<()> {
        match self
            .call(Request::Remove {
                key: key.to_owned(),
                force,
            })
            .await?
        {
            Reply::Unit(u) => from_wire(u),
            other => Err(unexpected(other)),
        }
    }

    /// Removes each key; one result per key.
    pub async fn batch_remove(&self, keys: &[&str], force: bool) -> Result<Vec<Result<()>>> {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        match self.call(Request::BatchRemove { keys, force }).await? {
            Reply::UnitsOr(r) => from_wire(r).map(|v| v.into_iter().map(from_wire).collect()),
            other => Err(unexpected(other)),
        }
    }

    /// Removes the keys matching `pattern`; how many.
    pub async fn remove_by_regex(&self, pattern: &str, force: bool) -> Result<u64> {
        match self
            .call(Request::RemoveByRegex {
                pattern: pattern.to_owned(),
                force,
            })
            .await?
        {
            Reply::Count(c) => from_wire(c),
            other => Err(unexpected(other)),
        }
    }

    /// Removes every object; how many.
    pub async fn remove_all(&self, force: bool) -> Result<u64> {
        match self.call(Request::RemoveAll { force }).await? {
            Reply::Count(c) => from_wire(c),
            other => Err(unexpected(other)),
        }
    }

    /// Descriptors of `key`'s replicas.
    pub async fn get_replica_desc(&self, key: &str) -> Result<Vec<ReplicaDescriptor>> {
        match self
            .call(Request::GetReplicaDesc {
                key: key.to_owned(),
            })
            .await?
        {
            Reply::Replicas(r) => from_wire(r),
            other => Err(unexpected(other)),
        }
    }

    /// Descriptors for several keys; keys without a readable value are left out.
    pub async fn batch_get_replica_desc(
        &self,
        keys: &[&str],
    ) -> Result<HashMap<String, Vec<ReplicaDescriptor>>> {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        match self.call(Request::BatchGetReplicaDesc { keys }).await? {
            Reply::ReplicaMap(r) => from_wire(r).map(|v| v.into_iter().collect()),
            other => Err(unexpected(other)),
        }
    }

    /// Queues a copy of `key` to `targets`.
    pub async fn create_copy_task(&self, key: &str, targets: &[String]) -> Result<TaskId> {
        match self
            .call(Request::CreateCopyTask {
                key: key.to_owned(),
                targets: targets.to_vec(),
            })
            .await?
        {
            Reply::Task(t) => from_wire(t),
            other => Err(unexpected(other)),
        }
    }

    /// Queues a move of `key`'s replica from `source` to `target`.
    pub async fn create_move_task(&self, key: &str, source: &str, target: &str) -> Result<TaskId> {
        match self
            .call(Request::CreateMoveTask {
                key: key.to_owned(),
                source: source.to_owned(),
                target: target.to_owned(),
            })
            .await?
        {
            Reply::Task(t) => from_wire(t),
            other => Err(unexpected(other)),
        }
    }

    /// A task's status.
    pub async fn query_task(&self, id: TaskId) -> Result<TaskInfo> {
        match self.call(Request::QueryTask { id }).await? {
            Reply::TaskInfo(t) => from_wire(t),
            other => Err(unexpected(other)),
        }
    }

    /// The master's metrics.
    pub async fn master_metrics(&self) -> Result<MasterMetrics> {
        match self.call(Request::MasterMetrics).await? {
            Reply::Metrics(m) => from_wire(m).map(|b| *b),
            other => Err(unexpected(other)),
        }
    }
}

/// `(key, address, size)` items as single-buffer items.
fn single_buffer_items(items: &[(&str, u64, u64)]) -> Vec<(String, Vec<(u64, u64)>)> {
    items
        .iter()
        .map(|&(k, a, s)| (k.to_owned(), vec![(a, s)]))
        .collect()
}

/// Says hello to the real client and registers the pool `fd` (`total` bytes mapped at `base`
/// here) on its Unix socket; returns the socket (the session lives while it is open), the session
/// id and the real client's segment name.
async fn register(
    rpc: &RpcClient,
    fd: &OwnedFd,
    total: u64,
    base: u64,
) -> Result<(UnixStream, u64, String)> {
    let (ipc_name, hostname) = match rpc
        .call::<_, Reply>(&Request::Hello {
            version: PROTOCOL_VERSION,
        })
        .await?
    {
        Reply::Hello {
            version,
            ipc_name,
            hostname,
        } if version == PROTOCOL_VERSION => (ipc_name, hostname),
        Reply::Failed(e) => return Err(e.into()),
        other => return Err(unexpected(other)),
    };
    let fd = fd.try_clone()?;
    let (ipc, session) = tokio::task::spawn_blocking(move || -> Result<(UnixStream, u64)> {
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(ipc_name.as_bytes())?;
        let sock = UnixStream::connect_addr(&addr).map_err(|e| {
            Error::with_code(
                ErrorCode::RPC_FAIL,
                format!(
                    "connecting to the real client's socket {ipc_name} (is it on this host?): {e}"
                ),
            )
        })?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut msg = Vec::with_capacity(REGISTER_LEN);
        msg.extend_from_slice(REGISTER_MAGIC);
        msg.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        msg.extend_from_slice(&total.to_le_bytes());
        msg.extend_from_slice(&base.to_le_bytes());
        send_with_fds(&sock, &msg, &[fd.as_raw_fd()])?;
        let mut reply = [0u8; REGISTER_REPLY_LEN];
        (&sock).read_exact(&mut reply)?;
        let code = i32::from_le_bytes(reply[..4].try_into().expect("4 bytes"));
        if code != 0 {
            return Err(Error::with_code(
                ErrorCode::from_i32(code).unwrap_or(ErrorCode::INTERNAL_ERROR),
                "the real client refused the shared pool",
            ));
        }
        sock.set_read_timeout(None)?;
        let session = u64::from_le_bytes(reply[4..].try_into().expect("8 bytes"));
        Ok((sock, session))
    })
    .await
    .map_err(|e| Error::Io(format!("registering the pool: {e}")))??;
    Ok((ipc, session, hostname))
}
