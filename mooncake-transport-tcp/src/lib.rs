//! TCP transport for the mooncake-rs transfer engine.
//!
//! What it does:
//! - keeps persistent connections per peer, several "lanes" each, reused across transfers (no
//!   socket per transfer, so no ephemeral-port exhaustion under load);
//! - pipelines requests: a batch is written back to back and answered in order, small payloads
//!   are coalesced into large writes on both sides;
//! - spreads a batch over the lanes and splits large requests across them, so both cores work;
//! - moves large payloads straight between the socket and registered memory;
//! - on the target, checks every request against the registered buffers: an out-of-range
//!   request gets an error reply, a malformed frame closes only its connection;
//! - fails requests to a dead or hung peer within [`TcpConfig::request_timeout`].
//!
//! - with [`TcpConfig::auth`] set, authenticates both ends of every connection with a
//!   certificate of the cluster CA before anything else (a full TLS 1.3 handshake, ALPN
//!   [`ALPN`]), admits only peers whose certificate grants one of the required roles (default
//!   [`DEFAULT_ROLES`]), then runs the same protocol unencrypted at full TCP speed: the
//!   handshake happens once per pooled connection, the data path is unchanged
//!   (`transfer_engine_bench --protocol tcp,tcp-auth`, 2-core loopback host, two long runs in
//!   both orders: authenticated over plain 0.97x to 1.04x from 4 KiB to 16 MiB, within the
//!   run-to-run spread).
//!
//! What it does not do: encryption. Authenticated or not, payloads cross the network in the
//! clear (anyone on the path can read them, and without [`TcpConfig::auth`] any peer that can
//! reach the port can read and write every registered buffer); use the QUIC transport where
//! transfers must be secret.
//!
//! ```no_run
//! use std::sync::Arc;
//! use mooncake_core::{EngineConfig, TransferEngine};
//! use mooncake_transport_tcp::{TcpConfig, TcpTransport};
//! # async fn demo() -> mooncake_core::Result<()> {
//! let tcp = TcpTransport::new(TcpConfig::default())?;
//! let engine = TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![tcp]).await?;
//! println!("serving segment {}", engine.segment_name());
//! # Ok(()) }
//! ```

mod auth;
mod client;
pub mod frame;
mod server;
mod sys;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use mooncake_core::{
    BatchState, Endpoint, Error, LocalSegment, OpCode, Result, SegmentDesc, TransferOp, Transport,
};
use tokio::task::JoinHandle;

use auth::Auth;
use client::{Call, Completion, Kind, Outgoing, PeerPool, Split};
use frame::Op;

pub use auth::{ALPN, DEFAULT_ROLES};
pub use mooncake_tls::{
    certs, PeerAuthorizer, PeerIdentity, Role, RoleAuthorizer, TlsIdentity, TLS_ENV,
};

/// TCP transport settings. Every field has a default chosen for a 2-core host on a LAN.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// Address to listen on. Default `127.0.0.1:0` (loopback, any free port): set the host's
    /// address for a multi-host cluster.
    pub bind: SocketAddr,
    /// Host name or address to advertise in the endpoint, when peers must use another name than
    /// the bound IP (binding `0.0.0.0`, NAT). Default: the bound IP.
    pub advertise_host: Option<String>,
    /// Connections per peer. Default 2: one per core on the 2-core hosts this was tuned on; more
    /// lanes help on larger hosts with large transfers.
    pub lanes: usize,
    /// Bound on one `transfer` call, from submission to the last completion. Requests still
    /// pending then fail as timed out and their connections are closed. Default 30 s.
    pub request_timeout: Duration,
    /// Bound on establishing a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Payloads up to this size are copied into the coalescing buffers; larger ones move straight
    /// between socket and registered memory. Default 64 KiB.
    pub inline_payload: usize,
    /// Requests of at least this many bytes are split across all lanes. Default 1 MiB.
    pub split_threshold: u64,
    /// A refused WRITE carrying at most this many payload bytes is skipped and the connection
    /// kept; a larger one closes the connection. Default 64 MiB.
    pub max_discard: u64,
    /// Connections the server keeps open at once; more are closed as they are accepted.
    /// Default 4096.
    pub max_connections: usize,
    /// Connections the server keeps open at once from one IP address. Default 256 (a host runs
    /// a few processes, each with `lanes` connections per peer).
    pub max_connections_per_address: usize,
    /// This node's certificate, key and cluster CA. When set, every connection (those this node
    /// opens and those it accepts) starts by authenticating both ends, within
    /// [`TcpConfig::connect_timeout`]; peers without a certificate of the cluster CA, with an
    /// expired one or without an admitted role are refused before any request is read, and
    /// this node refuses targets that do not authenticate. The rest of the connection is the
    /// same unencrypted protocol. Default `None`: no authentication, any peer is served.
    pub auth: Option<TlsIdentity>,
    /// With [`TcpConfig::auth`]: which verified peers are admitted, on both ends. Default
    /// `None`: peers whose certificate grants the `client` or `master` role
    /// ([`DEFAULT_ROLES`]).
    pub authorizer: Option<Arc<dyn PeerAuthorizer>>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_host: None,
            lanes: 2,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            inline_payload: 64 * 1024,
            split_threshold: 1 << 20,
            max_discard: 64 << 20,
            max_connections: 4096,
            max_connections_per_address: 256,
            auth: None,
            authorizer: None,
        }
    }
}

impl TcpConfig {
    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(format!("tcp config: {m}")));
        if self.lanes == 0 || self.lanes > 64 {
            return bad("lanes must be between 1 and 64");
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad("timeouts must be non-zero");
        }
        if self.inline_payload > 16 << 20 {
            return bad("inline_payload above 16 MiB defeats zero-copy");
        }
        if self.split_threshold < 64 * 1024 {
            return bad("split_threshold below 64 KiB");
        }
        if self.max_connections == 0 || self.max_connections_per_address == 0 {
            return bad("connection limits must be at least 1");
        }
        if self.authorizer.is_some() && self.auth.is_none() {
            return bad("an authorizer needs an identity (auth) to verify peers with");
        }
        Ok(())
    }
}

/// See the crate docs.
#[derive(Debug)]
pub struct TcpTransport {
    config: Arc<TcpConfig>,
    /// Built from [`TcpConfig::auth`] once.
    auth: Option<Arc<Auth>>,
    pools: Mutex<HashMap<String, Arc<PeerPool>>>,
    server: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerPool({} lanes)", self.lane_count())
    }
}

/// Smallest piece a large request is split into.
const MIN_PART: u64 = 256 * 1024;

impl TcpTransport {
    /// A transport with `config` (validated; an identity whose files do not parse is an error
    /// here).
    pub fn new(config: TcpConfig) -> Result<Arc<Self>> {
        config.validate()?;
        let auth = Auth::from_config(&config)?;
        Ok(Arc::new(TcpTransport {
            config: Arc::new(config),
            auth,
            pools: Mutex::new(HashMap::new()),
            server: Mutex::new(None),
            closed: AtomicBool::new(false),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &TcpConfig {
        &self.config
    }

    /// True when connections authenticate both ends ([`TcpConfig::auth`]).
    pub fn authenticates(&self) -> bool {
        self.auth.is_some()
    }

    fn pool(&self, address: &str) -> Arc<PeerPool> {
        let mut pools = self.pools.lock().expect("pools");
        pools
            .entry(address.to_owned())
            .or_insert_with(|| PeerPool::new(address.to_owned(), self.config.lanes))
            .clone()
    }

    /// Sends each lane's requests and waits for all completions of `call`, within the request
    /// timeout. On timeout, closes the lanes involved so nothing arrives late, and fails what
    /// is left as timed out.
    async fn run(
        &self,
        pool: &Arc<PeerPool>,
        per_lane: Vec<(usize, Vec<Outgoing>)>,
        call: &Arc<Call>,
    ) {
        let used: Mutex<Vec<Arc<client::Lane>>> = Mutex::new(Vec::new());
        let config = &self.config;
        let auth = self.auth.as_deref();
        let work = async {
            let sends = per_lane.into_iter().map(|(i, items)| {
                let used = &used;
                async move {
                    match pool.lane(i, config, auth).await {
                        Ok(lane) => {
                            used.lock().expect("used lanes").push(lane.clone());
                            lane.send(items).await;
                        }
                        Err(e) => {
                            for item in items {
                                item.completion.finish(Err(e.clone()));
                            }
                        }
                    }
                }
            });
            futures::future::join_all(sends).await;
            call.wait().await;
        };
        let mut work = Box::pin(work);
        tokio::select! {
            _ = &mut work => return,
            _ = tokio::time::sleep(config.request_timeout) => {}
        }
        let timeout = Error::Timeout(config.request_timeout);
        call.fail_abandoned_with(timeout.clone());
        drop(work);
        for lane in used.into_inner().expect("used lanes") {
            lane.kill(timeout.clone());
        }
        call.wait().await;
    }
}

#[async_trait]
impl Transport for TcpTransport {
    fn protocol(&self) -> &'static str {
        "tcp"
    }

    async fn serve(&self, segment: Arc<LocalSegment>) -> Result<Endpoint> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        let listener = tokio::net::TcpListener::bind(self.config.bind)
            .await
            .map_err(|e| Error::Io(format!("binding {}: {e}", self.config.bind)))?;
        let local = listener.local_addr()?;
        let host = match &self.config.advertise_host {
            Some(h) => h.clone(),
            None if local.is_ipv6() => format!("[{}]", local.ip()),
            None => local.ip().to_string(),
        };
        let task = tokio::spawn(server::accept_loop(
            listener,
            segment,
            self.config.clone(),
            self.auth.clone(),
        ));
        if let Some(old) = self.server.lock().expect("server slot").replace(task) {
            old.abort();
        }
        Ok(Endpoint {
            protocol: "tcp".into(),
            address: format!("{host}:{}", local.port()),
        })
    }

    async fn transfer(&self, target: &SegmentDesc, ops: Vec<TransferOp>, batch: &Arc<BatchState>) {
        let fail_all = |ops: Vec<TransferOp>, e: Error| {
            for op in ops {
                batch.complete(op.index, Err(e.clone()));
            }
        };
        if self.closed.load(Ordering::Acquire) {
            return fail_all(ops, Error::Shutdown);
        }
        let Some(endpoint) = target.endpoint("tcp") else {
            return fail_all(
                ops,
                Error::NoTransport {
                    segment: target.name.clone(),
                    offered: "no tcp endpoint".into(),
                },
            );
        };
        let pool = self.pool(&endpoint.address);
        let call = Call::new(ops.len());
        let lanes = pool.lane_count();
        let start = pool.rotate();
        let mut per_lane: Vec<(usize, Vec<Outgoing>)> = (0..lanes)
            .map(|k| ((start + k) % lanes, Vec::new()))
            .collect();
        let mut load = vec![0u64; lanes];
        let outgoing = |op: Op, addr, local, completion, notify, deadline| Outgoing {
            op,
            addr,
            local: Some(local),
            completion,
            notify,
            deadline,
        };
        for op in ops {
            let code = match op.opcode {
                OpCode::Read => Op::Read,
                OpCode::Write => Op::Write,
            };
            let len = op.local.len();
            if lanes > 1 && len >= self.config.split_threshold.max(2 * MIN_PART) {
                let parts = (lanes as u64).min(len / MIN_PART);
                let part_len = (len / parts) & !4095;
                let split = Split::new(parts as usize, batch.clone(), op.index);
                let mut offset = 0;
                for k in 0..parts as usize {
                    let this = if k + 1 == parts as usize {
                        len - offset
                    } else {
                        part_len
                    };
                    let local = op.local.slice(offset, this).expect("within the op");
                    let c = Completion::new(Kind::Part(split.clone()), &call);
                    per_lane[k].1.push(outgoing(
                        code,
                        op.target_addr + offset,
                        local,
                        c,
                        op.notify,
                        op.deadline,
                    ));
                    load[k] += this;
                    offset += this;
                }
            } else {
                // Least-loaded lane, ties to the rotating start.
                let k = (0..lanes).min_by_key(|&k| load[k]).expect("lanes > 0");
                load[k] += len.max(1);
                let c = Completion::new(
                    Kind::Op {
                        batch: batch.clone(),
                        index: op.index,
                    },
                    &call,
                );
                per_lane[k].1.push(outgoing(
                    code,
                    op.target_addr,
                    op.local,
                    c,
                    op.notify,
                    op.deadline,
                ));
            }
        }
        per_lane.retain(|(_, items)| !items.is_empty());
        self.run(&pool, per_lane, &call).await;
    }

    async fn handshake(&self, address: &str) -> Result<SegmentDesc> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        match address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "segment name {address:?} is not host:port"
                )))
            }
        }
        let pool = self.pool(address);
        let call = Call::new(1);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let item = Outgoing {
            op: Op::Describe,
            addr: 0,
            local: None,
            completion: Completion::new(Kind::Describe(tx), &call),
            notify: false,
            deadline: None,
        };
        let lane = pool.rotate();
        self.run(&pool, vec![(lane, vec![item])], &call).await;
        let bytes = rx
            .await
            .map_err(|_| Error::Protocol("handshake dropped".into()))??;
        SegmentDesc::decode(&bytes)
    }

    async fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        let server = self.server.lock().expect("server slot").take();
        if let Some(task) = server {
            task.abort();
            let _ = task.await;
        }
        let pools: Vec<_> = self
            .pools
            .lock()
            .expect("pools")
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in pools {
            p.close(Error::Shutdown).await;
        }
    }
}
