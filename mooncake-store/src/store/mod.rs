//! The store client: put, get and manage objects in a Mooncake store.
//!
//! A [`Store`] has two roles. It issues calls (put/get/remove/...), asking the master where
//! replicas are or go and moving the bytes itself through its transfer engine. And it contributes
//! a segment of `global_segment_size` bytes that it mounts on the master, where other clients'
//! replicas land. Object bytes move client to client; the master only hands out locations.
//!
//! Byte-oriented calls copy through a registered staging buffer of `local_buffer_size` bytes;
//! zero-copy calls ([`Store::put_from`], [`Store::get_into`]) move data straight between the
//! caller's registered buffers and the replicas. Reads prefer a replica in the client's own
//! segment (a memcpy). Results carry the store's error codes ([`ErrorCode`]).
//!
//! The calls a store client offers, whichever kind serves them, are the [`StoreApi`] trait: a
//! [`Store`] and a dummy client of a real client ([`crate::real_client::DummyClient`]) both
//! implement it.
//!
//! A background task sends heartbeats (remounting the segment when the master no longer knows
//! the client, say after a master restart); nothing else runs on it, so no other work delays
//! them. Another executes the copy and move tasks the master assigns to this client, including
//! the re-replication of objects that lost a replica: several at once, each within a deadline.
//!
//! A write whose WRITE to a segment fails (the storage node died, say, and the master has not
//! expired it yet) asks the master to place the replicas that were there again elsewhere, and
//! this client avoids that segment for a few seconds (see the `write` module).

mod admin;
mod api;
mod checksum;
mod locations;
mod read;
mod reserve;
mod staging;
mod value;
mod write;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mooncake_core::{Discovery, Error, ErrorCode, Location, Result, TransferEngine};
use mooncake_master::{
    ClientId, Command, HeartbeatStatus, ReplicaDescriptor, Response, SegmentSpec, TaskAssignment,
    TaskOutcome, Timestamp,
};

use locations::LocationCache;
use mooncake_master_service::service::MasterService;
use mooncake_rpc::{
    apply_named, MasterApi, MasterRequest, RemoteMaster, RequestIds, RpcClientConfig,
};
use staging::Staging;

pub use api::StoreApi;
pub use locations::ReadAheadStats;
pub use mooncake_master::{ReplicateConfig, WriteKind};
pub use reserve::CommitStats;
pub use value::StagedValue;

/// Copy/move tasks a storage node executes at once.
const TASKS_AT_ONCE: usize = 8;

/// How long one copy/move task may take before this client reports it failed: longer than a
/// transfer may take (the TCP transport's request timeout is 30 s), shorter than the master's
/// own task timeout (60 s by default), so the master hears the failure rather than waits.
const TASK_DEADLINE: Duration = Duration::from_secs(45);

/// Runs `f` every `interval` (the first time after one interval) while the store lives.
async fn every(
    weak: std::sync::Weak<Store>,
    interval: Duration,
    f: fn(Arc<Store>) -> futures::future::BoxFuture<'static, ()>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(store) = weak.upgrade() else { return };
        f(store).await;
    }
}

/// Store client settings, with the names and defaults of the Python `setup` call.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// This node's host name, optionally with a port (`localhost`, `node1:12345`).
    pub local_hostname: String,
    /// Where transfer-engine descriptors live: `P2PHANDSHAKE` (peers ask each other) or
    /// `http://host:port/metadata` (the master's HTTP metadata server).
    pub metadata_server: String,
    /// Bytes this client contributes to the cluster (its mounted segment). 0: none, the client
    /// only issues calls. Default 16 MiB, as upstream.
    pub global_segment_size: u64,
    /// Bytes of the staging buffer for byte-oriented calls; also the largest value such calls
    /// accept. Default 1 GiB, as upstream; 0 is a client without one (zero-copy calls only).
    pub local_buffer_size: u64,
    /// Transport protocol: `tcp` (default) or `quic` (mutual TLS; certificates from the files
    /// the `MC_TLS_CA`, `MC_TLS_CERT`, `MC_TLS_KEY` variables name).
    pub protocol: String,
    /// Device names for the protocol (RDMA NICs); empty for TCP.
    pub device_name: String,
    /// The master, `host:port`, or the members of a master group, `h1:p1,h2:p2,h3:p3`.
    pub master_server_addr: String,
    /// Bounds on master calls. Default: 5 s per call, 2 s to connect.
    pub rpc: RpcClientConfig,
    /// Interval of heartbeats and task polling. Default 1 s (the master's `client_ttl` is 10 s).
    pub heartbeat_interval: Duration,
    /// How long a call waits for staging space held by concurrent calls. Default 10 s.
    pub staging_wait: Duration,
    /// Keys whose last read location is remembered, so that reading them again overlaps the
    /// transfer with the master call (one round trip instead of two; the master still confirms
    /// every read). Default 65536; 0 turns it off.
    pub location_cache_entries: usize,
    /// Bytes of cluster space this client asks the master to reserve for it at a time. Puts with
    /// one replica and no placement wishes, of at most a quarter of this per call, are written
    /// into it and committed with one master call, instead of PutStart before the write and
    /// PutEnd after it. The master may grant less (at most a sixteenth of its largest segment)
    /// and frees what is unused after a second. Default 16 MiB; 0 turns it off.
    pub reservation_bytes: u64,
    /// Touch every page of the segment at setup, so that writes into it never wait for the
    /// kernel to provide a page (the process holds the whole segment in memory from the start).
    /// Default false: pages are provided as values first land on them.
    pub prefault_segment: bool,
    /// Send a reserved put's commit together with its WRITE: the storage node reports the
    /// landing to the master, which commits as soon as the bytes are in place (see
    /// the service's landing reports). One one-way trip less per put; two when the master runs in the
    /// storage node. `None` (default): as the master advises for the reservation's segment
    /// (yes when that segment's storage node runs in the master's process; with a master
    /// elsewhere the extra report costs as much as it saves on a loopback host). `Some(false)`
    /// commits after the WRITE's acknowledgement, `Some(true)` always with the WRITE.
    pub commit_on_landing: Option<bool>,
    /// Reach storage nodes of this host through shared memory: their segments are memfds this
    /// client maps, so a read or write of theirs is one memcpy, not a socket round trip (and
    /// this client's own segment is shared the same way). Default: on, unless the environment
    /// says `MC_SAME_HOST_SHM=0`.
    pub same_host_shm: bool,
    /// Check every zero-copy read (`get_into` and its batch forms) against the value's checksum
    /// too, not only reads returned as bytes (see the `checksum` module): a mismatch tries the
    /// next replica, and gives `CHECKSUM_MISMATCH` when none matches. Costs one pass over the
    /// bytes read. Default: whether the environment says `MOONCAKE_STORE_CHECKSUM=1`
    /// (upstream's switch).
    pub verify_zero_copy: bool,
    /// How long after asking for space (PutStart) a put's WRITEs may land: their deadline,
    /// which the target enforces (TCP) and the engine checks before starting a copy. Keep it
    /// below the master's `put_takeover_ms` (30 s by default), after which the master may hand
    /// the space to another writer. Default 20 s. (Writes into a reservation have their own,
    /// shorter deadline, from the reservation's TTL.)
    pub put_write_deadline: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            local_hostname: "localhost".into(),
            metadata_server: "P2PHANDSHAKE".into(),
            global_segment_size: 16 << 20,
            local_buffer_size: 1 << 30,
            protocol: "tcp".into(),
            device_name: String::new(),
            master_server_addr: "localhost:50051".into(),
            rpc: RpcClientConfig::default(),
            heartbeat_interval: Duration::from_secs(1),
            staging_wait: Duration::from_secs(10),
            location_cache_entries: 1 << 16,
            reservation_bytes: 16 << 20,
            prefault_segment: false,
            commit_on_landing: None,
            same_host_shm: crate::engine::same_host_shm_allowed(),
            verify_zero_copy: std::env::var("MOONCAKE_STORE_CHECKSUM").is_ok_and(|v| v == "1"),
            put_write_deadline: Duration::from_secs(20),
        }
    }
}

impl StoreConfig {
    /// Rejects settings that cannot work, saying why.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::with_code(ErrorCode::INVALID_PARAMS, m));
        if self.local_hostname.is_empty() {
            return bad("local_hostname is empty".into());
        }
        let available = crate::engine::available_protocols();
        if !available.contains(&self.protocol.as_str()) {
            return Err(Error::with_code(
                ErrorCode::NOT_SUPPORTED,
                format!(
                    "protocol {:?} is not available in this build (available: {})",
                    self.protocol,
                    available.join(", ")
                ),
            ));
        }
        if self.metadata_server != "P2PHANDSHAKE" && !self.metadata_server.starts_with("http://") {
            return bad(format!(
                "metadata_server {:?}: expected P2PHANDSHAKE or http://host:port/metadata",
                self.metadata_server
            ));
        }
        if self.heartbeat_interval.is_zero() {
            return bad("heartbeat_interval must be non-zero".into());
        }
        if self.put_write_deadline.is_zero() {
            return bad("put_write_deadline must be non-zero".into());
        }
        Ok(())
    }
}

/// See the module docs.
pub struct Store {
    config: StoreConfig,
    client_id: ClientId,
    /// Names the calls that change the master's state, so a retry after a failover is answered
    /// with the first attempt's outcome.
    ids: RequestIds,
    engine: Arc<TransferEngine>,
    master: Arc<dyn MasterApi>,
    segment: Option<SegmentSpec>,
    staging: Arc<Staging>,
    locations: LocationCache,
    reserved: reserve::Reserved,
    /// Segments a WRITE failed to reach lately, until when they are avoided.
    avoided: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The heartbeat and task loops.
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("client_id", &self.client_id.to_string())
            .field("segment", &self.engine.segment_name())
            .finish()
    }
}

/// A fresh client id from the OS's hash seeds, the clock and the process id.
fn new_client_id() -> ClientId {
    use std::hash::{BuildHasher, Hasher};
    let mut bits = 0u128;
    for i in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        bits = (bits << 64) | h.finish() as u128;
    }
    ClientId(bits.max(1))
}

/// Most landing reports in flight to a remote master at once; more wait and go in later ones.
const LANDING_REPORTS_IN_FLIGHT: usize = 8;

/// The segment's landing notices, gathered per burst of acknowledgements and delivered to the
/// master: at once when it can be (an in-process master, or a free connection to a remote one),
/// else as `Landed` requests sent by a task that ends with the segment. Reports name this
/// store's client id, which owns the segment: a remote master accepts landing reports only from
/// a segment's owner (or from a writer about its own reservation).
struct LandingReporter {
    master: Arc<dyn MasterApi>,
    client_id: ClientId,
    segment: String,
    gathered: Mutex<Vec<(u64, u64)>>,
    queue: tokio::sync::mpsc::UnboundedSender<Vec<(u64, u64)>>,
}

impl mooncake_core::LandingObserver for LandingReporter {
    fn landed(&self, addr: u64, len: u64) {
        self.gathered
            .lock()
            .expect("landing reports")
            .push((addr, len));
    }

    fn flush(&self) {
        // Held while delivering, so reports leave in the order their WRITEs are acknowledged.
        let mut gathered = self.gathered.lock().expect("landing reports");
        if gathered.is_empty() {
            return;
        }
        if self
            .master
            .note_landed(self.client_id, &self.segment, &gathered)
        {
            gathered.clear();
        } else {
            let _ = self.queue.send(std::mem::take(&mut *gathered));
        }
    }
}

fn report_landings(
    engine: &TransferEngine,
    master: Arc<dyn MasterApi>,
    client_id: ClientId,
) -> Result<()> {
    let (queue, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<(u64, u64)>>();
    let segment = engine.segment_name().to_owned();
    // An empty report tells a master in this process that this segment's reports are local.
    master.note_landed(client_id, &segment, &[]);
    engine.set_landing_observer(Arc::new(LandingReporter {
        master: master.clone(),
        client_id,
        segment: segment.clone(),
        gathered: Mutex::new(Vec::new()),
        queue,
    }))?;
    tokio::spawn(async move {
        let mut sending = tokio::task::JoinSet::new();
        let mut batches = Vec::new();
        while rx.recv_many(&mut batches, 1024).await > 0 {
            let request = MasterRequest::Landed {
                client_id,
                segment: segment.clone(),
                ranges: batches.drain(..).flatten().collect(),
            };
            let master = master.clone();
            sending.spawn(async move {
                if let Err(e) = master.call(request).await {
                    // The commit waiting for it is confirmed by its writer instead.
                    tracing::debug!("landing report not delivered: {e}");
                }
            });
            while sending.try_join_next().is_some() {}
            if sending.len() >= LANDING_REPORTS_IN_FLIGHT {
                sending.join_next().await;
            }
        }
    });
    Ok(())
}

impl Store {
    /// Sets up a client of the master at `config.master_server_addr`. When this node has a
    /// certificate (`MC_TLS_CA`, `MC_TLS_CERT` and `MC_TLS_KEY` name its PEM files), the master
    /// is reached over mutual TLS with it; a half-set environment is refused.
    pub async fn setup(config: StoreConfig) -> Result<Arc<Store>> {
        let tls = mooncake_tls::TlsIdentity::from_env_opt()?;
        Self::setup_with_tls(config, tls.as_ref()).await
    }

    /// [`Store::setup`] with this node's certificate given (`None`: plain connections),
    /// whatever the environment says.
    pub async fn setup_with_tls(
        config: StoreConfig,
        tls: Option<&mooncake_tls::TlsIdentity>,
    ) -> Result<Arc<Store>> {
        config.validate()?;
        let connector = tls.map(mooncake_rpc::tls_connector).transpose()?;
        let master = Arc::new(RemoteMaster::with_tls(
            config.master_server_addr.as_str(),
            config.rpc.clone(),
            connector,
        ));
        Self::setup_with_master(config, master).await
    }

    /// Sets up a client of an in-process master (embedded mode): no sockets to the master.
    pub async fn setup_embedded(
        config: StoreConfig,
        master: Arc<MasterService>,
    ) -> Result<Arc<Store>> {
        Self::setup_with_master(config, master).await
    }

    /// Sets up a client of `master`.
    pub async fn setup_with_master(
        config: StoreConfig,
        master: Arc<dyn MasterApi>,
    ) -> Result<Arc<Store>> {
        config.validate()?;
        let discovery = if config.metadata_server == "P2PHANDSHAKE" {
            Discovery::P2PHandshake
        } else {
            Discovery::Metadata(Arc::new(mooncake_meta_http::HttpMetadataStore::new(
                &config.metadata_server,
            )?))
        };
        let engine = crate::engine::start_engine_for(
            &config.local_hostname,
            discovery,
            config.same_host_shm,
            &config.protocol,
        )
        .await?;
        Self::setup_with_engine(config, master, engine).await
    }

    /// Sets up a client of `master` on a transfer engine the caller started (with the transports
    /// and discovery it chose: the in-memory transport of a deterministic test, say) instead of
    /// the one [`setup_with_master`](Self::setup_with_master) starts from `config`. The store
    /// owns the engine from here: it shuts it down when setup fails or the store closes.
    pub async fn setup_with_engine(
        config: StoreConfig,
        master: Arc<dyn MasterApi>,
        engine: Arc<TransferEngine>,
    ) -> Result<Arc<Store>> {
        if let Err(e) = config.validate() {
            engine.shutdown().await;
            return Err(e);
        }
        // No staging buffer at all with local_buffer_size 0 (as upstream allows): zero-copy
        // calls work, byte puts and gets of a non-empty value are INVALID_PARAMS.
        let staging_base = if config.local_buffer_size == 0 {
            0
        } else {
            engine.allocate_buffer(config.local_buffer_size as usize, Location::cpu(0))?
        };
        let staging = Staging::new(staging_base, config.local_buffer_size)?;
        let segment = if config.global_segment_size > 0 {
            let base =
                engine.allocate_buffer(config.global_segment_size as usize, Location::cpu(0))?;
            if config.prefault_segment {
                engine
                    .memory()
                    .resolve(base, config.global_segment_size)?
                    .prefault();
            }
            Some(SegmentSpec::new(
                engine.segment_name(),
                base,
                config.global_segment_size,
            ))
        } else {
            None
        };
        // The id the segment is mounted under, which its landing reports name.
        let client_id = new_client_id();
        if segment.is_some() {
            report_landings(&engine, master.clone(), client_id)?;
        }
        if let Err(e) = engine.publish().await {
            engine.shutdown().await;
            return Err(e);
        }
        let store = Arc::new(Store {
            client_id,
            ids: RequestIds::new(client_id),
            locations: LocationCache::new(config.location_cache_entries),
            reserved: reserve::Reserved::default(),
            config,
            engine,
            master,
            segment,
            staging,
            avoided: Mutex::default(),
            background: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        });
        if let Err(e) = store.mount().await {
            store.engine.shutdown().await;
            return Err(e);
        }
        let weak = Arc::downgrade(&store);
        let interval = store.config.heartbeat_interval;
        // Heartbeats run on a task of their own: whatever else this client does (a copy task
        // may take as long as a transfer may, tens of seconds), nothing delays them, so the
        // master never expires a node that is alive.
        let heartbeats = tokio::spawn(every(weak.clone(), interval, |s| {
            Box::pin(async move { s.heartbeat_round().await })
        }));
        let tasks = tokio::spawn(Store::task_loop(weak, interval));
        store
            .background
            .lock()
            .expect("background slot")
            .extend([heartbeats, tasks]);
        Ok(store)
    }

    async fn mount(&self) -> Result<()> {
        match &self.segment {
            Some(spec) => self
                .apply(Command::MountSegment {
                    client_id: self.client_id,
                    segment: spec.clone(),
                })
                .await?
                .1
                .into_unit()
                .map_err(|c| Error::with_code(c, "mounting the segment")),
            // A client with no segment registers itself, to hold reservations.
            None => self.register().await,
        }
    }

    /// Registers this client (and its segment, if any) with a master that does not know it.
    async fn register(&self) -> Result<()> {
        let segments: Vec<SegmentSpec> = self.segment.iter().cloned().collect();
        let n = segments.len();
        match self
            .apply(Command::RemountSegments {
                client_id: self.client_id,
                segments,
            })
            .await?
            .1
        {
            Response::UnitBatch(rs) if rs.len() == n => rs
                .into_iter()
                .collect::<std::result::Result<(), ErrorCode>>()
                .map_err(|c| Error::with_code(c, "remounting the segment")),
            other => Err(Error::Protocol(format!(
                "RemountSegments answered {other:?}"
            ))),
        }
    }

    async fn heartbeat(&self) -> Result<HeartbeatStatus> {
        match self
            .apply(Command::Heartbeat {
                client_id: self.client_id,
            })
            .await?
            .1
        {
            Response::Heartbeat(s) => Ok(s),
            other => Err(Error::Protocol(format!(
                "heartbeat answered with {other:?}"
            ))),
        }
    }

    /// One heartbeat (and a remount if the master asks for one).
    async fn heartbeat_round(&self) {
        match self.heartbeat().await {
            Ok(HeartbeatStatus::Ok) => {}
            Ok(HeartbeatStatus::NeedRemount) => {
                match &self.segment {
                    Some(spec) => {
                        tracing::info!("master does not know this client; remounting {}", spec.name)
                    }
                    None => tracing::debug!("master does not know this client; registering"),
                }
                if let Err(e) = self.register().await {
                    tracing::warn!("remount failed: {e}");
                }
            }
            Err(e) => tracing::debug!("heartbeat failed: {e}"),
        }
    }

    /// Fetches the copy/move tasks assigned to this client every `interval` and executes them
    /// concurrently (at most [`TASKS_AT_ONCE`] at a time), each within [`TASK_DEADLINE`]: the
    /// source replica is in this client's segment, so each destination is one WRITE from it. A
    /// client with no segment is never assigned any.
    async fn task_loop(weak: std::sync::Weak<Store>, interval: Duration) {
        let has_segment = weak.upgrade().is_some_and(|s| s.segment.is_some());
        if !has_segment {
            return;
        }
        let mut running = tokio::task::JoinSet::new();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(_) = running.join_next() => continue,
            }
            let Some(store) = weak.upgrade() else { return };
            let room = TASKS_AT_ONCE - running.len().min(TASKS_AT_ONCE);
            if room == 0 {
                continue;
            }
            let tasks = match store.fetch_tasks(room).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!("fetching tasks failed: {e}");
                    continue;
                }
            };
            for task in tasks {
                let store = store.clone();
                running.spawn(async move { store.run_task(task).await });
            }
        }
    }

    /// The copy/move tasks the master assigns to this client, at most `max`.
    async fn fetch_tasks(&self, max: usize) -> Result<Vec<TaskAssignment>> {
        match self
            .apply(Command::FetchTasks {
                client_id: self.client_id,
                max: max as u32,
            })
            .await?
            .1
        {
            Response::Tasks(t) => Ok(t),
            other => Err(Error::Protocol(format!("FetchTasks answered {other:?}"))),
        }
    }

    /// Executes one task within [`TASK_DEADLINE`] and reports how it went.
    async fn run_task(&self, task: TaskAssignment) {
        let copied = tokio::time::timeout(TASK_DEADLINE, self.copy_replica(&task))
            .await
            .unwrap_or_else(|_| {
                Err(Error::with_code(
                    ErrorCode::TRANSFER_FAIL,
                    format!("the copy took longer than {TASK_DEADLINE:?}"),
                ))
            });
        let outcome = match copied {
            Ok(()) => TaskOutcome::Success,
            Err(e) => {
                tracing::warn!("task {} for {} failed: {e}", task.task_id, task.key);
                TaskOutcome::Failed(e.code())
            }
        };
        let finished = self
            .apply(Command::FinishTask {
                client_id: self.client_id,
                task_id: task.task_id,
                outcome,
            })
            .await;
        if let Err(e) = finished {
            // The master times the task out and assigns it again.
            tracing::debug!("reporting task {} failed: {e}", task.task_id);
        }
    }

    async fn copy_replica(&self, task: &TaskAssignment) -> Result<()> {
        let source = task.source.memory().ok_or_else(|| {
            Error::with_code(ErrorCode::INVALID_REPLICA, "source is not in memory")
        })?;
        let mut requests = Vec::new();
        for dest in &task.destinations {
            let (seg, addr) = self.locate(dest).await?;
            requests.push(mooncake_core::TransferRequest::write(
                &seg,
                addr,
                source.buffer_address,
                task.size,
            ));
        }
        for r in self.engine.transfer(requests).await {
            r?;
        }
        Ok(())
    }

    /// The opened segment and address of a memory replica.
    async fn locate(
        &self,
        replica: &ReplicaDescriptor,
    ) -> Result<(mooncake_core::SegmentHandle, u64)> {
        let mem = replica.memory().ok_or_else(|| {
            Error::with_code(ErrorCode::INVALID_REPLICA, "replica is not in memory")
        })?;
        let endpoint = if mem.transport_endpoint.is_empty() {
            &mem.segment_name
        } else {
            &mem.transport_endpoint
        };
        Ok((
            self.engine.open_segment(endpoint).await?,
            mem.buffer_address,
        ))
    }

    /// Sends a command to the master.
    async fn apply(&self, command: Command) -> Result<(Timestamp, Response)> {
        self.check_open()?;
        apply_named(&*self.master, &self.ids, command).await
    }

    /// `UNAVAILABLE_IN_CURRENT_STATUS` once the store is closed.
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::with_code(
                ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS,
                "the store is closed",
            ))
        } else {
            Ok(())
        }
    }

    /// How reads sent ahead of the master's answer fared (see
    /// [`StoreConfig::location_cache_entries`]).
    pub fn read_ahead_stats(&self) -> ReadAheadStats {
        self.locations.stats()
    }

    /// This client's id.
    pub fn client_id(&self) -> ClientId {
        self.client_id
    }

    /// This client's segment name (`host:port`), which other clients use as a preferred segment.
    pub fn hostname(&self) -> &str {
        self.engine.segment_name()
    }

    /// How this client's reserved puts were committed.
    pub fn commit_stats(&self) -> CommitStats {
        self.reserved.stats()
    }

    /// The transfer engine (to register buffers for zero-copy calls).
    pub fn engine(&self) -> &Arc<TransferEngine> {
        &self.engine
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// Registers caller memory for zero-copy calls.
    ///
    /// # Safety
    /// `[addr, addr + len)` must stay valid until [`unregister_buffer`](Self::unregister_buffer).
    pub unsafe fn register_buffer(&self, addr: u64, len: u64) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { self.engine.register_memory(addr, len, Location::cpu(0)) }
    }

    /// Unregisters memory registered with [`register_buffer`](Self::register_buffer), waiting for
    /// transfers that use it.
    pub fn unregister_buffer(&self, addr: u64) -> Result<()> {
        self.engine.unregister_memory(addr)
    }

    /// Unmounts the segment (its replicas are dropped by the master), stops the background task
    /// and the transfer engine. Later calls fail with `UNAVAILABLE_IN_CURRENT_STATUS`. Idempotent.
    pub async fn close(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        for h in self.background.lock().expect("background slot").drain(..) {
            h.abort();
        }
        if let Some(spec) = &self.segment {
            let r = self
                .apply(Command::UnmountSegment {
                    client_id: self.client_id,
                    name: spec.name.clone(),
                })
                .await;
            if let Err(e) = r {
                tracing::warn!("unmounting {} at close failed: {e}", spec.name);
            }
        }
        self.closed.store(true, Ordering::Release);
        self.engine.shutdown().await;
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        for h in self.background.lock().expect("background slot").drain(..) {
            h.abort();
        }
        // A store dropped without `close` still stops its transfer engine: otherwise its
        // listeners, pooled connections and their tasks outlive it for as long as the process
        // runs. (A segment it offered is unmounted by the master when the client expires.)
        if !self.closed.swap(true, Ordering::AcqRel) {
            let engine = self.engine.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move { engine.shutdown().await });
                }
                Err(_) => {
                    let _ = std::thread::Builder::new()
                        .name("mooncake-store-drop".into())
                        .spawn(move || {
                            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                                .enable_all()
                                .build()
                            {
                                rt.block_on(engine.shutdown());
                            }
                        });
                }
            }
        }
    }
}
