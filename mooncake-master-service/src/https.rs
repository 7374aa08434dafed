//! The master's metrics port over mutual TLS: `/metrics`, `/health` and the admin endpoints of
//! [`admin_http`](crate::admin_http), served to peers with a certificate of the cluster CA.
//!
//! A master started with TLS serves its metrics port with this server instead of the plain one
//! of `mooncake-meta-http` (which speaks over bare TCP only). It answers the same paths with the
//! same bodies; what differs is who gets an answer:
//!
//! - every connection must present a certificate of the cluster CA (the TLS handshake refuses
//!   others: none, another CA's, an expired one);
//! - `/metrics`, `/metrics/summary` and `/health` answer any such certificate;
//! - the endpoints that list or look up keys and segments need the `admin` role; others get
//!   `403` with the reason, and the refusal is logged with the peer's name.
//!
//! It serves GET and HEAD only (no endpoint here takes a body): a request with a body is
//! answered `413` and the connection closed. Connections are capped like the RPC's, a request
//! must arrive within [`HttpsLimits::request_timeout`], and an idle keep-alive connection is
//! closed after it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mooncake_core::admission::Admission;
use mooncake_meta_http::{ExtraRoutes, RouteRequest};
use mooncake_rpc::RefusalLog;
use mooncake_tls::{PeerIdentity, Role, TlsAcceptor};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The ALPN protocol an HTTPS listener offers.
pub const HTTPS_ALPN: &[u8] = b"http/1.1";

/// What the HTTPS metrics port serves.
#[derive(Clone)]
pub struct HttpsEndpoints {
    /// Renders the Prometheus text served at `/metrics`.
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// Whether `/health` answers `200 OK` (else `503`).
    pub health: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Every other path (the admin endpoints); `None` from it answers `404`.
    pub routes: ExtraRoutes,
    /// Paths that need the `admin` role.
    pub admin_only: fn(&str) -> bool,
}

/// Limits of the HTTPS metrics port.
#[derive(Clone, Debug)]
pub struct HttpsLimits {
    /// Connections open at once. Default 1024 (the plain server's).
    pub max_connections: usize,
    /// Connections open at once from one IP address. Default 128.
    pub max_per_address: usize,
    /// Time for the handshake, for a request to arrive in full and for its answer to be
    /// written; also how long an idle connection is kept. Default 10 s.
    pub request_timeout: Duration,
    /// Longest request line plus headers, in bytes; longer gets `431`. Default 16 KiB.
    pub max_head: usize,
}

impl Default for HttpsLimits {
    fn default() -> Self {
        HttpsLimits {
            max_connections: 1024,
            max_per_address: 128,
            request_timeout: Duration::from_secs(10),
            max_head: 16 << 10,
        }
    }
}

/// Serves `endpoints` over mutual TLS on `listener` until the returned task is aborted.
pub fn serve_https(
    listener: TcpListener,
    tls: TlsAcceptor,
    endpoints: HttpsEndpoints,
    limits: HttpsLimits,
) -> JoinHandle<()> {
    let admission = Admission::new(
        "metrics https",
        limits.max_connections,
        limits.max_per_address,
    );
    let tls = tls.with_timeout(limits.request_timeout);
    let shared = Arc::new((endpoints, limits, RefusalLog::new()));
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let Ok(admitted) = admission.admit(peer.ip()) else {
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        let (tls, shared) = (tls.clone(), shared.clone());
                        conns.spawn(async move {
                            let _admitted = admitted;
                            let (endpoints, limits, refusals) = &*shared;
                            match tls.accept(stream).await {
                                Ok((stream, identity)) => {
                                    let conn = Conn { peer, identity, endpoints, limits, refusals };
                                    conn.serve(stream).await;
                                }
                                Err(e) => refusals.refused("metrics https", &peer.to_string(), &e),
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!("metrics https accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
    })
}

/// One answer.
struct Answer {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    more: bool,
}

fn text(status: u16, body: impl Into<String>) -> Answer {
    Answer {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.into().into_bytes(),
        more: false,
    }
}

/// One parsed request head.
struct Head {
    method: String,
    target: String,
    close: bool,
}

struct Conn<'a> {
    peer: SocketAddr,
    identity: PeerIdentity,
    endpoints: &'a HttpsEndpoints,
    limits: &'a HttpsLimits,
    refusals: &'a RefusalLog,
}

impl Conn<'_> {
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(&self, stream: S) {
        let mut conn = BufReader::new(stream);
        loop {
            let read = tokio::time::timeout(self.limits.request_timeout, self.read_head(&mut conn));
            let head = match read.await {
                Ok(Ok(Some(head))) => head,
                Ok(Ok(None)) | Err(_) => return,
                Ok(Err(answer)) => {
                    let _ = self.write(&mut conn, answer, true, false).await;
                    return;
                }
            };
            let answer = self.route(&head);
            let head_only = head.method == "HEAD";
            if self
                .write(&mut conn, answer, head.close, head_only)
                .await
                .is_err()
                || head.close
            {
                return;
            }
        }
    }

    /// Reads one request head; `Ok(None)` when the connection closed (or was idle) before one
    /// began, `Err` with the answer to close with when it is malformed, too large or has a
    /// body.
    async fn read_head<R: AsyncBufRead + Unpin>(&self, r: &mut R) -> Result<Option<Head>, Answer> {
        let mut head = Vec::new();
        loop {
            let buf = r
                .fill_buf()
                .await
                .map_err(|_| text(400, "connection error"))?;
            if buf.is_empty() {
                return if head.is_empty() {
                    Ok(None)
                } else {
                    Err(text(400, "truncated request"))
                };
            }
            let before = head.len();
            head.extend_from_slice(buf);
            let end = find_end(&head, before);
            let used = match end {
                Some(end) => end - before,
                None => buf.len(),
            };
            r.consume(used);
            if let Some(end) = end {
                head.truncate(end);
                break;
            }
            if head.len() > self.limits.max_head {
                return Err(text(431, "request head too large"));
            }
        }
        let head = String::from_utf8(head).map_err(|_| text(400, "request head is not UTF-8"))?;
        let mut lines = head.split("\r\n").skip_while(|l| l.is_empty());
        let line = lines.next().unwrap_or_default();
        let mut parts = line.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(text(400, "malformed request line"));
        };
        let http11 = match version {
            "HTTP/1.1" => true,
            "HTTP/1.0" => false,
            _ => return Err(text(505, "only HTTP/1.x is supported")),
        };
        let (mut saw_close, mut keep_alive) = (false, false);
        for header in lines.filter(|l| !l.is_empty()) {
            let Some((name, value)) = header.split_once(':') else {
                return Err(text(400, "malformed header"));
            };
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") && value != "0" {
                return Err(text(413, "this server takes no request bodies"));
            }
            if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(text(413, "this server takes no request bodies"));
            }
            if name.eq_ignore_ascii_case("connection") {
                for option in value.split(',').map(str::trim) {
                    saw_close |= option.eq_ignore_ascii_case("close");
                    keep_alive |= option.eq_ignore_ascii_case("keep-alive");
                }
            }
        }
        Ok(Some(Head {
            method: method.to_owned(),
            target: target.to_owned(),
            close: saw_close || (!http11 && !keep_alive),
        }))
    }

    fn route(&self, head: &Head) -> Answer {
        let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
        let read = matches!(head.method.as_str(), "GET" | "HEAD");
        let e = self.endpoints;
        if (e.admin_only)(path) {
            if let Err(why) = self
                .identity
                .require_any(&[Role::Admin], &format!("read {path}"))
            {
                let who = format!("{} ({})", self.identity.name(), self.peer);
                self.refusals.refused("metrics https", &who, &why);
                return text(403, why.to_string());
            }
        }
        match path {
            "/metrics" if read => Answer {
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: (e.metrics)().into_bytes(),
                ..text(200, "")
            },
            "/health" if read => match (e.health)() {
                true => text(200, "OK"),
                false => text(503, "unhealthy"),
            },
            "/metrics" | "/health" => text(405, "method not allowed"),
            _ => {
                let view = RouteRequest {
                    method: &head.method,
                    path,
                    query,
                };
                match (e.routes)(&view) {
                    Some(r) => Answer {
                        status: r.status,
                        content_type: r.content_type,
                        body: r.body,
                        more: r.more,
                    },
                    None => text(404, "not found"),
                }
            }
        }
    }

    async fn write<W: AsyncWrite + Unpin>(
        &self,
        w: &mut W,
        answer: Answer,
        close: bool,
        head_only: bool,
    ) -> std::io::Result<()> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            answer.status,
            reason(answer.status),
            answer.content_type,
            answer.body.len()
        );
        if answer.status == 405 {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        if answer.more {
            out.push_str("X-Mooncake-More: 1\r\n");
        }
        if close {
            out.push_str("Connection: close\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head_only {
            bytes.extend_from_slice(&answer.body);
        }
        let sent = async {
            w.write_all(&bytes).await?;
            w.flush().await?;
            if close {
                w.shutdown().await?;
            }
            Ok(())
        };
        tokio::time::timeout(self.limits.request_timeout, sent)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }
}

/// The end of the head (just past `\r\n\r\n`) in `head`, searching from a little before
/// `from` (the terminator may straddle two reads).
fn find_end(head: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    head[start..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| start + i + 4)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mooncake_meta_http::RouteResponse;
    use mooncake_tls::{certs, TlsConnector};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    /// Sends `requests` on one TLS connection and reads until the server closes it.
    async fn exchange(addr: SocketAddr, tls: &TlsConnector, requests: &str) -> String {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut s, _) = tls.connect(tcp, "127.0.0.1").await.unwrap();
        s.write_all(requests.as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keep_alive_head_bodies_and_roles() {
        let ca = certs::new_ca("https test CA").unwrap();
        let id = |name: &str, roles: &[Role]| {
            certs::issue_role_cert(&ca, name, &["127.0.0.1"], roles)
                .unwrap()
                .identity(&ca)
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes: ExtraRoutes = Arc::new(|r: &RouteRequest<'_>| {
            (r.path == "/secret").then(|| RouteResponse::new(200, "text/plain", "listing"))
        });
        let server = serve_https(
            listener,
            TlsAcceptor::new(&id("master", &[Role::Master]), HTTPS_ALPN).unwrap(),
            HttpsEndpoints {
                metrics: Arc::new(|| "m 1\n".to_owned()),
                health: Arc::new(|| true),
                routes,
                admin_only: |p| p == "/secret",
            },
            HttpsLimits {
                request_timeout: Duration::from_secs(2),
                ..HttpsLimits::default()
            },
        );
        let client = TlsConnector::new(&id("node", &[Role::Client]), HTTPS_ALPN).unwrap();
        // Three requests on one connection: keep-alive, HEAD without the body, then close.
        let out = exchange(
            addr,
            &client,
            "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n\
             HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n\
             GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 3, "{out}");
        assert_eq!(out.matches("m 1\n").count(), 1, "{out}");
        assert!(out.ends_with("\r\n\r\nOK"), "{out}");
        // The admin path needs the admin role; a body, another method or a bad line is refused.
        for (request, status) in [
            (
                "GET /secret HTTP/1.1\r\nConnection: close\r\n\r\n",
                "403 Forbidden",
            ),
            ("GET /nothing HTTP/1.0\r\n\r\n", "404 Not Found"),
            ("POST /metrics HTTP/1.0\r\n\r\n", "405 Method Not Allowed"),
            (
                "PUT /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
                "413",
            ),
            ("GET /metrics HTTP/2\r\n\r\n", "505"),
            ("garbage\r\n\r\n", "400 Bad Request"),
        ] {
            let out = exchange(addr, &client, request).await;
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status}")),
                "{request}: {out}"
            );
        }
        let admin = TlsConnector::new(&id("ops", &[Role::Admin]), HTTPS_ALPN).unwrap();
        let out = exchange(addr, &admin, "GET /secret HTTP/1.0\r\n\r\n").await;
        assert!(
            out.starts_with("HTTP/1.1 200 OK") && out.ends_with("listing"),
            "{out}"
        );
        // A head that never ends is cut off.
        let out = exchange(
            addr,
            &client,
            &format!("GET /{} HTTP/1.1\r\n", "a".repeat(40_000)),
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        server.abort();
    }
}
