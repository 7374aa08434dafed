//! A running transfer engine with the transports this crate was built with (features `tcp` and
//! `shm`), for stores and for users of the engine alone.

use std::sync::Arc;

#[cfg(feature = "quic")]
use mooncake_transport_quic as quic;
#[cfg(feature = "shm")]
use mooncake_transport_shm as shm;
#[cfg(feature = "tcp")]
use mooncake_transport_tcp as tcp;

use mooncake_core::{Discovery, EngineConfig, Result, TransferEngine, Transport};

/// Starts a transfer engine named after `local_hostname` (`host` or `host:port`) with every
/// transport enabled by this crate's features, each listening on that host's address (and port,
/// when given). Same-host shared memory goes first unless [`same_host_shm_allowed`] says no.
pub async fn start_engine(
    local_hostname: &str,
    discovery: Discovery,
) -> Result<Arc<TransferEngine>> {
    start_engine_with(local_hostname, discovery, same_host_shm_allowed()).await
}

/// The environment's word on same-host shared memory: `MC_SAME_HOST_SHM=0` (or `false`, `off`)
/// turns it off for every engine of the process; anything else leaves it on.
pub fn same_host_shm_allowed() -> bool {
    !matches!(
        std::env::var("MC_SAME_HOST_SHM").as_deref().map(str::trim),
        Ok("0" | "false" | "off" | "no")
    )
}

/// [`start_engine`], saying whether peers of this host are reached through shared memory
/// (feature `shm`): the engine's buffers are then memfds that such peers map, and requests into
/// a same-host peer's shared buffers are one memcpy instead of a socket round trip. Without
/// shared-memory support on the machine the engine starts without it.
pub async fn start_engine_with(
    local_hostname: &str,
    discovery: Discovery,
    same_host_shm: bool,
) -> Result<Arc<TransferEngine>> {
    start_engine_for(local_hostname, discovery, same_host_shm, "tcp").await
}

/// The protocols [`start_engine_for`] can start in this build.
pub fn available_protocols() -> Vec<&'static str> {
    [
        (cfg!(feature = "tcp"), "tcp"),
        (cfg!(feature = "quic"), "quic"),
    ]
    .into_iter()
    .filter_map(|(built, protocol)| built.then_some(protocol))
    .collect()
}

/// Environment variables naming the PEM files of this node's TLS identity: the cluster CA's
/// certificate, this node's certificate and its private key.
pub use mooncake_tls::TLS_ENV;

/// [`start_engine_with`] for `protocol`: `tcp` (TCP, behind same-host shared memory) or `quic`
/// (QUIC with mutual TLS, behind same-host shared memory: every transfer between hosts is
/// encrypted and both ends show a certificate of the cluster's CA, read from the files named by
/// the `MC_TLS_CA`, `MC_TLS_CERT` and `MC_TLS_KEY` variables). Every node of a cluster uses the
/// same protocol.
///
/// With `tcp` and those variables set, every TCP transfer connection authenticates both ends
/// with the same certificates (peers need the `client` or `master` role) and then runs
/// unencrypted: a cluster started with certificates admits only its members on the transfer
/// port too. Without them, TCP serves any peer, as before. Half of the variables set is an
/// error.
pub async fn start_engine_for(
    local_hostname: &str,
    discovery: Discovery,
    same_host_shm: bool,
    protocol: &str,
) -> Result<Arc<TransferEngine>> {
    if !available_protocols().contains(&protocol) {
        return Err(mooncake_core::Error::NotSupported(format!(
            "protocol {protocol:?} is not available in this build (available: {})",
            available_protocols().join(", ")
        )));
    }
    #[allow(unused_mut)]
    let mut transports: Vec<Arc<dyn Transport>> = Vec::new();
    #[cfg(feature = "shm")]
    if same_host_shm {
        match shm::ShmTransport::new(shm::ShmConfig::default()) {
            Ok(t) => transports.push(t),
            Err(e) => tracing::info!("same-host shared memory is off: {e}"),
        }
    }
    #[cfg(not(feature = "shm"))]
    let _ = same_host_shm;
    #[cfg(feature = "tcp")]
    if protocol == "tcp" {
        let bind = mooncake_rpc::bind_address(local_hostname)?;
        let auth = tcp::TlsIdentity::from_env_opt()?;
        let tcp = tcp::TcpTransport::new(tcp::TcpConfig {
            bind,
            auth,
            ..tcp::TcpConfig::default()
        })?;
        if tcp.authenticates() {
            tracing::info!("TCP transfers authenticate both ends with this node's certificate");
        }
        transports.push(tcp);
    }
    #[cfg(feature = "quic")]
    if protocol == "quic" {
        let identity = tls_identity_from_env()?;
        let mut config = quic::QuicConfig::new(identity);
        config.bind = mooncake_rpc::bind_address(local_hostname)?;
        transports.push(quic::QuicTransport::new(config)?);
    }
    let mut config = EngineConfig::new(local_hostname);
    config.discovery = discovery;
    TransferEngine::start(config, transports).await
}

/// This node's TLS identity, from the PEM files the [`TLS_ENV`] variables name.
#[cfg(feature = "quic")]
pub fn tls_identity_from_env() -> Result<quic::TlsIdentity> {
    quic::TlsIdentity::from_env()
}

#[cfg(all(test, feature = "tcp"))]
mod tests {
    //! The environment's certificates and the TCP transport, in child processes (the
    //! environment is the process's: setting it here would reach every test of this binary).

    use std::io::{BufRead, BufReader, Read};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::time::Duration;

    use mooncake_core::{Discovery, EngineConfig, Error, Location, TransferEngine};
    use mooncake_core::{TransferRequest, Transport};

    use super::tcp;
    use tcp::certs::{self, CertifiedPem};
    use tcp::Role;

    const CHILD_VAR: &str = "MOONCAKE_TEST_TCP_NODE";
    const FILL: u8 = 0x42;

    /// Not a test on its own: the node process of
    /// `tcp_transfers_authenticate_when_the_environment_names_certificates`.
    #[test]
    #[ignore = "runs only as a child process of the TCP authentication test"]
    fn tcp_node_child() {
        if std::env::var_os(CHILD_VAR).is_none() {
            return;
        }
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let e =
                match super::start_engine_for("127.0.0.1", Discovery::P2PHandshake, false, "tcp")
                    .await
                {
                    Ok(e) => e,
                    Err(e) => {
                        println!("ERROR {e}");
                        return;
                    }
                };
            let buf = e.allocate_buffer(4096, Location::cpu(0)).unwrap();
            e.memory()
                .resolve(buf, 4096)
                .unwrap()
                .write_from(&[FILL; 4096])
                .unwrap();
            println!("NODE {} {buf}", e.segment_name());
            tokio::task::spawn_blocking(|| {
                let mut b = [0u8; 1];
                let _ = std::io::stdin().read(&mut b);
            })
            .await
            .unwrap();
            e.shutdown().await;
        });
    }

    /// A node process with `env` (pairs of variable and value; every `MC_TLS_*` variable not
    /// named is removed): the process and its first line of output.
    fn spawn_node(env: &[(&str, &Path)]) -> (Child, String) {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "engine::tests::tcp_node_child",
            "--nocapture",
            "--include-ignored",
        ])
        .env(CHILD_VAR, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for var in tcp::TLS_ENV {
            cmd.env_remove(var);
        }
        for (var, value) in env {
            cmd.env(var, value);
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in &mut lines {
            let line = line.unwrap();
            if line.starts_with("NODE ") || line.starts_with("ERROR ") {
                // Keep reading, so the child's test harness never writes into a closed pipe.
                std::thread::spawn(move || lines.for_each(drop));
                return (child, line);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the node process printed nothing");
    }

    fn stop(mut child: Child) {
        drop(child.stdin.take());
        let _ = child.wait();
    }

    async fn initiator(auth: Option<tcp::TlsIdentity>) -> Arc<TransferEngine> {
        let t: Arc<dyn Transport> = tcp::TcpTransport::new(tcp::TcpConfig {
            connect_timeout: Duration::from_secs(2),
            auth,
            ..tcp::TcpConfig::default()
        })
        .unwrap();
        TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![t])
            .await
            .unwrap()
    }

    /// Reads the node's 4 KiB buffer from `e`.
    async fn read_node(e: &TransferEngine, node: &str) -> mooncake_core::Result<Vec<u8>> {
        let (name, addr) = node
            .strip_prefix("NODE ")
            .and_then(|r| r.split_once(' '))
            .expect("a NODE line");
        let seg = e.open_segment(name).await?;
        let local = e.allocate_buffer(4096, Location::cpu(0)).unwrap();
        let remote: u64 = addr.parse().unwrap();
        let r = e
            .transfer(vec![TransferRequest::read(&seg, remote, local, 4096)])
            .await;
        r.into_iter().next().unwrap()?;
        Ok(e.memory().resolve(local, 4096).unwrap().to_vec())
    }

    fn write_identity(dir: &Path, name: &str, ca: &CertifiedPem) -> [std::path::PathBuf; 3] {
        let node = certs::issue_role_cert(ca, name, &["127.0.0.1"], &[Role::Client]).unwrap();
        let files = [
            (dir.join("ca.pem"), &ca.cert_pem),
            (dir.join(format!("{name}.pem")), &node.cert_pem),
            (dir.join(format!("{name}-key.pem")), &node.key_pem),
        ];
        for (path, pem) in &files {
            std::fs::write(path, pem).unwrap();
        }
        files.map(|(p, _)| p)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_transfers_authenticate_when_the_environment_names_certificates() {
        let dir =
            std::env::temp_dir().join(format!("mooncake-store-tcp-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = certs::new_ca("cluster").unwrap();
        let files = write_identity(&dir, "node", &ca);
        let env: Vec<(&str, &Path)> = tcp::TLS_ENV
            .iter()
            .copied()
            .zip(files.iter().map(|p| p.as_path()))
            .collect();
        let member = initiator(Some(
            certs::issue_role_cert(&ca, "member", &["127.0.0.1"], &[Role::Client])
                .unwrap()
                .identity(&ca),
        ))
        .await;
        let plain = initiator(None).await;

        // Certificates in the environment: members only.
        let (child, node) = spawn_node(&env);
        assert_eq!(read_node(&member, &node).await.unwrap(), vec![FILL; 4096]);
        match read_node(&plain, &node).await {
            Err(Error::PermissionDenied(m)) => {
                assert!(m.contains("requires a certificate"), "{m}")
            }
            other => panic!("a plain peer must be refused, got {other:?}"),
        }
        stop(child);

        // None: any peer, as before.
        let (child, node) = spawn_node(&[]);
        assert_eq!(read_node(&plain, &node).await.unwrap(), vec![FILL; 4096]);
        stop(child);

        // Half of them: the node does not start (rather than silently serving anyone).
        let (child, line) = spawn_node(&env[..2]);
        assert!(line.contains("TLS is half configured"), "{line}");
        stop(child);

        member.shutdown().await;
        plain.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
