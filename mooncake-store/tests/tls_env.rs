//! A node whose `MC_TLS_CA`, `MC_TLS_CERT` and `MC_TLS_KEY` name its certificate: its store
//! reaches a TLS master, its real client (what `mooncake_client` runs) requires certificates of
//! dummy clients, and dummy clients of the node present theirs, all without code changes. One
//! test in its own binary: it sets the process's environment.

use std::time::Duration;

use mooncake_core::ErrorCode;
use mooncake_master::MasterConfig;
use mooncake_master_service::{MasterService, ServiceConfig};
use mooncake_rpc::{tls_acceptor, RpcClientConfig};
use mooncake_store::real_client::{DummyClient, RealClient, RealClientConfig};
use mooncake_store::{ReplicateConfig, StoreConfig, TLS_ENV};
use mooncake_tls::{certs, Role};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_in_its_environment_uses_it_everywhere() {
    let dir = std::env::temp_dir().join(format!("mooncake-tls-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = certs::new_ca("env test CA").unwrap();
    let master_id = certs::issue_role_cert(&ca, "master", &["127.0.0.1"], &[Role::Master])
        .unwrap()
        .identity(&ca);
    let svc = MasterService::new(MasterConfig::default(), ServiceConfig::default()).unwrap();
    let master = svc
        .serve_rpc_tls(
            "127.0.0.1:0".parse().unwrap(),
            Some(tls_acceptor(&master_id).unwrap()),
        )
        .await
        .unwrap()
        .to_string();
    let node = certs::issue_role_cert(&ca, "node-1", &["127.0.0.1"], &[Role::Client]).unwrap();
    for ((file, pem), var) in [("ca.pem", &ca.cert_pem), ("node.pem", &node.cert_pem)]
        .into_iter()
        .chain([("node-key.pem", &node.key_pem)])
        .zip(TLS_ENV)
    {
        std::fs::write(dir.join(file), pem).unwrap();
        // Edition 2021: not unsafe; this binary runs this one test only.
        std::env::set_var(var, dir.join(file));
    }
    let real = RealClient::start(RealClientConfig {
        store: StoreConfig {
            local_hostname: "127.0.0.1".into(),
            master_server_addr: master.clone(),
            global_segment_size: 32 << 20,
            local_buffer_size: 16 << 20,
            rpc: RpcClientConfig {
                call_timeout: Duration::from_secs(3),
                connect_timeout: Duration::from_secs(1),
            },
            ..StoreConfig::default()
        },
        bind: "127.0.0.1:0".parse().unwrap(),
    })
    .await
    .unwrap();
    let server = real.rpc_address().to_string();
    let dummy = DummyClient::connect(&server, 4 << 20, 1 << 20)
        .await
        .unwrap();
    let value: Vec<u8> = (0..4096u32).map(|i| (i % 241) as u8).collect();
    dummy
        .put("env/a", &value, &ReplicateConfig::default())
        .await
        .unwrap();
    assert_eq!(dummy.get("env/a").await.unwrap(), value);
    assert_eq!(real.store().get("env/a").await.unwrap(), value);
    dummy.close().await.unwrap();

    // A process without a certificate is refused by the real client, saying why.
    for var in TLS_ENV {
        std::env::remove_var(var);
    }
    let e = DummyClient::connect(&server, 4 << 20, 1 << 20)
        .await
        .err()
        .map(|e| (e.code(), e.to_string()));
    let (code, text) = e.expect("a dummy client without a certificate must not get through");
    assert_eq!(code, ErrorCode::ILLEGAL_CLIENT, "{text}");
    assert!(text.contains("requires mutual TLS"), "{text}");
    real.shutdown().await.unwrap();
    svc.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
