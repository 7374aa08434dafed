//! The RPC over mutual TLS, on real loopback sockets with certificates of a real CA: who gets
//! through, what the handler learns of them, and how everyone else is turned away.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mooncake_core::ErrorCode;
use mooncake_rpc::rpc::{tls_acceptor, tls_connector};
use mooncake_rpc::{
    bind, serve_tls, Caller, Handler, RpcClient, RpcClientConfig, ServeLimits, TlsIdentity,
};
use mooncake_tls::certs::{self, CertifiedPem};
use mooncake_tls::Role;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Answers with who asked (certificate name and roles) and what they sent; records every
/// request in order.
struct WhoAsked(Mutex<Vec<String>>);

#[async_trait::async_trait]
impl Handler<String, String> for WhoAsked {
    async fn handle(&self, request: String) -> String {
        format!("anonymous:{request}")
    }

    async fn handle_from(&self, caller: &Caller, request: String) -> String {
        self.0.lock().unwrap().push(request.clone());
        match &caller.identity {
            Some(id) => format!(
                "{}[{}]:{request}",
                id.name(),
                id.roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            None => format!("plain:{request}"),
        }
    }
}

fn identity(ca: &CertifiedPem, name: &str, roles: &[Role]) -> TlsIdentity {
    certs::issue_role_cert(ca, name, &["127.0.0.1"], roles)
        .unwrap()
        .identity(ca)
}

fn quick() -> RpcClientConfig {
    RpcClientConfig {
        call_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_secs(2),
    }
}

struct Server {
    addr: String,
    handler: Arc<WhoAsked>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(server: Option<&TlsIdentity>, limits: ServeLimits) -> Server {
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handler = Arc::new(WhoAsked(Mutex::new(Vec::new())));
    let tls = server.map(|s| tls_acceptor(s).unwrap());
    let task = serve_tls(listener, handler.clone(), limits, tls);
    Server {
        addr,
        handler,
        task,
    }
}

fn client(addr: &str, identity: &TlsIdentity) -> RpcClient {
    RpcClient::with_tls(addr, quick(), Some(tls_connector(identity).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_served_and_the_handler_learns_their_certificate() {
    let ca = certs::new_ca("rpc test CA").unwrap();
    let master = identity(&ca, "master-1", &[Role::Master]);
    let server = start(Some(&master), ServeLimits::default()).await;
    let node = Arc::new(client(
        &server.addr,
        &identity(&ca, "node-7", &[Role::Client]),
    ));
    let r: String = node.call(&"hello".to_string()).await.unwrap();
    assert_eq!(r, "node-7[client]:hello");
    // Concurrent calls share the connection and each gets its own answer.
    let calls = (0..64).map(|i| {
        let node = node.clone();
        async move { node.call::<_, String>(&format!("c{i}")).await }
    });
    for (i, r) in futures::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(r.unwrap(), format!("node-7[client]:c{i}"));
    }
    // Notices written from synchronous code go out in order, before later calls.
    for i in 0..50 {
        assert!(node.try_send_now(&format!("n{i}")));
    }
    let r: String = node.call(&"last".to_string()).await.unwrap();
    assert_eq!(r, "node-7[client]:last");
    let seen = server.handler.0.lock().unwrap().clone();
    let tail: Vec<String> = (0..50)
        .map(|i| format!("n{i}"))
        .chain(["last".to_string()])
        .collect();
    assert_eq!(seen[seen.len() - 51..], tail[..]);
    // An admin's certificate says so too.
    let ops = client(&server.addr, &identity(&ca, "ops", &[Role::Admin]));
    let r: String = ops.call(&"members".to_string()).await.unwrap();
    assert_eq!(r, "ops[admin]:members");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_expired_and_plain_peers_are_refused_and_members_still_served() {
    let ca = certs::new_ca("rpc test CA").unwrap();
    let server = start(
        Some(&identity(&ca, "master-1", &[Role::Master])),
        ServeLimits::default(),
    )
    .await;
    let member = client(&server.addr, &identity(&ca, "node-1", &[Role::Client]));
    // A certificate of another CA, held by a node that trusts ours.
    let foreign = certs::new_ca("intruder CA").unwrap();
    let intruder = TlsIdentity {
        ca_pem: ca.cert_pem.clone(),
        ..identity(&foreign, "intruder", &[Role::Admin])
    };
    let now = SystemTime::now();
    let expired = certs::issue_cert(
        &ca,
        "expired",
        &["127.0.0.1"],
        &[Role::Admin],
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )
    .unwrap()
    .identity(&ca);
    for (who, id) in [("foreign", &intruder), ("expired", &expired)] {
        let c = client(&server.addr, id);
        let e = c.call::<_, String>(&"x".to_string()).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::RPC_FAIL, "{who}: {e}");
        let text = e.to_string();
        assert!(
            // The server's alert names the reason (UnknownCA, CertificateExpired); a reset
            // that overtakes it still fails the call.
            text.contains("received fatal alert") || text.contains("connection"),
            "{who}: {text}"
        );
    }
    // A plain client is told that the server requires TLS.
    let plain = RpcClient::new(server.addr.clone(), quick());
    let e = plain.call::<_, String>(&"x".to_string()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::ILLEGAL_CLIENT, "{e}");
    assert!(e.to_string().contains("requires mutual TLS"), "{e}");
    // None of them reached the handler; the member is served throughout.
    assert!(server.handler.0.lock().unwrap().is_empty());
    let r: String = member.call(&"ok".to_string()).await.unwrap();
    assert_eq!(r, "node-1[client]:ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_of_a_plain_server_fails_clearly_and_plain_clients_are_unchanged() {
    let ca = certs::new_ca("rpc test CA").unwrap();
    let server = start(None, ServeLimits::default()).await;
    let plain = RpcClient::new(server.addr.clone(), quick());
    let r: String = plain.call(&"a".to_string()).await.unwrap();
    assert_eq!(r, "plain:a");
    let tls = client(&server.addr, &identity(&ca, "node-1", &[Role::Client]));
    let e = tls.call::<_, String>(&"b".to_string()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::RPC_FAIL, "{e}");
    assert!(e.to_string().contains("running without TLS"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_surplus_connections_count_against_the_limits() {
    let ca = certs::new_ca("rpc test CA").unwrap();
    let limits = ServeLimits {
        max_connections: 64,
        max_per_address: 3,
        first_frame_timeout: Duration::from_millis(400),
        frame_timeout: Duration::from_millis(400),
    };
    let server = start(Some(&identity(&ca, "master-1", &[Role::Master])), limits).await;
    let member = client(&server.addr, &identity(&ca, "node-1", &[Role::Client]));
    let _: String = member.call(&"first".to_string()).await.unwrap();
    // Two connections that never start a handshake fill this address's places.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(&server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut surplus = TcpStream::connect(&server.addr).await.unwrap();
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_millis(300), surplus.read(&mut b)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    // The silent ones are closed at the handshake timeout, which frees their places.
    for s in silent.iter_mut() {
        let closed = tokio::time::timeout(Duration::from_secs(3), s.read(&mut b)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    }
    let second = client(&server.addr, &identity(&ca, "node-2", &[Role::Client]));
    let r: String = second.call(&"in".to_string()).await.unwrap();
    assert_eq!(r, "node-2[client]:in");
    let r: String = member.call(&"still".to_string()).await.unwrap();
    assert_eq!(r, "node-1[client]:still");
}
