//! `mooncake_p2p`: publish a file or directory under a name, fetch a name to a path, list names,
//! through the P2P store with its catalog in an HTTP metadata server.
//!
//! ```text
//! mooncake_p2p --metadata http://host:port/metadata publish ckpt/step-100 ./checkpoint/
//! mooncake_p2p --metadata http://host:port/metadata fetch ckpt/step-100 ./restored/
//! mooncake_p2p --metadata http://host:port/metadata list ckpt/
//! ```
//!
//! `publish` memory-maps the files (private mappings: nothing is copied, and nothing reaches the
//! files), registers them as one payload whose first buffer is a manifest (the files' relative
//! paths and sizes, sorted by path) and serves until interrupted (Ctrl-C or SIGTERM unregister
//! it). Published files must not change meanwhile: readers would refuse the changed pieces,
//! and a truncated file makes the publisher fault. `fetch` pulls the payload into memory
//! (every piece checked against its BLAKE3 hash), then writes the files; it serves the pieces
//! it has to other fetchers while it runs.

mod manifest;
mod mapped;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mooncake_core::memory::AlignedBuffer;
use mooncake_core::{parse_size, Location, MetadataStore};
use mooncake_meta_http::HttpMetadataStore;
use mooncake_p2p::{Buffer, CancelToken, P2PConfig, P2PStore, PullOptions};
use mooncake_transport_quic::TlsIdentity;

use manifest::Manifest;
use mapped::MappedFile;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Publish, fetch and list checkpoints through the mooncake-rs P2P store"
)]
struct Cli {
    /// URL of the HTTP metadata server that holds the catalog (`serve_http`, or
    /// `mooncake_master --enable_http_metadata_server`).
    #[arg(long, default_value = "http://127.0.0.1:8080/metadata")]
    metadata: String,
    /// This host's address as peers reach it (`host` or `host:port`; a free port without one).
    #[arg(long, default_value = "127.0.0.1")]
    local: String,
    /// How pieces move: `tcp`, or `quic` (mutual TLS; the certificate files come from
    /// MC_TLS_CA, MC_TLS_CERT and MC_TLS_KEY, see `mooncake_certs`).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "quic"])]
    protocol: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Publish a file or directory under NAME and serve it until interrupted.
    Publish {
        /// Name, unique in the cluster.
        name: String,
        /// A file, or a directory (its files in path order).
        path: PathBuf,
        /// Shard size of the payload (the catalog's unit; pieces subdivide it).
        #[arg(long, default_value = "64MiB")]
        shard_size: String,
        /// Replace a payload of the same name.
        #[arg(long)]
        force: bool,
    },
    /// Fetch NAME into DEST (a file, or a directory for a published directory).
    Fetch {
        /// Name of the payload.
        name: String,
        /// Where to write it; must not exist.
        dest: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// List the payloads whose names start with PREFIX.
    List {
        /// Name prefix; all payloads without one.
        #[arg(default_value = "")]
        prefix: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Fallible<T = ()> = Result<T, String>;

async fn run(cli: Cli) -> Fallible {
    let catalog: Arc<dyn MetadataStore> =
        Arc::new(HttpMetadataStore::new(&cli.metadata).map_err(|e| e.to_string())?);
    let mut config = P2PConfig::default();
    if cli.protocol == "quic" {
        config.quic = Some(TlsIdentity::from_env().map_err(|e| e.to_string())?);
    } else {
        // With certificates in MC_TLS_*, TCP connections authenticate both ends.
        config.tcp_auth = TlsIdentity::from_env_opt().map_err(|e| e.to_string())?;
    }
    if let Command::Fetch { timeout, .. } = &cli.command {
        config.pull_timeout = Duration::from_secs(*timeout);
    }
    let store = P2PStore::new(catalog, &cli.local, config)
        .await
        .map_err(|e| e.to_string())?;
    let result = match cli.command {
        Command::Publish {
            name,
            path,
            shard_size,
            force,
        } => publish(&store, &name, &path, &shard_size, force).await,
        Command::Fetch { name, dest, .. } => fetch(&store, &name, &dest).await,
        Command::List { prefix } => list(&store, &prefix).await,
    };
    let closed = store.close().await.map_err(|e| e.to_string());
    result.and(closed)
}

async fn publish(store: &P2PStore, name: &str, path: &Path, shard: &str, force: bool) -> Fallible {
    let shard = parse_size(shard).map_err(|e| format!("--shard-size: {e}"))?;
    let manifest = Manifest::of(path)?;
    let engine = store.engine();
    let location = Location::cpu(0);
    let encoded = manifest.encode();
    let addr = engine
        .allocate_buffer(encoded.len(), location.clone())
        .map_err(|e| e.to_string())?;
    let region = engine.memory().resolve(addr, encoded.len() as u64);
    region
        .and_then(|r| r.write_from(&encoded))
        .map_err(|e| e.to_string())?;
    let mut buffers = vec![Buffer::new(addr, encoded.len() as u64)];
    for file in manifest.files.iter().filter(|f| f.size > 0) {
        let on_disk = manifest.destination(path, file);
        let mapped = MappedFile::open(&on_disk, file.size).map_err(|e| e.to_string())?;
        let buffer = AlignedBuffer::from_provided(mapped).map_err(|e| e.to_string())?;
        let addr = engine
            .memory()
            .register_owned(buffer, location.clone())
            .map_err(|e| e.to_string())?;
        buffers.push(Buffer::new(addr, file.size));
    }
    let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
    store
        .register(name, &buffers, shard, &location.to_string(), force)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "published {name}: {bytes} bytes in {} file(s) from {}; serving until interrupted",
        manifest.files.len(),
        path.display()
    );
    let _ = std::io::stdout().flush();
    interrupted().await;
    eprintln!("stopping: unregistering {name}");
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[allow(clippy::disallowed_methods)] // the wall-clock time of the fetch, for the final line
async fn fetch(store: &P2PStore, name: &str, dest: &Path) -> Fallible {
    if dest.exists() {
        return Err(format!(
            "{} exists; fetch writes a new path",
            dest.display()
        ));
    }
    let info = store.list(name).await.map_err(|e| e.to_string())?;
    let info = info
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| format!("no payload named {name:?}"))?;
    let engine = store.engine();
    let buffers = info
        .size_list
        .iter()
        .map(|&len| {
            let addr = engine.allocate_buffer(len as usize, Location::cpu(0));
            addr.map(|addr| Buffer::new(addr, len))
                .map_err(|e| e.to_string())
        })
        .collect::<Fallible<Vec<_>>>()?;

    let bar = ProgressBar::new(info.total_size);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(name.to_owned());
    let verified = Arc::new(AtomicU64::new(0));
    let ticker = {
        let (bar, verified) = (bar.clone(), verified.clone());
        tokio::spawn(async move {
            loop {
                bar.set_position(verified.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // Ctrl-C or SIGTERM cancels the pull, which withdraws the partial copy from the catalog
    // (a killed process would leave it for the others to find dead).
    let cancel = CancelToken::new();
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            interrupted().await;
            cancel.cancel();
        })
    };
    let started = Instant::now();
    let pulled = store
        .get_replica_with(
            name,
            &buffers,
            &PullOptions {
                progress: Some(verified.clone()),
                cancel: Some(cancel),
                ..PullOptions::default()
            },
        )
        .await;
    watcher.abort();
    ticker.abort();
    bar.set_position(verified.load(Ordering::Relaxed));
    bar.finish_and_clear();
    let report = pulled.map_err(|e| e.to_string())?;

    let read = |b: &Buffer| {
        engine
            .memory()
            .resolve(b.addr, b.len)
            .map_err(|e| e.to_string())
    };
    let manifest = Manifest::decode(&read(&buffers[0])?.to_vec(), &info.size_list[1..])?;
    let mut data = buffers[1..].iter();
    if manifest.directory {
        std::fs::create_dir_all(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    }
    for file in &manifest.files {
        let path = manifest.destination(dest, file);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        let mut out =
            std::fs::File::create_new(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if file.size > 0 {
            let buffer = data.next().expect("decode checked the buffer count");
            let region = read(buffer)?;
            let mut chunk = vec![0u8; (8 << 20).min(file.size as usize)];
            let mut at = 0;
            while at < file.size {
                let n = chunk.len().min((file.size - at) as usize);
                let part = region.slice(at, n as u64).map_err(|e| e.to_string())?;
                part.read_into(&mut chunk[..n]).map_err(|e| e.to_string())?;
                out.write_all(&chunk[..n])
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                at += n as u64;
            }
        }
        out.sync_all()
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let secs = started.elapsed().as_secs_f64();
    let payload: u64 = manifest.files.iter().map(|f| f.size).sum();
    println!(
        "fetched {name}: {payload} bytes in {} file(s) to {} in {secs:.2} s ({:.1} MB/s); \
         verified: all {} pieces matched their BLAKE3 hashes ({} corrupt piece(s) refetched)",
        manifest.files.len(),
        dest.display(),
        payload as f64 / secs.max(1e-9) / 1e6,
        report.pieces,
        report.corrupt,
    );
    Ok(())
}

async fn list(store: &P2PStore, prefix: &str) -> Fallible {
    let payloads = store.list(prefix).await.map_err(|e| e.to_string())?;
    for p in &payloads {
        println!(
            "{}\t{} bytes\t{} buffer(s)\tshard {}",
            p.name,
            p.total_size,
            p.size_list.len(),
            p.max_shard_size
        );
    }
    Ok(())
}
