//! The store over QUIC with mutual TLS (`protocol = "quic"`): certificates of the cluster's CA
//! from the files `MC_TLS_CA`, `MC_TLS_CERT` and `MC_TLS_KEY` name. One test in its own binary:
//! it sets the process's environment.

use std::path::Path;
use std::time::Duration;

use mooncake_master::MasterConfig;
use mooncake_master_service::{MasterService, ServiceConfig};
use mooncake_rpc::tls_acceptor;
use mooncake_rpc::RpcClientConfig;
use mooncake_store::{ReplicateConfig, Store, StoreConfig, TLS_ENV};
use mooncake_transport_quic::{certs, Role};

fn config(master: &str, segment: u64) -> StoreConfig {
    StoreConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: master.into(),
        global_segment_size: segment,
        local_buffer_size: 32 << 20,
        protocol: "quic".into(),
        // Between hosts, as it would be: not through same-host shared memory.
        same_host_shm: false,
        rpc: RpcClientConfig {
            call_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
        },
        heartbeat_interval: Duration::from_millis(200),
        ..StoreConfig::default()
    }
}

/// Writes a node certificate of `ca` for 127.0.0.1 under `dir/name.*` and points the
/// environment at it.
fn use_identity(dir: &Path, name: &str, ca: &certs::CertifiedPem) {
    let node = certs::issue_node_cert(ca, name, &["127.0.0.1"]).unwrap();
    let files = [
        (dir.join(format!("{name}-ca.pem")), &ca.cert_pem),
        (dir.join(format!("{name}.pem")), &node.cert_pem),
        (dir.join(format!("{name}-key.pem")), &node.key_pem),
    ];
    for ((path, pem), var) in files.iter().zip(TLS_ENV) {
        std::fs::write(path, pem).unwrap();
        // SAFETY (edition 2021: not unsafe): this binary runs this one test only.
        std::env::set_var(var, path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_move_bytes_over_quic_only_within_their_ca() {
    let dir = std::env::temp_dir().join(format!("mooncake-quic-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The master requires certificates of the cluster's CA too.
    let ca = certs::new_ca("cluster").unwrap();
    let master_id = certs::issue_role_cert(&ca, "master", &["127.0.0.1"], &[Role::Master])
        .unwrap()
        .identity(&ca);
    let svc = MasterService::new(MasterConfig::default(), ServiceConfig::default()).unwrap();
    let addr = svc
        .serve_rpc_tls(
            "127.0.0.1:0".parse().unwrap(),
            Some(tls_acceptor(&master_id).unwrap()),
        )
        .await
        .unwrap()
        .to_string();

    // No certificate configured: a clear refusal, naming the variables.
    for var in TLS_ENV {
        std::env::remove_var(var);
    }
    let err = Store::setup(config(&addr, 16 << 20)).await.unwrap_err();
    assert!(err.to_string().contains("MC_TLS_CA"), "{err}");

    // Two nodes of one CA: puts and gets move over QUIC.
    use_identity(&dir, "storage", &ca);
    let storage = Store::setup(config(&addr, 32 << 20)).await.unwrap();
    use_identity(&dir, "reader", &ca);
    let reader = Store::setup(config(&addr, 0)).await.unwrap();
    let value: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let on_storage = ReplicateConfig {
        preferred_segment: storage.hostname().to_owned(),
        ..Default::default()
    };
    reader.put("k", &value, &on_storage).await.unwrap();
    assert_eq!(reader.get("k").await.unwrap(), value);
    assert_eq!(storage.get("k").await.unwrap(), value);

    // A node with another CA's certificate is refused by the master (and the cluster's nodes
    // would move no byte to or from it: see the QUIC transport's own tests).
    let other = certs::new_ca("intruder").unwrap();
    use_identity(&dir, "intruder", &other);
    let refused = Store::setup(config(&addr, 0))
        .await
        .err()
        .map(|e| e.to_string());
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("certificate")),
        "{refused:?}"
    );

    for s in [reader, storage] {
        s.close().await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
