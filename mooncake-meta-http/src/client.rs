//! The HTTP client: [`HttpMetadataStore`].

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use mooncake_tls::tokio_rustls::client::TlsStream;
use mooncake_tls::{TlsConnector, TlsIdentity};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
    ReadBuf,
};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::timeout;

use mooncake_core::{Error, ErrorCode, MetadataStore, Result, Versioned};

use crate::server::{MORE_HEADER, REVISION_HEADER};

use super::*;

/// Settings of an [`HttpMetadataStore`].
#[derive(Clone, Debug)]
pub struct HttpClientConfig {
    /// Time to establish a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// Time for one request, from sending it to having read the whole response. Default 5 s.
    pub request_timeout: Duration,
    /// Largest response body accepted, in bytes. Default 65 MiB: the server's request limit
    /// (64 MiB) plus room for the key and framing of a listing page's single largest entry.
    pub max_body: usize,
    /// The certificate an `https://` URL connects with (the cluster CA, this node's
    /// certificate and key). Default `None`: an `https://` URL then takes the files the
    /// `MC_TLS_CA`, `MC_TLS_CERT` and `MC_TLS_KEY` environment variables name, and fails without
    /// them. An `http://` URL never uses TLS, and is refused when this is set (a configured
    /// certificate must not be silently unused).
    pub tls: Option<TlsIdentity>,
}

impl Default for HttpClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            max_body: (64 << 20) + (1 << 20),
            tls: None,
        }
    }
}

/// A [`MetadataStore`] served over upstream Mooncake's HTTP metadata protocol
/// (`http://host:port/metadata`), e.g. by [`serve_http`] or by `mooncake_master
/// --enable_http_metadata_server`; over HTTPS with a client certificate for
/// `https://host:port/metadata` (see [`HttpClientConfig::tls`] and
/// [`HttpTls`](crate::HttpTls)). A request the server refuses for the certificate's roles
/// fails with [`Error::PermissionDenied`] and the server's reason.
///
/// With this crate's server every operation is supported, with real revisions (the crate docs
/// describe the protocol extension). With upstream's servers, reads and writes report
/// revision 1, and `compare_and_swap` and `list` fail with [`Error::NotSupported`]. Requests
/// share one keep-alive connection, opened again when it breaks. Servers that answer every
/// `DELETE` with `200` (upstream's Go example server) make [`MetadataStore::delete`] report
/// `true` for missing keys.
#[derive(Debug)]
pub struct HttpMetadataStore {
    pub(super) url: String,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) authority: String,
    pub(super) path: String,
    pub(super) config: HttpClientConfig,
    pub(super) tls: Option<TlsConnector>,
    pub(super) conn: Mutex<Option<BufReader<Conn>>>,
}

/// A connection to the server: plain TCP or TLS.
pub(super) enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Plain(_) => "Conn::Plain",
            Conn::Tls(_) => "Conn::Tls",
        })
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl HttpMetadataStore {
    /// A client for `url` (`http://host[:port]/path`, or `https://host[:port]/path` with the
    /// certificate `MC_TLS_CA`, `MC_TLS_CERT` and `MC_TLS_KEY` name) with default timeouts;
    /// connects lazily.
    pub fn new(url: &str) -> Result<Self> {
        Self::with_config(url, HttpClientConfig::default())
    }

    /// A client for `url` with the given settings; an `https://` URL needs a certificate
    /// ([`HttpClientConfig::tls`]).
    pub fn with_config(url: &str, config: HttpClientConfig) -> Result<Self> {
        let invalid = |why: &str| Error::InvalidArgument(format!("metadata URL {url:?}: {why}"));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("expected http://host:port/path"))?;
        let https = scheme.eq_ignore_ascii_case("https");
        if !https && !scheme.eq_ignore_ascii_case("http") {
            return Err(invalid("only http:// and https:// are supported"));
        }
        if !https && config.tls.is_some() {
            return Err(invalid(
                "a TLS certificate is configured: use https:// to connect with it",
            ));
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
            None if https => 443,
            None => 80,
            Some(Ok(port @ 1..)) => port,
            Some(_) => return Err(invalid("bad port")),
        };
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        let tls = if https {
            let identity = match &config.tls {
                Some(identity) => identity.clone(),
                None => TlsIdentity::from_env().map_err(|e| invalid(&e.to_string()))?,
            };
            let connector =
                TlsConnector::new(&identity, HTTP_ALPN).map_err(|e| invalid(&e.to_string()))?;
            Some(connector.with_timeout(config.connect_timeout))
        } else {
            None
        };
        Ok(Self {
            url: url.to_owned(),
            host: host.to_owned(),
            port,
            authority: authority.to_owned(),
            path: path.to_owned(),
            config,
            tls,
            conn: Mutex::new(None),
        })
    }

    /// The URL this client talks to.
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn connect(&self) -> Result<BufReader<Conn>> {
        let limit = self.config.connect_timeout;
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        match timeout(limit, connect).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                let Some(tls) = &self.tls else {
                    return Ok(BufReader::new(Conn::Plain(stream)));
                };
                match tls.connect(stream, &self.host).await {
                    Ok((stream, _)) => Ok(BufReader::new(Conn::Tls(Box::new(stream)))),
                    Err(Error::PermissionDenied(why)) => Err(Error::PermissionDenied(format!(
                        "connecting to {}: {why}",
                        self.url
                    ))),
                    Err(e) => Err(Error::Metadata(format!("connecting to {}: {e}", self.url))),
                }
            }
            Ok(Err(e)) => Err(Error::Metadata(format!("connecting to {}: {e}", self.url))),
            Err(_) => Err(Error::with_code(
                ErrorCode::RPC_TIMEOUT,
                format!("connecting to {}: no answer within {limit:?}", self.url),
            )),
        }
    }

    /// Sends one request about `key` and returns the response; `params` are appended to the
    /// query (already escaped).
    async fn request(&self, method: &str, key: &str, body: &[u8], params: &str) -> Result<Answer> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("empty metadata key".into()));
        }
        let query = format!("key={}{params}", percent_encode(key));
        self.send(method, key, &query, body).await
    }

    /// Sends one request with `query` and returns the response; `what` names it in errors.
    async fn send(&self, method: &str, what: &str, query: &str, body: &[u8]) -> Result<Answer> {
        let key = what;
        let sep = if self.path.contains('?') { '&' } else { '?' };
        let (path, host) = (&self.path, &self.authority);
        let mut head = format!("{method} {path}{sep}{query} HTTP/1.1\r\nHost: {host}\r\n");
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
            // are idempotent, and a conditional write is retried only when the server closed
            // the connection without answering, which our server does only for requests it did
            // not read). `slot` stays empty, so the retry cannot loop.
            let reused = slot.is_some();
            let mut conn = match slot.take() {
                Some(conn) => conn,
                None => self.connect().await?,
            };
            let exchange = exchange(&mut conn, &request, self.config.max_body);
            match timeout(limit, exchange).await {
                Ok(Ok(answer)) => {
                    if answer.keep_alive {
                        *slot = Some(conn);
                    }
                    return Ok(answer);
                }
                Ok(Err((_, true))) if reused => continue,
                // Under TLS 1.3 the server checks this client's certificate after the client's
                // side of the handshake is done: its refusal arrives as an alert on the first
                // read.
                Ok(Err((why, true))) if self.tls.is_some() && why.contains("alert") => {
                    return Err(Error::PermissionDenied(format!(
                        "{method} {} key {key:?}: the server refused this client's \
                         certificate: {why}",
                        self.url
                    )))
                }
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
        if status == 403 {
            return Error::PermissionDenied(format!(
                "{method} {} key {key:?}: HTTP 403: {body}",
                self.url
            ));
        }
        Error::Metadata(format!(
            "{method} {} key {key:?}: HTTP {status}: {body}",
            self.url
        ))
    }
}

/// A response as the client sees it.
#[derive(Debug, Default)]
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) body: Vec<u8>,
    keep_alive: bool,
    /// [`REVISION_HEADER`](crate::server::REVISION_HEADER), if sent.
    pub(super) revision: Option<u64>,
    /// Whether [`MORE_HEADER`](crate::server::MORE_HEADER) said more listing pages follow.
    pub(super) more: bool,
}

/// Sends `request` and reads the response. An error's flag says no byte of a response arrived,
/// so a retry on a fresh connection is safe.
async fn exchange<S: AsyncBufRead + AsyncWrite + Unpin>(
    conn: &mut S,
    request: &[u8],
    max_body: usize,
) -> std::result::Result<Answer, (String, bool)> {
    let sent = conn.write_all(request).await;
    if let Err(e) = sent.and(conn.flush().await) {
        return Err((format!("sending: {e}"), true));
    }
    match conn.fill_buf().await {
        Ok([]) => return Err(("connection closed before the response".into(), true)),
        Err(e) => return Err((format!("receiving: {e}"), true)),
        // A TLS record (an alert, a handshake) where an HTTP answer should begin.
        Ok([0x15 | 0x16, ..]) => {
            return Err((
                "the server answered with TLS: it serves https:// only".into(),
                false,
            ))
        }
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
) -> std::result::Result<Answer, String> {
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
        let (mut revision, mut more) = (None, false);
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
            } else if name.eq_ignore_ascii_case(REVISION_HEADER.as_bytes()) {
                revision = Some(parse_length(value).ok_or("bad revision header")?);
            } else if name.eq_ignore_ascii_case(MORE_HEADER.as_bytes()) {
                more = value == b"1";
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
        return Ok(Answer {
            status,
            body,
            keep_alive,
            revision,
            more,
        });
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

impl HttpMetadataStore {
    /// The revision a write answered with; its absence means a server without revisions (such
    /// as upstream's), which ignored the condition.
    fn conditional(&self, method: &str, key: &str, answer: Answer) -> Result<Option<u64>> {
        match answer {
            Answer {
                status: 200..=299,
                revision: Some(revision),
                ..
            } => Ok(Some(revision)),
            Answer { status: 412, .. } => Ok(None),
            Answer {
                status: 501, body, ..
            } => Err(Error::NotSupported(format!(
                "{method} {} key {key:?}: {}",
                self.url,
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))),
            Answer {
                status: 200..=299, ..
            } => Err(Error::NotSupported(format!(
                "{method} {} key {key:?}: the server has no revisions, so the write was \
                 unconditional",
                self.url
            ))),
            Answer { status, body, .. } => Err(self.unexpected(method, key, status, &body)),
        }
    }
}

#[async_trait]
impl MetadataStore for HttpMetadataStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        match self.request("GET", key, &[], "").await? {
            Answer {
                status: 200,
                body,
                revision,
                ..
            } => Ok(Some(Versioned {
                value: body,
                revision: revision.unwrap_or(1), // upstream's servers have no revisions
            })),
            Answer { status: 404, .. } => Ok(None),
            Answer { status, body, .. } => Err(self.unexpected("GET", key, status, &body)),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64> {
        match self.request("PUT", key, &value, "").await? {
            Answer {
                status: 200..=299,
                revision,
                ..
            } => Ok(revision.unwrap_or(1)),
            Answer { status, body, .. } => Err(self.unexpected("PUT", key, status, &body)),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        match self.request("DELETE", key, &[], "").await? {
            Answer {
                status: 200..=299, ..
            } => Ok(true),
            Answer { status: 404, .. } => Ok(false),
            Answer { status, body, .. } => Err(self.unexpected("DELETE", key, status, &body)),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Option<Vec<u8>>,
    ) -> Result<Option<u64>> {
        let condition = format!("&expected_revision={expected}");
        let (method, body) = match &value {
            Some(value) => ("PUT", value.as_slice()),
            None => ("DELETE", &[][..]),
        };
        let answer = self.request(method, key, body, &condition).await?;
        self.conditional(method, key, answer)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        let mut out: Vec<(String, Versioned)> = Vec::new();
        loop {
            let mut query = format!("prefix={}", percent_encode(prefix));
            if let Some((last, _)) = out.last() {
                query += &format!("&after={}", percent_encode(last));
            }
            let what = format!("{prefix}*");
            let answer = self.send("GET", &what, &query, &[]).await?;
            match answer.status {
                200 => {}
                // Upstream's servers want a key: no listing there.
                400 | 404 | 405 | 501 => {
                    return Err(Error::NotSupported(format!(
                        "listing {} (HTTP {}): the server does not list keys",
                        self.url, answer.status
                    )))
                }
                status => return Err(self.unexpected("GET", &what, status, &answer.body)),
            }
            let bad =
                |why: &str| Error::Metadata(format!("listing {} {prefix:?}: {why}", self.url));
            let entries = decode_entries(&answer.body).map_err(bad)?;
            if answer.more && entries.is_empty() {
                return Err(bad("an empty page that says more follow"));
            }
            for (key, revision, value) in entries {
                // Keys must be ours and strictly ascending across pages, so paging ends.
                let ascending = out.last().is_none_or(|(last, _)| *last < key);
                if !key.starts_with(prefix) || !ascending {
                    return Err(bad("keys out of order or outside the prefix"));
                }
                out.push((key, Versioned { value, revision }));
            }
            if !answer.more {
                return Ok(out);
            }
        }
    }
}
