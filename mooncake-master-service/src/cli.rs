//! What the command-line programs share: running a program's future to an exit code, waiting
//! for a shutdown signal, the `--raft_peers` syntax and the TLS identity of `--tls_*` or
//! `MC_TLS_*`.

use std::future::Future;

use mooncake_core::{Error, Result};
use mooncake_tls::{TlsIdentity, TLS_ENV};

/// The node's TLS identity from `--tls_ca`, `--tls_cert` and `--tls_key` (all three or none),
/// or, when none of them is given, from the `MC_TLS_CA`, `MC_TLS_CERT` and `MC_TLS_KEY`
/// environment variables (likewise all three or none). `None` runs without TLS. `crl`
/// (`--tls_crl`, else `MC_TLS_CRL`) names the CA's revocation list to check peers against. The
/// files are read and checked here, so a bad certificate, key or list stops the start with its
/// reason.
pub fn tls_identity(
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    crl: Option<String>,
) -> Result<Option<TlsIdentity>> {
    let identity = match (ca, cert, key) {
        (None, None, None) => TlsIdentity::from_env_opt()?,
        (Some(ca), Some(cert), Some(key)) => Some(TlsIdentity::from_pem_files(ca, cert, key)?),
        (ca, cert, key) => {
            let missing: Vec<&str> = [
                ("--tls_ca", &ca),
                ("--tls_cert", &cert),
                ("--tls_key", &key),
            ]
            .into_iter()
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| n)
            .collect();
            return Err(Error::InvalidArgument(format!(
                "TLS is half configured: --tls_ca, --tls_cert and --tls_key go together \
                 ({} missing)",
                missing.join(", ")
            )));
        }
    };
    let identity = match (identity, crl) {
        (Some(id), Some(crl)) => Some(id.with_crl_file(crl)?),
        (None, Some(_)) => {
            return Err(Error::InvalidArgument(
                "--tls_crl needs a certificate (--tls_ca, --tls_cert, --tls_key)".into(),
            ))
        }
        (id, None) => id,
    };
    if let Some(id) = &identity {
        // Builds the configurations once: a PEM that does not parse is refused now.
        id.configs(b"check").map_err(|e| {
            Error::InvalidArgument(format!(
                "TLS identity (--tls_* or {}): {e}",
                TLS_ENV.join("/")
            ))
        })?;
    }
    Ok(identity)
}

/// Runs a program's future on a two-worker runtime and turns its outcome into an exit code (0,
/// or 1 with the error on stderr, prefixed with `program`).
pub fn run_program(program: &str, main: impl Future<Output = Result<()>>) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{program}: starting the runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{program}: {e}");
            1
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Parses `--raft_peers`: `id=raft_host:port/rpc_host:port`, comma-separated.
pub fn parse_raft_peers(value: &str) -> Result<Vec<(u64, String, String)>> {
    let bad = |m: String| Error::InvalidArgument(format!("--raft_peers: {m}"));
    let mut peers: Vec<(u64, String, String)> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, addrs) = item
            .split_once('=')
            .ok_or_else(|| bad(format!("{item:?} is not id=raft_addr/rpc_addr")))?;
        let id: u64 = id
            .trim()
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or_else(|| bad(format!("{id:?} is not a non-zero id")))?;
        let (raft, rpc) = addrs
            .split_once('/')
            .ok_or_else(|| bad(format!("{item:?} lacks the /rpc_addr part")))?;
        if peers.iter().any(|p| p.0 == id) {
            return Err(bad(format!("id {id} appears twice")));
        }
        peers.push((id, raft.trim().to_owned(), rpc.trim().to_owned()));
    }
    if peers.is_empty() {
        return Err(bad("no members".into()));
    }
    Ok(peers)
}
