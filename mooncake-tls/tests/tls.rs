//! Mutual TLS over real loopback sockets: who is admitted, who is refused and why, the
//! authenticate-then-plain mode, and certificates made by the `mooncake_certs` command.

use std::time::{Duration, SystemTime};

use mooncake_core::Error;
use mooncake_tls::certs::{self, CertifiedPem};
use mooncake_tls::{Role, TlsAcceptor, TlsConnector, TlsIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ALPN: &[u8] = b"mooncake-test/1";

fn ca() -> CertifiedPem {
    certs::new_ca("test CA").unwrap()
}

fn node(ca: &CertifiedPem, name: &str, roles: &[Role]) -> TlsIdentity {
    certs::issue_role_cert(ca, name, &["127.0.0.1"], roles)
        .unwrap()
        .identity(ca)
}

/// Accepts one connection with `server` and connects with `client`; returns both outcomes
/// (the server's peer name, or its error; the client's, likewise).
async fn handshake(
    server: &TlsIdentity,
    client: &TlsIdentity,
    plain: bool,
) -> (Result<String, Error>, Result<String, Error>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::new(server, ALPN)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        if plain {
            let (mut tcp, peer) = acceptor.accept_plain(tcp).await?;
            // Plain bytes after authentication: echo one message.
            let mut buf = [0u8; 5];
            tcp.read_exact(&mut buf).await?;
            tcp.write_all(&buf).await?;
            Ok(format!("{}:{}", peer.name(), String::from_utf8_lossy(&buf)))
        } else {
            let (mut tls, peer) = acceptor.accept(tcp).await?;
            let mut buf = [0u8; 5];
            tls.read_exact(&mut buf).await?;
            tls.write_all(&buf).await?;
            tls.flush().await?;
            Ok(format!("{}:{}", peer.name(), String::from_utf8_lossy(&buf)))
        }
    });
    let connector = TlsConnector::new(client, ALPN)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connected: Result<String, Error> = async {
        let mut buf = [0u8; 5];
        let name = if plain {
            let (mut tcp, peer) = connector.connect_plain(tcp, "127.0.0.1").await?;
            tcp.write_all(b"hello").await?;
            tcp.read_exact(&mut buf).await?;
            peer.name()
        } else {
            let (mut tls, peer) = connector.connect(tcp, "127.0.0.1").await?;
            tls.write_all(b"hello").await?;
            tls.flush().await?;
            tls.read_exact(&mut buf).await?;
            peer.name()
        };
        Ok(format!("{name}:{}", String::from_utf8_lossy(&buf)))
    }
    .await;
    (accept.await.unwrap(), connected)
}

/// The identity of `name` as the `mooncake_certs` command wrote it into `dir`.
fn identity_in(dir: &std::path::Path, name: &str) -> TlsIdentity {
    TlsIdentity::from_pem_files(
        dir.join("ca.pem"),
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    )
    .unwrap()
}

#[tokio::test]
async fn members_of_one_ca_talk_and_learn_each_others_roles() {
    let ca = ca();
    let server = node(&ca, "master-1", &[Role::Master]);
    let client = node(&ca, "ops", &[Role::Admin, Role::Client]);
    for plain in [false, true] {
        let (s, c) = handshake(&server, &client, plain).await;
        assert_eq!(s.unwrap(), "ops:hello");
        assert_eq!(c.unwrap(), "master-1:hello");
    }
    // A certificate listing no role (made by another tool) is a client certificate; master
    // and admin are only ever granted explicitly.
    let plain = node(&ca, "made-elsewhere", &[]).own().unwrap();
    assert_eq!(plain.roles, vec![Role::Client]);
    let own = client.own().unwrap();
    assert_eq!(own.roles, vec![Role::Client, Role::Admin]);
    own.require_any(&[Role::Admin], "change membership")
        .unwrap();
    let err = server
        .own()
        .unwrap()
        .require_any(&[Role::Admin], "change membership")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("master-1 (roles: master) may not change membership"),
        "{err}"
    );
}

#[tokio::test]
async fn plain_mode_hands_over_a_socket_that_carries_bulk_bytes_unchanged() {
    let ca = ca();
    let server = node(&ca, "target", &[Role::Client]);
    let client = node(&ca, "initiator", &[Role::Client]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::new(&server, ALPN).unwrap();
    let payload: Vec<u8> = (0..4 << 20).map(|i: u32| (i * 7 + 3) as u8).collect();
    let expected = payload.clone();
    let echo = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut tcp, _) = acceptor.accept_plain(tcp).await.unwrap();
        let mut got = vec![0u8; expected.len()];
        tcp.read_exact(&mut got).await.unwrap();
        assert!(got == expected);
        tcp.write_all(&got).await.unwrap();
    });
    let connector = TlsConnector::new(&client, ALPN).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (tcp, _) = connector.connect_plain(tcp, "127.0.0.1").await.unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let writer = {
        let payload = payload.clone();
        tokio::spawn(async move { wr.write_all(&payload).await.unwrap() })
    };
    let mut back = vec![0u8; payload.len()];
    rd.read_exact(&mut back).await.unwrap();
    writer.await.unwrap();
    echo.await.unwrap();
    assert!(back == payload);
}

#[tokio::test]
async fn a_foreign_ca_an_expired_certificate_and_a_wrong_host_are_refused() {
    let ca = ca();
    let server = node(&ca, "target", &[Role::Client]);
    let foreign = certs::new_ca("intruder CA").unwrap();
    // A certificate of another CA, presented by a client that trusts ours.
    let intruder = TlsIdentity {
        ca_pem: ca.cert_pem.clone(),
        ..node(&foreign, "intruder", &[Role::Admin])
    };
    let now = SystemTime::now();
    let expired = certs::issue_cert(
        &ca,
        "expired",
        &["127.0.0.1"],
        &[Role::Client],
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )
    .unwrap()
    .identity(&ca);
    for plain in [false, true] {
        for (who, client) in [("foreign", &intruder), ("expired", &expired)] {
            let (s, c) = handshake(&server, client, plain).await;
            let s = s.expect_err(who).to_string();
            assert!(s.contains("peer refused at TLS"), "{who}: {s}");
            assert!(c.is_err(), "{who}: the client must not get through");
        }
    }
    // A server whose certificate does not name the address dialled.
    let elsewhere = certs::issue_role_cert(&ca, "elsewhere", &["10.9.9.9"], &[Role::Client])
        .unwrap()
        .identity(&ca);
    let client = node(&ca, "client", &[Role::Client]);
    let (_, c) = handshake(&elsewhere, &client, false).await;
    let c = c.unwrap_err().to_string();
    assert!(c.contains("TLS with 127.0.0.1 failed"), "{c}");
}

#[tokio::test]
#[allow(deprecated)] // ring's provider, the only one compiled in
async fn a_peer_without_a_certificate_or_speaking_plain_is_refused() {
    let ca = ca();
    let server = node(&ca, "target", &[Role::Client]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::new(&server, ALPN)
        .unwrap()
        .with_timeout(Duration::from_millis(500));
    let accept = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..3 {
            let (tcp, _) = listener.accept().await.unwrap();
            results.push(acceptor.accept_plain(tcp).await.map(|(_, p)| p.name()));
        }
        results
    });
    // 1. A TLS client with no certificate of its own.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject;
        r.add(rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        r
    };
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    let anonymous = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let r = anonymous
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await;
    if let Ok(mut tls) = r {
        // TLS 1.3 reports the server's refusal on the first read.
        let mut b = [0u8; 1];
        assert!(tls.read(&mut b).await.map(|n| n == 0).unwrap_or(true));
    }
    // 2. A peer that speaks the plain protocol straight away.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"MCTP\x01\x00\x00\x00 describe please")
        .await
        .unwrap();
    // 3. A peer that connects and says nothing (the handshake times out).
    let _silent = TcpStream::connect(addr).await.unwrap();
    let results = accept.await.unwrap();
    for r in &results {
        let e = r.as_ref().unwrap_err().to_string();
        assert!(e.contains("peer refused at TLS"), "{e}");
    }
    assert!(results[2]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("timed out"));
}

#[test]
fn certificates_made_by_the_command_carry_names_and_roles() {
    let dir = std::env::temp_dir().join(format!("mooncake-certs-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mooncake_certs"))
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .output()
            .expect("run mooncake_certs")
    };
    assert!(run(&["init"]).status.success());
    let out = run(&[
        "issue",
        "node-a",
        "--name",
        "127.0.0.1",
        "--name",
        "node-a.local",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&[
        "issue",
        "m1",
        "--name",
        "127.0.0.1",
        "--role",
        "master,admin",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["issue", "bad", "--name", "127.0.0.1", "--role", "root"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown role"));
    // Nothing is ever overwritten: a second CA would orphan every certificate issued.
    let again = run(&["init"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));
    let identity = |name: &str| identity_in(&dir, name);
    let a = identity("node-a").own().unwrap();
    assert_eq!(a.common_name.as_deref(), Some("node-a"));
    assert_eq!(a.roles, vec![Role::Client]);
    assert_eq!(a.dns_names, vec!["node-a.local".to_owned()]);
    let m = identity("m1").own().unwrap();
    assert_eq!(m.roles, vec![Role::Master, Role::Admin]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (s, c) = rt.block_on(handshake(&identity("m1"), &identity("node-a"), true));
    assert_eq!(s.unwrap(), "node-a:hello");
    assert_eq!(c.unwrap(), "m1:hello");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Accepts connections with one acceptor (built once, like a running listener) and reports, per
/// connection, the peer's name or the refusal.
async fn serve_many(
    server: &TlsIdentity,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<String, Error>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::new(server, ALPN)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let outcome = match acceptor.accept(tcp).await {
                Ok((mut tls, peer)) => {
                    let mut buf = [0u8; 5];
                    let _ = tls.read_exact(&mut buf).await;
                    let _ = tls.write_all(&buf).await;
                    let _ = tls.flush().await;
                    Ok(peer.name())
                }
                Err(e) => Err(e),
            };
            if tx.send(outcome).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

async fn dial(addr: std::net::SocketAddr, client: &TlsIdentity) -> Result<String, Error> {
    let connector = TlsConnector::new(client, ALPN)
        .unwrap()
        .with_timeout(Duration::from_secs(5));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut tls, peer) = connector.connect(tcp, "127.0.0.1").await?;
    tls.write_all(b"hello").await?;
    tls.flush().await?;
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await?;
    Ok(peer.name())
}

#[tokio::test]
async fn a_revoked_certificate_is_refused_from_the_next_connection_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("mooncake-crl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mooncake_certs"))
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .output()
            .expect("run mooncake_certs");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["init"]);
    for name in ["server", "good", "bad", "worse"] {
        run(&["issue", name, "--name", "127.0.0.1"]);
    }
    let identity = |name: &str| identity_in(&dir, name);
    // A revocation list must exist and parse when a node starts with one.
    let crl = dir.join("crl.pem");
    let err = identity("server").with_crl_file(&crl).unwrap_err();
    assert!(err.to_string().contains("crl.pem"), "{err}");
    run(&["revoke", "worse"]);
    let server = identity("server").with_crl_file(&crl).unwrap();
    let (addr, mut outcomes) = serve_many(&server).await;

    // Before `bad` is revoked: admitted; `worse` (in the list at start): refused.
    assert_eq!(dial(addr, &identity("good")).await.unwrap(), "server");
    assert_eq!(outcomes.recv().await.unwrap().unwrap(), "good");
    assert_eq!(dial(addr, &identity("bad")).await.unwrap(), "server");
    assert_eq!(outcomes.recv().await.unwrap().unwrap(), "bad");
    assert!(dial(addr, &identity("worse")).await.is_err());
    let refused = outcomes.recv().await.unwrap().unwrap_err().to_string();
    assert!(refused.contains("peer refused at TLS"), "{refused}");
    assert!(refused.to_lowercase().contains("revoked"), "{refused}");

    // Revoked while the listener runs: refused from the next connection on; the list keeps the
    // earlier entry.
    let said = run(&["revoke", "bad"]);
    assert!(said.contains("2 certificate(s) revoked"), "{said}");
    let (entries, number) =
        certs::read_revocation_list(&std::fs::read_to_string(&crl).unwrap()).unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(number, 2);
    assert!(dial(addr, &identity("bad")).await.is_err());
    assert!(outcomes.recv().await.unwrap().is_err());
    assert_eq!(dial(addr, &identity("good")).await.unwrap(), "server");
    assert_eq!(outcomes.recv().await.unwrap().unwrap(), "good");
    // Revoking twice changes nothing.
    assert!(run(&["revoke", "bad"]).contains("already revoked"));

    // The connecting side checks the list too: a node with a revoked certificate cannot serve
    // a client that checks it.
    let (bad_addr, _bad_outcomes) = serve_many(&identity("bad")).await;
    let checking = identity("good").with_crl_file(&crl).unwrap();
    let err = dial(bad_addr, &checking).await.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("revoked"), "{err}");

    // A list that turns unreadable refuses everyone (fails closed) until a good one is back.
    let good_list = std::fs::read(&crl).unwrap();
    std::fs::write(
        &crl,
        b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
    )
    .unwrap();
    assert!(dial(addr, &identity("good")).await.is_err());
    assert!(outcomes.recv().await.unwrap().is_err());
    std::fs::write(&crl, &good_list).unwrap();
    assert_eq!(dial(addr, &identity("good")).await.unwrap(), "server");
    assert_eq!(outcomes.recv().await.unwrap().unwrap(), "good");
    let _ = std::fs::remove_dir_all(&dir);
}
