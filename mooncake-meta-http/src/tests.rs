//! Tests of the HTTP server and client over loopback sockets.

use mooncake_core::{Error, ErrorCode, MetadataStore};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use mooncake_core::MemoryMetadataStore;

use super::client::*;
use super::server::*;
use super::*;

/// A server on loopback with a fresh store; the flag drives `/health`.
async fn start(cfg: HttpServerConfig) -> (SocketAddr, Arc<MemoryMetadataStore>, Arc<AtomicBool>) {
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
