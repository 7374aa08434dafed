//! The master service: runs the master state machine behind a [`MetadataStore`] command log,
//! drives its timers and answers store clients, in-process ([`MasterService`] implements
//! [`MasterApi`]) or over RPC ([`RemoteMaster`]).
//!
//! Every state change is a [`Command`] stamped with the service's clock and applied through the
//! store's command log, so a replicated store replicates the master unchanged. Queries that change
//! nothing (task status, metrics) read the local state directly.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use mooncake_core::master::{
    decode_response, Command, LogEntry, Master, MasterConfig, MasterMetrics, Response, SegmentInfo,
    TaskId, TaskInfo, Timestamp,
};
use mooncake_core::{Error, ErrorCode, MemoryMetadataStore, MetadataStore, Result, StateMachine};

use crate::rpc::{self, Handler, RpcClient, RpcClientConfig};

/// A request to the master.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MasterRequest {
    /// Apply a state change.
    Apply(Command),
    /// Status of a copy or move task.
    QueryTask(TaskId),
    /// Gauges and counters.
    Metrics,
    /// Mounted segments.
    Segments,
}

/// The master's answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MasterReply {
    /// The result of an applied command, with the master time it was applied at (so clients can
    /// turn lease deadlines into durations without trusting their own clock).
    Applied {
        /// Master time of the apply.
        now: Timestamp,
        /// The result.
        response: Response,
    },
    /// A task's status.
    Task(std::result::Result<TaskInfo, ErrorCode>),
    /// Metrics.
    Metrics(MasterMetrics),
    /// Segments.
    Segments(Vec<SegmentInfo>),
    /// The request could not be served.
    Failed {
        /// Code.
        code: ErrorCode,
        /// Why.
        message: String,
    },
}

/// Something that answers master requests: the service itself in-process, or a remote one.
#[async_trait]
pub trait MasterApi: Send + Sync + std::fmt::Debug {
    /// Sends one request.
    async fn call(&self, request: MasterRequest) -> Result<MasterReply>;
}

/// The master's clock: milliseconds since the Unix epoch, so every process of a cluster (and a
/// master that takes over) reads the same time base.
pub fn master_clock() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Timestamp::from_millis(ms)
}

/// The master as the command log's [`StateMachine`], sharing its state with the service that
/// queries it.
struct SharedMaster(Arc<Mutex<Master>>);

impl StateMachine for SharedMaster {
    fn apply(&mut self, entry: &[u8]) -> Vec<u8> {
        StateMachine::apply(&mut *self.0.lock().expect("master lock"), entry)
    }
    fn snapshot(&self) -> Result<Vec<u8>> {
        StateMachine::snapshot(&*self.0.lock().expect("master lock"))
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<()> {
        StateMachine::restore(&mut *self.0.lock().expect("master lock"), snapshot)
    }
}

/// Service settings beyond the master's own.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// How often the timeout handler runs (expiry, reclaim, eviction, task timeouts). Default
    /// 100 ms.
    pub tick: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            tick: Duration::from_millis(100),
        }
    }
}

/// See the module docs.
pub struct MasterService {
    master: Arc<Mutex<Master>>,
    log: Arc<dyn MetadataStore>,
    config: ServiceConfig,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for MasterService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterService")
            .field("log", &self.log)
            .finish()
    }
}

impl MasterService {
    /// A service whose command log is in memory (the embedded, single-master default). Starts
    /// the timer task on the current tokio runtime.
    pub fn new(config: MasterConfig, service: ServiceConfig) -> Result<Arc<Self>> {
        let master = Arc::new(Mutex::new(Master::new(config)?));
        let log = Arc::new(MemoryMetadataStore::with_state_machine(Box::new(
            SharedMaster(master.clone()),
        )));
        let svc = Arc::new(MasterService {
            master,
            log,
            config: service,
            tasks: Mutex::new(Vec::new()),
        });
        svc.start_timers();
        Ok(svc)
    }

    /// The metadata store behind the service (segment descriptors of the HTTP metadata server
    /// live here too).
    pub fn metadata(&self) -> Arc<dyn MetadataStore> {
        self.log.clone()
    }

    /// Applies `command` at the current master time through the command log.
    pub async fn apply(&self, command: Command) -> Result<(Timestamp, Response)> {
        let now = master_clock();
        let out = self
            .log
            .apply_command(LogEntry { now, command }.encode())
            .await?;
        let response = decode_response(&out)
            .map_err(|c| Error::with_code(c, "undecodable response from the command log"))?;
        Ok((now, response))
    }

    /// Current metrics.
    pub fn metrics(&self) -> MasterMetrics {
        self.master.lock().expect("master lock").metrics()
    }

    fn start_timers(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let tick = self.config.tick;
        let handle = tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(svc) = weak.upgrade() else { return };
                let due = svc
                    .master
                    .lock()
                    .expect("master lock")
                    .handle_timeout(master_clock());
                for command in due {
                    if let Err(e) = svc.apply(command).await {
                        tracing::warn!("applying a maintenance command failed: {e}");
                    }
                }
            }
        });
        self.tasks.lock().expect("service tasks").push(handle);
    }

    /// Serves the RPC protocol on `addr`; returns the bound address.
    pub async fn serve_rpc(self: &Arc<Self>, addr: SocketAddr) -> Result<SocketAddr> {
        let listener = rpc::bind(addr).await?;
        let bound = listener.local_addr()?;
        let handle = rpc::serve(listener, Arc::new(RpcFront(self.clone())));
        self.tasks.lock().expect("service tasks").push(handle);
        Ok(bound)
    }

    /// Keeps a server task of this service, to be stopped by [`shutdown`](Self::shutdown).
    pub fn keep(&self, task: tokio::task::JoinHandle<()>) {
        self.tasks.lock().expect("service tasks").push(task);
    }

    /// Stops timers and servers.
    pub fn shutdown(&self) {
        for t in self.tasks.lock().expect("service tasks").drain(..) {
            t.abort();
        }
    }

    async fn handle(&self, request: MasterRequest) -> MasterReply {
        match request {
            MasterRequest::Apply(command) => match self.apply(command).await {
                Ok((now, response)) => MasterReply::Applied { now, response },
                Err(e) => MasterReply::Failed {
                    code: e.code(),
                    message: e.to_string(),
                },
            },
            MasterRequest::QueryTask(id) => {
                MasterReply::Task(self.master.lock().expect("master lock").query_task(id))
            }
            MasterRequest::Metrics => MasterReply::Metrics(self.metrics()),
            MasterRequest::Segments => {
                MasterReply::Segments(self.master.lock().expect("master lock").segments())
            }
        }
    }
}

impl Drop for MasterService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[async_trait]
impl MasterApi for MasterService {
    async fn call(&self, request: MasterRequest) -> Result<MasterReply> {
        Ok(self.handle(request).await)
    }
}

/// The RPC server's view of the service. Holds it strongly: serving keeps the service alive
/// until [`MasterService::shutdown`] stops the server.
struct RpcFront(Arc<MasterService>);

#[async_trait]
impl Handler<MasterRequest, MasterReply> for RpcFront {
    async fn handle(&self, request: MasterRequest) -> MasterReply {
        self.0.handle(request).await
    }
}

/// A master reached over RPC.
#[derive(Debug)]
pub struct RemoteMaster {
    rpc: RpcClient,
}

impl RemoteMaster {
    /// A client for the master at `address` (`host:port`); connects lazily.
    pub fn new(address: impl Into<String>, config: RpcClientConfig) -> Self {
        RemoteMaster {
            rpc: RpcClient::new(address, config),
        }
    }

    /// The master's address.
    pub fn address(&self) -> &str {
        self.rpc.address()
    }
}

#[async_trait]
impl MasterApi for RemoteMaster {
    async fn call(&self, request: MasterRequest) -> Result<MasterReply> {
        self.rpc.call(&request).await
    }
}

/// Sends `command` and returns the applied response and master time; a `Failed` reply becomes
/// an error with its code.
pub async fn apply_via(master: &dyn MasterApi, command: Command) -> Result<(Timestamp, Response)> {
    match master.call(MasterRequest::Apply(command)).await? {
        MasterReply::Applied { now, response } => Ok((now, response)),
        MasterReply::Failed { code, message } => Err(Error::with_code(code, message)),
        other => Err(Error::Protocol(format!(
            "unexpected master reply {other:?}"
        ))),
    }
}
