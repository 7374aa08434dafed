//! The real client: a [`Store`] served to dummy clients over RPC, with one shared-memory session
//! per connected dummy.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mooncake_core::{AlignedBuffer, Error, ErrorCode, Location, ProvidedMemory, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::shm::{check_memfd, try_recv_with_fds, Mapping};
use super::wire::{
    to_wire, Blob, PoolItem, Reply, Request, WireError, MAX_INLINE, PROTOCOL_VERSION,
};
use crate::store::{Store, StoreConfig, WriteKind};
use mooncake_rpc::rpc::{Caller, Handler, RefusalLog};
use mooncake_tls::{Role, TlsIdentity};

/// Magic of a pool registration on the Unix socket.
pub(crate) const REGISTER_MAGIC: &[u8; 4] = b"MCDM";
/// Length of a registration: magic, version u32, pool length u64, dummy base address u64.
pub(crate) const REGISTER_LEN: usize = 4 + 4 + 8 + 8;
/// Length of the answer: code i32, session u64.
pub(crate) const REGISTER_REPLY_LEN: usize = 4 + 8;

/// Settings of a real client.
#[derive(Clone, Debug)]
pub struct RealClientConfig {
    /// The store client the real client runs.
    pub store: StoreConfig,
    /// Where dummy clients connect (RPC). Default `127.0.0.1:50052`.
    pub bind: SocketAddr,
}

impl Default for RealClientConfig {
    fn default() -> Self {
        RealClientConfig {
            store: StoreConfig::default(),
            bind: SocketAddr::from(([127, 0, 0, 1], 50052)),
        }
    }
}

/// A dummy's pool as mapped here, registered with the transfer engine, which owns the mapping:
/// unregistered when the session's last call ends, and unmapped by the engine once no transfer
/// uses it any more.
struct Pool {
    dummy_base: u64,
    /// Start and length of the mapping here.
    addr: u64,
    len: u64,
    store: Arc<Store>,
}

impl Pool {
    /// This process's address of the dummy range `[addr, addr + len)`, or `INVALID_PARAMS` when
    /// the range is not wholly inside the pool.
    fn translate(&self, addr: u64, len: u64) -> Result<u64> {
        translate(self.dummy_base, self.addr, self.len, addr, len)
    }
}

/// A mapping of a dummy's pool memfd, checked to be sealed against shrinking.
struct PoolMemory(Mapping);

// SAFETY: a fresh `MAP_SHARED` read-write mapping (page-aligned, non-empty) of a memfd that
// `check_memfd` found sealed against shrinking, so every page stays backed; it never moves and is
// unmapped only when this value drops.
unsafe impl ProvidedMemory for PoolMemory {
    fn addr(&self) -> u64 {
        self.0.addr()
    }
    fn len(&self) -> usize {
        self.0.len() as usize
    }
}

/// The address in a mapping of `map_len` bytes at `map_addr` of the dummy range
/// `[addr, addr + len)`, the dummy's mapping starting at `dummy_base`; `INVALID_PARAMS` unless the
/// range is non-empty and wholly inside.
fn translate(dummy_base: u64, map_addr: u64, map_len: u64, addr: u64, len: u64) -> Result<u64> {
    let inside = addr
        .checked_sub(dummy_base)
        .filter(|off| off.checked_add(len).is_some_and(|end| end <= map_len));
    match inside {
        Some(off) if len > 0 => Ok(map_addr + off),
        _ => Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            format!(
                "range {addr:#x}+{len} is not inside the shared memory pool \
                 ({dummy_base:#x}+{map_len}); use alloc_from_mem_pool buffers"
            ),
        )),
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Not waiting for transfers that still use the pool (this may run on an async worker):
        // the engine owns the mapping and unmaps it after the last of them.
        if let Err(e) = self.store.engine().unregister_memory_async(self.addr) {
            tracing::debug!("unregistering a dummy pool: {e}");
        }
    }
}

/// An item to send to the store: its index, key and translated `(address, size)` parts.
type Planned = (usize, String, Vec<(u64, u64)>);

struct State {
    store: Arc<Store>,
    ipc_name: String,
    sessions: Mutex<HashMap<u64, Arc<Pool>>>,
    next: AtomicU64,
    seed: std::collections::hash_map::RandomState,
    /// Requests refused for their peer's roles (over TLS).
    refusals: RefusalLog,
}

impl State {
    fn pool(&self, session: u64) -> Result<Arc<Pool>> {
        self.sessions
            .lock()
            .expect("sessions")
            .get(&session)
            .cloned()
            .ok_or_else(|| {
                Error::with_code(
                    ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS,
                    format!("unknown dummy session {session:#x} (disconnected?)"),
                )
            })
    }

    fn new_session_id(&self) -> u64 {
        let mut h = self.seed.build_hasher();
        h.write_u64(self.next.fetch_add(1, Ordering::Relaxed));
        h.finish().max(1)
    }

    /// Maps and registers a received pool; returns the session id.
    fn register(&self, msg: &[u8], fd: Option<std::os::fd::OwnedFd>) -> Result<u64> {
        if msg.len() != REGISTER_LEN || &msg[..4] != REGISTER_MAGIC {
            return Err(Error::Protocol("malformed pool registration".into()));
        }
        let version = u32::from_le_bytes(msg[4..8].try_into().expect("4 bytes"));
        if version != PROTOCOL_VERSION {
            return Err(Error::with_code(
                ErrorCode::INVALID_VERSION,
                format!("dummy protocol {version}, real client speaks {PROTOCOL_VERSION}"),
            ));
        }
        let len = u64::from_le_bytes(msg[8..16].try_into().expect("8 bytes"));
        let dummy_base = u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes"));
        let fd =
            fd.ok_or_else(|| Error::Protocol("pool registration without a descriptor".into()))?;
        check_memfd(&fd, len)?;
        let map = PoolMemory(Mapping::map(&fd, len)?);
        drop(fd);
        let addr = self
            .store
            .engine()
            .memory()
            .register_owned(AlignedBuffer::from_provided(map)?, Location::cpu(0))?;
        let id = self.new_session_id();
        let pool = Arc::new(Pool {
            dummy_base,
            addr,
            len,
            store: self.store.clone(),
        });
        self.sessions.lock().expect("sessions").insert(id, pool);
        Ok(id)
    }

    async fn put_from(
        &self,
        session: u64,
        kind: WriteKind,
        items: Vec<PoolItem>,
        config: crate::store::ReplicateConfig,
    ) -> Vec<Result<()>> {
        let pool = match self.pool(session) {
            Ok(p) => p,
            Err(e) => return vec![Err(e); items.len()],
        };
        let mut out: Vec<Option<Result<()>>> = Vec::with_capacity(items.len());
        let mut go: Vec<Planned> = Vec::new();
        for (i, (key, parts)) in items.into_iter().enumerate() {
            let translated: Result<Vec<(u64, u64)>> = parts
                .iter()
                .map(|&(a, n)| pool.translate(a, n).map(|r| (r, n)))
                .collect();
            match translated {
                Ok(p) if kind == WriteKind::Upsert && p.len() != 1 => out.push(Some(Err(
                    Error::with_code(ErrorCode::NOT_SUPPORTED, "a multi-buffer upsert"),
                ))),
                Ok(p) if p.is_empty() => out.push(Some(Err(Error::with_code(
                    ErrorCode::INVALID_PARAMS,
                    "no buffers",
                )))),
                Ok(p) => {
                    out.push(None);
                    go.push((i, key, p));
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        if !go.is_empty() {
            let results = if go.iter().all(|(_, _, p)| p.len() == 1) {
                let items: Vec<(&str, u64, u64)> = go
                    .iter()
                    .map(|(_, k, p)| (k.as_str(), p[0].0, p[0].1))
                    .collect();
                self.store.batch_write_from(kind, &items, &config).await
            } else {
                let items: Vec<(&str, Vec<(u64, u64)>)> =
                    go.iter().map(|(_, k, p)| (k.as_str(), p.clone())).collect();
                self.store
                    .batch_put_from_multi_buffers(&items, &config)
                    .await
            };
            for ((i, _, _), r) in go.iter().zip(results) {
                out[*i] = Some(r);
            }
        }
        drop(pool);
        out.into_iter()
            .map(|r| r.expect("every item answered"))
            .collect()
    }

    /// Reads into the session's pool; `checked`: always against the values' checksums (the
    /// dummy returns the bytes as a value), else as the store's configuration says.
    async fn get_into(
        &self,
        session: u64,
        items: Vec<PoolItem>,
        checked: bool,
    ) -> Vec<Result<u64>> {
        let pool = match self.pool(session) {
            Ok(p) => p,
            Err(e) => return vec![Err(e); items.len()],
        };
        let mut out: Vec<Option<Result<u64>>> = Vec::with_capacity(items.len());
        let mut go: Vec<Planned> = Vec::new();
        for (i, (key, parts)) in items.into_iter().enumerate() {
            let translated: Result<Vec<(u64, u64)>> = parts
                .iter()
                .map(|&(a, n)| pool.translate(a, n).map(|r| (r, n)))
                .collect();
            match translated {
                Ok(p) if !p.is_empty() => {
                    out.push(None);
                    go.push((i, key, p));
                }
                Ok(_) => out.push(Some(Err(Error::with_code(
                    ErrorCode::INVALID_PARAMS,
                    "no buffers",
                )))),
                Err(e) => out.push(Some(Err(e))),
            }
        }
        if !go.is_empty() {
            let items: Vec<(&str, Vec<(u64, u64)>)> =
                go.iter().map(|(_, k, p)| (k.as_str(), p.clone())).collect();
            let results = if checked {
                self.store.batch_get_into_checked(&items).await
            } else {
                self.store.batch_get_into_multi_buffers(&items).await
            };
            for ((i, _, _), r) in go.iter().zip(results) {
                out[*i] = Some(r);
            }
        }
        drop(pool);
        out.into_iter()
            .map(|r| r.expect("every item answered"))
            .collect()
    }
}

fn units(v: Vec<Result<()>>) -> Reply {
    Reply::Units(v.into_iter().map(to_wire).collect())
}

fn strs(keys: &[String]) -> Vec<&str> {
    keys.iter().map(String::as_str).collect()
}

#[async_trait::async_trait]
impl Handler<Request, Reply> for State {
    async fn handle_from(&self, caller: &Caller, request: Request) -> Reply {
        // Over TLS (a node with a certificate) a dummy client's certificate must be a client's.
        if let Some(identity) = &caller.identity {
            if let Err(e) = identity.require_any(&[Role::Client], "use this real client") {
                self.refusals
                    .refused("real client rpc", &caller.describe(), &e.to_string());
                return Reply::Failed(WireError::from(&e));
            }
        }
        self.handle(request).await
    }

    async fn handle(&self, request: Request) -> Reply {
        let s = &self.store;
        match request {
            Request::Hello { version } => {
                if version != PROTOCOL_VERSION {
                    return Reply::Failed(WireError {
                        code: ErrorCode::INVALID_VERSION.code(),
                        message: format!(
                            "dummy protocol {version}, real client speaks {PROTOCOL_VERSION}"
                        ),
                    });
                }
                Reply::Hello {
                    version: PROTOCOL_VERSION,
                    ipc_name: self.ipc_name.clone(),
                    hostname: s.hostname().to_owned(),
                }
            }
            Request::PutInline {
                kind,
                key,
                parts,
                config,
            } => {
                let parts: Vec<&[u8]> = parts.iter().map(|p| p.0.as_slice()).collect();
                Reply::Unit(to_wire(s.write_parts(kind, &key, &parts, &config).await))
            }
            Request::PutBatchInline {
                kind,
                items,
                config,
            } => {
                let items: Vec<(&str, &[u8])> = items
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.0.as_slice()))
                    .collect();
                units(s.write_batch(kind, &items, &config).await)
            }
            Request::PutFrom {
                session,
                kind,
                items,
                config,
            } => units(self.put_from(session, kind, items, config).await),
            Request::GetInline { key } => Reply::Bytes(to_wire(s.get(&key).await.and_then(|v| {
                if v.len() > MAX_INLINE {
                    Err(Error::with_code(
                        ErrorCode::INVALID_PARAMS,
                        format!(
                            "{key:?} holds {} bytes, more than one message carries; read it \
                             into the shared pool (get_into)",
                            v.len()
                        ),
                    ))
                } else {
                    Ok(Blob(v))
                }
            }))),
            Request::GetInto { session, items } => Reply::Counts(
                self.get_into(session, items, false)
                    .await
                    .into_iter()
                    .map(to_wire)
                    .collect(),
            ),
            Request::GetIntoChecked { session, items } => Reply::Counts(
                self.get_into(session, items, true)
                    .await
                    .into_iter()
                    .map(to_wire)
                    .collect(),
            ),
            Request::GetSizes { keys } => {
                let sizes = keys.iter().map(|k| s.get_size(k));
                Reply::Counts(
                    futures::future::join_all(sizes)
                        .await
                        .into_iter()
                        .map(to_wire)
                        .collect(),
                )
            }
            Request::IsExist { key } => Reply::Bool(to_wire(s.is_exist(&key).await)),
            Request::BatchIsExist { keys } => {
                Reply::Bools(to_wire(s.batch_is_exist(&strs(&keys)).await))
            }
            Request::Remove { key, force } => Reply::Unit(to_wire(s.remove(&key, force).await)),
            Request::BatchRemove { keys, force } => Reply::UnitsOr(to_wire(
                s.batch_remove(&strs(&keys), force)
                    .await
                    .map(|v| v.into_iter().map(to_wire).collect()),
            )),
            Request::RemoveByRegex { pattern, force } => {
                Reply::Count(to_wire(s.remove_by_regex(&pattern, force).await))
            }
            Request::RemoveAll { force } => Reply::Count(to_wire(s.remove_all(force).await)),
            Request::GetReplicaDesc { key } => {
                Reply::Replicas(to_wire(s.get_replica_desc(&key).await))
            }
            Request::BatchGetReplicaDesc { keys } => Reply::ReplicaMap(to_wire(
                s.batch_get_replica_desc(&strs(&keys))
                    .await
                    .map(|m| m.into_iter().collect()),
            )),
            Request::CreateCopyTask { key, targets } => {
                Reply::Task(to_wire(s.create_copy_task(&key, &targets).await))
            }
            Request::CreateMoveTask {
                key,
                source,
                target,
            } => Reply::Task(to_wire(s.create_move_task(&key, &source, &target).await)),
            Request::QueryTask { id } => Reply::TaskInfo(to_wire(s.query_task(id).await)),
            Request::MasterMetrics => {
                Reply::Metrics(to_wire(s.master_metrics().await.map(Box::new)))
            }
        }
    }
}

/// A running real client: its store, the RPC server for dummy clients and their sessions.
pub struct RealClient {
    state: Arc<State>,
    rpc_address: SocketAddr,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for RealClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealClient")
            .field("rpc", &self.rpc_address)
            .field("segment", &self.state.store.hostname())
            .field("sessions", &self.session_count())
            .finish()
    }
}

impl RealClient {
    /// Sets up the store (`config.store`) and serves it on `config.bind`.
    pub async fn start(config: RealClientConfig) -> Result<Arc<RealClient>> {
        let store = Store::setup(config.store).await?;
        match Self::serve(store.clone(), config.bind).await {
            Ok(c) => Ok(c),
            Err(e) => {
                let _ = store.close().await;
                Err(e)
            }
        }
    }

    /// Serves an existing store to dummy clients on `bind`; over mutual TLS when this node has
    /// a certificate (`MC_TLS_CA`, `MC_TLS_CERT`, `MC_TLS_KEY`), as [`RealClient::serve_tls`].
    pub async fn serve(store: Arc<Store>, bind: SocketAddr) -> Result<Arc<RealClient>> {
        let tls = TlsIdentity::from_env_opt()?;
        Self::serve_tls(store, bind, tls.as_ref()).await
    }

    /// Serves an existing store to dummy clients on `bind`; with `tls`, every connection needs
    /// a certificate of the cluster CA with the `client` role.
    pub async fn serve_tls(
        store: Arc<Store>,
        bind: SocketAddr,
        tls: Option<&TlsIdentity>,
    ) -> Result<Arc<RealClient>> {
        let acceptor = tls.map(mooncake_rpc::tls_acceptor).transpose()?;
        let listener = mooncake_rpc::rpc::bind(bind).await?;
        let rpc_address = listener.local_addr()?;
        let seed = std::collections::hash_map::RandomState::new();
        let mut h = seed.build_hasher();
        h.write_u32(std::process::id());
        let ipc_name = format!(
            "mooncake_client.{}.{}.{:016x}",
            std::process::id(),
            rpc_address.port(),
            h.finish()
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(ipc_name.as_bytes())?;
        let ipc = std::os::unix::net::UnixListener::bind_addr(&addr)
            .map_err(|e| Error::Io(format!("binding the dummy socket {ipc_name}: {e}")))?;
        ipc.set_nonblocking(true)?;
        let ipc = tokio::net::UnixListener::from_std(ipc)?;
        let state = Arc::new(State {
            store,
            ipc_name,
            sessions: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            seed,
            refusals: RefusalLog::new(),
        });
        let rpc = mooncake_rpc::rpc::serve_tls(
            listener,
            state.clone(),
            mooncake_rpc::ServeLimits::default(),
            acceptor,
        );
        let sessions = tokio::spawn(accept_sessions(ipc, Arc::downgrade(&state)));
        Ok(Arc::new(RealClient {
            state,
            rpc_address,
            tasks: Mutex::new(vec![rpc, sessions]),
        }))
    }

    /// Where dummy clients connect.
    pub fn rpc_address(&self) -> SocketAddr {
        self.rpc_address
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.state.store
    }

    /// The abstract Unix socket dummy clients of this host register their pools on.
    pub fn dummy_socket_name(&self) -> &str {
        &self.state.ipc_name
    }

    /// How many dummy clients have a registered pool.
    pub fn session_count(&self) -> usize {
        self.state.sessions.lock().expect("sessions").len()
    }

    /// Stops serving, drops every session (pools are unregistered and unmapped once the calls
    /// using them end) and closes the store. Idempotent.
    pub async fn shutdown(&self) -> Result<()> {
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks"));
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        self.state.sessions.lock().expect("sessions").clear();
        self.state.store.close().await
    }
}

impl Drop for RealClient {
    fn drop(&mut self) {
        for t in self.tasks.lock().expect("tasks").drain(..) {
            t.abort();
        }
        self.state.sessions.lock().expect("sessions").clear();
    }
}

/// Dummy sessions a real client serves at once (one per local process using it).
const MAX_SESSIONS: usize = 1024;

async fn accept_sessions(ipc: tokio::net::UnixListener, state: std::sync::Weak<State>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = ipc.accept() => match accepted {
                Ok((stream, _)) => {
                    let Some(state) = state.upgrade() else { return };
                    // A dummy's pool is mapped into this process: only its own user's.
                    if let Err(e) = mooncake_core::memfd::check_same_user(&stream) {
                        tracing::warn!("refused a dummy session: {e}");
                        continue;
                    }
                    if conns.len() >= MAX_SESSIONS {
                        tracing::warn!("refused a dummy session: {MAX_SESSIONS} are open");
                        continue;
                    }
                    conns.spawn(session(stream, state));
                }
                Err(e) => {
                    tracing::warn!("dummy socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// How long a dummy has, from connecting, to send its pool registration.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(10);

/// One dummy's session: receives and registers its pool, then waits for the dummy to hang up and
/// drops the pool. Entirely on the runtime (no thread is held while a dummy dawdles).
async fn session(mut stream: tokio::net::UnixStream, state: Arc<State>) {
    let mut buf = [0u8; 64];
    // The first descriptor is the pool; any others are closed as they drop.
    let received = tokio::time::timeout(REGISTRATION_TIMEOUT, async {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        loop {
            stream.readable().await?;
            match stream.try_io(tokio::io::Interest::READABLE, || {
                try_recv_with_fds(fd, &mut buf)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    })
    .await;
    let registered = match received {
        Err(_) => Err(Error::Protocol(format!(
            "no pool registration within {REGISTRATION_TIMEOUT:?}"
        ))),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            Err(Error::Protocol(e.to_string()))
        }
        Ok(Err(e)) => Err(Error::Io(format!("recvmsg: {e}"))),
        Ok(Ok((n, fds))) => state.register(&buf[..n], fds.into_iter().next()),
    };
    let mut reply = [0u8; REGISTER_REPLY_LEN];
    match &registered {
        Ok(id) => reply[4..].copy_from_slice(&id.to_le_bytes()),
        Err(e) => {
            tracing::warn!("dummy pool registration refused: {e}");
            reply[..4].copy_from_slice(&e.code().code().to_le_bytes());
        }
    }
    let sent = tokio::time::timeout(REGISTRATION_TIMEOUT, stream.write_all(&reply)).await;
    let Ok(id) = registered else { return };
    tracing::info!(
        "dummy session {id:#x} registered ({} sessions)",
        state.sessions.lock().expect("sessions").len()
    );
    if matches!(sent, Ok(Ok(()))) {
        let mut buf = [0u8; 64];
        // The dummy sends nothing more: end of stream (or an error) means it is gone.
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    }
    state.sessions.lock().expect("sessions").remove(&id);
    tracing::info!("dummy session {id:#x} ended; its pool is released");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_tls_the_real_client_serves_client_certificates_only() {
        use mooncake_master::MasterConfig;
        use mooncake_master_service::{MasterService, ServiceConfig};
        use mooncake_rpc::{tls_connector, RpcClient, RpcClientConfig};
        use mooncake_tls::certs;
        let master = MasterService::new(MasterConfig::default(), ServiceConfig::default()).unwrap();
        let store = Store::setup_embedded(
            StoreConfig {
                local_hostname: "127.0.0.1".into(),
                global_segment_size: 16 << 20,
                local_buffer_size: 16 << 20,
                ..StoreConfig::default()
            },
            master.clone(),
        )
        .await
        .unwrap();
        let ca = certs::new_ca("real client test CA").unwrap();
        let issue = |name: &str, roles: &[Role]| {
            certs::issue_role_cert(&ca, name, &["127.0.0.1"], roles)
                .unwrap()
                .identity(&ca)
        };
        let real = RealClient::serve_tls(
            store,
            "127.0.0.1:0".parse().unwrap(),
            Some(&issue("real", &[Role::Client])),
        )
        .await
        .unwrap();
        let addr = real.rpc_address().to_string();
        let config = RpcClientConfig::default();
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
        };
        // A dummy client with a client certificate is served.
        let tls = tls_connector(&issue("dummy", &[Role::Client])).unwrap();
        let dummy = RpcClient::with_tls(addr.clone(), config.clone(), Some(tls));
        let reply: Reply = dummy.call(&hello).await.unwrap();
        assert!(matches!(reply, Reply::Hello { .. }), "{reply:?}");
        // One whose certificate grants another role is refused with the reason.
        let tls = tls_connector(&issue("ops", &[Role::Admin])).unwrap();
        let ops = RpcClient::with_tls(addr.clone(), config.clone(), Some(tls));
        match ops.call::<_, Reply>(&hello).await.unwrap() {
            Reply::Failed(e) => {
                assert_eq!(e.code, ErrorCode::ILLEGAL_CLIENT.code());
                assert!(e.message.contains("needs the client role"), "{}", e.message);
            }
            other => panic!("served a certificate without the client role: {other:?}"),
        }
        // A plain one is told that TLS is required.
        let plain = RpcClient::new(addr, config);
        let e = plain.call::<_, Reply>(&hello).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::ILLEGAL_CLIENT, "{e}");
        assert!(e.to_string().contains("requires mutual TLS"), "{e}");
        real.shutdown().await.unwrap();
        master.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_tls_a_dummy_certificate_revoked_while_connected_is_cut_off() {
        use mooncake_master::MasterConfig;
        use mooncake_master_service::{MasterService, ServiceConfig};
        use mooncake_rpc::{tls_connector, RpcClient, RpcClientConfig};
        use mooncake_tls::certs;
        let master = MasterService::new(MasterConfig::default(), ServiceConfig::default()).unwrap();
        let store = Store::setup_embedded(
            StoreConfig {
                local_hostname: "127.0.0.1".into(),
                global_segment_size: 16 << 20,
                local_buffer_size: 16 << 20,
                ..StoreConfig::default()
            },
            master.clone(),
        )
        .await
        .unwrap();
        let ca = certs::new_ca("real client CRL test CA").unwrap();
        let issue = |name: &str| {
            certs::issue_role_cert(&ca, name, &["127.0.0.1"], &[Role::Client])
                .unwrap()
                .identity(&ca)
        };
        let dir = std::env::temp_dir().join(format!("mc-real-crl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let crl = dir.join("crl.pem");
        certs::write_revocation_list(&ca, &crl, &[], 1).unwrap();
        let real = RealClient::serve_tls(
            store,
            "127.0.0.1:0".parse().unwrap(),
            Some(&issue("real").with_crl_file(&crl).unwrap()),
        )
        .await
        .unwrap();
        let addr = real.rpc_address().to_string();
        let config = RpcClientConfig::default();
        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
        };
        let dummy_id = issue("dummy-a");
        let dummy = RpcClient::with_tls(
            addr.clone(),
            config.clone(),
            Some(tls_connector(&dummy_id).unwrap()),
        );
        // Served before the revocation.
        let reply: Reply = dummy.call(&hello).await.unwrap();
        assert!(matches!(reply, Reply::Hello { .. }), "{reply:?}");
        let connection = dummy.connection_id();
        // Revoked: the same connection's next call fails once the real client looked at the
        // list again (at most every half second).
        certs::write_revocation_list(&ca, &crl, &[&dummy_id.cert_pem], 2).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match dummy.call::<_, Reply>(&hello).await {
                Ok(Reply::Hello { .. }) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "a revoked certificate's open connection is still served"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(other) => panic!("unexpected reply {other:?}"),
                Err(_) => break,
            }
        }
        assert_eq!(
            dummy.connection_id(),
            connection,
            "the call that failed went out on the connection served before"
        );
        // Reconnecting is refused at the handshake; other certificates are still served.
        assert!(dummy.call::<_, Reply>(&hello).await.is_err());
        let other = RpcClient::with_tls(
            addr,
            config,
            Some(tls_connector(&issue("dummy-b")).unwrap()),
        );
        let reply: Reply = other.call(&hello).await.unwrap();
        assert!(matches!(reply, Reply::Hello { .. }), "{reply:?}");
        real.shutdown().await.unwrap();
        master.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn dummy_ranges_translate_only_inside_the_pool() {
        let (base, map, len) = (0x7000_0000u64, 0x1000_0000u64, 0x10000u64);
        assert_eq!(translate(base, map, len, base, len).unwrap(), map);
        assert_eq!(translate(base, map, len, base + 16, 32).unwrap(), map + 16);
        for (a, n) in [
            (base, 0),
            (base, len + 1),
            (base + len, 1),
            (base + len - 1, 2),
            (base - 1, 1),
            (0, 16),
            (u64::MAX, 1),
            (base + 8, u64::MAX),
        ] {
            let e = translate(base, map, len, a, n).unwrap_err();
            assert_eq!(e.code(), ErrorCode::INVALID_PARAMS, "{a:#x}+{n}");
        }
    }
}
