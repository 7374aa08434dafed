//! [`P2PStore`]: the seed's API (register, unregister, list, get_replica, delete_replica,
//! close) on a transfer engine and a catalog.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use mooncake_core::{Discovery, EngineConfig, MetadataStore, TransferEngine, Transport};
use mooncake_transport_tcp::{TcpConfig, TcpTransport};
use tokio::sync::watch;

use crate::catalog::{Catalog, HaveRecord, PayloadRecord};
use crate::error::{Error, Result};
use crate::piece::{auto_piece_size, fragments, hash_piece, layout, Bitmap, Buffer};
use crate::pull::{pull, PullOptions, PullReport};
use crate::scheduler::SchedulerConfig;

/// P2P store settings. Each field's default says where it comes from.
#[derive(Clone, Debug)]
pub struct P2PConfig {
    /// Piece size for payloads this instance registers (capped at the shard size). Default
    /// `None`: [`auto_piece_size`](crate::piece::auto_piece_size) of each payload, about 512
    /// pieces of 512 KiB to 8 MiB (Kraken uses 4 MiB, Dragonfly 4-64 MiB; smaller pieces here
    /// shorten the tail of a swarm, see that function).
    pub piece_size: Option<u64>,
    /// Piece choice, pipelining, timeouts and backoff. A `seed` of 0 is replaced by a random
    /// one per pull.
    pub scheduler: SchedulerConfig,
    /// Uploads this instance admits at once, from every payload it serves; readers split them
    /// among themselves (see [`fair_share`](crate::scheduler::fair_share)). Default 8 (a few
    /// more than BitTorrent's 4 unchoked peers, as pieces here are READs with no choking
    /// round trip).
    pub upload_slots: u32,
    /// Pieces in flight at once per pull, over all peers; each has a scratch buffer of a piece
    /// where it lands and is verified before it is copied into the destination, so a pull
    /// holds `max_in_flight × piece size` of scratch memory (8-128 MiB by default), up to twice
    /// that while requests that timed out still wait for the transport. Default 16 (Dragonfly
    /// keeps 10 pieces in flight; a few more cover several slow peers).
    pub max_in_flight: usize,
    /// Longest wait before newly verified pieces are published (updates are batched). Default
    /// 50 ms.
    pub publish_interval: Duration,
    /// How often a pull looks at the catalog for new holders and their pieces. Default 200 ms.
    pub refresh_interval: Duration,
    /// A pull not complete by then fails with [`Error::Timeout`]. Default 10 minutes.
    pub pull_timeout: Duration,
    /// How pulls behave. Default [`PullMode::Swarm`]; [`PullMode::Upstream`] is for
    /// comparisons only.
    pub mode: PullMode,
    /// With an identity, the engine [`P2PStore::new`] starts moves pieces over QUIC with mutual
    /// TLS (every peer must hold a certificate of the same CA; `TlsIdentity::from_env` reads
    /// one from `MC_TLS_CA`, `MC_TLS_CERT`, `MC_TLS_KEY`); without, over TCP. Default: TCP.
    #[cfg(feature = "quic")]
    pub quic: Option<mooncake_transport_quic::TlsIdentity>,
    /// Over TCP, with an identity every connection authenticates both ends with the cluster's
    /// certificates and then moves pieces unencrypted (`TlsIdentity::from_env_opt` reads one
    /// from `MC_TLS_*`). Default: none (any peer may connect).
    pub tcp_auth: Option<mooncake_tls::TlsIdentity>,
}

/// How a pull chooses sources and publishes what it has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullMode {
    /// Pieces published as soon as they verify, any holder a source, random-first then
    /// rarest-first then endgame.
    #[default]
    Swarm,
    /// Upstream Mooncake's behaviour, for side-by-side benchmarks: a copy is published only
    /// once complete, only complete copies (and the origin) are sources, pieces are taken in
    /// random order with no endgame. Pieces are still verified. (Upstream also fetches a whole
    /// shard per READ and retries the whole file when a source leaves; neither is copied.)
    Upstream,
}

impl Default for P2PConfig {
    fn default() -> Self {
        P2PConfig {
            piece_size: None,
            scheduler: SchedulerConfig::default(),
            upload_slots: 8,
            max_in_flight: 16,
            publish_interval: Duration::from_millis(50),
            refresh_interval: Duration::from_millis(200),
            pull_timeout: Duration::from_secs(600),
            mode: PullMode::Swarm,
            #[cfg(feature = "quic")]
            quic: None,
            tcp_auth: None,
        }
    }
}

impl P2PConfig {
    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidArgument(m.to_owned()));
        if self.piece_size.is_some_and(|p| p == 0 || p > 1 << 30) {
            return bad("piece_size must be between 1 byte and 1 GiB");
        }
        if self.max_in_flight == 0 || self.scheduler.pipeline_per_peer == 0 {
            return bad("max_in_flight and pipeline_per_peer must be at least 1");
        }
        if self.upload_slots == 0 {
            return bad("upload_slots must be at least 1");
        }
        if self.scheduler.endgame_copies == 0 {
            return bad("endgame_copies must be at least 1");
        }
        if self.scheduler.request_timeout.is_zero() || self.pull_timeout.is_zero() {
            return bad("timeouts must be positive");
        }
        if self.refresh_interval.is_zero() {
            return bad("refresh_interval must be positive");
        }
        Ok(())
    }
}

/// A payload as [`P2PStore::list`] shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadInfo {
    /// Full name.
    pub name: String,
    /// The `max_shard_size` passed to `register`.
    pub max_shard_size: u64,
    /// Sum of `size_list`.
    pub total_size: u64,
    /// The buffers' sizes passed to `register`.
    pub size_list: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replica {
    Pulling,
    Complete { generation: u64 },
}

#[derive(Debug, Default)]
struct Local {
    /// Registered here: name -> generation.
    registered: HashMap<String, u64>,
    replicas: HashMap<String, Replica>,
}

/// What the pull loop needs of the store.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) engine: Arc<TransferEngine>,
    pub(crate) catalog: Catalog,
    pub(crate) config: P2PConfig,
    local: Mutex<Local>,
    /// `true` once [`P2PStore::close`] began: pulls in progress end with [`Error::Closed`].
    pub(crate) closed: watch::Sender<bool>,
}

/// See the [crate docs](crate).
#[derive(Debug)]
pub struct P2PStore {
    shared: Arc<Shared>,
    owns_engine: bool,
}

/// A random number (a payload generation, a scheduler seed).
#[allow(clippy::disallowed_methods)] // the time of day salts the randomness
pub(crate) fn random_u64(salt: &str) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write(salt.as_bytes());
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.finish().max(1)
}

fn bind_address(local: &str) -> Result<SocketAddr> {
    if let Ok(a) = local.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = local.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 0));
    }
    let (host, port) = match local.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (
            h,
            p.parse::<u16>()
                .map_err(|_| Error::InvalidArgument(format!("bad port in {local:?}")))?,
        ),
        _ => (local, 0),
    };
    (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::InvalidArgument(format!("resolving {local:?}: {e}")))?
        .next()
        .ok_or_else(|| Error::InvalidArgument(format!("{local:?} resolves to no address")))
}

impl P2PStore {
    /// Starts a transfer engine with a TCP (or, with [`P2PConfig::quic`], QUIC) transport on
    /// `local_segment_name` (`host` or
    /// `host:port`; without a port a free one is picked), whose segment is published in
    /// `metadata`, and a store on it whose catalog is in `metadata` too. `close` shuts the
    /// engine down.
    pub async fn new(
        metadata: Arc<dyn MetadataStore>,
        local_segment_name: &str,
        config: P2PConfig,
    ) -> Result<P2PStore> {
        config.validate()?;
        let bind = bind_address(local_segment_name)?;
        #[allow(unused_mut)]
        let mut transport: Option<Arc<dyn Transport>> = None;
        #[cfg(feature = "quic")]
        if let Some(identity) = &config.quic {
            let mut quic = mooncake_transport_quic::QuicConfig::new(identity.clone());
            quic.bind = bind;
            transport = Some(mooncake_transport_quic::QuicTransport::new(quic)?);
        }
        let transport = match transport {
            Some(t) => t,
            None => TcpTransport::new(TcpConfig {
                bind,
                auth: config.tcp_auth.clone(),
                ..TcpConfig::default()
            })?,
        };
        let mut engine_config = EngineConfig::new(local_segment_name);
        engine_config.discovery = Discovery::Metadata(metadata.clone());
        let engine = TransferEngine::start(engine_config, vec![transport]).await?;
        let mut store = P2PStore::with_engine(metadata, engine, config)?;
        store.owns_engine = true;
        Ok(store)
    }

    /// A store on an engine the caller runs (started with `mooncake_store::start_engine`, say).
    /// Its peers must find each other's segments through the engine's discovery. `close` leaves
    /// the engine running.
    pub fn with_engine(
        metadata: Arc<dyn MetadataStore>,
        engine: Arc<TransferEngine>,
        config: P2PConfig,
    ) -> Result<P2PStore> {
        config.validate()?;
        Ok(P2PStore {
            shared: Arc::new(Shared {
                engine,
                catalog: Catalog::new(metadata),
                config,
                local: Mutex::new(Local::default()),
                closed: watch::channel(false).0,
            }),
            owns_engine: false,
        })
    }

    /// The transfer engine (to allocate and register buffers with it).
    pub fn engine(&self) -> &Arc<TransferEngine> {
        &self.shared.engine
    }

    /// This instance's segment name.
    pub fn segment_name(&self) -> &str {
        self.shared.engine.segment_name()
    }

    fn check_open(&self) -> Result<()> {
        if *self.shared.closed.borrow() {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.shared.local.lock().expect("p2p local state")
    }

    /// Publishes the file made of `buffers` (concatenated in order) under `name`, so that others
    /// can pull it. The buffers must lie in memory registered with this store's engine, and
    /// stay unchanged until [`unregister`](Self::unregister). Hashes every piece (reads the
    /// whole file once, on a blocking thread). `location` must be empty or the buffers' registered location.
    /// Fails with [`Error::AlreadyExists`] if the name is taken, unless `force_create`.
    pub async fn register(
        &self,
        name: &str,
        buffers: &[Buffer],
        max_shard_size: u64,
        location: &str,
        force_create: bool,
    ) -> Result<()> {
        self.check_open()?;
        if name.is_empty() {
            return Err(Error::InvalidArgument("empty payload name".into()));
        }
        if max_shard_size == 0 {
            return Err(Error::InvalidArgument("max_shard_size is 0".into()));
        }
        let total_size = self.check_buffers(buffers, Some(location))?;
        if self.local().replicas.contains_key(name) {
            return Err(Error::AlreadyPulled(name.to_owned()));
        }
        let piece_size = (self.shared.config.piece_size)
            .unwrap_or_else(|| auto_piece_size(total_size))
            .min(max_shard_size);
        let pieces = layout(total_size, max_shard_size, piece_size);
        // Hashing reads the whole file: off the async threads.
        let memory = self.shared.engine.memory().clone();
        let layout_buffers = buffers.to_vec();
        let hashes = tokio::task::spawn_blocking(move || -> Result<Vec<_>> {
            let mut bytes = Vec::new();
            let mut hashes = Vec::with_capacity(pieces.len());
            for p in &pieces {
                bytes.resize(p.len as usize, 0);
                let frags =
                    fragments(&layout_buffers, p.offset, p.len).expect("pieces lie in the file");
                for (addr, len, at) in frags {
                    memory
                        .resolve(addr, len)?
                        .read_into(&mut bytes[at as usize..(at + len) as usize])?;
                }
                hashes.push(hash_piece(&bytes));
            }
            Ok(hashes)
        })
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // The runtime is shutting down.
            Err(_) => Error::Closed,
        })??;
        let pieces = hashes.len();
        let generation = random_u64(name);
        let segment = self.segment_name().to_owned();
        let record = PayloadRecord {
            name: name.to_owned(),
            max_shard_size,
            total_size,
            size_list: buffers.iter().map(|b| b.len).collect(),
            piece_size,
            hashes,
            generation,
            origin: Some(segment.clone()),
        };
        // Peers read these buffers: they must be in the published descriptor.
        self.shared.engine.publish().await?;
        self.shared.catalog.create(&record, force_create).await?;
        let have = HaveRecord {
            generation,
            segment,
            buffers: buffers.to_vec(),
            have: Bitmap::full(pieces),
            fetching: Vec::new(),
            upload_slots: self.shared.config.upload_slots,
        };
        self.shared.catalog.publish_have(name, &have).await?;
        self.local().registered.insert(name.to_owned(), generation);
        Ok(())
    }

    /// Checks that every buffer lies in registered memory (at `location`, when given and not
    /// empty); returns the total size.
    fn check_buffers(&self, buffers: &[Buffer], location: Option<&str>) -> Result<u64> {
        if buffers.is_empty() {
            return Err(Error::InvalidBuffers("no buffers".into()));
        }
        let mut total = 0u64;
        for b in buffers {
            if b.len == 0 {
                return Err(Error::InvalidBuffers(format!(
                    "empty buffer at {:#x}",
                    b.addr
                )));
            }
            let region = self
                .shared
                .engine
                .memory()
                .resolve(b.addr, b.len)
                .map_err(|e| Error::InvalidBuffers(e.to_string()))?;
            if let Some(loc) = location.filter(|l| !l.is_empty()) {
                let registered = region.buffer().location();
                if registered.0 != loc {
                    return Err(Error::InvalidBuffers(format!(
                        "buffer at {:#x} is registered at {registered}, not {loc}",
                        b.addr
                    )));
                }
            }
            total = total
                .checked_add(b.len)
                .ok_or_else(|| Error::InvalidBuffers("total size overflows".into()))?;
        }
        Ok(total)
    }

    /// Stops serving `name` from the registered buffers. Replicas others pulled keep serving;
    /// the catalog forgets the payload once no copy is left.
    pub async fn unregister(&self, name: &str) -> Result<()> {
        self.check_open()?;
        let generation = *self
            .local()
            .registered
            .get(name)
            .ok_or_else(|| Error::NotRegisteredHere(name.to_owned()))?;
        let result = self
            .shared
            .catalog
            .unregister(name, self.segment_name(), generation)
            .await;
        // Replaced by another's force_create meanwhile: it is not ours any more either way.
        if matches!(result, Ok(()) | Err(Error::NotRegisteredHere(_))) {
            self.local().registered.remove(name);
        }
        result
    }

    /// Payloads whose names start with `prefix` (all of them for `""`), by name.
    pub async fn list(&self, prefix: &str) -> Result<Vec<PayloadInfo>> {
        self.check_open()?;
        Ok(self
            .shared
            .catalog
            .list(prefix)
            .await?
            .into_iter()
            .map(|r| PayloadInfo {
                name: r.name,
                max_shard_size: r.max_shard_size,
                total_size: r.total_size,
                size_list: r.size_list,
            })
            .collect())
    }

    /// Pulls `name` into `buffers` (registered with this store's engine; their concatenation
    /// receives the file) from the peers that hold its pieces, verifying each piece against the
    /// catalog's hash before it is written to the buffers and published. Pieces are served to
    /// others as soon as they are verified, and the whole copy after completion, until
    /// [`delete_replica`](Self::delete_replica).
    ///
    /// A name is pulled at most once per instance ([`Error::AlreadyPulled`]). Fails with
    /// [`Error::Timeout`] after [`P2PConfig::pull_timeout`]; dropping the future cancels the
    /// pull (see [`get_replica_with`](Self::get_replica_with) for a per-call deadline and
    /// cancellation from elsewhere). A pull that fails or is cancelled withdraws what it
    /// published, and may be tried again.
    pub async fn get_replica(&self, name: &str, buffers: &[Buffer]) -> Result<PullReport> {
        self.get_replica_with(name, buffers, &PullOptions::default())
            .await
    }

    /// [`get_replica`](Self::get_replica) with a per-call timeout, a [`CancelToken`](crate::CancelToken)
    /// and a progress counter ([`PullOptions`]).
    pub async fn get_replica_with(
        &self,
        name: &str,
        buffers: &[Buffer],
        options: &PullOptions,
    ) -> Result<PullReport> {
        self.check_open()?;
        let total_size = self.check_buffers(buffers, None)?;
        {
            let mut local = self.local();
            if local.registered.contains_key(name) || local.replicas.contains_key(name) {
                return Err(Error::AlreadyPulled(name.to_owned()));
            }
            local.replicas.insert(name.to_owned(), Replica::Pulling);
        }
        let mut guard = PullGuard {
            shared: self.shared.clone(),
            name: name.to_owned(),
            generation: None,
            done: false,
        };
        let (record, _) = self
            .shared
            .catalog
            .payload(name)
            .await?
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        if record.total_size != total_size {
            return Err(Error::InvalidBuffers(format!(
                "{name:?} has {} bytes, the buffers {total_size}",
                record.total_size
            )));
        }
        guard.generation = Some(record.generation);
        match pull(&self.shared, &record, buffers, options).await {
            Ok(report) => {
                self.local().replicas.insert(
                    name.to_owned(),
                    Replica::Complete {
                        generation: record.generation,
                    },
                );
                guard.done = true;
                Ok(report)
            }
            Err(e) => {
                // Withdraw before returning, so that a retry does not race the withdrawal.
                guard.generation = None;
                let catalog = &self.shared.catalog;
                if let Err(w) = catalog.withdraw_have(name, self.segment_name()).await {
                    tracing::warn!("withdrawing the partial replica of {name:?}: {w}");
                }
                let _ = catalog.remove_if_orphaned(name, record.generation).await;
                Err(e)
            }
        }
    }

    /// Stops serving the local replica of `name` (its buffers may then be reused) and lets this
    /// instance pull it again.
    pub async fn delete_replica(&self, name: &str) -> Result<()> {
        self.check_open()?;
        let generation = match self.local().replicas.get(name) {
            Some(Replica::Complete { generation }) => *generation,
            _ => return Err(Error::NoReplica(name.to_owned())),
        };
        let catalog = &self.shared.catalog;
        catalog.withdraw_have(name, self.segment_name()).await?;
        self.local().replicas.remove(name);
        catalog.remove_if_orphaned(name, generation).await
    }

    /// Ends pulls in progress (they fail with [`Error::Closed`]), withdraws every payload and
    /// replica of this instance from the catalog and, if this store started its engine, shuts
    /// the engine down. Idempotent.
    pub async fn close(&self) -> Result<()> {
        if self.shared.closed.send_replace(true) {
            return Ok(());
        }
        let (registered, replicas) = {
            let mut local = self.local();
            (
                std::mem::take(&mut local.registered),
                std::mem::take(&mut local.replicas),
            )
        };
        let segment = self.segment_name().to_owned();
        let catalog = &self.shared.catalog;
        let mut first_error = None;
        for (name, generation) in registered {
            if let Err(e) = catalog.unregister(&name, &segment, generation).await {
                first_error.get_or_insert(e);
            }
        }
        for (name, replica) in replicas {
            if let Replica::Complete { generation } = replica {
                let r = async {
                    catalog.withdraw_have(&name, &segment).await?;
                    catalog.remove_if_orphaned(&name, generation).await
                };
                if let Err(e) = r.await {
                    first_error.get_or_insert(e);
                }
            }
        }
        if self.owns_engine {
            self.shared.engine.shutdown().await;
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Undoes a pull that did not complete (failed, timed out or dropped): forgets the local entry
/// and withdraws what it published.
struct PullGuard {
    shared: Arc<Shared>,
    name: String,
    generation: Option<u64>,
    /// The pull completed: keep everything.
    done: bool,
}

impl Drop for PullGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.shared
            .local
            .lock()
            .expect("p2p local state")
            .replicas
            .remove(&self.name);
        let Some(generation) = self.generation else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        let name = std::mem::take(&mut self.name);
        rt.spawn(async move {
            let segment = shared.engine.segment_name();
            if let Err(e) = shared.catalog.withdraw_have(&name, segment).await {
                tracing::warn!("withdrawing the partial replica of {name:?}: {e}");
            }
            let _ = shared.catalog.remove_if_orphaned(&name, generation).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_rejects_nonsense() {
        assert!(P2PConfig::default().validate().is_ok());
        let cases: [fn(&mut P2PConfig); 7] = [
            |c| c.piece_size = Some(0),
            |c| c.upload_slots = 0,
            |c| c.max_in_flight = 0,
            |c| c.scheduler.pipeline_per_peer = 0,
            |c| c.scheduler.endgame_copies = 0,
            |c| c.pull_timeout = Duration::ZERO,
            |c| c.refresh_interval = Duration::ZERO,
        ];
        for edit in cases {
            let mut c = P2PConfig::default();
            edit(&mut c);
            assert!(
                matches!(c.validate(), Err(Error::InvalidArgument(_))),
                "{c:?}"
            );
        }
    }

    #[test]
    fn bind_addresses() {
        assert_eq!(bind_address("127.0.0.1").unwrap().port(), 0);
        assert_eq!(bind_address("127.0.0.1:4567").unwrap().port(), 4567);
        assert!(bind_address("localhost").unwrap().ip().is_loopback());
        assert!(bind_address("localhost:x").is_err());
    }

    #[test]
    fn random_numbers_differ_and_are_never_zero() {
        let a = random_u64("x");
        let b = random_u64("x");
        assert_ne!(a, b);
        assert_ne!(a, 0);
    }
}
