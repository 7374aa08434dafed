//! A small RPC layer: length-prefixed, versioned postcard frames over TCP.
//!
//! Performance-critical: every master call goes through `RpcClient::call` and `serve_connection`.
//!
//! ```text
//! frame: len u32 (bytes after this field) | version u8 | kind u8 | call id u64 | postcard body
//! ```
//!
//! A client multiplexes concurrent calls over one connection; the server answers each connection's
//! calls in order and coalesces responses into one write while more requests are buffered. Frames
//! are bounded ([`MAX_FRAME`]); an oversized or undecodable frame closes that connection only. A
//! call that gets no answer within the client's timeout fails with `RPC_TIMEOUT`, a lost connection
//! fails its calls with `RPC_FAIL`, and the next call reconnects.
//!
//! What a client of a server can hold ([`ServeLimits`]): a body is read as it arrives, so memory
//! follows the bytes received, not the length a header announces; a frame, once begun, must
//! arrive whole within a timeout, as must a connection's first frame; connections are capped per
//! listener and per peer address. An idle connection that has spoken costs one small buffer and
//! is kept (clients hold their connection for their lifetime), within those caps.
//!
//! # Mutual TLS
//!
//! A server started with a [`TlsAcceptor`] ([`serve_tls`]) runs a TLS 1.3 handshake (ALPN
//! [`RPC_ALPN`]) on every connection before reading a frame: the peer must present a
//! certificate of the cluster CA, the handshake counts against the first-frame timeout and the
//! connection caps, and the handler learns the verified [`PeerIdentity`] with each request
//! ([`Handler::handle_from`]) to authorize it. A client that speaks plain frames to such a server
//! is answered with one refusal frame (kind 3, a text body) saying that the server requires TLS,
//! and its calls fail with `ILLEGAL_CLIENT`. Clients connect over TLS with
//! [`RpcClient::with_tls`]. Without TLS nothing changes on the wire.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use mooncake_core::admission::Admission;
use mooncake_core::{Error, ErrorCode, Result};
use mooncake_tls::{PeerIdentity, TlsAcceptor, TlsConnector, TlsIdentity};

/// The ALPN protocol name of the RPC over TLS: a connection meant for another listener of the
/// cluster (Raft, transfers) cannot be replayed at an RPC port.
pub const RPC_ALPN: &[u8] = b"mooncake-rpc/1";

/// Protocol version in every frame.
pub const RPC_VERSION: u8 = 1;
/// Largest frame either side accepts (64 MiB: a batch of many thousands of keys).
pub const MAX_FRAME: usize = 64 << 20;
const HEADER: usize = 4 + 1 + 1 + 8;
const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;
/// A TLS server's answer to a peer that spoke plain frames: the body (a postcard string) says
/// why, and the server closes the connection.
const KIND_REFUSED: u8 = 3;

/// Encodes one frame into `out`.
fn encode_frame<T: Serialize>(kind: u8, id: u64, body: &T, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    let out2 = std::mem::take(out);
    let mut out2 = postcard::to_extend(body, out2)?;
    let len = out2.len() - start - 4;
    if len + 4 > MAX_FRAME {
        out2.truncate(start);
        *out = out2;
        return Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            format!("message of {len} bytes exceeds the {MAX_FRAME}-byte frame limit"),
        ));
    }
    out2[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out2[start + 4] = RPC_VERSION;
    out2[start + 5] = kind;
    out2[start + 6..start + 14].copy_from_slice(&id.to_le_bytes());
    *out = out2;
    Ok(())
}

/// A frame header: kind, call id and body length.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Request or response.
    pub kind: u8,
    /// Call id.
    pub id: u64,
    /// Body length.
    pub body_len: usize,
}

/// Decodes a frame header (its first 14 bytes), checking version and bounds.
pub fn decode_header(h: &[u8; 14]) -> Result<FrameHeader> {
    let len = u32::from_le_bytes(h[..4].try_into().expect("4 bytes")) as usize;
    if !(HEADER - 4..=MAX_FRAME).contains(&len) {
        return Err(Error::Protocol(format!("frame length {len} out of bounds")));
    }
    if h[4] != RPC_VERSION {
        return Err(Error::Protocol(format!(
            "rpc version {} (this side speaks {RPC_VERSION})",
            h[4]
        )));
    }
    if !matches!(h[5], KIND_REQUEST | KIND_RESPONSE | KIND_REFUSED) {
        return Err(Error::Protocol(format!("unknown frame kind {}", h[5])));
    }
    Ok(FrameHeader {
        kind: h[5],
        id: u64::from_le_bytes(h[6..14].try_into().expect("8 bytes")),
        body_len: len - (HEADER - 4),
    })
}

/// A body buffer that grew past this is given back after its frame.
const KEEP_BODY: usize = 256 * 1024;

/// Reads one frame into `body`. Waits for its first byte as long as it takes (an idle
/// connection); from then on, when `within` is set, the whole frame must arrive within it. The
/// body grows as bytes arrive, never to the announced length ahead of them.
async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut tokio::io::BufReader<R>,
    body: &mut Vec<u8>,
    within: Option<Duration>,
) -> Result<FrameHeader> {
    use tokio::io::AsyncBufReadExt;
    if r.fill_buf().await?.is_empty() {
        return Err(Error::Io("connection closed".into()));
    }
    let rest = async {
        let mut h = [0u8; HEADER];
        r.read_exact(&mut h).await?;
        let header = decode_header(&h)?;
        body.clear();
        if body.capacity() > KEEP_BODY {
            body.shrink_to(KEEP_BODY);
        }
        let got = (&mut *r)
            .take(header.body_len as u64)
            .read_to_end(body)
            .await?;
        if got != header.body_len {
            return Err(Error::Io(format!(
                "connection closed {got} bytes into a {}-byte body",
                header.body_len
            )));
        }
        Ok(header)
    };
    match within {
        None => rest.await,
        Some(t) => tokio::time::timeout(t, rest)
            .await
            .map_err(|_| Error::Protocol(format!("a frame did not arrive whole within {t:?}")))?,
    }
}

/// Who sent a request: the peer's address, and over TLS what its verified certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The peer's address.
    pub addr: SocketAddr,
    /// The peer's verified identity: `Some` on a server started with TLS (every request of a
    /// TLS connection carries it), `None` on a plain one.
    pub identity: Option<Arc<PeerIdentity>>,
}

impl Caller {
    /// A name for logs: the certificate's name and the address, or the address alone.
    pub fn describe(&self) -> String {
        match &self.identity {
            Some(id) => format!("{} ({})", id.name(), self.addr),
            None => self.addr.to_string(),
        }
    }
}

/// What a server does with requests.
#[async_trait::async_trait]
pub trait Handler<Req: Send + 'static, Resp: Send + 'static>: Send + Sync + 'static {
    /// Answers one request.
    async fn handle(&self, request: Req) -> Resp;

    /// Answers one request of `caller`; the server calls this one. A handler that authorizes
    /// requests by who sent them overrides it; the default answers with [`Handler::handle`].
    async fn handle_from(&self, caller: &Caller, request: Req) -> Resp {
        let _ = caller;
        self.handle(request).await
    }
}

/// Refusal log lines of one listener, at most one a second (shared with the other listeners).
pub use mooncake_core::admission::RefusalLog;

/// What the clients of one listener may hold (see the module docs).
#[derive(Clone, Debug)]
pub struct ServeLimits {
    /// Connections open at once; more are closed as they are accepted. Default 4096.
    pub max_connections: usize,
    /// Connections open at once from one IP address. Default 512.
    pub max_per_address: usize,
    /// A connection's first frame must arrive whole within this of the connection. Default 10 s.
    pub first_frame_timeout: Duration,
    /// Any later frame must arrive whole within this of its first byte. Default 10 s.
    pub frame_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            max_connections: 4096,
            max_per_address: 512,
            first_frame_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(10),
        }
    }
}

/// Serves `handler` on `listener` with the default [`ServeLimits`] until the returned task is
/// aborted.
pub fn serve<Req, Resp, H>(listener: TcpListener, handler: Arc<H>) -> tokio::task::JoinHandle<()>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Handler<Req, Resp>,
{
    serve_with(listener, handler, ServeLimits::default())
}

/// Serves `handler` on `listener` within `limits` until the returned task is aborted.
pub fn serve_with<Req, Resp, H>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: ServeLimits,
) -> tokio::task::JoinHandle<()>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Handler<Req, Resp>,
{
    serve_tls(listener, handler, limits, None)
}

/// [`serve_with`], over mutual TLS when `tls` is given (see the module docs): every connection
/// must complete a handshake with a certificate of the acceptor's CA within
/// `limits.first_frame_timeout` (which also bounds the first frame after it), and the handler
/// learns the peer's identity with each request. Refused peers are logged (at most once a
/// second) with their address and the reason.
pub fn serve_tls<Req, Resp, H>(
    listener: TcpListener,
    handler: Arc<H>,
    limits: ServeLimits,
    tls: Option<TlsAcceptor>,
) -> tokio::task::JoinHandle<()>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Handler<Req, Resp>,
{
    let admission = Admission::new("rpc", limits.max_connections, limits.max_per_address);
    let refusals = Arc::new(RefusalLog::new());
    let tls = tls.map(|a| a.with_timeout(limits.first_frame_timeout));
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(admitted) = admission.admit(peer.ip()) else {
                            drop(stream);
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let handler = handler.clone();
                        let limits = limits.clone();
                        let tls = tls.clone();
                        let refusals = refusals.clone();
                        conns.spawn(async move {
                            let _admitted = admitted;
                            let served = match tls {
                                None => {
                                    let caller = Caller { addr: peer, identity: None };
                                    let (r, w) = stream.into_split();
                                    serve_connection::<Req, Resp, H, _, _>(
                                        r,
                                        w,
                                        caller,
                                        handler,
                                        &limits,
                                        limits.first_frame_timeout,
                                        None,
                                    )
                                    .await
                                }
                                Some(acceptor) => {
                                    serve_secure_connection::<Req, Resp, H>(
                                        stream, peer, &acceptor, handler, &limits,
                                    )
                                    .await
                                }
                            };
                            if let Err(e) = served {
                                match &e {
                                    Error::Io(_) => tracing::debug!(%peer, "rpc connection ended: {e}"),
                                    Error::PermissionDenied(why) => {
                                        refusals.refused("rpc", &peer.to_string(), why)
                                    }
                                    _ => tracing::warn!(%peer, "closing rpc connection: {e}"),
                                }
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!("rpc accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}

/// The first byte of a TLS ClientHello (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a TLS server tells a peer that speaks plain frames to it.
const PLAIN_REFUSAL: &str = "this server requires mutual TLS: connect with a certificate of \
                             the cluster CA (set MC_TLS_CA, MC_TLS_CERT and MC_TLS_KEY, or the \
                             --tls_ca, --tls_cert and --tls_key flags)";

/// Runs the TLS handshake on one connection, then serves it. A peer that speaks plain frames is
/// sent a refusal frame; one whose handshake fails (no certificate, another CA's, an expired
/// one, a timeout) is closed. Either way the error says why, for the log.
async fn serve_secure_connection<Req, Resp, H>(
    mut stream: TcpStream,
    peer: SocketAddr,
    acceptor: &TlsAcceptor,
    handler: Arc<H>,
    limits: &ServeLimits,
) -> Result<()>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Handler<Req, Resp>,
{
    let started = tokio::time::Instant::now();
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(limits.first_frame_timeout, stream.peek(&mut first))
        .await
        .map_err(|_| {
            Error::PermissionDenied(format!(
                "no TLS handshake within {:?} of connecting",
                limits.first_frame_timeout
            ))
        })??;
    if peeked == 0 {
        return Err(Error::Io("connection closed before the handshake".into()));
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        refuse_plain(&mut stream).await;
        return Err(Error::PermissionDenied(
            "it spoke plain RPC to a server that requires mutual TLS".into(),
        ));
    }
    let (tls, identity) = acceptor.accept(stream).await?;
    let (r, w) = tokio::io::split(tls);
    let caller = Caller {
        addr: peer,
        identity: Some(Arc::new(identity)),
    };
    let left = limits.first_frame_timeout.saturating_sub(started.elapsed());
    serve_connection::<Req, Resp, H, _, _>(r, w, caller, handler, limits, left, Some(acceptor))
        .await
}

/// Sends a plain peer the refusal frame, then reads (a bounded amount of) what it still sends
/// for a moment, so that closing does not reset the connection before it read the refusal.
async fn refuse_plain(stream: &mut TcpStream) {
    let mut frame = Vec::new();
    if encode_frame(KIND_REFUSED, 0, &PLAIN_REFUSAL, &mut frame).is_err() {
        return;
    }
    let sent = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&frame).await?;
        stream.shutdown().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let (mut buf, mut left) = ([0u8; 4096], 1usize << 20);
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            left = left.saturating_sub(n);
            if left == 0 {
                break;
            }
        }
    })
    .await;
}

/// Most requests of one connection whose handlers are still running; the connection reads no
/// further request until one finishes.
const MAX_IN_FLIGHT: usize = 1024;

/// Serves one connection. A request whose handler answers at once (a read, the in-memory log) is
/// answered in line, replies batched while more requests are buffered; one that has to wait (a
/// Raft commit) runs as its own task, so the requests behind it on the same connection are not
/// held up, and its reply goes out when ready: replies carry their request's id, in any order.
/// Over TLS, `acceptor` re-checks the peer's certificate against the revocation list before
/// each request, so a certificate revoked while its connection is open is cut off at its next
/// request.
async fn serve_connection<Req, Resp, H, R, W>(
    r: R,
    w: W,
    caller: Caller,
    handler: Arc<H>,
    limits: &ServeLimits,
    first_frame_within: Duration,
    acceptor: Option<&TlsAcceptor>,
) -> Result<()>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Handler<Req, Resp>,
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let w = Arc::new(tokio::sync::Mutex::new(w));
    let caller = Arc::new(caller);
    // Small buffers for connections that stay idle; they grow with what a busy one sends.
    let mut r = tokio::io::BufReader::with_capacity(16 * 1024, r);
    let mut body = Vec::new();
    let mut out = Vec::new();
    let mut waiting = tokio::task::JoinSet::new();
    // The first frame, from the moment of the connection.
    let first = tokio::time::timeout(first_frame_within, read_frame(&mut r, &mut body, None))
        .await
        .map_err(|_| {
            Error::Protocol(format!(
                "no whole request within {:?} of connecting",
                limits.first_frame_timeout
            ))
        })??;
    let mut pending = Some(first);
    let mut list_seen = 0;
    loop {
        while waiting.try_join_next().is_some() {}
        if waiting.len() >= MAX_IN_FLIGHT {
            waiting.join_next().await;
        }
        let header = match pending.take() {
            Some(h) => h,
            None => read_frame(&mut r, &mut body, Some(limits.frame_timeout)).await?,
        };
        if header.kind != KIND_REQUEST {
            return Err(Error::Protocol("a response sent to the server".into()));
        }
        if let (Some(acceptor), Some(identity)) = (acceptor, &caller.identity) {
            acceptor.recheck(identity, &mut list_seen)?;
        }
        let request: Req = postcard::from_bytes(&body)
            .map_err(|e| Error::Protocol(format!("undecodable request: {e}")))?;
        let (h, caller) = (handler.clone(), caller.clone());
        let mut answer = Box::pin(async move { h.handle_from(&caller, request).await });
        let polled = {
            let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
            std::future::Future::poll(answer.as_mut(), &mut cx)
        };
        match polled {
            std::task::Poll::Ready(response) => {
                encode_frame(KIND_RESPONSE, header.id, &response, &mut out)?;
            }
            std::task::Poll::Pending => {
                // Polled again by its own task, which registers a real waker.
                let (w, id) = (w.clone(), header.id);
                waiting.spawn(async move {
                    let response = answer.await;
                    let mut frame = Vec::new();
                    match encode_frame(KIND_RESPONSE, id, &response, &mut frame) {
                        Ok(()) => {
                            let mut w = w.lock().await;
                            if w.write_all(&frame).await.is_ok() {
                                let _ = w.flush().await;
                            }
                        }
                        Err(e) => tracing::warn!("rpc reply not encodable: {e}"),
                    }
                });
            }
        }
        // Answer now unless another request is already buffered (then answer both at once).
        if !out.is_empty() && (r.buffer().len() < HEADER || out.len() > 256 * 1024) {
            let mut w = w.lock().await;
            w.write_all(&out).await?;
            // Nothing for a TCP socket; sends what a TLS stream still holds.
            w.flush().await?;
            out.clear();
        }
    }
}

type Waiters = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Vec<u8>>>>>>;

/// The sending half of a client's connection.
enum Writer {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<mooncake_tls::tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Writer {
    /// Writes the whole frame and sends it.
    async fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Plain(w) => w.write_all(frame).await,
            Writer::Tls(w) => {
                w.write_all(frame).await?;
                w.flush().await
            }
        }
    }

    /// Writes what the connection takes now without waiting; `WouldBlock` when it takes
    /// nothing. Over TLS the bytes taken may still need a [`Writer::send`] of nothing (a flush)
    /// to leave: `Ok((n, flushed))`.
    fn try_write_now(&mut self, frame: &[u8]) -> std::io::Result<(usize, bool)> {
        match self {
            Writer::Plain(w) => w.try_write(frame).map(|n| (n, true)),
            Writer::Tls(w) => {
                use std::task::Poll;
                let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
                let mut w = std::pin::Pin::new(w);
                match w.as_mut().poll_write(&mut cx, frame) {
                    Poll::Ready(Ok(n)) => {
                        let flushed = matches!(w.poll_flush(&mut cx), Poll::Ready(Ok(())));
                        Ok((n, flushed))
                    }
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Pending => Err(std::io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }
}

struct Connection {
    writer: Arc<tokio::sync::Mutex<Writer>>,
    waiters: Waiters,
    dead: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Removes a call's waiter from its connection when the call ends.
struct Unwait<'a> {
    waiters: &'a Waiters,
    id: u64,
}

impl Drop for Unwait<'_> {
    fn drop(&mut self) {
        self.waiters.lock().expect("waiters").remove(&self.id);
    }
}

/// Client settings.
#[derive(Clone, Debug)]
pub struct RpcClientConfig {
    /// Bound on one call from send to answer. Default 5 s.
    pub call_timeout: Duration,
    /// Bound on connecting. Default 2 s.
    pub connect_timeout: Duration,
}

impl Default for RpcClientConfig {
    fn default() -> Self {
        RpcClientConfig {
            call_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// A client for one server address; reconnects on the next call after a failure.
pub struct RpcClient {
    address: String,
    config: RpcClientConfig,
    /// Connects over mutual TLS when set.
    tls: Option<TlsConnector>,
    conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    next_id: AtomicU64,
    /// Id of the current connection (0 before the first): see [`RpcClient::connection_id`].
    conn_id: AtomicU64,
}

/// Connection ids, unique within the process.
static CONNECTIONS: AtomicU64 = AtomicU64::new(1);

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RpcClient({})", self.address)
    }
}

impl RpcClient {
    /// A client for `address` (`host:port`); connects lazily.
    pub fn new(address: impl Into<String>, config: RpcClientConfig) -> Self {
        Self::with_tls(address, config, None)
    }

    /// A client for `address` that connects over mutual TLS with `tls` when given (the
    /// server's certificate must name the host of `address`), like [`RpcClient::new`] without.
    pub fn with_tls(
        address: impl Into<String>,
        config: RpcClientConfig,
        tls: Option<TlsConnector>,
    ) -> Self {
        RpcClient {
            address: address.into(),
            config,
            tls,
            conn: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            conn_id: AtomicU64::new(0),
        }
    }

    /// The server address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The id of the connection calls go out on, unique within the process and changed by every
    /// reconnect: two answers read under the same id came from one server process, over one
    /// connection, in order. 0 before the first connection.
    pub fn connection_id(&self) -> u64 {
        self.conn_id.load(Ordering::Acquire)
    }

    async fn connection(&self) -> Result<Arc<Connection>> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.dead.load(Ordering::Acquire) {
                return Ok(c.clone());
            }
        }
        let fail = |reason: String| {
            Error::with_code(ErrorCode::RPC_FAIL, format!("{}: {reason}", self.address))
        };
        let stream = tokio::time::timeout(
            self.config.connect_timeout,
            TcpStream::connect(&self.address),
        )
        .await
        .map_err(|_| fail("connect timed out".into()))?
        .map_err(|e| fail(format!("connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let waiters: Waiters = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        let (writer, reader) = match &self.tls {
            None => {
                let (r, w) = stream.into_split();
                let reader = tokio::spawn(read_responses(
                    r,
                    waiters.clone(),
                    dead.clone(),
                    self.address.clone(),
                ));
                (Writer::Plain(w), reader)
            }
            Some(tls) => {
                let host = host_of(&self.address);
                let (stream, _) =
                    tokio::time::timeout(self.config.connect_timeout, tls.connect(stream, host))
                        .await
                        .map_err(|_| fail("TLS handshake timed out".into()))?
                        .map_err(|e| fail(handshake_failure(&e)))?;
                let (r, w) = tokio::io::split(stream);
                let reader = tokio::spawn(read_responses(
                    r,
                    waiters.clone(),
                    dead.clone(),
                    self.address.clone(),
                ));
                (Writer::Tls(w), reader)
            }
        };
        let conn = Arc::new(Connection {
            writer: Arc::new(tokio::sync::Mutex::new(writer)),
            waiters,
            dead,
            reader,
        });
        *slot = Some(conn.clone());
        self.conn_id.store(
            CONNECTIONS.fetch_add(1, Ordering::Relaxed),
            Ordering::Release,
        );
        Ok(conn)
    }

    /// Writes `request` on the current connection now, from synchronous code, and does not wait
    /// for its answer (which is discarded). For notices that must not wait for a task to be
    /// scheduled. Returns false, having sent nothing, when there is no live connection, a call
    /// is writing on it, or its socket takes none of the frame; a frame the socket takes only in
    /// part is finished by a task that holds the connection's writer meanwhile.
    pub fn try_send_now<Req: Serialize>(&self, request: &Req) -> bool {
        let conn = match self.conn.try_lock() {
            Ok(slot) => match slot.as_ref() {
                Some(c) if !c.dead.load(Ordering::Acquire) => c.clone(),
                _ => return false,
            },
            Err(_) => return false,
        };
        let Ok(mut writer) = conn.writer.clone().try_lock_owned() else {
            return false;
        };
        let mut frame = Vec::new();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if encode_frame(KIND_REQUEST, id, request, &mut frame).is_err() {
            return false;
        }
        match writer.try_write_now(&frame) {
            Ok((n, true)) if n == frame.len() => true,
            Ok((0, _)) => false,
            Ok((n, _)) => match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    // The rest of the frame (or, over TLS, what is still buffered) is sent by a
                    // task that holds the writer meanwhile, so later calls queue behind it.
                    let dead = conn.dead.clone();
                    rt.spawn(async move {
                        let mut writer = writer;
                        if writer.send(&frame[n..]).await.is_err() {
                            dead.store(true, Ordering::Release);
                        }
                    });
                    true
                }
                Err(_) => {
                    // Half a frame on the stream and no way to finish it: drop the connection.
                    conn.dead.store(true, Ordering::Release);
                    false
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(_) => {
                conn.dead.store(true, Ordering::Release);
                false
            }
        }
    }

    /// Sends `request` and waits for the response, within the call timeout.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        request: &Req,
    ) -> Result<Resp> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        encode_frame(KIND_REQUEST, id, request, &mut frame)?;
        let work = async {
            // The waiter goes in under the waiters' lock only while the connection is alive:
            // the reader marks it dead and fails the waiters under that lock, so a waiter added
            // once it has died would wait for nothing until the call timed out. A connection
            // found dead there was not used: take a new one (nothing was sent).
            let (tx, rx) = oneshot::channel();
            let mut tx = Some(tx);
            let mut conn = None;
            for _ in 0..2 {
                let c = self.connection().await?;
                let mut waiters = c.waiters.lock().expect("waiters");
                if !c.dead.load(Ordering::Acquire) {
                    waiters.insert(id, tx.take().expect("one waiter"));
                    drop(waiters);
                    conn = Some(c);
                    break;
                }
            }
            let Some(conn) = conn else {
                return Err(Error::with_code(
                    ErrorCode::RPC_FAIL,
                    format!("{}: connection lost", self.address),
                ));
            };
            // However this call ends (an answer, a timeout, its caller giving up on it), its
            // waiter leaves the connection: a call dropped while a server sits on it (one that
            // is paused, say) leaves nothing behind.
            let _unwait = Unwait {
                waiters: &conn.waiters,
                id,
            };
            let sent = conn.writer.lock().await.send(&frame).await;
            if let Err(e) = sent {
                conn.dead.store(true, Ordering::Release);
                return Err(Error::with_code(
                    ErrorCode::RPC_FAIL,
                    format!("{}: send: {e}", self.address),
                ));
            }
            let body = rx.await.map_err(|_| {
                Error::with_code(
                    ErrorCode::RPC_FAIL,
                    format!("{}: connection lost", self.address),
                )
            })??;
            postcard::from_bytes(&body).map_err(|e| {
                Error::with_code(ErrorCode::RPC_FAIL, format!("undecodable response: {e}"))
            })
        };
        match tokio::time::timeout(self.config.call_timeout, work).await {
            Ok(r) => r,
            // The waiter left with the dropped call (see `Unwait`).
            Err(_) => Err(Error::with_code(
                ErrorCode::RPC_TIMEOUT,
                format!(
                    "{}: no answer within {:?}",
                    self.address, self.config.call_timeout
                ),
            )),
        }
    }

    /// Drops the connection (the next call reconnects).
    pub async fn disconnect(&self) {
        self.conn.lock().await.take();
    }
}

/// Why a client's handshake failed, with a hint when the server closed the connection during
/// it (what a server without TLS does with a handshake).
fn handshake_failure(e: &Error) -> String {
    let e = e.to_string();
    if e.contains("eof") {
        format!(
            "{e}: the server closed the connection during the TLS handshake (is it running \
             without TLS?)"
        )
    } else {
        e
    }
}

/// The host part of `host:port` (`[v6]:port` gives `[v6]`, which the TLS connector reads).
fn host_of(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(h, _)| h)
}

async fn read_responses<R: AsyncRead + Unpin>(
    r: R,
    waiters: Waiters,
    dead: Arc<AtomicBool>,
    address: String,
) {
    let mut r = tokio::io::BufReader::with_capacity(64 * 1024, r);
    let mut body = Vec::new();
    let reason = loop {
        match read_frame(&mut r, &mut body, None).await {
            Ok(h) if h.kind == KIND_RESPONSE => {
                let waiter = waiters.lock().expect("waiters").remove(&h.id);
                if let Some(tx) = waiter {
                    let _ = tx.send(Ok(std::mem::take(&mut body)));
                }
            }
            Ok(h) if h.kind == KIND_REFUSED => {
                let why: String = postcard::from_bytes(&body)
                    .unwrap_or_else(|_| "the server refused this connection".into());
                break Error::PermissionDenied(why);
            }
            Ok(_) => break Error::Protocol("server sent a request".into()),
            Err(e) => break e,
        }
    };
    // Marked dead under the waiters' lock: a call adds its waiter under it only to a live
    // connection, so every waiter added is failed here.
    let drained: Vec<_> = {
        let mut w = waiters.lock().expect("waiters");
        dead.store(true, Ordering::Release);
        w.drain().collect()
    };
    let err = match reason {
        Error::PermissionDenied(why) => Error::PermissionDenied(format!("{address}: {why}")),
        reason => Error::with_code(
            ErrorCode::RPC_FAIL,
            format!("{address}: connection lost: {reason}"),
        ),
    };
    for (_, tx) in drained {
        let _ = tx.send(Err(err.clone()));
    }
}

/// The acceptor of an RPC server of a node with `identity` (ALPN [`RPC_ALPN`]).
pub fn tls_acceptor(identity: &TlsIdentity) -> Result<TlsAcceptor> {
    TlsAcceptor::new(identity, RPC_ALPN)
}

/// The connector of an RPC client of a node with `identity` (ALPN [`RPC_ALPN`]).
pub fn tls_connector(identity: &TlsIdentity) -> Result<TlsConnector> {
    TlsConnector::new(identity, RPC_ALPN)
}

/// Binds a listener, with a clear error naming the address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Io(format!("binding {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    #[async_trait::async_trait]
    impl Handler<(u32, String), Option<String>> for Echo {
        async fn handle(&self, (n, s): (u32, String)) -> Option<String> {
            if n == 7 {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Some(s.repeat(n as usize))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_pipeline_time_out_and_reconnect() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = serve(listener, Arc::new(Echo));
        let client = Arc::new(RpcClient::new(
            addr.to_string(),
            RpcClientConfig {
                call_timeout: Duration::from_millis(500),
                ..Default::default()
            },
        ));
        let r: Option<String> = client.call(&(3u32, "ab".to_string())).await.unwrap();
        assert_eq!(r.as_deref(), Some("ababab"));
        let calls = (0..64u32).map(|i| {
            let c = client.clone();
            async move { c.call::<_, Option<String>>(&(i % 5, "x".to_string())).await }
        });
        for (i, r) in futures::future::join_all(calls)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(r.unwrap().unwrap().len(), i % 5);
        }
        let slow = client
            .call::<_, Option<String>>(&(7u32, "z".to_string()))
            .await;
        assert_eq!(slow.unwrap_err().code(), ErrorCode::RPC_TIMEOUT);

        server.abort();
        let _ = server.await;
        let down = client
            .call::<_, Option<String>>(&(1u32, "z".to_string()))
            .await;
        assert_eq!(down.unwrap_err().code(), ErrorCode::RPC_FAIL);

        let listener = bind(addr).await.unwrap();
        let server = serve(listener, Arc::new(Echo));
        let back: Option<String> = client.call(&(2u32, "q".to_string())).await.unwrap();
        assert_eq!(back.as_deref(), Some("qq"));
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_dropped_or_timed_out_leaves_no_waiter_behind() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = serve(listener, Arc::new(Echo));
        let client = RpcClient::new(
            addr.to_string(),
            RpcClientConfig {
                call_timeout: Duration::from_millis(300),
                ..Default::default()
            },
        );
        let waiting = || async {
            let slot = client.conn.lock().await;
            let n = slot.as_ref().unwrap().waiters.lock().unwrap().len();
            n
        };
        // Its caller gives up on it (the server sits on `7` for 3 s).
        let dropped = tokio::time::timeout(
            Duration::from_millis(100),
            client.call::<_, Option<String>>(&(7u32, "z".to_string())),
        )
        .await;
        assert!(dropped.is_err());
        assert_eq!(waiting().await, 0);
        // It times out.
        let slow = client
            .call::<_, Option<String>>(&(7u32, "z".to_string()))
            .await;
        assert_eq!(slow.unwrap_err().code(), ErrorCode::RPC_TIMEOUT);
        assert_eq!(waiting().await, 0);
        // It is answered.
        let r: Option<String> = client.call(&(2u32, "q".to_string())).await.unwrap();
        assert_eq!(r.as_deref(), Some("qq"));
        assert_eq!(waiting().await, 0);
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_request_does_not_hold_up_the_next_on_its_connection() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = serve(listener, Arc::new(Echo));
        let client = Arc::new(RpcClient::new(addr.to_string(), RpcClientConfig::default()));
        // Connect first, so both calls share one connection.
        let _: Option<String> = client.call(&(1u32, "a".to_string())).await.unwrap();
        let slow = {
            let c = client.clone();
            tokio::spawn(async move { c.call::<_, Option<String>>(&(7u32, "s".to_string())).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let fast: Option<String> = client.call(&(2u32, "f".to_string())).await.unwrap();
        assert_eq!(fast.as_deref(), Some("ff"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the fast call waited {:?} behind the slow one",
            started.elapsed()
        );
        assert!(!slow.is_finished());
        assert_eq!(slow.await.unwrap().unwrap().as_deref(), Some("sssssss"));
        server.abort();
    }

    /// Records what it is sent.
    struct Recorder(Mutex<Vec<String>>);

    #[async_trait::async_trait]
    impl Handler<(u32, String), Option<String>> for Recorder {
        async fn handle(&self, (_, s): (u32, String)) -> Option<String> {
            self.0.lock().unwrap().push(s.clone());
            Some(s)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn notices_go_out_at_once_on_a_live_connection_and_their_answers_are_dropped() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorder = Arc::new(Recorder(Mutex::new(Vec::new())));
        let server = serve(listener, recorder.clone());
        let client = RpcClient::new(addr.to_string(), RpcClientConfig::default());
        assert!(
            !client.try_send_now(&(1u32, "early".to_string())),
            "no connection yet: nothing sent"
        );
        let _: Option<String> = client.call(&(1u32, "first".to_string())).await.unwrap();
        for i in 0..100 {
            assert!(client.try_send_now(&(1u32, format!("n{i}"))));
        }
        // Calls after the notices still get their own answers, in order.
        let last: Option<String> = client.call(&(1u32, "last".to_string())).await.unwrap();
        assert_eq!(last.as_deref(), Some("last"));
        let seen = recorder.0.lock().unwrap().clone();
        let want: Vec<String> = std::iter::once("first".to_string())
            .chain((0..100).map(|i| format!("n{i}")))
            .chain(std::iter::once("last".to_string()))
            .collect();
        assert_eq!(seen, want);
        server.abort();
    }

    /// A request header announcing a `MAX_FRAME` body, and nothing of the body.
    fn announce_huge_body() -> Vec<u8> {
        let mut h = vec![0u8; HEADER];
        h[..4].copy_from_slice(&(MAX_FRAME as u32).to_le_bytes());
        h[4] = RPC_VERSION;
        h[5] = KIND_REQUEST;
        h
    }

    /// Whether the server closed `s` (reads EOF or an error) within `within`.
    async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(within, s.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_and_surplus_connections_are_closed_and_others_served() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ServeLimits {
            max_connections: 64,
            max_per_address: 6,
            first_frame_timeout: Duration::from_millis(400),
            frame_timeout: Duration::from_millis(400),
        };
        let server = serve_with(listener, Arc::new(Echo), limits);
        let client = RpcClient::new(addr.to_string(), RpcClientConfig::default());
        let ok: Option<String> = client.call(&(2u32, "a".to_string())).await.unwrap();
        assert_eq!(ok.as_deref(), Some("aa"));
        // Four connections announce huge bodies and send none; one sends nothing at all.
        let mut stalled = Vec::new();
        for _ in 0..4 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&announce_huge_body()).await.unwrap();
            stalled.push(s);
        }
        let mut silent = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Six from this address are open: the seventh is closed at once.
        let mut surplus = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut surplus, Duration::from_millis(300)).await);
        // The client's own connection is served throughout.
        let ok: Option<String> = client.call(&(3u32, "b".to_string())).await.unwrap();
        assert_eq!(ok.as_deref(), Some("bbb"));
        // The stalled frames and the silent connection time out and are closed...
        for s in stalled.iter_mut() {
            assert!(closed_within(s, Duration::from_secs(3)).await);
        }
        assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
        // ... which frees their places.
        let second = RpcClient::new(addr.to_string(), RpcClientConfig::default());
        let ok: Option<String> = second.call(&(1u32, "c".to_string())).await.unwrap();
        assert_eq!(ok.as_deref(), Some("c"));
        // A connection that spoke may stay idle past the timeouts and still be served.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let ok: Option<String> = client.call(&(1u32, "d".to_string())).await.unwrap();
        assert_eq!(ok.as_deref(), Some("d"));
        server.abort();
    }

    #[test]
    fn hostile_headers_are_rejected() {
        let mut h = [0u8; 14];
        h[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        h[4] = RPC_VERSION;
        h[5] = KIND_REQUEST;
        assert!(decode_header(&h).is_err(), "oversized frame");
        h[..4].copy_from_slice(&20u32.to_le_bytes());
        h[4] = 9;
        assert!(decode_header(&h).is_err(), "unknown version");
        h[4] = RPC_VERSION;
        h[5] = 77;
        assert!(decode_header(&h).is_err(), "unknown kind");
        h[5] = KIND_RESPONSE;
        assert_eq!(decode_header(&h).unwrap().body_len, 10);
    }
}
