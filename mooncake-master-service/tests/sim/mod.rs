//! A deterministic in-process cluster for the cluster tests: master services over one in-memory
//! replicated command log whose leadership the test switches, store clients on the in-memory
//! transport reaching the masters through a [`MasterGroup`] (behind a [`Link`] the test can cut),
//! and a [`VirtualClock`] over tokio's paused time. No sockets, no real sleeping: run the tests
//! with `#[tokio::test(start_paused = true)]`.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use mooncake_core::mem_transport::{MemNetwork, MemTransport};
use mooncake_core::{
    CommandLog, Discovery, EngineConfig, Error, ErrorCode, Leadership, MemoryMetadataStore, Result,
    StateMachine, TransferEngine, Transport, VirtualClock,
};
use mooncake_master::MasterConfig;
use mooncake_master_service::service::MasterState;
use mooncake_master_service::MasterGroup;
use mooncake_master_service::{MasterService, ServiceConfig};
use mooncake_rpc::{MasterApi, MasterReply, MasterRequest};
use mooncake_store::{Store, StoreConfig};

/// Prefix of the leader's address in a not-leader error of [`SimLog`].
const HINT: &str = "sim_leader=";

/// One command log replicated to every member at once (a group that never loses a majority),
/// with leadership set by the test: [`elect`](Self::elect) starts a new term with a new leader,
/// [`depose`](Self::depose) leaves the group without one (an election under way).
pub struct SimLog {
    state: Mutex<LogState>,
    grace: Duration,
}

struct LogState {
    term: u64,
    leader: Option<usize>,
    addrs: Vec<String>,
    machines: Vec<Option<Box<dyn StateMachine>>>,
    entries: usize,
}

impl SimLog {
    /// A log for members at `addrs`; member 0 leads term 1. A new leader assumes its
    /// predecessor may serve reads for `grace` after taking over.
    pub fn new(addrs: &[String], grace: Duration) -> Arc<Self> {
        Arc::new(SimLog {
            state: Mutex::new(LogState {
                term: 1,
                leader: Some(0),
                addrs: addrs.to_vec(),
                machines: addrs.iter().map(|_| None).collect(),
                entries: 0,
            }),
            grace,
        })
    }

    /// Member `me`'s end of the log, applying to `machine`.
    pub fn member(self: &Arc<Self>, me: usize, machine: Box<dyn StateMachine>) -> Arc<SimMember> {
        let mut s = self.state.lock().unwrap();
        assert_eq!(s.entries, 0, "members join before the first command");
        s.machines[me] = Some(machine);
        Arc::new(SimMember {
            log: self.clone(),
            me,
        })
    }

    /// Member `leader` wins a new term.
    pub fn elect(&self, leader: usize) {
        let mut s = self.state.lock().unwrap();
        s.term += 1;
        s.leader = Some(leader);
    }

    /// The leader is gone and no successor is elected yet.
    pub fn depose(&self) {
        let mut s = self.state.lock().unwrap();
        s.term += 1;
        s.leader = None;
    }

    /// Entries committed so far.
    pub fn entries(&self) -> usize {
        self.state.lock().unwrap().entries
    }
}

/// One member's view of a [`SimLog`].
pub struct SimMember {
    log: Arc<SimLog>,
    me: usize,
}

impl std::fmt::Debug for SimMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimMember({})", self.me)
    }
}

#[async_trait]
impl CommandLog for SimMember {
    async fn apply_command(&self, command: Vec<u8>) -> Result<Vec<u8>> {
        let mut s = self.log.state.lock().unwrap();
        if s.leader != Some(self.me) {
            let hint = s.leader.map_or(String::new(), |l| s.addrs[l].clone());
            return Err(Error::with_code(
                ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS,
                format!("not the leader ({HINT}{hint})"),
            ));
        }
        s.entries += 1;
        let mut mine = Vec::new();
        for (i, m) in s.machines.iter_mut().enumerate() {
            if let Some(m) = m {
                let out = m.apply(&command);
                if i == self.me {
                    mine = out;
                }
            }
        }
        Ok(mine)
    }

    fn leadership(&self) -> Leadership {
        let s = self.log.state.lock().unwrap();
        match s.leader {
            Some(l) if l == self.me => Leadership::Leader { term: s.term },
            l => Leadership::Follower {
                leader_hint: l.map(|l| s.addrs[l].clone()),
            },
        }
    }

    fn not_leader_hint(&self, error: &Error) -> Option<Option<String>> {
        let Error::Code { code, context } = error else {
            return None;
        };
        if *code != ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS {
            return None;
        }
        let start = context.rfind(HINT)? + HINT.len();
        let addr = context[start..].trim_end_matches(')');
        Some((!addr.is_empty()).then(|| addr.to_owned()))
    }

    fn takeover_grace(&self) -> Duration {
        self.log.grace
    }
}

/// A client's link to its masters; [`cut`](Self::cut) makes every call fail as an unreachable
/// master would (`RPC_FAIL`), [`heal`](Self::heal) restores it.
#[derive(Debug)]
pub struct Link {
    inner: Arc<dyn MasterApi>,
    up: AtomicBool,
}

impl Link {
    pub fn new(inner: Arc<dyn MasterApi>) -> Arc<Self> {
        Arc::new(Link {
            inner,
            up: AtomicBool::new(true),
        })
    }
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
    }
    pub fn heal(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[async_trait]
impl MasterApi for Link {
    async fn call(&self, request: MasterRequest) -> Result<MasterReply> {
        if !self.up.load(Ordering::SeqCst) {
            return Err(Error::with_code(
                ErrorCode::RPC_FAIL,
                "link cut by the test",
            ));
        }
        self.inner.call(request).await
    }
    fn session(&self) -> u64 {
        self.inner.session()
    }
    fn note_landed(
        &self,
        reporter: mooncake_master::ClientId,
        segment: &str,
        ranges: &[(u64, u64)],
    ) -> bool {
        self.up.load(Ordering::SeqCst) && self.inner.note_landed(reporter, segment, ranges)
    }
}

/// Masters over a [`SimLog`], a network for their clients' engines, and a virtual clock.
pub struct Cluster {
    pub log: Arc<SimLog>,
    pub masters: Vec<Arc<MasterService>>,
    pub addrs: Vec<String>,
    pub clock: Arc<VirtualClock>,
    net: Arc<MemNetwork>,
    /// Where engines publish and find segment descriptors.
    directory: Arc<MemoryMetadataStore>,
}

impl Cluster {
    /// `n` masters (`master-0` leads), all with `config`. Call inside a paused-time runtime.
    pub fn start(n: usize, config: MasterConfig, grace: Duration) -> Cluster {
        let addrs: Vec<String> = (0..n).map(|i| format!("master-{i}")).collect();
        let log = SimLog::new(&addrs, grace);
        let clock = Arc::new(VirtualClock::new(1_700_000_000_000));
        let masters = (0..n)
            .map(|i| {
                let state = MasterState::new(config.clone()).unwrap();
                let member = log.member(i, state.state_machine());
                MasterService::start(
                    state,
                    member,
                    Arc::new(MemoryMetadataStore::new()),
                    ServiceConfig::default(),
                    clock.clone(),
                )
            })
            .collect();
        Cluster {
            log,
            masters,
            addrs,
            clock,
            net: MemNetwork::new(),
            directory: Arc::new(MemoryMetadataStore::new()),
        }
    }

    /// A fresh leader-following view of every master, as one client would hold it.
    pub fn group(&self) -> Arc<MasterGroup> {
        let members = self
            .addrs
            .iter()
            .cloned()
            .zip(self.masters.iter().map(|m| m.clone() as Arc<dyn MasterApi>))
            .collect();
        Arc::new(MasterGroup::new(members).unwrap())
    }

    /// A store client named `name` on the in-memory network, with a `segment`-byte segment
    /// (0: none), reaching the masters through `master`.
    pub async fn client(&self, name: &str, master: Arc<dyn MasterApi>, segment: u64) -> Arc<Store> {
        let mut engine = EngineConfig::new(name);
        engine.discovery = Discovery::Metadata(self.directory.clone());
        let transport: Arc<dyn Transport> = MemTransport::new(self.net.clone());
        let engine = TransferEngine::start(engine, vec![transport])
            .await
            .unwrap();
        let config = StoreConfig {
            local_hostname: name.into(),
            global_segment_size: segment,
            local_buffer_size: 8 << 20,
            heartbeat_interval: Duration::from_secs(1),
            same_host_shm: false,
            ..StoreConfig::default()
        };
        Store::setup_with_engine(config, master, engine)
            .await
            .unwrap()
    }
}

/// The bytes of value number `seed`.
pub fn value(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed) as u8)
        .collect()
}
