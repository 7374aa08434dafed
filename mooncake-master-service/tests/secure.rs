//! A `mooncake_master` started with certificates, as a real process on loopback, against peers
//! with certificates made by a real CA (`mooncake_tls::certs`): who is admitted on the RPC and
//! metrics ports, what each role may do, and how everyone else is refused (and logged). Also:
//! without TLS the master says at start that it accepts anyone.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{eventually, free_port, store_config, wait_line, Proc};
use mooncake_core::ErrorCode;
use mooncake_rpc::admin::AdminRequest;
use mooncake_rpc::{
    tls_connector, MasterApi, MasterReply, MasterRequest, RemoteMaster, RpcClientConfig,
};
use mooncake_store::{ReplicateConfig, Store};
use mooncake_tls::certs::{self, CertifiedPem};
use mooncake_tls::{Role, TlsConnector, TlsIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A cluster's certificates written as PEM files into a directory removed on drop.
struct Pki {
    dir: PathBuf,
    ca: CertifiedPem,
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("mooncake-secure-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ca = certs::new_ca("secure test CA").unwrap();
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
        Pki { dir, ca }
    }

    /// Issues `name` with `roles` for 127.0.0.1 and writes its files.
    fn issue(&self, name: &str, roles: &[Role]) -> TlsIdentity {
        let cert = certs::issue_role_cert(&self.ca, name, &["127.0.0.1"], roles).unwrap();
        self.write(name, &cert.identity(&self.ca))
    }

    fn write(&self, name: &str, id: &TlsIdentity) -> TlsIdentity {
        std::fs::write(self.dir.join(format!("{name}.pem")), &id.cert_pem).unwrap();
        std::fs::write(self.dir.join(format!("{name}-key.pem")), &id.key_pem).unwrap();
        id.clone()
    }

    /// `--tls_ca/--tls_cert/--tls_key` for `name`.
    fn flags(&self, name: &str) -> Vec<String> {
        vec![
            format!("--tls_ca={}", self.dir.join("ca.pem").display()),
            format!(
                "--tls_cert={}",
                self.dir.join(format!("{name}.pem")).display()
            ),
            format!(
                "--tls_key={}",
                self.dir.join(format!("{name}-key.pem")).display()
            ),
        ]
    }

    /// `MC_TLS_CA/_CERT/_KEY` for `name`.
    fn env(&self, name: &str) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("MC_TLS_CA", self.dir.join("ca.pem")),
            ("MC_TLS_CERT", self.dir.join(format!("{name}.pem"))),
            ("MC_TLS_KEY", self.dir.join(format!("{name}-key.pem"))),
        ]
    }
}

/// A running master: its process, RPC, metrics and HTTP metadata addresses, and the file its
/// log goes to.
struct Master {
    _proc: Proc,
    rpc: String,
    metrics: String,
    http_metadata: String,
    log: PathBuf,
}

impl Master {
    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }
}

fn spawn_master(args: &[String], env: &[(&str, PathBuf)], log: &Path) -> Master {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mooncake_master"))
        .args(["--rpc_address=127.0.0.1", "--metrics_port=0"])
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .expect("start mooncake_master");
    let rest = wait_line(&mut child, "mooncake_master listening: rpc=");
    let rpc = rest.split_whitespace().next().unwrap().to_owned();
    let field = |name: &str| {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap()
            .to_owned()
    };
    Master {
        _proc: Proc(child),
        rpc,
        metrics: field("metrics="),
        http_metadata: field("http_metadata="),
        log: log.to_owned(),
    }
}

fn quick() -> RpcClientConfig {
    RpcClientConfig {
        call_timeout: Duration::from_secs(3),
        connect_timeout: Duration::from_secs(2),
    }
}

fn remote(addr: &str, id: &TlsIdentity) -> RemoteMaster {
    RemoteMaster::with_tls(addr, quick(), Some(tls_connector(id).unwrap()))
}

/// The reply's failure code and message, if it failed.
fn failed(reply: &MasterReply) -> Option<(ErrorCode, &str)> {
    match reply {
        MasterReply::Failed { code, message } => Some((*code, message.as_str())),
        _ => None,
    }
}

/// A TLS client that presents no certificate (it trusts the cluster CA).
#[allow(deprecated)] // ring's provider, the only one compiled in
fn anonymous(ca: &CertifiedPem, alpn: &[u8]) -> mooncake_tls::tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    mooncake_tls::tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Whether a connection that sends `request` (after the TLS handshake when `tls`) gets any
/// answer bytes back: false when the server refuses it (alert, close or reset).
async fn answered<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    request: &[u8],
) -> Vec<u8> {
    let _ = s.write_all(request).await;
    let _ = s.flush().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rpc_admits_only_cluster_certificates_and_requests_their_roles_allow() {
    let pki = Pki::new("rpc");
    pki.issue("master-1", &[Role::Master]);
    let node = pki.issue("node-1", &[Role::Client]);
    let ops = pki.issue("ops", &[Role::Admin]);
    let master = spawn_master(
        &[&["--rpc_port=0".to_string()][..], &pki.flags("master-1")].concat(),
        &[],
        &pki.dir.join("master.log"),
    );

    // A storage node's certificate: data commands and metrics.
    let client = remote(&master.rpc, &node);
    assert!(matches!(
        client.call(MasterRequest::Segments).await.unwrap(),
        MasterReply::Segments(_)
    ));
    assert!(matches!(
        client.call(MasterRequest::Metrics).await.unwrap(),
        MasterReply::Metrics(_)
    ));
    // ... but neither the group's membership nor a change of it.
    for request in [
        AdminRequest::Members,
        AdminRequest::Remove { id: 1 },
        AdminRequest::AddLearner {
            id: 9,
            raft_addr: "127.0.0.1:1".into(),
            rpc_addr: "127.0.0.1:2".into(),
        },
    ] {
        let reply = client.call(MasterRequest::Admin(request)).await.unwrap();
        let (code, message) = failed(&reply).expect("refused");
        assert_eq!(code, ErrorCode::ILLEGAL_CLIENT, "{message}");
        assert!(
            message.contains("node-1 (roles: client) may not"),
            "{message}"
        );
        assert!(message.contains("needs the admin"), "{message}");
    }
    // An operator's certificate passes the role check for admin requests (a single master has
    // no group, which is a different answer), and is refused data commands.
    let operator = remote(&master.rpc, &ops);
    let reply = operator
        .call(MasterRequest::Admin(AdminRequest::Members))
        .await
        .unwrap();
    assert_ne!(failed(&reply).map(|f| f.0), Some(ErrorCode::ILLEGAL_CLIENT));
    let reply = operator.call(MasterRequest::Segments).await.unwrap();
    let (code, message) = failed(&reply).expect("refused");
    assert_eq!(code, ErrorCode::ILLEGAL_CLIENT);
    assert!(message.contains("data commands"), "{message}");

    // A certificate of another CA, and an expired one of ours.
    let foreign = certs::new_ca("intruder CA").unwrap();
    let intruder = TlsIdentity {
        ca_pem: pki.ca.cert_pem.clone(),
        ..certs::issue_role_cert(&foreign, "intruder", &["127.0.0.1"], &[Role::Admin])
            .unwrap()
            .identity(&foreign)
    };
    let now = SystemTime::now();
    let expired = certs::issue_cert(
        &pki.ca,
        "expired",
        &["127.0.0.1"],
        &[Role::Admin, Role::Client],
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )
    .unwrap()
    .identity(&pki.ca);
    for (who, id, alert) in [
        ("foreign", &intruder, "UnknownCA"),
        ("expired", &expired, "CertificateExpired"),
    ] {
        let e = remote(&master.rpc, id)
            .call(MasterRequest::Metrics)
            .await
            .unwrap_err();
        assert_eq!(e.code(), ErrorCode::RPC_FAIL, "{who}: {e}");
        let text = e.to_string();
        assert!(
            text.contains(alert) || text.contains("connection"),
            "{who}: {text}"
        );
    }
    // No certificate at all: the handshake completes on the client's side, then the master's
    // refusal arrives instead of an answer.
    let tcp = TcpStream::connect(&master.rpc).await.unwrap();
    if let Ok(tls) = anonymous(&pki.ca, mooncake_rpc::RPC_ALPN)
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
    {
        assert!(answered(tls, b"\x0e\0\0\0\x01\x01\0\0\0\0\0\0\0\0")
            .await
            .is_empty());
    }
    // A plain client is told that the master requires TLS.
    let plain = RemoteMaster::new(master.rpc.as_str(), quick());
    let e = plain.call(MasterRequest::Metrics).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::ILLEGAL_CLIENT, "{e}");
    assert!(e.to_string().contains("requires mutual TLS"), "{e}");
    assert!(e.to_string().contains("MC_TLS_CA"), "{e}");

    // Members are still served; the refusals are in the master's log with peer and reason.
    assert!(matches!(
        client.call(MasterRequest::Metrics).await.unwrap(),
        MasterReply::Metrics(_)
    ));
    let log = master.log();
    assert!(log.contains("mutual TLS on"), "{log}");
    assert!(!log.contains("accepts any peer"), "{log}");
    assert!(
        log.contains("master rpc: refused node-1 (127.0.0.1:"),
        "no role refusal logged: {log}"
    );
    assert!(log.contains("rpc: refused 127.0.0.1:"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_client_with_its_certificate_puts_and_gets_through_a_tls_master() {
    let pki = Pki::new("store");
    pki.issue("master-1", &[Role::Master]);
    let node = pki.issue("node-1", &[Role::Client]);
    // The master's identity from the environment this time.
    let master = spawn_master(
        &["--rpc_port=0".to_string()],
        &pki.env("master-1"),
        &pki.dir.join("master.log"),
    );
    let store = Store::setup_with_tls(store_config(&master.rpc, 16 << 20), Some(&node))
        .await
        .unwrap();
    let one = ReplicateConfig::with_replicas(1);
    let value: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
    store.put("secure/a", &value, &one).await.unwrap();
    assert_eq!(store.get("secure/a").await.unwrap(), value);
    assert!(store.is_exist("secure/a").await.unwrap());
    store.close().await.unwrap();
    // Without a certificate the same setup fails, saying why.
    let Err(e) = Store::setup_with_tls(store_config(&master.rpc, 16 << 20), None).await else {
        panic!("a plain store client must not get through");
    };
    assert!(e.to_string().contains("requires mutual TLS"), "{e}");
}

/// One HTTPS `GET` with `Connection: close` over `tls`; the status and body, or `None` when the
/// server refused the connection.
async fn https_get(addr: &str, tls: &TlsConnector, target: &str) -> Option<(u16, String)> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (stream, _) = tls.connect(tcp, "127.0.0.1").await.ok()?;
    let request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let out = String::from_utf8_lossy(&answered(stream, request.as_bytes()).await).into_owned();
    let (head, body) = out.split_once("\r\n\r\n")?;
    Some((head.get(9..12)?.parse().ok()?, body.to_owned()))
}

/// One HTTPS `GET` on an open keep-alive connection: the status and body, or `None` when the
/// server closed the connection instead of answering.
async fn keep_alive_get<S>(conn: &mut S, target: &str) -> Option<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
    conn.write_all(request.as_bytes()).await.ok()?;
    conn.flush().await.ok()?;
    let answer = async {
        let (mut head, mut byte) = (Vec::new(), [0u8; 1]);
        while !head.ends_with(b"\r\n\r\n") {
            match conn.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return None,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))?
            .trim()
            .parse()
            .ok()?;
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body).await.ok()?;
        Some((
            head.get(9..12)?.parse().ok()?,
            String::from_utf8_lossy(&body).into_owned(),
        ))
    };
    tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .expect("the server neither answered nor closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_admin_and_metadata_endpoints_serve_https_to_cluster_certificates_only() {
    let pki = Pki::new("https");
    pki.issue("master-1", &[Role::Master]);
    let node = pki.issue("node-1", &[Role::Client]);
    let ops = pki.issue("ops", &[Role::Admin]);
    let master = spawn_master(
        &[
            &[
                "--rpc_port=0".to_string(),
                "--enable_http_metadata_server".to_string(),
                "--http_metadata_server_host=127.0.0.1".to_string(),
                "--http_metadata_server_port=0".to_string(),
            ][..],
            &pki.flags("master-1"),
        ]
        .concat(),
        &[],
        &pki.dir.join("master.log"),
    );
    let https = |id: &TlsIdentity| TlsConnector::new(id, b"http/1.1").unwrap();

    // Any cluster certificate reads the metrics and health.
    let (status, body) = https_get(&master.metrics, &https(&node), "/metrics")
        .await
        .expect("served");
    assert_eq!(status, 200);
    assert!(body.contains("master_"), "{body}");
    let (status, body) = https_get(&master.metrics, &https(&node), "/health")
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "OK"));
    // The listings of keys and segments need the admin role.
    let (status, body) = https_get(&master.metrics, &https(&node), "/get_all_keys")
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("needs the admin role"), "{body}");
    for path in ["/get_all_keys", "/get_all_segments", "/query_key?key=x"] {
        let (status, body) = https_get(&master.metrics, &https(&ops), path)
            .await
            .unwrap();
        assert!(status == 200 || status == 404, "{path}: {status} {body}");
    }

    // Plain HTTP gets no HTTP answer at all.
    let tcp = TcpStream::connect(&master.metrics).await.unwrap();
    let out = answered(
        tcp,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        !out.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    // Neither does TLS without a certificate.
    let tcp = TcpStream::connect(&master.metrics).await.unwrap();
    if let Ok(tls) = anonymous(&pki.ca, b"http/1.1")
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
    {
        let out = answered(
            tls,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    }
    // Nor a certificate of another CA.
    let foreign = certs::new_ca("intruder CA").unwrap();
    let intruder = TlsIdentity {
        ca_pem: pki.ca.cert_pem.clone(),
        ..certs::issue_role_cert(&foreign, "intruder", &["127.0.0.1"], &[Role::Admin])
            .unwrap()
            .identity(&foreign)
    };
    assert_eq!(
        https_get(&master.metrics, &https(&intruder), "/metrics").await,
        None
    );
    // The HTTP metadata server the master runs is HTTPS too: members read it, others get no
    // HTTP answer.
    let (status, body) = https_get(&master.http_metadata, &https(&node), "/metadata?key=k")
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    let tcp = TcpStream::connect(&master.http_metadata).await.unwrap();
    let out = answered(tcp, b"GET /metadata?key=k HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(
        !out.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let log = master.log();
    assert!(
        log.contains("refused GET /get_all_keys from 127.0.0.1:"),
        "{log}"
    );
    assert!(log.contains("node-1 (roles: client) may not"), "{log}");
    assert!(
        log.contains("refused an HTTPS connection from 127.0.0.1:"),
        "{log}"
    );
}

/// Runs `mooncake_master admin ARGS` with `env`; exit code, stdout and stderr.
fn admin(args: &[String], env: &[(&str, PathBuf)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mooncake_master"))
        .arg("admin")
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_admin_certificate_changes_a_tls_groups_membership() {
    let pki = Pki::new("group");
    pki.issue("master-1", &[Role::Master]);
    pki.issue("node-1", &[Role::Client]);
    pki.issue("ops", &[Role::Admin]);
    let (rpc_port, raft_port) = (free_port(), free_port());
    let rpc = format!("127.0.0.1:{rpc_port}");
    let master = spawn_master(
        &[
            &[
                format!("--rpc_port={rpc_port}"),
                "--raft_id=1".to_string(),
                format!("--raft_peers=1=127.0.0.1:{raft_port}/{rpc}"),
                format!("--raft_data_dir={}", pki.dir.join("raft-1").display()),
                "--raft_tick_ms=20".to_string(),
            ][..],
            &pki.flags("master-1"),
        ]
        .concat(),
        &[],
        &pki.dir.join("master.log"),
    );
    let at = format!("--master_server_addr={rpc}");
    // The operator lists the members once the single member leads.
    let ops_flags = pki.flags("ops");
    eventually("the member leads", Duration::from_secs(20), || {
        let args = [&["members".to_string(), at.clone()][..], &ops_flags].concat();
        async move { admin(&args, &[]).0 == 0 }
    })
    .await;
    let learner = format!("2=127.0.0.1:{}/127.0.0.1:{}", free_port(), free_port());
    // A storage node's certificate (from the environment) may not add a member.
    let (code, _, err) = admin(
        &["add-learner".to_string(), learner.clone(), at.clone()],
        &pki.env("node-1"),
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("node-1 (roles: client) may not change"),
        "{err}"
    );
    // Nor may a plain client.
    let (code, _, err) = admin(&["members".to_string(), at.clone()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("requires mutual TLS"), "{err}");
    // The operator may.
    let (code, out, err) = admin(
        &[
            &["add-learner".to_string(), learner, at.clone()][..],
            &ops_flags,
        ]
        .concat(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("learner"), "{out}");
    let (code, out, err) = admin(
        &[
            &["remove".to_string(), "2".to_string(), at.clone()][..],
            &ops_flags,
        ]
        .concat(),
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("learner"), "{out}");
    let log = master.log();
    assert!(log.contains("master rpc: refused node-1"), "{log}");
}

#[test]
fn without_tls_the_master_says_it_accepts_anyone_and_half_a_tls_setup_is_refused() {
    let dir = std::env::temp_dir().join(format!("mooncake-secure-plain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let master = spawn_master(&["--rpc_port=0".to_string()], &[], &dir.join("master.log"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !master.log().contains("accepts any peer") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = master.log();
    assert!(log.contains("accepts any peer"), "{log}");
    assert!(log.contains("--tls_ca"), "{log}");
    assert_eq!(log.matches("accepts any peer").count(), 1, "{log}");
    drop(master);
    for (args, env, why) in [
        (
            vec!["--tls_ca=/nonexistent/ca.pem".to_string()],
            vec![],
            "--tls_cert, --tls_key missing",
        ),
        (
            vec![],
            vec![("MC_TLS_CA", dir.join("ca.pem"))],
            "MC_TLS_CERT, MC_TLS_KEY not",
        ),
        (
            vec![
                "--tls_ca=/nonexistent/ca.pem".to_string(),
                "--tls_cert=/nonexistent/c.pem".to_string(),
                "--tls_key=/nonexistent/k.pem".to_string(),
            ],
            vec![],
            "/nonexistent/ca.pem",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mooncake_master"))
            .args([
                "--rpc_address=127.0.0.1",
                "--rpc_port=0",
                "--metrics_port=0",
            ])
            .args(&args)
            .envs(
                env.iter()
                    .map(|(k, v): &(&str, PathBuf)| (*k, v.as_os_str())),
            )
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: started anyway");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_group_with_certificates_elects_a_leader_and_serves_a_store() {
    let pki = Pki::new("group3");
    let node = pki.issue("node-1", &[Role::Client]);
    pki.issue("ops", &[Role::Admin]);
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let peers = ports
        .iter()
        .enumerate()
        .map(|(i, (rpc, raft))| format!("{}=127.0.0.1:{raft}/127.0.0.1:{rpc}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    // Every member's certificate names it as the Raft network requires: master-<id>.
    let members: Vec<Master> = ports
        .iter()
        .enumerate()
        .map(|(i, (rpc, _))| {
            let name = format!("master-{}", i + 1);
            pki.issue(&name, &[Role::Master]);
            let args = [
                &[
                    format!("--rpc_port={rpc}"),
                    format!("--raft_id={}", i + 1),
                    format!("--raft_peers={peers}"),
                    format!("--raft_data_dir={}", pki.dir.join(&name).display()),
                    "--raft_tick_ms=20".to_string(),
                ][..],
                &pki.flags(&name),
            ]
            .concat();
            spawn_master(&args, &[], &pki.dir.join(format!("{name}.log")))
        })
        .collect();
    let addresses = members
        .iter()
        .map(|m| m.rpc.clone())
        .collect::<Vec<_>>()
        .join(",");
    let at = format!("--master_server_addr={addresses}");
    let ops_flags = pki.flags("ops");
    let voters = |out: &str| out.matches(" voter ").count();
    eventually("the group elects a leader", Duration::from_secs(30), || {
        let args = [&["members".to_string(), at.clone()][..], &ops_flags].concat();
        async move {
            let (code, out, _) = admin(&args, &[]);
            code == 0 && voters(&out) == 3 && !out.starts_with("leader unknown")
        }
    })
    .await;
    // A store client with its certificate puts and gets through the group's leader.
    let store = Store::setup_with_tls(store_config(&addresses, 16 << 20), Some(&node))
        .await
        .unwrap();
    let value = vec![7u8; 64 << 10];
    store
        .put("group/a", &value, &ReplicateConfig::with_replicas(1))
        .await
        .unwrap();
    assert_eq!(store.get("group/a").await.unwrap(), value);
    store.close().await.unwrap();
    drop(members);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_while_the_master_runs_loses_its_open_rpc_and_https_connections() {
    let pki = Pki::new("crl");
    pki.issue("master-1", &[Role::Master]);
    let node = pki.issue("node-1", &[Role::Client]);
    let other = pki.issue("node-2", &[Role::Client]);
    let crl = pki.dir.join("crl.pem");
    std::fs::write(&crl, certs::revocation_list(&pki.ca, &[], 1).unwrap()).unwrap();
    let master = spawn_master(
        &[
            &["--rpc_port=0".to_string()][..],
            &pki.flags("master-1"),
            &[format!("--tls_crl={}", crl.display())],
        ]
        .concat(),
        &[],
        &pki.dir.join("master.log"),
    );
    // node-1 keeps a connection open across the revocation, to RPC and to the metrics port.
    let kept = remote(&master.rpc, &node);
    assert!(matches!(
        kept.call(MasterRequest::Segments).await.unwrap(),
        MasterReply::Segments(_)
    ));
    let https = TlsConnector::new(&node, b"http/1.1").unwrap();
    let tcp = TcpStream::connect(&master.metrics).await.unwrap();
    let (mut kept_https, _) = https.connect(tcp, "127.0.0.1").await.unwrap();
    assert_eq!(
        keep_alive_get(&mut kept_https, "/metrics").await.unwrap().0,
        200
    );
    // The CA revokes node-1 (a new list, swapped in as `mooncake_certs revoke` does).
    let revoked = certs::RevokedEntry {
        serial: certs::serial_of(&node.cert_pem).unwrap(),
        revoked_at: SystemTime::now(),
    };
    let tmp = pki.dir.join("crl.pem.tmp");
    std::fs::write(
        &tmp,
        certs::revocation_list(&pki.ca, &[revoked], 2).unwrap(),
    )
    .unwrap();
    std::fs::rename(&tmp, &crl).unwrap();
    let e = remote(&master.rpc, &node)
        .call(MasterRequest::Segments)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::RPC_FAIL, "{e}");
    // Its open connection is cut at a request once the master has looked at the list again
    // (at most every half second), and reconnecting is refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match kept.call(MasterRequest::Segments).await {
            Err(_) => break,
            Ok(reply) => {
                assert!(matches!(reply, MasterReply::Segments(_)));
                assert!(
                    std::time::Instant::now() < deadline,
                    "a revoked peer's open connection is still served"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert!(kept.call(MasterRequest::Segments).await.is_err());
    // So is its open connection to the metrics port, with a 403 saying why.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = keep_alive_get(&mut kept_https, "/metrics")
            .await
            .expect("the metrics port closed the connection without an answer");
        if status != 200 {
            break (status, body);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a revoked peer's open metrics connection is still served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("node-1 was revoked"), "{body}");
    assert!(keep_alive_get(&mut kept_https, "/metrics").await.is_none());
    // Everyone else is still served, and the refusal is in the master's log.
    assert!(matches!(
        remote(&master.rpc, &other)
            .call(MasterRequest::Segments)
            .await
            .unwrap(),
        MasterReply::Segments(_)
    ));
    let log = master.log();
    assert!(
        log.contains("certificate revocation list reloaded"),
        "{log}"
    );
    assert!(
        log.contains("Revoked"),
        "no revocation refusal logged: {log}"
    );
    assert!(
        log.lines().any(
            |l| l.contains("closing an HTTPS connection from 127.0.0.1:")
                && l.contains("node-1 was revoked")
        ),
        "the metrics port did not log the revoked certificate: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_acts_only_over_the_certificate_that_first_used_it() {
    use mooncake_master::{ClientId, Command as MasterCommand};
    let pki = Pki::new("bind");
    pki.issue("master-1", &[Role::Master]);
    let owner = pki.issue("node-1", &[Role::Client]);
    let intruder = pki.issue("node-2", &[Role::Client]);
    let master = spawn_master(
        &[&["--rpc_port=0".to_string()][..], &pki.flags("master-1")].concat(),
        &[],
        &pki.dir.join("master.log"),
    );
    let id = ClientId(0x5eed_0000_0000_0000_0000_0000_0000_0001);
    let heartbeat = || MasterRequest::Apply(MasterCommand::Heartbeat { client_id: id });
    let owner = remote(&master.rpc, &owner);
    assert!(failed(&owner.call(heartbeat()).await.unwrap()).is_none());
    // Another member's certificate naming node-1's id: refused, nothing applied.
    let intruder = remote(&master.rpc, &intruder);
    for request in [
        heartbeat(),
        MasterRequest::Apply(MasterCommand::UnmountSegment {
            client_id: id,
            name: "node-1-segment".into(),
        }),
        // Nor may it report landings in node-1's name (as the segment's owner, say).
        MasterRequest::Landed {
            client_id: id,
            segment: "node-1-segment".into(),
            ranges: vec![(0x1000, 4096)],
        },
    ] {
        let reply = intruder.call(request).await.unwrap();
        let (code, message) = failed(&reply).expect("refused");
        assert_eq!(code, ErrorCode::ILLEGAL_CLIENT, "{message}");
        assert!(message.contains("it belongs to node-1"), "{message}");
    }
    // Its own ids work; the owner is still served.
    let own = MasterRequest::Apply(MasterCommand::Heartbeat {
        client_id: ClientId(2),
    });
    assert!(failed(&intruder.call(own).await.unwrap()).is_none());
    assert!(failed(&owner.call(heartbeat()).await.unwrap()).is_none());
    assert!(master.log().contains("may not act for client"));
}
