//! QUIC transport with mutual TLS for the mooncake-rs transfer engine.
//!
//! What it does:
//! - authenticates both ends of every connection with certificates of one cluster CA: a target
//!   serves only peers presenting a client certificate chained to the CA, an initiator talks
//!   only to targets whose certificate chains to the CA and names the address it dialled (an IP
//!   SAN for an IP endpoint); the verified identity of each peer ([`PeerIdentity`]) is given to
//!   an optional [`PeerAuthorizer`], and refused handshakes are logged on both sides; with a
//!   revocation list ([`TlsIdentity::crl_file`]) a revoked certificate fails the handshake, and
//!   a target re-checks the certificate of each open connection before every request (a clock
//!   read and an atomic load unless the list changed), closing the connection of one revoked
//!   meanwhile (application code [`REVOKED`], its certificate named in the target's log);
//! - encrypts everything (TLS 1.3 inside QUIC, ring provider);
//! - keeps [`QuicConfig::connections_per_peer`] connections to each peer, reused across
//!   transfers, each with its own UDP socket; one connection is one serial state machine, so
//!   large requests are split across all of them and small ones spread over them;
//! - gives each large request its own bidirectional stream (opening one costs no round trip), so
//!   a large request never holds up the others, and sends small ones back to back on shared
//!   streams, answered in order;
//! - on the target, checks every range against the registered buffers before touching memory,
//!   bounds connections, handshakes, streams and buffered data, and answers a refused request
//!   with an error while the connection keeps serving;
//! - fails requests to a dead or hung peer within [`QuicConfig::request_timeout`].
//!
//! The wire format is in [`frame`]; certificates for a cluster can be made with [`certs`].
//!
//! ```no_run
//! use mooncake_core::{EngineConfig, TransferEngine};
//! use mooncake_transport_quic::{certs, QuicConfig, QuicTransport};
//! # async fn demo() -> mooncake_core::Result<()> {
//! let ca = certs::new_ca("cluster CA")?;
//! let node = certs::issue_node_cert(&ca, "node-a", &["127.0.0.1"])?;
//! let quic = QuicTransport::new(QuicConfig::new(node.identity(&ca)))?;
//! let engine = TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![quic]).await?;
//! println!("serving segment {}", engine.segment_name());
//! # Ok(()) }
//! ```

#![deny(unsafe_code)]

mod client;
pub mod frame;
mod server;
mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{FuturesUnordered, StreamExt};
use mooncake_core::{
    BatchState, Endpoint, Error, LocalSegment, OpCode, Result, SegmentDesc, TransferOp, Transport,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};
use tokio::task::JoinHandle;

use client::PeerPool;
use frame::Op;
pub use mooncake_tls::{certs, PeerAuthorizer, PeerIdentity, Role, TlsIdentity, TLS_ENV};

/// The application error code with which a target closes the connection of a peer whose
/// certificate was revoked while the connection was open (the reason reads
/// `certificate revoked`).
pub const REVOKED: u32 = server::code::REVOKED;

/// The ALPN protocol name, which is also the wire protocol's version.
pub const ALPN: &[u8] = b"mooncake-quic/1";

/// QUIC transport settings. Every field but the identity has a default chosen for a 2-core host
/// on a LAN: [`QuicConfig::new`].
#[derive(Clone, Debug)]
pub struct QuicConfig {
    /// This node's certificate, key and cluster CA. Mandatory: there is no unauthenticated mode.
    pub identity: TlsIdentity,
    /// Address to listen on. Default `127.0.0.1:0` (loopback, any free port): set the host's
    /// address for a multi-host cluster.
    pub bind: SocketAddr,
    /// Host name or address to advertise in the endpoint, when peers must use another name than
    /// the bound IP (binding `0.0.0.0`, NAT). The certificate must name it. Default: the bound IP.
    pub advertise_host: Option<String>,
    /// Connections per peer. Default 4: one connection is one serial state machine, and on
    /// loopback one moves about 0.5 GB/s.
    pub connections_per_peer: usize,
    /// Bound on one `transfer` call, from submission to the last completion, and on serving one
    /// request. Requests still pending then fail as timed out. Default 30 s.
    pub request_timeout: Duration,
    /// Bound on establishing a connection, handshake included. Default 5 s.
    pub connect_timeout: Duration,
    /// A connection without any packet for this long is dead; initiators send keep-alives at a
    /// third of it. Default 30 s.
    pub idle_timeout: Duration,
    /// Requests of at least this many bytes are split across all connections. Default 1 MiB.
    pub split_threshold: u64,
    /// Most connections a target serves at once; more are refused. Default 64.
    pub max_connections: usize,
    /// Most handshakes a target lets be in progress at once. Default 64.
    pub max_incoming: usize,
    /// Most requests (streams) a peer may have open on one connection at once; more wait.
    /// Default 256.
    pub max_streams_per_connection: u32,
    /// Bytes a peer may send on one stream ahead of the reader. Default 8 MiB.
    pub stream_receive_window: u64,
    /// Bytes a peer may send on one connection ahead of the reader: with
    /// [`QuicConfig::max_connections`], the bound on what peers can make a target buffer.
    /// Default 32 MiB.
    pub receive_window: u64,
    /// Bytes sent and not yet acknowledged per connection. Default 32 MiB.
    pub send_window: u64,
    /// Largest UDP payload path MTU discovery tries, and the largest this side accepts.
    /// Default 1452 (Ethernet); loopback and jumbo-frame networks go faster with more, up to
    /// [`MAX_UDP_PAYLOAD`].
    pub max_udp_payload: u16,
    /// A UDP payload size every path to peers is known to carry: used from the first packet
    /// and never gone below, even when losses look like a black hole to path MTU discovery.
    /// Default 1200 (what QUIC requires of any path); on loopback or a known jumbo-frame
    /// network a larger value cuts the per-packet cost several times (loopback: set both this
    /// and [`QuicConfig::max_udp_payload`] to [`MAX_UDP_PAYLOAD`]). Must not exceed
    /// [`QuicConfig::max_udp_payload`].
    pub min_udp_payload: u16,
    /// Requested size of each UDP socket's kernel send and receive buffers (the kernel caps it
    /// at `net.core.rmem_max` / `wmem_max`). A burst larger than the receive buffer is dropped
    /// and costs a congestion-window cut. Default 4 MiB.
    pub udp_buffer: usize,
    /// Decides which verified peers are served. Default: every peer with a valid certificate.
    pub authorizer: Option<Arc<dyn PeerAuthorizer>>,
}

impl QuicConfig {
    /// The defaults, with `identity`.
    pub fn new(identity: TlsIdentity) -> Self {
        QuicConfig {
            identity,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_host: None,
            connections_per_peer: 4,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            split_threshold: 1 << 20,
            max_connections: 64,
            max_incoming: 64,
            max_streams_per_connection: 256,
            stream_receive_window: 8 << 20,
            receive_window: 32 << 20,
            send_window: 32 << 20,
            max_udp_payload: 1452,
            min_udp_payload: 1200,
            udp_buffer: 4 << 20,
            authorizer: None,
        }
    }

    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(format!("quic config: {m}")));
        if self.connections_per_peer == 0 || self.connections_per_peer > 64 {
            return bad("connections_per_peer must be between 1 and 64");
        }
        if self.request_timeout.is_zero()
            || self.connect_timeout.is_zero()
            || self.idle_timeout.is_zero()
        {
            return bad("timeouts must be non-zero");
        }
        if self.split_threshold < 64 * 1024 {
            return bad("split_threshold below 64 KiB");
        }
        if self.max_connections == 0 || self.max_incoming == 0 {
            return bad("max_connections and max_incoming must be positive");
        }
        if self.max_streams_per_connection == 0 {
            return bad("max_streams_per_connection must be positive");
        }
        let window_max = VarInt::MAX.into_inner();
        if self.stream_receive_window < 64 * 1024
            || self.receive_window < self.stream_receive_window
            || self.receive_window > window_max
            || self.send_window < 64 * 1024
        {
            return bad("windows must be at least 64 KiB, the connection's at least the stream's");
        }
        if !(1200..=MAX_UDP_PAYLOAD).contains(&self.max_udp_payload) {
            return bad("max_udp_payload must be between 1200 and 6500");
        }
        if self.min_udp_payload < 1200 || self.min_udp_payload > self.max_udp_payload {
            return bad("min_udp_payload must be between 1200 and max_udp_payload");
        }
        Ok(())
    }

    /// A QUIC endpoint on a new UDP socket bound to `addr`, with this config's socket buffers.
    pub(crate) fn endpoint(
        &self,
        addr: SocketAddr,
        server: Option<quinn::ServerConfig>,
    ) -> std::io::Result<quinn::Endpoint> {
        let socket = std::net::UdpSocket::bind(addr)?;
        let state = quinn::udp::UdpSocketState::new((&socket).into())?;
        // Best effort: the kernel caps the sizes, and a smaller buffer only costs speed.
        if let Err(e) = state.set_recv_buffer_size((&socket).into(), self.udp_buffer) {
            tracing::debug!("setting the UDP receive buffer: {e}");
        }
        if let Err(e) = state.set_send_buffer_size((&socket).into(), self.udp_buffer) {
            tracing::debug!("setting the UDP send buffer: {e}");
        }
        let mut endpoint = quinn::EndpointConfig::default();
        // What this side accepts, announced to peers: it caps their path MTU discovery.
        endpoint
            .max_udp_payload_size(self.max_udp_payload)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        quinn::Endpoint::new(endpoint, server, socket, Arc::new(quinn::TokioRuntime))
    }

    fn transport(&self) -> Result<Arc<TransportConfig>> {
        let mut t = TransportConfig::default();
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| Error::InvalidArgument("quic config: idle_timeout too large".into()))?;
        let mut mtu = MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload);
        t.max_concurrent_bidi_streams(VarInt::from_u32(self.max_streams_per_connection))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u64(self.stream_receive_window).expect("checked"))
            .receive_window(VarInt::from_u64(self.receive_window).expect("checked"))
            .send_window(self.send_window)
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.idle_timeout / 3))
            .datagram_receive_buffer_size(None)
            .initial_mtu(self.min_udp_payload)
            .min_mtu(self.min_udp_payload)
            .mtu_discovery_config(Some(mtu));
        Ok(Arc::new(t))
    }
}

/// See the crate docs.
#[derive(Debug)]
pub struct QuicTransport {
    config: Arc<QuicConfig>,
    client: quinn::ClientConfig,
    server_config: quinn::ServerConfig,
    /// The revocation list the server's open connections are re-checked against, if any.
    revocation: Option<mooncake_tls::Revocation>,
    pools: Mutex<HashMap<String, Arc<PeerPool>>>,
    server: Mutex<Option<(JoinHandle<()>, quinn::Endpoint)>>,
    closed: AtomicBool,
}

/// Largest [`QuicConfig::max_udp_payload`]: quinn hands the kernel up to 10 packets per
/// segmentation-offload (GSO) call and one call carries at most 64 KiB, so larger packets are
/// lost whole batches at a time.
pub const MAX_UDP_PAYLOAD: u16 = 6500;

/// One request on the wire: an op, or a piece of a split one.
struct Piece {
    op: Op,
    addr: u64,
    local: mooncake_core::MemRegion,
    notify: bool,
}

/// Most requests sent back to back on one stream.
const STREAM_REQUESTS: usize = 64;
/// Most payload bytes of the requests sent back to back on one stream.
const STREAM_BYTES: u64 = 1 << 20;

/// The streams to carry `pieces` on one connection: each large piece alone, small ones (a
/// refused payload of which the target skips) back to back, a few dozen per stream, so a batch
/// of small requests costs a few streams rather than one each.
fn streams(pieces: Vec<(usize, Piece)>) -> Vec<Vec<(usize, Piece)>> {
    let mut out: Vec<Vec<(usize, Piece)>> = Vec::new();
    let mut group: Vec<(usize, Piece)> = Vec::new();
    let mut bytes = 0;
    for (pos, piece) in pieces {
        let len = piece.local.len();
        if len > server::MAX_DISCARD {
            out.push(vec![(pos, piece)]);
            continue;
        }
        if group.len() == STREAM_REQUESTS || bytes + len > STREAM_BYTES {
            out.push(std::mem::take(&mut group));
            bytes = 0;
        }
        bytes += len;
        group.push((pos, piece));
    }
    if !group.is_empty() {
        out.push(group);
    }
    out
}

/// Smallest piece a large request is split into.
const MIN_PART: u64 = 256 * 1024;

impl QuicTransport {
    /// A transport with `config` (validated; the identity is parsed and checked here).
    pub fn new(config: QuicConfig) -> Result<Arc<Self>> {
        config.validate()?;
        let tls = tls::build(&config.identity)?;
        let revocation = tls.revocation.clone();
        let transport = config.transport()?;
        let crypto_error =
            |e: &dyn std::fmt::Display| Error::InvalidArgument(format!("quic tls config: {e}"));
        let mut client = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(tls.client).map_err(|e| crypto_error(&e))?,
        ));
        client.transport_config(transport.clone());
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(tls.server).map_err(|e| crypto_error(&e))?,
        ));
        server_config
            .transport_config(transport)
            .max_incoming(config.max_incoming);
        Ok(Arc::new(QuicTransport {
            config: Arc::new(config),
            client,
            server_config,
            revocation,
            pools: Mutex::new(HashMap::new()),
            server: Mutex::new(None),
            closed: AtomicBool::new(false),
        }))
    }

    /// The configuration.
    pub fn config(&self) -> &QuicConfig {
        &self.config
    }

    fn pool(&self, address: &str) -> Arc<PeerPool> {
        let mut pools = self.pools.lock().expect("pools");
        pools
            .entry(address.to_owned())
            .or_insert_with(|| PeerPool::new(address.to_owned(), self.config.connections_per_peer))
            .clone()
    }

    /// One request (the handshake's DESCRIBE) on connection `conn` of `pool`.
    async fn piece(
        &self,
        pool: &PeerPool,
        conn: usize,
        op: Op,
        addr: u64,
        local: Option<&mooncake_core::MemRegion>,
        notify: bool,
    ) -> Result<Vec<u8>> {
        let c = pool.connection(conn, &self.config, &self.client).await?;
        client::request(&c, pool.address(), op, addr, local, notify).await
    }
}

#[async_trait]
impl Transport for QuicTransport {
    fn protocol(&self) -> &'static str {
        "quic"
    }

    async fn serve(&self, segment: Arc<LocalSegment>) -> Result<Endpoint> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        let endpoint = self
            .config
            .endpoint(self.config.bind, Some(self.server_config.clone()))
            .map_err(|e| Error::Io(format!("binding QUIC on {}: {e}", self.config.bind)))?;
        let local = endpoint.local_addr()?;
        let host = match &self.config.advertise_host {
            Some(h) => h.clone(),
            None if local.is_ipv6() => format!("[{}]", local.ip()),
            None => local.ip().to_string(),
        };
        let task = tokio::spawn(server::accept_loop(
            endpoint.clone(),
            segment,
            self.config.clone(),
            self.revocation.clone(),
        ));
        if let Some((old, old_endpoint)) = self
            .server
            .lock()
            .expect("server slot")
            .replace((task, endpoint))
        {
            old.abort();
            old_endpoint.close(VarInt::from_u32(server::code::SHUTDOWN), b"replaced");
        }
        Ok(Endpoint {
            protocol: "quic".into(),
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
        let Some(endpoint) = target.endpoint("quic") else {
            return fail_all(
                ops,
                Error::NoTransport {
                    segment: target.name.clone(),
                    offered: "no quic endpoint".into(),
                },
            );
        };
        let pool = self.pool(&endpoint.address);
        let n = pool.len();
        let start = pool.rotate();
        let mut load = vec![0u64; n];
        // What each connection carries: (op position, piece) with the piece's target address
        // and local memory.
        let mut per_conn: Vec<Vec<(usize, Piece)>> = (0..n).map(|_| Vec::new()).collect();
        // Per op: pieces outstanding and the first error.
        let mut remaining = Vec::with_capacity(ops.len());
        let mut failed: Vec<Option<Error>> = vec![None; ops.len()];
        for (pos, op) in ops.iter().enumerate() {
            let code = match op.opcode {
                OpCode::Read => Op::Read,
                OpCode::Write => Op::Write,
            };
            let len = op.local.len();
            // Least-loaded connection, ties to the rotating start.
            let least = (0..n)
                .map(|k| (start + k) % n)
                .min_by_key(|&k| load[k])
                .expect("at least one connection");
            let mut piece = |conn: usize, offset: u64, len: u64| {
                load[conn] += len.max(1);
                per_conn[conn].push((
                    pos,
                    Piece {
                        op: code,
                        addr: op.target_addr + offset,
                        local: op.local.slice(offset, len).expect("within the op"),
                        notify: op.notify,
                    },
                ));
            };
            if n > 1 && len >= self.config.split_threshold.max(2 * MIN_PART) {
                let parts = (n as u64).min(len / MIN_PART);
                let part_len = (len / parts) & !4095;
                let mut offset = 0;
                for k in 0..parts {
                    let this = if k + 1 == parts {
                        len - offset
                    } else {
                        part_len
                    };
                    piece((start + k as usize) % n, offset, this);
                    offset += this;
                }
                remaining.push(parts as usize);
            } else {
                piece(least, 0, len);
                remaining.push(1);
            }
        }
        // One task per connection used, so the connections' copies run on every core; each
        // reports every piece as it finishes.
        let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = tokio::task::JoinSet::new();
        for (conn, pieces) in per_conn.into_iter().enumerate() {
            if pieces.is_empty() {
                continue;
            }
            let pool = pool.clone();
            let config = self.config.clone();
            let client = self.client.clone();
            let done_tx = done_tx.clone();
            tasks.spawn(async move {
                let connection = match pool.connection(conn, &config, &client).await {
                    Ok(c) => c,
                    Err(e) => {
                        for (pos, piece) in pieces {
                            drop(piece);
                            let _ = done_tx.send((pos, Err(e.clone())));
                        }
                        return;
                    }
                };
                let connection = &connection;
                let pool = &pool;
                let mut running: FuturesUnordered<_> = streams(pieces)
                    .into_iter()
                    .map(|group| async move {
                        let reqs: Vec<client::Req<'_>> = group
                            .iter()
                            .map(|(_, p)| client::Req {
                                op: p.op,
                                addr: p.addr,
                                local: Some(&p.local),
                                notify: p.notify,
                            })
                            .collect();
                        let results = client::requests(connection, pool.address(), &reqs).await;
                        drop(reqs);
                        let positions: Vec<usize> = group.into_iter().map(|(pos, _)| pos).collect();
                        positions
                            .into_iter()
                            .zip(results)
                            .map(|(pos, r)| (pos, r.map(drop)))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                while let Some(results) = running.next().await {
                    for result in results {
                        let _ = done_tx.send(result);
                    }
                }
            });
        }
        drop(done_tx);
        let mut outstanding = ops.len();
        // Returns whether the op is now complete.
        let mut finish = |pos: usize, result: Result<()>, ops: &[TransferOp]| {
            if let Err(e) = result {
                failed[pos].get_or_insert(e);
            }
            remaining[pos] -= 1;
            if remaining[pos] == 0 {
                // `ops` still holds the op's memory: whoever waits for it to be released sees
                // the op finished first.
                let result = failed[pos].take().map_or(Ok(()), Err);
                batch.complete(ops[pos].index, result);
                return true;
            }
            false
        };
        let deadline = tokio::time::sleep(self.config.request_timeout);
        tokio::pin!(deadline);
        while outstanding > 0 {
            tokio::select! {
                next = done.recv() => match next {
                    Some((pos, result)) => {
                        if finish(pos, result, &ops) {
                            outstanding -= 1;
                        }
                    }
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        // Stop whatever still runs (its streams are reset) and wait until it let go of the
        // memory; what finished meanwhile still counts.
        tasks.shutdown().await;
        while let Ok((pos, result)) = done.try_recv() {
            finish(pos, result, &ops);
        }
        let timeout = Error::Timeout(self.config.request_timeout);
        for (pos, left) in remaining.iter().enumerate() {
            if *left > 0 {
                batch.complete(ops[pos].index, Err(timeout.clone()));
            }
        }
    }

    async fn handshake(&self, address: &str) -> Result<SegmentDesc> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        client::split_address(address)?;
        let pool = self.pool(address);
        let conn = pool.rotate();
        let bytes = tokio::time::timeout(
            self.config.request_timeout,
            self.piece(&pool, conn, Op::Describe, 0, None, false),
        )
        .await
        .map_err(|_| Error::Timeout(self.config.request_timeout))??;
        SegmentDesc::decode(&bytes)
    }

    async fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        let server = self.server.lock().expect("server slot").take();
        if let Some((task, endpoint)) = server {
            endpoint.close(VarInt::from_u32(server::code::SHUTDOWN), b"shutdown");
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
            p.close(server::code::SHUTDOWN, b"shutdown").await;
        }
    }
}
