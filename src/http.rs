//! A small HTTP/1.1 server and client for the metadata, metrics and health endpoints.
//!
//! [`serve_http`] speaks upstream Mooncake's HTTP metadata protocol (`GET`/`PUT`/`DELETE
//! /metadata?key=K`, with which transfer engines publish segment descriptors) and serves
//! `/metrics` (Prometheus text) and `/health`. [`HttpMetadataStore`] is the other side: a
//! [`MetadataStore`] over that protocol, for `http://host:port/metadata` metadata URLs.
//!
//! Hand-rolled on tokio, and defensive: request heads and bodies are bounded, each request must
//! arrive within a timeout, malformed input gets `400` and a closed connection. Not supported:
//! TLS, chunked request bodies (`411`), revisions (the protocol has none).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use mooncake_core::{Error, ErrorCode, MetadataStore, Result, Versioned};

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
}

impl Default for HttpServerConfig {
    fn default() -> Self {
        Self {
            max_head: 16 << 10,
            max_body: 64 << 20,
            request_timeout: Duration::from_secs(10),
            max_connections: 1024,
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
    let (endpoints, config) = (Arc::new(endpoints), Arc::new(config));
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("http accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (endpoints, config) = (endpoints.clone(), config.clone());
            tokio::spawn(async move {
                serve_connection(stream, &endpoints, &config).await;
                drop(permit);
            });
        }
    })
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
}

fn text(status: u16, body: impl Into<String>) -> Response {
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.into().into_bytes(),
        allow: None,
    }
}

fn not_allowed(allow: &'static str) -> Response {
    Response {
        allow: Some(allow),
        ..text(405, "method not allowed")
    }
}

async fn serve_connection(stream: TcpStream, endpoints: &HttpEndpoints, cfg: &HttpServerConfig) {
    let _ = stream.set_nodelay(true);
    let mut conn = BufReader::new(stream);
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
        let head_only = request.method == "HEAD";
        let close = request.close;
        let response = route(request, endpoints).await;
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
async fn close_with(conn: &mut BufReader<TcpStream>, response: Response, cfg: &HttpServerConfig) {
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

/// Outcome of reading one line of a message head.
enum Line {
    Text(Vec<u8>),
    Eof,
    TooLong,
}

/// Reads one `\n`-terminated line (returned without `\r\n`), charging it to `budget`.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, budget: &mut usize) -> io::Result<Line> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(*budget as u64)
        .read_until(b'\n', &mut line)
        .await?;
    *budget -= n;
    if line.pop() != Some(b'\n') {
        return Ok(if *budget == 0 {
            Line::TooLong
        } else {
            Line::Eof
        });
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Line::Text(line))
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Splits `Name: value` into the name and the trimmed value.
fn parse_header(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
    is_token(name).then_some((name, value))
}

fn parse_length(value: &[u8]) -> Option<u64> {
    let digits = std::str::from_utf8(value).ok()?;
    digits
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| digits.parse().ok())?
}

/// Reads one request; `Ok(None)` when the connection closed before it began, `Err` with the
/// response to close with when it is malformed or too large.
async fn read_request<S: AsyncBufRead + AsyncWrite + Unpin>(
    conn: &mut S,
    cfg: &HttpServerConfig,
    started: &mut bool,
) -> std::result::Result<Option<Request>, Response> {
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

async fn route(request: Request, endpoints: &HttpEndpoints) -> Response {
    let target = match request.target.strip_prefix("http://") {
        Some(absolute) => absolute.find('/').map_or("/", |i| &absolute[i..]),
        None => &request.target,
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let read = matches!(request.method.as_str(), "GET" | "HEAD");
    match path {
        "/metadata" => match &endpoints.metadata {
            Some(store) => metadata(&**store, &request.method, query, request.body).await,
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
        _ => text(404, "not found"),
    }
}

async fn metadata(store: &dyn MetadataStore, method: &str, query: &str, body: Vec<u8>) -> Response {
    if !matches!(method, "GET" | "HEAD" | "PUT" | "DELETE") {
        return not_allowed("GET, HEAD, PUT, DELETE");
    }
    let key = match query_param(query, "key") {
        Ok(Some(key)) if !key.is_empty() => key,
        Ok(_) => return text(400, "missing key parameter"),
        Err(why) => return text(400, why),
    };
    let result = match method {
        "PUT" => store
            .put(&key, body)
            .await
            .map(|_| text(200, "metadata updated")),
        "DELETE" => store.delete(&key).await.map(|existed| match existed {
            true => text(200, "metadata deleted"),
            false => text(404, "metadata not found"),
        }),
        _ => store.get(&key).await.map(|found| match found {
            Some(v) => Response {
                content_type: "application/octet-stream",
                body: v.value,
                ..text(200, "")
            },
            None => text(404, "metadata not found"),
        }),
    };
    result.unwrap_or_else(|e| text(500, e.to_string()))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
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

/// The decoded value of the first `name` parameter in a query string.
fn query_param(query: &str, name: &str) -> std::result::Result<Option<String>, &'static str> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k)? == name {
            return percent_decode(v).map(Some);
        }
    }
    Ok(None)
}

/// Decodes `%XX` escapes and `+` (a space, as in forms and Go's `Query().Get`).
fn percent_decode(s: &str) -> std::result::Result<String, &'static str> {
    let (mut out, mut bytes) = (Vec::with_capacity(s.len()), s.bytes());
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hex = [bytes.next(), bytes.next()];
                let hex = hex.map(|d| d.and_then(|d| (d as char).to_digit(16)));
                match hex {
                    [Some(hi), Some(lo)] => (hi * 16 + lo) as u8,
                    _ => return Err("bad percent-escape in query"),
                }
            }
            b => b,
        });
    }
    String::from_utf8(out).map_err(|_| "query is not UTF-8 after decoding")
}

/// Escapes everything but RFC 3986 unreserved characters, as `curl_easy_escape` does.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// Settings of an [`HttpMetadataStore`].
#[derive(Clone, Debug)]
pub struct HttpClientConfig {
    /// Time to establish a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Time for one request, from sending it to having read the whole response. Default 5 s.
    pub request_timeout: Duration,
    /// Largest response body accepted, in bytes. Default 64 MiB, as the server's request limit.
    pub max_body: usize,
}

impl Default for HttpClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            max_body: 64 << 20,
        }
    }
}

/// A [`MetadataStore`] served over upstream Mooncake's HTTP metadata protocol
/// (`http://host:port/metadata`), e.g. by [`serve_http`] or by `mooncake_master
/// --enable_http_metadata_server`.
///
/// The protocol has no revisions: reads and writes report revision 1, and `compare_and_swap` and
/// `list` fail with [`Error::NotSupported`]. Requests share one keep-alive connection, opened
/// again when it breaks. Servers that answer every `DELETE` with `200` (upstream's Go example
/// server) make [`MetadataStore::delete`] report `true` for missing keys.
#[derive(Debug)]
pub struct HttpMetadataStore {
    url: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
    config: HttpClientConfig,
    conn: Mutex<Option<BufReader<TcpStream>>>,
}

impl HttpMetadataStore {
    /// A client for `url` (`http://host[:port]/path`) with default timeouts; connects lazily.
    pub fn new(url: &str) -> Result<Self> {
        Self::with_config(url, HttpClientConfig::default())
    }

    /// A client for `url` with the given settings.
    pub fn with_config(url: &str, config: HttpClientConfig) -> Result<Self> {
        let invalid = |why: &str| Error::InvalidArgument(format!("metadata URL {url:?}: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("expected http://host:port/path"))?;
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(invalid("only http:// is supported"));
        }
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
        if !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("the path must be printable ASCII"));
        }
        if authority.contains(['@', '?']) || !authority.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid("bad host"));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((host, "")) => (host, None),
                Some((host, port)) => (host, Some(port.strip_prefix(':').unwrap_or("x"))),
                None => return Err(invalid("unclosed '['")),
            },
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port = match port.map(str::parse::<u16>) {
            None => 80,
            Some(Ok(port @ 1..)) => port,
            Some(_) => return Err(invalid("bad port")),
        };
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        Ok(Self {
            url: url.to_owned(),
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            path: path.to_owned(),
            config,
            conn: Mutex::new(None),
        })
    }

    /// The URL this client talks to.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn connect(&self) -> Result<BufReader<TcpStream>> {
        let limit = self.config.connect_timeout;
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        match timeout(limit, connect).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(BufReader::new(stream))
            }
            Ok(Err(e)) => Err(Error::Metadata(format!("connecting to {}: {e}", self.url))),
            Err(_) => Err(Error::with_code(
                ErrorCode::RPC_TIMEOUT,
                format!("connecting to {}: no answer within {limit:?}", self.url),
            )),
        }
    }

    /// Sends one request and returns the response's status and body.
    async fn request(&self, method: &str, key: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("empty metadata key".into()));
        }
        let sep = if self.path.contains('?') { '&' } else { '?' };
        let (path, host, key_escaped) = (&self.path, &self.authority, percent_encode(key));
        let mut head =
            format!("{method} {path}{sep}key={key_escaped} HTTP/1.1\r\nHost: {host}\r\n");
        if method == "PUT" {
            head += &format!("Content-Length: {}\r\n", body.len());
        }
        let mut request = (head + "\r\n").into_bytes();
        request.extend_from_slice(body);
        let limit = self.config.request_timeout;
        let mut slot = self.conn.lock().await;
        loop {
            // A reused connection may have been closed by the server while idle: when it fails
            // before any byte of a response arrives, retry once on a new one (all our requests
            // are idempotent). `slot` stays empty, so the retry cannot loop.
            let reused = slot.is_some();
            let mut conn = match slot.take() {
                Some(conn) => conn,
                None => self.connect().await?,
            };
            let exchange = exchange(&mut conn, &request, self.config.max_body);
            match timeout(limit, exchange).await {
                Ok(Ok((status, body, keep_alive))) => {
                    if keep_alive {
                        *slot = Some(conn);
                    }
                    return Ok((status, body));
                }
                Ok(Err((_, true))) if reused => continue,
                Ok(Err((why, _))) => {
                    return Err(Error::Metadata(format!(
                        "{method} {} key {key:?}: {why}",
                        self.url
                    )))
                }
                Err(_) => {
                    return Err(Error::with_code(
                        ErrorCode::RPC_TIMEOUT,
                        format!(
                            "{method} {} key {key:?}: no answer within {limit:?}",
                            self.url
                        ),
                    ))
                }
            }
        }
    }

    fn unexpected(&self, method: &str, key: &str, status: u16, body: &[u8]) -> Error {
        let body = String::from_utf8_lossy(&body[..body.len().min(200)]);
        Error::Metadata(format!(
            "{method} {} key {key:?}: HTTP {status}: {body}",
            self.url
        ))
    }
}

/// Sends `request` and reads the response: `(status, body, keep_alive)`. An error's flag says no
/// byte of a response arrived, so a retry on a fresh connection is safe.
async fn exchange<S: AsyncBufRead + AsyncWrite + Unpin>(
    conn: &mut S,
    request: &[u8],
    max_body: usize,
) -> std::result::Result<(u16, Vec<u8>, bool), (String, bool)> {
    let sent = conn.write_all(request).await;
    if let Err(e) = sent.and(conn.flush().await) {
        return Err((format!("sending: {e}"), true));
    }
    match conn.fill_buf().await {
        Ok([]) => return Err(("connection closed before the response".into(), true)),
        Err(e) => return Err((format!("receiving: {e}"), true)),
        Ok(_) => {}
    }
    read_response(conn, max_body)
        .await
        .map_err(|why| (why, false))
}

async fn head_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    budget: &mut usize,
) -> std::result::Result<Vec<u8>, String> {
    match read_line(r, budget).await {
        Ok(Line::Text(line)) => Ok(line),
        Ok(Line::TooLong) => Err("response head too large".into()),
        Ok(Line::Eof) => Err("truncated response".into()),
        Err(e) => Err(format!("receiving: {e}")),
    }
}

async fn read_response<R: AsyncBufRead + Unpin>(
    conn: &mut R,
    max_body: usize,
) -> std::result::Result<(u16, Vec<u8>, bool), String> {
    loop {
        let mut budget = 64 << 10;
        let line = head_line(conn, &mut budget).await?;
        let line = String::from_utf8_lossy(&line);
        let mut parts = line.splitn(3, ' ');
        let (version, status) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let status = match status.parse::<u16>() {
            Ok(s @ 100..=999) if version.starts_with("HTTP/1.") => s,
            _ => return Err(format!("bad status line {line:?}")),
        };
        let (mut keep_alive, mut length, mut chunked) = (version == "HTTP/1.1", None, false);
        loop {
            let line = head_line(conn, &mut budget).await?;
            if line.is_empty() {
                break;
            }
            let (name, value) = parse_header(&line).ok_or("malformed response header")?;
            if name.eq_ignore_ascii_case(b"content-length") {
                length = Some(parse_length(value).ok_or("bad Content-Length")?);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                chunked = value.to_ascii_lowercase().ends_with(b"chunked");
            } else if name.eq_ignore_ascii_case(b"connection") {
                let value = value.to_ascii_lowercase();
                keep_alive = !value.windows(5).any(|w| w == b"close")
                    && (keep_alive || value.windows(10).any(|w| w == b"keep-alive"));
            }
        }
        if status < 200 {
            continue; // 100 Continue and friends come before the real answer
        }
        let mut body = Vec::new();
        if status == 204 || status == 304 {
        } else if chunked {
            loop {
                let line = head_line(conn, &mut budget).await?;
                let size = line
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                let size = std::str::from_utf8(size).ok();
                let size = size
                    .and_then(|s| u64::from_str_radix(s, 16).ok())
                    .ok_or("bad chunk")?;
                if size == 0 {
                    while !head_line(conn, &mut budget).await?.is_empty() {} // trailers
                    break;
                }
                read_body(conn, size, max_body, &mut body).await?;
                if !head_line(conn, &mut budget).await?.is_empty() {
                    return Err("chunk longer than announced".into());
                }
            }
        } else if let Some(length) = length {
            read_body(conn, length, max_body, &mut body).await?;
        } else {
            keep_alive = false; // the body ends when the connection does
            let limit = max_body as u64 + 1;
            let read = (&mut *conn).take(limit).read_to_end(&mut body).await;
            read.map_err(|e| format!("receiving: {e}"))?;
            if body.len() > max_body {
                return Err(format!("response body over {max_body} bytes"));
            }
        }
        return Ok((status, body, keep_alive));
    }
}

async fn read_body<R: AsyncBufRead + Unpin>(
    conn: &mut R,
    length: u64,
    max_body: usize,
    body: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    if body.len() as u64 + length > max_body as u64 {
        return Err(format!("response body over {max_body} bytes"));
    }
    let start = body.len();
    let read = (&mut *conn).take(length).read_to_end(body).await;
    read.map_err(|e| format!("receiving: {e}"))?;
    match (body.len() - start) as u64 == length {
        true => Ok(()),
        false => Err("truncated response body".into()),
    }
}

#[async_trait]
impl MetadataStore for HttpMetadataStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        match self.request("GET", key, &[]).await? {
            (200, value) => Ok(Some(Versioned { value, revision: 1 })),
            (404, _) => Ok(None),
            (status, body) => Err(self.unexpected("GET", key, status, &body)),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64> {
        match self.request("PUT", key, &value).await? {
            (200..=299, _) => Ok(1),
            (status, body) => Err(self.unexpected("PUT", key, status, &body)),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        match self.request("DELETE", key, &[]).await? {
            (200..=299, _) => Ok(true),
            (404, _) => Ok(false),
            (status, body) => Err(self.unexpected("DELETE", key, status, &body)),
        }
    }

    async fn compare_and_swap(&self, _: &str, _: u64, _: Option<Vec<u8>>) -> Result<Option<u64>> {
        Err(Error::NotSupported(
            "compare-and-swap over the HTTP metadata protocol".into(),
        ))
    }

    async fn list(&self, _: &str) -> Result<Vec<(String, Versioned)>> {
        Err(Error::NotSupported(
            "listing keys over the HTTP metadata protocol".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, Ordering};

    use mooncake_core::MemoryMetadataStore;

    use super::*;

    /// A server on loopback with a fresh store; the flag drives `/health`.
    async fn start(
        cfg: HttpServerConfig,
    ) -> (SocketAddr, Arc<MemoryMetadataStore>, Arc<AtomicBool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (store, healthy) = (
            Arc::new(MemoryMetadataStore::new()),
            Arc::new(AtomicBool::new(true)),
        );
        let flag = healthy.clone();
        let endpoints = HttpEndpoints {
            metadata: Some(store.clone()),
            metrics: Arc::new(|| "mooncake_up 1\n".to_owned()),
            health: Arc::new(move || flag.load(Ordering::Relaxed)),
        };
        serve_http_with(listener, endpoints, cfg);
        (addr, store, healthy)
    }

    fn client(addr: SocketAddr) -> HttpMetadataStore {
        HttpMetadataStore::new(&format!("http://{addr}/metadata")).unwrap()
    }

    /// Sends raw bytes and returns everything the server sends until it closes.
    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        read_all(&mut s).await
    }

    async fn read_all(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let read = timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        read.expect("server did not close").expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn metadata_round_trip() {
        let (addr, server_store, _) = start(HttpServerConfig::default()).await;
        let c = client(addr);
        let binary: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
        let keys = [
            "mooncake/segments/node1:12345",
            "a b&c=d?e#f%g+h/é\u{1F980}",
            "x",
        ];
        for key in keys {
            assert_eq!(c.get(key).await.unwrap(), None);
            assert_eq!(c.put(key, binary.clone()).await.unwrap(), 1);
            let got = c.get(key).await.unwrap().unwrap();
            assert_eq!((got.value == binary, got.revision), (true, 1));
            // The server decoded the key to exactly what the client meant.
            assert_eq!(server_store.get(key).await.unwrap().unwrap().value, binary);
        }
        c.put("x", Vec::new()).await.unwrap();
        assert_eq!(c.get("x").await.unwrap().unwrap().value, b"");
        assert!(c.delete("x").await.unwrap());
        assert!(!c.delete("x").await.unwrap());
        assert_eq!(c.get("x").await.unwrap(), None);
        assert!(matches!(c.get("").await, Err(Error::InvalidArgument(_))));
        let cas = c.compare_and_swap("k", 0, Some(vec![1])).await;
        assert!(matches!(cas, Err(Error::NotSupported(_))));
        assert!(matches!(c.list("").await, Err(Error::NotSupported(_))));
    }

    #[tokio::test]
    async fn client_reconnects_after_the_server_drops_an_idle_connection() {
        let cfg = HttpServerConfig {
            request_timeout: Duration::from_millis(100),
            ..Default::default()
        };
        let (addr, _, _) = start(cfg).await;
        let c = client(addr);
        c.put("k", b"v".to_vec()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(c.get("k").await.unwrap().unwrap().value, b"v");
        assert!(c.delete("k").await.unwrap());
    }

    #[tokio::test]
    async fn client_times_out_and_reports_unreachable_servers() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap(); // never accepts
        let cfg = HttpClientConfig {
            request_timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let url = format!("http://{}/metadata", silent.local_addr().unwrap());
        let c = HttpMetadataStore::with_config(&url, cfg).unwrap();
        assert_eq!(c.get("k").await.unwrap_err().code(), ErrorCode::RPC_TIMEOUT);
        let port = silent.local_addr().unwrap().port();
        drop(silent);
        let gone = HttpMetadataStore::new(&format!("http://127.0.0.1:{port}/metadata")).unwrap();
        assert!(matches!(gone.get("k").await, Err(Error::Metadata(_))));
    }

    #[tokio::test]
    async fn client_reads_chunked_and_close_delimited_answers() {
        // Upstream's Go server answers large values with chunked encoding.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let answers: [&[u8]; 2] = [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
                b"HTTP/1.0 200 OK\r\n\r\nuntil close",
            ];
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = BufReader::new(stream);
            for answer in answers {
                let mut line = String::new();
                while stream.read_line(&mut line).await.unwrap() > 2 {
                    line.clear();
                }
                stream.write_all(answer).await.unwrap();
            }
        });
        let c = client(addr);
        assert_eq!(c.get("a").await.unwrap().unwrap().value, b"abcde");
        assert_eq!(c.get("b").await.unwrap().unwrap().value, b"until close");
    }

    #[test]
    fn urls() {
        let c = HttpMetadataStore::new("http://[::1]:8080/metadata").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.path.as_str()),
            ("::1", 8080, "/metadata")
        );
        let c = HttpMetadataStore::new("HTTP://meta.example/metadata?cluster=a").unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.authority.as_str()),
            ("meta.example", 80, "meta.example")
        );
        assert_eq!(c.path, "/metadata?cluster=a");
        for bad in [
            "https://h/metadata",
            "h:80/metadata",
            "http://",
            "http://h:x/",
            "http://h:0/",
            "http://u@h/",
            "http://[::1/",
            "http://h/a b",
            "etcd://h:2379",
        ] {
            let err = HttpMetadataStore::new(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn percent_coding() {
        let all: String = (1..0x250u32).filter_map(char::from_u32).collect();
        assert_eq!(percent_decode(&percent_encode(&all)).unwrap(), all);
        assert_eq!(percent_decode("a+b%2B%2fc").unwrap(), "a b+/c");
        for bad in ["%", "%4", "%zz", "%ff"] {
            assert!(percent_decode(bad).is_err(), "{bad}");
        }
        assert_eq!(
            query_param("x=1&key=a%20b&key=c", "key").unwrap().unwrap(),
            "a b"
        );
        assert_eq!(query_param("", "key").unwrap(), None);
    }

    #[tokio::test]
    async fn metrics_and_health() {
        let (addr, _, healthy) = start(HttpServerConfig::default()).await;
        let metrics = raw(addr, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").await;
        assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
        assert!(metrics.contains("Content-Type: text/plain; version=0.0.4"));
        assert!(metrics.ends_with("\r\n\r\nmooncake_up 1\n"));
        let health = b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n";
        assert!(raw(addr, health).await.ends_with("\r\n\r\nOK"));
        healthy.store(false, Ordering::Relaxed);
        assert!(raw(addr, health).await.starts_with("HTTP/1.1 503 "));
        let head = raw(addr, b"HEAD /health HTTP/1.0\r\n\r\n").await;
        assert!(
            head.contains("Content-Length: 9\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let post = raw(addr, b"POST /health HTTP/1.0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD\r\n"));
    }

    #[tokio::test]
    async fn keep_alive_pipelining_and_expect_continue() {
        let (addr, _, _) = start(HttpServerConfig::default()).await;
        let two = raw(
            addr,
            b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi\
            GET /metadata?key=k HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(two.matches("HTTP/1.1 200 OK").count(), 2, "{two}");
        assert!(two.ends_with("Connection: close\r\n\r\nhi"), "{two}");
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"PUT /metadata?key=e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = [0u8; 25];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
        s.write_all(b"xGET /metadata?key=e HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let rest = read_all(&mut s).await;
        assert!(
            rest.starts_with("HTTP/1.1 200 OK") && rest.ends_with("\r\n\r\nx"),
            "{rest}"
        );
    }

    #[tokio::test]
    async fn hostile_requests_get_errors_and_a_closed_connection() {
        let (addr, store, _) = start(HttpServerConfig::default()).await;
        let big_header = format!(
            "GET /health HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(20 << 10)
        );
        let cases: &[(&[u8], &str)] = &[
            (b"GARBAGE\r\n\r\n", "400"),
            (b"\x00\xff\xfe GET /\r\n\r\n", "400"),
            (b"GET /health HTTP/1.1 extra\r\n\r\n", "400"),
            (b"GET /health HTTP/2.0\r\n\r\n", "505"),
            (b"GET /health HTTP/1.1\r\nno colon\r\n\r\n", "400"),
            (b"GET /health HTTP/1.1\r\n folded: x\r\n\r\n", "400"),
            (big_header.as_bytes(), "431"),
            (b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 1099511627776\r\n\r\n", "413"),
            (b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", "400"),
            (b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "400"),
            (b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", "400"),
            (b"PUT /metadata?key=k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", "411"),
            (b"PUT /metadata?key=k HTTP/1.1\r\n\r\n", "411"),
            (b"PUT /metadata?key=k HTTP/1.1\r\nContent-Length: 5\r\n\r\nab", "400"),
            (b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n", "404"),
            (b"PATCH /metadata?key=k HTTP/1.1\r\nConnection: close\r\n\r\n", "405"),
            (b"GET /metadata HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
            (b"GET /metadata?key=%zz HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
            (b"GET /metadata?key=%C3 HTTP/1.1\r\nConnection: close\r\n\r\n", "400"),
        ];
        for (i, (request, status)) in cases.iter().enumerate() {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(request).await.unwrap();
            if i == 13 {
                s.shutdown().await.unwrap(); // the body never comes
            }
            let answer = read_all(&mut s).await;
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "case {i}: {answer}"
            );
        }
        assert_eq!(store.get("k").await.unwrap(), None);
        // The server still works.
        client(addr).put("k", b"v".to_vec()).await.unwrap();
    }

    #[tokio::test]
    async fn stalled_clients_time_out_without_blocking_others() {
        let cfg = HttpServerConfig {
            request_timeout: Duration::from_millis(1000),
            ..Default::default()
        };
        let (addr, _, _) = start(cfg).await;
        let mut half_body = TcpStream::connect(addr).await.unwrap();
        half_body
            .write_all(b"PUT /metadata?key=a HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let mut half_line = TcpStream::connect(addr).await.unwrap();
        half_line.write_all(b"GE").await.unwrap();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let c = client(addr);
        for i in 0..20u8 {
            c.put("b", vec![i]).await.unwrap();
            assert_eq!(c.get("b").await.unwrap().unwrap().value, [i]);
        }
        // Served while the stalled connections were still open.
        let mut byte = [0u8; 1];
        assert!(timeout(Duration::ZERO, half_body.read(&mut byte))
            .await
            .is_err());
        assert!(read_all(&mut half_body).await.starts_with("HTTP/1.1 408 "));
        assert!(read_all(&mut half_line).await.starts_with("HTTP/1.1 408 "));
        assert_eq!(read_all(&mut silent).await, "");
        assert_eq!(c.get("a").await.unwrap(), None);
    }
}
