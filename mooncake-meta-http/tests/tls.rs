//! The HTTP metadata server over HTTPS with client certificates, on loopback: a client
//! certificate reads and writes; a client without a certificate, with another CA's, an expired
//! one or one with only the admin role is refused (`403` and a log line where a request was
//! read) and the stored descriptor stays as it was.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use mooncake_core::{Error, MemoryMetadataStore, MetadataStore};
use mooncake_meta_http::{
    serve_http_routes, HttpClientConfig, HttpEndpoints, HttpMetadataStore, HttpServerConfig,
    HttpTls, RouteResponse, HTTP_ALPN,
};
use mooncake_tls::certs::{self, CertifiedPem};
use mooncake_tls::{Role, TlsConnector, TlsIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the server logged (shared by the tests of this file: assertions look for lines only
/// one test causes).
fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_env_filter("mooncake_meta_http=info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        logs
    })
}

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(buf)?;
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Whether some line holds every one of `words`.
    fn has_line(&self, words: &[&str]) -> bool {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().any(|l| words.iter().all(|w| l.contains(w)))
    }
}

fn cert(ca: &CertifiedPem, name: &str, roles: &[Role]) -> TlsIdentity {
    certs::issue_role_cert(ca, name, &["127.0.0.1"], roles)
        .unwrap()
        .identity(ca)
}

/// An HTTPS metadata server (a master's certificate) over a fresh store, with one extra route
/// (`/inspect`) standing for the embedding program's admin endpoints.
async fn https_server(ca: &CertifiedPem) -> (SocketAddr, Arc<MemoryMetadataStore>) {
    https_server_as(cert(ca, "master-1", &[Role::Master])).await
}

/// [`https_server`] with the server's identity `identity`.
async fn https_server_as(identity: TlsIdentity) -> (SocketAddr, Arc<MemoryMetadataStore>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let store = Arc::new(MemoryMetadataStore::new());
    let endpoints = HttpEndpoints {
        metadata: Some(store.clone()),
        metrics: Arc::new(|| "mooncake_up 1\n".to_owned()),
        health: Arc::new(|| true),
    };
    let config = HttpServerConfig {
        tls: Some(HttpTls::new(&identity).unwrap()),
        request_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let extra = Arc::new(|req: &mooncake_meta_http::RouteRequest<'_>| {
        (req.path == "/inspect").then(|| {
            let who = req.peer.map(|p| p.name()).unwrap_or_default();
            RouteResponse::new(200, "text/plain", format!("hello {who}"))
        })
    });
    serve_http_routes(listener, endpoints, Some(extra), config);
    (addr, store)
}

fn https_client(addr: SocketAddr, identity: TlsIdentity) -> HttpMetadataStore {
    let config = HttpClientConfig {
        tls: Some(identity),
        ..Default::default()
    };
    HttpMetadataStore::with_config(&format!("https://{addr}/metadata"), config).unwrap()
}

/// Sends one raw request over TLS with `identity`; returns the status line and the body.
async fn raw_https(addr: SocketAddr, identity: &TlsIdentity, request: &str) -> (String, String) {
    let connector = TlsConnector::new(identity, HTTP_ALPN).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut tls, _) = connector.connect(tcp, "127.0.0.1").await.unwrap();
    tls.write_all(request.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    // A TLS close without close_notify is still the end of the answer.
    let _ = read.expect("the server did not answer");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

#[tokio::test]
async fn a_client_certificate_reads_and_writes_over_https() {
    logs();
    let ca = certs::new_ca("http test CA").unwrap();
    let (addr, store) = https_server(&ca).await;
    let client = https_client(addr, cert(&ca, "node-a", &[Role::Client]));
    let revision = client
        .put("seg/node-a", b"descriptor".to_vec())
        .await
        .unwrap();
    let got = client.get("seg/node-a").await.unwrap().unwrap();
    assert_eq!(
        (got.value.as_slice(), got.revision),
        (&b"descriptor"[..], revision)
    );
    assert_eq!(
        store.get("seg/node-a").await.unwrap().unwrap().value,
        b"descriptor"
    );
    let swapped = client
        .compare_and_swap("seg/node-a", revision, Some(b"v2".to_vec()))
        .await
        .unwrap();
    assert!(swapped.is_some());
    assert_eq!(client.list("seg/").await.unwrap().len(), 1);
    assert!(client.delete("seg/node-a").await.unwrap());
    assert_eq!(client.get("seg/node-a").await.unwrap(), None);
    // A master may write too; an admin reads the extra route, and the handler sees who asks.
    let master = https_client(addr, cert(&ca, "master-2", &[Role::Master]));
    master.put("seg/m", b"x".to_vec()).await.unwrap();
    let admin = cert(&ca, "ops", &[Role::Admin]);
    let (status, body) = raw_https(
        addr,
        &admin,
        "GET /inspect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, "hello ops");
    let (status, _) = raw_https(
        addr,
        &admin,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status.contains("200"), "{status}");
}

#[tokio::test]
async fn writes_without_the_right_certificate_are_refused_and_change_nothing() {
    let logs = logs();
    let ca = certs::new_ca("http test CA").unwrap();
    let foreign = certs::new_ca("intruder CA").unwrap();
    let (addr, store) = https_server(&ca).await;
    let owner = https_client(addr, cert(&ca, "node-a", &[Role::Client]));
    owner.put("seg/node-a", b"original".to_vec()).await.unwrap();
    let original = store.get("seg/node-a").await.unwrap().unwrap();

    // No certificate at all: plain HTTP to the HTTPS port.
    let plain = HttpMetadataStore::new(&format!("http://{addr}/metadata")).unwrap();
    let err = plain.put("seg/node-a", b"evil".to_vec()).await.unwrap_err();
    assert!(err.to_string().contains("https:// only"), "{err}");
    assert!(plain.delete("seg/node-a").await.is_err());
    // A certificate of another CA (the client trusts ours, to reach the server).
    let intruder = https_client(
        addr,
        TlsIdentity {
            ca_pem: ca.cert_pem.clone(),
            ..cert(&foreign, "node-a", &[Role::Client, Role::Master])
        },
    );
    match intruder.put("seg/node-a", b"evil".to_vec()).await {
        Err(Error::PermissionDenied(why)) => assert!(why.contains("refused"), "{why}"),
        other => panic!("a foreign CA's certificate wrote: {other:?}"),
    }
    // The owner's name and role, but expired.
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    let expired = certs::issue_cert(
        &ca,
        "node-a",
        &["127.0.0.1"],
        &[Role::Client],
        now - 2 * day,
        now - day,
    )
    .unwrap();
    let expired = https_client(addr, expired.identity(&ca));
    assert!(matches!(
        expired.put("seg/node-a", b"evil".to_vec()).await,
        Err(Error::PermissionDenied(_))
    ));
    // The admin role alone reads but does not publish or remove descriptors.
    let admin = https_client(addr, cert(&ca, "ops", &[Role::Admin]));
    assert_eq!(
        admin.get("seg/node-a").await.unwrap().unwrap().value,
        b"original"
    );
    for result in [
        admin.put("seg/node-a", b"evil".to_vec()).await.map(|_| ()),
        admin.delete("seg/node-a").await.map(|_| ()),
        admin
            .compare_and_swap("seg/node-a", original.revision, None)
            .await
            .map(|_| ()),
    ] {
        match result {
            Err(Error::PermissionDenied(why)) => {
                assert!(
                    why.contains("403") && why.contains("client or master"),
                    "{why}"
                )
            }
            other => panic!("an admin certificate wrote: {other:?}"),
        }
    }
    // A client certificate does not reach the embedding program's routes.
    let (status, body) = raw_https(
        addr,
        &cert(&ca, "node-b", &[Role::Client]),
        "GET /inspect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(status.contains("403"), "{status}");
    assert!(body.contains("needs the admin role"), "{body}");

    let now = store.get("seg/node-a").await.unwrap().unwrap();
    assert_eq!(now, original, "a refused request changed the descriptor");
    for words in [
        &["refused an HTTPS connection", "UnknownIssuer"][..],
        &["refused an HTTPS connection", "certificate expired"],
        &["refused PUT /metadata", "ops", "client or master"],
        &["refused GET /inspect", "node-b"],
    ] {
        assert!(logs.has_line(words), "no log line with {words:?}");
    }
}

#[test]
fn https_urls_need_a_certificate_and_http_urls_refuse_one() {
    let ca = certs::new_ca("http test CA").unwrap();
    let config = HttpClientConfig {
        tls: Some(cert(&ca, "node-a", &[Role::Client])),
        ..Default::default()
    };
    let err = HttpMetadataStore::with_config("http://127.0.0.1:1/metadata", config).unwrap_err();
    assert!(err.to_string().contains("use https://"), "{err}");
    if mooncake_tls::TLS_ENV
        .iter()
        .all(|v| std::env::var_os(v).is_none())
    {
        let err = HttpMetadataStore::new("https://127.0.0.1:1/metadata").unwrap_err();
        assert!(err.to_string().contains("MC_TLS_CA"), "{err}");
    }
}

/// Sends `request` on an open keep-alive connection and reads one response: the status line
/// and the body, or `None` when the server closed the connection instead.
async fn exchange<S>(conn: &mut S, request: &str) -> Option<(String, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    conn.write_all(request.as_bytes()).await.ok()?;
    conn.flush().await.ok()?;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    let read_head = async {
        while !got.ends_with(b"\r\n\r\n") {
            match conn.read(&mut byte).await {
                Ok(1) => got.push(byte[0]),
                _ => return false,
            }
        }
        true
    };
    let whole = tokio::time::timeout(Duration::from_secs(5), read_head)
        .await
        .expect("the server neither answered nor closed");
    if !whole {
        return None;
    }
    let head = String::from_utf8_lossy(&got).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body).await.ok()?;
    let status = head.lines().next().unwrap_or_default().to_owned();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn a_certificate_revoked_while_connected_is_cut_off_at_its_next_request() {
    let logs = logs();
    let ca = certs::new_ca("http test CA").unwrap();
    let dir = std::env::temp_dir().join(format!("mc-http-crl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let crl = dir.join("crl.pem");
    certs::write_revocation_list(&ca, &crl, &[], 1).unwrap();
    let server = cert(&ca, "master-1", &[Role::Master])
        .with_crl_file(&crl)
        .unwrap();
    let (addr, store) = https_server_as(server).await;
    store.put("seg/a", b"descriptor".to_vec()).await.unwrap();
    let node = cert(&ca, "node-revoked", &[Role::Client]);
    let connector = TlsConnector::new(&node, HTTP_ALPN).unwrap();
    let connect = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector
            .connect(tcp, "127.0.0.1")
            .await
            .map(|(tls, _)| tls)
    };
    let metrics = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let metadata = "GET /metadata?key=seg/a HTTP/1.1\r\nHost: x\r\n\r\n";

    // A keep-alive connection established (and served) before the revocation.
    let mut kept = connect().await.unwrap();
    for request in [metrics, metadata] {
        let (status, _) = exchange(&mut kept, request).await.expect("served");
        assert!(status.contains("200"), "{status}");
    }

    // The CA revokes the certificate: the same connection's next request gets 403 (once the
    // server looked at the list again, at most every half second) and the connection closes.
    certs::write_revocation_list(&ca, &crl, &[&node.cert_pem], 2).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = exchange(&mut kept, metadata)
            .await
            .expect("the server closed the connection without an answer");
        if !status.contains("200") {
            break (status, body);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a revoked certificate's open connection is still served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.contains("403"), "{status}");
    assert!(body.contains("node-revoked was revoked"), "{body}");
    assert!(
        exchange(&mut kept, metrics).await.is_none(),
        "the connection stays open after the refusal"
    );
    assert!(
        logs.has_line(&["closing an HTTPS connection", "node-revoked was revoked"]),
        "no log line names the revoked certificate"
    );

    // A fresh connection is refused at the handshake (in TLS 1.3 the client's side completes
    // first: the refusal shows as no answer).
    if let Ok(mut fresh) = connect().await {
        assert!(
            exchange(&mut fresh, metrics).await.is_none(),
            "a revoked certificate was served on a new connection"
        );
    }
    let e = https_client(addr, node).get("seg/a").await.unwrap_err();
    assert!(!e.to_string().is_empty());
    // Other certificates are still served.
    let other = https_client(addr, cert(&ca, "node-b", &[Role::Client]));
    assert!(other.get("seg/a").await.unwrap().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}
