//! Fuzzes the HTTP metadata server with arbitrary bytes from a client, over a real loopback
//! connection: request lines, headers, lengths, bodies, pipelined requests, cut-short input.
//!
//! Checks: no panic in the server (a panic in its connection task aborts this process); every
//! answer starts with an HTTP/1.1 status line; the server still answers a well-formed request
//! afterwards, and a descriptor stored by one request reads back from another.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mooncake_core::MemoryMetadataStore;
use mooncake_meta_http::{serve_http_with, HttpEndpoints, HttpServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

struct Server {
    rt: Runtime,
    addr: SocketAddr,
}

fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let addr = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let endpoints = HttpEndpoints {
                metadata: Some(Arc::new(MemoryMetadataStore::default())),
                metrics: Arc::new(|| "# metrics\n".to_owned()),
                health: Arc::new(|| true),
            };
            let config = HttpServerConfig {
                max_head: 2 << 10,
                max_body: 64 << 10,
                request_timeout: Duration::from_millis(300),
                max_connections: 64,
                max_list_page: 4 << 10,
                ..Default::default()
            };
            serve_http_with(listener, endpoints, config);
            addr
        });
        Server { rt, addr }
    })
}

/// Sends `bytes`, closes the write side, and returns everything answered until the server
/// closes (or a second passes).
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut out)).await;
    out
}

fuzz_target!(|data: &[u8]| {
    let s = server();
    s.rt.block_on(async {
        let answer = exchange(s.addr, data).await;
        if !answer.is_empty() {
            assert!(
                answer.starts_with(b"HTTP/1.1 ") && answer.len() >= 12,
                "not a status line: {:?}",
                String::from_utf8_lossy(&answer[..answer.len().min(64)])
            );
            let code = &answer[9..12];
            assert!(code.iter().all(u8::is_ascii_digit), "status {code:?}");
        }
        // The server still serves: a descriptor put by one connection reads back on another.
        let key = format!("probe-{}", data.len());
        let put = format!(
            "PUT /metadata?key={key} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        );
        let answer = exchange(s.addr, put.as_bytes()).await;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&answer));
        let get = format!("GET /metadata?key={key} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let answer = exchange(s.addr, get.as_bytes()).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200") && answer.ends_with(b"\r\n\r\nok"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    });
});
