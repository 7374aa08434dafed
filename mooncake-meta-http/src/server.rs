//! The HTTP server: `/metadata`, `/metrics`, `/health`, and whatever further paths an
//! [`ExtraRoutes`] handler serves.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use mooncake_core::admission::{Admission, RefusalLogByPeer};
use mooncake_core::{Error, MetadataStore};
use mooncake_tls::{PeerIdentity, Role, TlsAcceptor, TlsIdentity};

use super::*;

/// What an HTTP server started by [`serve_http`] serves.
#[derive(Clone)]
pub struct HttpEndpoints {
    /// Backs `/metadata?key=K`; `None` answers `404` there (a metrics-only server).
    pub metadata: Option<Arc<dyn MetadataStore>>,
    /// Renders the Prometheus text exposition served at `/metrics`.
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// Whether `/health` answers `200 OK` (else `503`).
    pub health: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// A request as an [`ExtraRoutes`] handler sees it.
#[derive(Clone, Copy, Debug)]
pub struct RouteRequest<'a> {
    /// The method, as sent (`GET`, `HEAD`, ...). A `HEAD` is answered like a `GET` without the
    /// body.
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The raw query (what follows `?`, empty without one).
    pub query: &'a str,
    /// With TLS ([`HttpServerConfig::tls`]): what the client's verified certificate says (its
    /// name and roles), for handlers that decide more finely than the server's rule for their
    /// paths ([`HttpTls::extra_route_roles`]). `None` without TLS.
    pub peer: Option<&'a PeerIdentity>,
}

impl RouteRequest<'_> {
    /// The percent-decoded value of the first `name` parameter of the query (`+` stays `+`);
    /// `Err` when the query holds a bad percent-escape.
    pub fn param(&self, name: &str) -> Result<Option<String>, &'static str> {
        query_param(self.query, name)
    }

    /// Whether the method only reads (`GET` or `HEAD`).
    pub fn is_read(&self) -> bool {
        matches!(self.method, "GET" | "HEAD")
    }
}

/// What an [`ExtraRoutes`] handler answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteResponse {
    /// The status code.
    pub status: u16,
    /// The `Content-Type` header.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
    /// Sends `X-Mooncake-More: 1`: the answer is one page of a longer listing.
    pub more: bool,
}

impl RouteResponse {
    /// A response with `body` as `content_type` and no paging header.
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        RouteResponse {
            status,
            content_type,
            body: body.into(),
            more: false,
        }
    }
}

/// Serves paths beyond the built-in ones: called for every request whose path is not
/// `/metadata`, `/metrics` or `/health`; `None` answers `404`. It runs on the connection's task,
/// so it should answer quickly (read state, format, return).
pub type ExtraRoutes = Arc<dyn Fn(&RouteRequest<'_>) -> Option<RouteResponse> + Send + Sync>;

/// Limits of an HTTP server, for [`serve_http_with`].
#[derive(Clone, Debug)]
pub struct HttpServerConfig {
    /// Longest request line plus headers, in bytes; longer gets `431`. Default 16 KiB.
    pub max_head: usize,
    /// Largest request body, in bytes; larger gets `413`. Default 64 MiB (the RPC frame limit).
    pub max_body: usize,
    /// Time for a request to arrive in full and for its response to be written; also how long an
    /// idle keep-alive connection is kept. Default 10 s.
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog. Default 1024.
    pub max_connections: usize,
    /// Connections served at once from one IP address; more are closed as they are accepted,
    /// so one client cannot take every place. Default 256.
    pub max_per_address: usize,
    /// Bytes of entries in one page of a prefix listing (`GET /metadata?prefix=P`); a page
    /// holds at least one entry whatever its size, and the client asks for the next page with
    /// `after=`. Default 16 MiB.
    pub max_list_page: usize,
    /// HTTPS with client certificates (see [`HttpTls`]). Default `None`: plain HTTP, anyone
    /// may read and write.
    pub tls: Option<HttpTls>,
}

/// The ALPN protocol the server offers under TLS.
pub const HTTP_ALPN: &[u8] = b"http/1.1";

/// HTTPS with mutual certificates for an HTTP server ([`HttpServerConfig::tls`]).
///
/// Every connection must present a certificate of the cluster CA (TLS 1.3, ALPN `http/1.1`);
/// one without, of another CA or expired is refused during the handshake, which counts against
/// [`HttpServerConfig::request_timeout`]. Then every request is checked against the roles of
/// the certificate ([`Role`]):
///
/// | request | needs |
/// |---|---|
/// | `GET`/`HEAD /metadata` (a key or a listing), `/metrics`, `/health` | any role (a certificate that lists none counts as `client`) |
/// | `PUT`/`DELETE /metadata` (publishing or removing a segment descriptor) | `client` or `master` |
/// | any other path (the embedding program's routes, e.g. the master's admin endpoints, which list every key and segment owner) | [`extra_route_roles`](Self::extra_route_roles): `admin` by default |
///
/// A refused request gets `403` with the reason in the body, and the server logs the client's
/// address, its certificate's name and the reason (at most once per address and certificate
/// every 10 s; a refused handshake, once per address and error).
///
/// With a revocation list ([`TlsIdentity::crl_file`]), a revoked certificate fails the
/// handshake, and the certificate of an open (keep-alive) connection is re-checked before each
/// request (a clock read and an atomic load unless the list changed): once it is revoked, the
/// request gets `403` saying so, the connection is closed and the server logs the certificate's
/// name.
///
/// ```no_run
/// # async fn demo(listener: tokio::net::TcpListener, endpoints: mooncake_meta_http::HttpEndpoints)
/// # -> mooncake_core::Result<()> {
/// use mooncake_meta_http::{serve_http_with, HttpServerConfig, HttpTls};
/// let identity = mooncake_tls::TlsIdentity::from_pem_files("ca.pem", "master-1.pem", "master-1-key.pem")?;
/// let config = HttpServerConfig {
///     tls: Some(HttpTls::new(&identity)?),
///     ..Default::default()
/// };
/// serve_http_with(listener, endpoints, config);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct HttpTls {
    acceptor: TlsAcceptor,
    /// Roles of which a certificate must hold one for paths other than `/metadata`,
    /// `/metrics` and `/health`. Default `[Admin]`.
    pub extra_route_roles: Vec<Role>,
}

impl HttpTls {
    /// HTTPS for a server holding `identity` (the cluster CA, its certificate and key); fails
    /// when the PEM texts do not make a usable configuration.
    pub fn new(identity: &TlsIdentity) -> mooncake_core::Result<Self> {
        Ok(HttpTls {
            acceptor: TlsAcceptor::new(identity, HTTP_ALPN)?,
            extra_route_roles: vec![Role::Admin],
        })
    }

    /// Why `peer` may not send `method` to `path`, if it may not.
    fn refusal(&self, peer: &PeerIdentity, method: &str, path: &str) -> Option<String> {
        let read = matches!(method, "GET" | "HEAD");
        let (roles, what): (&[Role], &str) = match path {
            "/metadata" if !read => (&[Role::Client, Role::Master], "write metadata"),
            "/metadata" | "/metrics" | "/health" => (&Role::ALL, "read"),
            _ => (&self.extra_route_roles, "use this path"),
        };
        peer.require_any(roles, what).err().map(|e| match e {
            Error::PermissionDenied(why) => why,
            e => e.to_string(),
        })
    }
}

impl Default for HttpServerConfig {
    fn default() -> Self {
        Self {
            max_head: 16 << 10,
            max_body: 64 << 20,
            request_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_per_address: 256,
            max_list_page: 16 << 20,
            tls: None,
        }
    }
}

/// Serves `endpoints` on `listener` with [`HttpServerConfig::default`] limits.
///
/// Call it inside a Tokio runtime. Each request must arrive in full within the configured timeout
/// (a slow client cannot hold a connection forever). Aborting the returned task stops accepting;
/// open connections end at their next timeout.
pub fn serve_http(listener: TcpListener, endpoints: HttpEndpoints) -> JoinHandle<()> {
    serve_http_with(listener, endpoints, HttpServerConfig::default())
}

/// Serves `endpoints` on `listener` with the given limits (see [`serve_http`]).
pub fn serve_http_with(
    listener: TcpListener,
    endpoints: HttpEndpoints,
    config: HttpServerConfig,
) -> JoinHandle<()> {
    serve_http_routes(listener, endpoints, None, config)
}

/// Serves `endpoints` on `listener` with the given limits (see [`serve_http`]), and hands every
/// request for another path to `extra` (without it, such requests get `404`). The server's
/// limits apply to those requests as to the built-in ones.
pub fn serve_http_routes(
    listener: TcpListener,
    endpoints: HttpEndpoints,
    extra: Option<ExtraRoutes>,
    config: HttpServerConfig,
) -> JoinHandle<()> {
    let endpoints = Arc::new(Served {
        endpoints,
        extra,
        log: RefusalLogByPeer::new(Duration::from_secs(10)),
    });
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let admission = Admission::new(
        "http",
        config.max_connections.max(1),
        config.max_per_address.max(1),
    );
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("http accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Refused (and logged, once a second at most) by closing it.
            let Ok(admitted) = admission.admit(remote.ip()) else {
                continue;
            };
            let (endpoints, config) = (endpoints.clone(), config.clone());
            tokio::spawn(async move {
                let _admitted = admitted;
                let _ = stream.set_nodelay(true);
                match &config.tls {
                    None => serve_connection(stream, remote, None, &endpoints, &config).await,
                    Some(tls) => {
                        // The handshake counts against the time a request has to arrive.
                        let acceptor = tls.acceptor.clone().with_timeout(config.request_timeout);
                        match acceptor.accept(stream).await {
                            Ok((stream, peer)) => {
                                serve_connection(stream, remote, Some(&peer), &endpoints, &config)
                                    .await
                            }
                            Err(e) => {
                                if endpoints.log.allow(remote.ip(), &e.to_string()) {
                                    tracing::warn!(
                                        peer = %remote,
                                        "refused an HTTPS connection from {remote}: {e}"
                                    );
                                }
                            }
                        }
                    }
                }
                drop(permit);
            });
        }
    })
}

/// The built-in endpoints and the extra routes of one server.
struct Served {
    endpoints: HttpEndpoints,
    extra: Option<ExtraRoutes>,
    /// Refusal lines: one per client address and reason every 10 s.
    log: RefusalLogByPeer,
}

/// One parsed request.
struct Request {
    method: String,
    target: String,
    close: bool,
    body: Vec<u8>,
}

/// One response to write.
struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    allow: Option<&'static str>,
    /// Sent as [`REVISION_HEADER`].
    revision: Option<u64>,
    /// Sends [`MORE_HEADER`]`: 1` (a listing page that is not the last).
    more: bool,
}

fn text(status: u16, body: impl Into<String>) -> Response {
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.into().into_bytes(),
        allow: None,
        revision: None,
        more: false,
    }
}

fn not_allowed(allow: &'static str) -> Response {
    Response {
        allow: Some(allow),
        ..text(405, "method not allowed")
    }
}

/// The client of one connection: its address and, with TLS, its certificate.
#[derive(Clone, Copy)]
struct Client<'a> {
    remote: SocketAddr,
    peer: Option<&'a PeerIdentity>,
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    remote: SocketAddr,
    peer: Option<&PeerIdentity>,
    endpoints: &Served,
    cfg: &HttpServerConfig,
) {
    let client = Client { remote, peer };
    let mut conn = BufReader::new(stream);
    // The revocation list's generation the client's certificate was last checked against.
    let mut list_seen = 0;
    loop {
        let mut started = false;
        let read = timeout(
            cfg.request_timeout,
            read_request(&mut conn, cfg, &mut started),
        )
        .await;
        let request = match read {
            Ok(Ok(Some(request))) => request,
            Ok(Ok(None)) => return,
            Ok(Err(error)) => return close_with(&mut conn, error, cfg).await,
            Err(_) if !started => return, // idle keep-alive connection
            Err(_) => return close_with(&mut conn, text(408, "request timed out"), cfg).await,
        };
        if let (Some(tls), Some(peer)) = (&cfg.tls, peer) {
            // A certificate revoked while its connection is open is cut off at its next request.
            if let Err(e) = tls.acceptor.recheck(peer, &mut list_seen) {
                let why = match e {
                    Error::PermissionDenied(why) => why,
                    e => e.to_string(),
                };
                tracing::warn!(peer = %remote, certificate = %peer.name(),
                    "closing an HTTPS connection from {remote}: {why}");
                return close_with(&mut conn, text(403, why), cfg).await;
            }
        }
        let head_only = request.method == "HEAD";
        let close = request.close;
        let response = route(request, client, endpoints, cfg).await;
        if write_response(&mut conn, response, close, head_only, cfg)
            .await
            .is_err()
            || close
        {
            return;
        }
    }
}

/// Answers a broken request and closes, reading (a bounded amount of) what the client still
/// sends so that the close does not reset the connection before it has read the answer.
async fn close_with<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut BufReader<S>,
    response: Response,
    cfg: &HttpServerConfig,
) {
    if write_response(conn, response, true, false, cfg)
        .await
        .is_err()
    {
        return;
    }
    let _ = conn.shutdown().await;
    let drain = async {
        let (mut buf, mut left) = ([0u8; 8192], 1usize << 20);
        while let Ok(n @ 1..) = conn.read(&mut buf).await {
            left = left.saturating_sub(n);
            if left == 0 {
                break;
            }
        }
    };
    let _ = timeout(cfg.request_timeout.min(Duration::from_secs(1)), drain).await;
}

/// Reads one request; `Ok(None)` when the connection closed before it began, `Err` with the
/// response to close with when it is malformed or too large.
async fn read_request<S: AsyncBufRead + AsyncWrite + Unpin>(
    conn: &mut S,
    cfg: &HttpServerConfig,
    started: &mut bool,
) -> Result<Option<Request>, Response> {
    let broken = |_| text(400, "connection error");
    if conn.fill_buf().await.map_err(broken)?.is_empty() {
        return Ok(None);
    }
    *started = true;
    let mut budget = cfg.max_head;
    let mut next_line = async |budget: &mut usize| match read_line(conn, budget).await {
        Ok(Line::Text(line)) => Ok(line),
        Ok(Line::TooLong) => Err(text(431, "request head too large")),
        Ok(Line::Eof) | Err(_) => Err(text(400, "truncated request")),
    };
    let mut line = next_line(&mut budget).await?;
    while line.is_empty() {
        line = next_line(&mut budget).await?; // RFC 9112 §2.2: skip empty lines before a request
    }
    let bad = |why: &str| text(400, why);
    let line = String::from_utf8(line).map_err(|_| bad("request line is not ASCII"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    if !is_token(method.as_bytes())
        || target.is_empty()
        || !target.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad("malformed request line"));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v if v.starts_with("HTTP/") => return Err(text(505, "only HTTP/1.x is supported")),
        _ => return Err(bad("malformed request line")),
    };
    let (mut length, mut chunked, mut expect_continue) = (None, false, false);
    let (mut saw_close, mut saw_keep_alive) = (false, false);
    loop {
        let line = next_line(&mut budget).await?;
        if line.is_empty() {
            break;
        }
        let (name, value) = parse_header(&line).ok_or_else(|| bad("malformed header"))?;
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(value).ok_or_else(|| bad("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("conflicting Content-Length headers"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                saw_close |= option.eq_ignore_ascii_case(b"close");
                saw_keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    if chunked || (method == "PUT" && length.is_none()) {
        return Err(text(
            411,
            "a body needs Content-Length (chunked is not supported)",
        ));
    }
    let length = length.unwrap_or(0);
    if length > cfg.max_body as u64 {
        return Err(text(413, format!("body over {} bytes", cfg.max_body)));
    }
    if expect_continue && length > 0 {
        let sent = conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        sent.and(conn.flush().await).map_err(broken)?;
    }
    let mut body = Vec::with_capacity(length.min(64 << 10) as usize);
    (&mut *conn)
        .take(length)
        .read_to_end(&mut body)
        .await
        .map_err(broken)?;
    if body.len() as u64 != length {
        return Err(bad("truncated body"));
    }
    Ok(Some(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        close: saw_close || (!http11 && !saw_keep_alive),
        body,
    }))
}

async fn route(
    request: Request,
    client: Client<'_>,
    served: &Served,
    cfg: &HttpServerConfig,
) -> Response {
    let endpoints = &served.endpoints;
    let absolute = request
        .target
        .strip_prefix("http://")
        .or_else(|| request.target.strip_prefix("https://"));
    let target = match absolute {
        Some(absolute) => absolute.find('/').map_or("/", |i| &absolute[i..]),
        None => &request.target,
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if let (Some(tls), Some(peer)) = (&cfg.tls, client.peer) {
        if let Some(why) = tls.refusal(peer, &request.method, path) {
            if served.log.allow(client.remote.ip(), &peer.name()) {
                tracing::warn!(
                    peer = %client.remote,
                    certificate = %peer.name(),
                    "refused {} {path} from {}: {why}",
                    request.method,
                    client.remote
                );
            }
            return text(403, why);
        }
    }
    let read = matches!(request.method.as_str(), "GET" | "HEAD");
    match path {
        "/metadata" => match &endpoints.metadata {
            Some(store) => metadata(&**store, &request.method, query, request.body, cfg).await,
            None => text(404, "no metadata store here"),
        },
        "/metrics" if read => Response {
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: (endpoints.metrics)().into_bytes(),
            ..text(200, "")
        },
        "/health" if read => match (endpoints.health)() {
            true => text(200, "OK"),
            false => text(503, "unhealthy"),
        },
        "/metrics" | "/health" => not_allowed("GET, HEAD"),
        _ => {
            let view = RouteRequest {
                method: &request.method,
                path,
                query,
                peer: client.peer,
            };
            match served.extra.as_ref().and_then(|extra| extra(&view)) {
                Some(r) => Response {
                    status: r.status,
                    content_type: r.content_type,
                    body: r.body,
                    more: r.more,
                    ..text(200, "")
                },
                None => text(404, "not found"),
            }
        }
    }
}

/// Headers of the protocol extension (see the crate docs).
pub(crate) const REVISION_HEADER: &str = "X-Mooncake-Revision";
pub(crate) const MORE_HEADER: &str = "X-Mooncake-More";

async fn metadata(
    store: &dyn MetadataStore,
    method: &str,
    query: &str,
    body: Vec<u8>,
    cfg: &HttpServerConfig,
) -> Response {
    if !matches!(method, "GET" | "HEAD" | "PUT" | "DELETE") {
        return not_allowed("GET, HEAD, PUT, DELETE");
    }
    let param = |name| query_param(query, name);
    let (key, prefix, expected, after) = match (
        param("key"),
        param("prefix"),
        param("expected_revision"),
        param("after"),
    ) {
        (Ok(k), Ok(p), Ok(e), Ok(a)) => (k, p, e, a),
        (Err(why), ..) | (_, Err(why), ..) | (_, _, Err(why), _) | (.., Err(why)) => {
            return text(400, why)
        }
    };
    let expected = match expected.map(|e| parse_length(e.as_bytes())) {
        None => None,
        Some(Some(e)) => Some(e),
        Some(None) => return text(400, "bad expected_revision"),
    };
    let read = matches!(method, "GET" | "HEAD");
    let result = match (key, prefix) {
        (Some(_), Some(_)) => return text(400, "key and prefix exclude each other"),
        (None, Some(prefix)) if read && expected.is_none() => {
            list_page(store, &prefix, after.as_deref(), cfg.max_list_page).await
        }
        (None, Some(_)) => return text(400, "a prefix listing is a GET without expected_revision"),
        (Some(key), None) if !key.is_empty() && after.is_none() => {
            if read && expected.is_some() {
                return text(400, "expected_revision applies to PUT and DELETE");
            }
            one_key(store, method, &key, expected, body).await
        }
        _ => return text(400, "missing key parameter"),
    };
    result.unwrap_or_else(|e| match e {
        Error::NotSupported(why) => text(501, why),
        e => text(500, e.to_string()),
    })
}

/// A read or write of one key; plain requests answer exactly as upstream's server does, plus
/// the revision header where the store reports one.
async fn one_key(
    store: &dyn MetadataStore,
    method: &str,
    key: &str,
    expected: Option<u64>,
    body: Vec<u8>,
) -> mooncake_core::Result<Response> {
    let with_revision = |mut r: Response, revision: u64| {
        r.revision = Some(revision);
        r
    };
    let mismatch = || text(412, "revision mismatch");
    Ok(match (method, expected) {
        ("PUT", None) => with_revision(text(200, "metadata updated"), store.put(key, body).await?),
        ("PUT", Some(e)) => match store.compare_and_swap(key, e, Some(body)).await? {
            Some(revision) => with_revision(text(200, "metadata updated"), revision),
            None => mismatch(),
        },
        ("DELETE", None) => match store.delete(key).await? {
            true => text(200, "metadata deleted"),
            false => text(404, "metadata not found"),
        },
        ("DELETE", Some(e)) => match store.compare_and_swap(key, e, None).await? {
            Some(revision) => with_revision(text(200, "metadata deleted"), revision),
            None => mismatch(),
        },
        _ => match store.get(key).await? {
            Some(v) => Response {
                content_type: "application/octet-stream",
                body: v.value,
                revision: Some(v.revision),
                ..text(200, "")
            },
            None => text(404, "metadata not found"),
        },
    })
}

/// One page of the keys under `prefix` after `after` (see [`encode_entry`] for the body). The
/// page holds at least one entry and stops before the one that would take it past `max_page`
/// bytes; [`MORE_HEADER`] says more follow.
async fn list_page(
    store: &dyn MetadataStore,
    prefix: &str,
    after: Option<&str>,
    max_page: usize,
) -> mooncake_core::Result<Response> {
    let entries = store.list(prefix).await?;
    let start = after.map_or(0, |a| entries.partition_point(|(k, _)| k.as_str() <= a));
    let mut body = Vec::new();
    let mut more = false;
    for (i, (key, v)) in entries[start..].iter().enumerate() {
        if i > 0 && body.len() + entry_len(key, &v.value) > max_page {
            more = true;
            break;
        }
        encode_entry(&mut body, key, v.revision, &v.value);
    }
    Ok(Response {
        content_type: "application/octet-stream",
        body,
        more,
        ..text(200, "")
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        412 => "Precondition Failed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

async fn write_response<S: AsyncWrite + Unpin>(
    conn: &mut S,
    response: Response,
    close: bool,
    head_only: bool,
    cfg: &HttpServerConfig,
) -> io::Result<()> {
    let (status, body) = (response.status, &response.body);
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        reason(status),
        response.content_type,
        body.len()
    );
    if let Some(allow) = response.allow {
        head += &format!("Allow: {allow}\r\n");
    }
    if let Some(revision) = response.revision {
        head += &format!("{REVISION_HEADER}: {revision}\r\n");
    }
    if response.more {
        head += &format!("{MORE_HEADER}: 1\r\n");
    }
    head += if close {
        "Connection: close\r\n\r\n"
    } else {
        "Connection: keep-alive\r\n\r\n"
    };
    let mut head = head.into_bytes();
    let body: &[u8] = if head_only { &[] } else { body };
    if body.len() <= 16 << 10 {
        head.extend_from_slice(body); // one write for small answers
    }
    let write = async {
        conn.write_all(&head).await?;
        if body.len() > 16 << 10 {
            conn.write_all(body).await?;
        }
        conn.flush().await
    };
    timeout(cfg.request_timeout, write)
        .await
        .map_err(|_| io::ErrorKind::TimedOut)?
}
