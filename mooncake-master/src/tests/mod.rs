//! Tests of the master state machine, driven through `apply` with a virtual clock.

mod checksum;
mod clients;
mod evict;
mod leader;
mod lifecycle;
mod prop;
mod requests;
mod reserve;
mod tasks;
mod timing;

use super::*;

pub(super) const MIB: u64 = 1 << 20;

/// A master plus a virtual clock; checks the invariants after every command.
pub(super) struct H {
    pub(super) m: Master,
    pub(super) now: u64,
}

pub(super) fn c(n: u128) -> ClientId {
    ClientId(n)
}

impl H {
    pub(super) fn new() -> H {
        H::with(MasterConfig::default())
    }

    pub(super) fn with(config: MasterConfig) -> H {
        H {
            m: Master::new(config).unwrap(),
            now: 0,
        }
    }

    pub(super) fn at(&mut self, ms: u64) -> &mut Self {
        self.now = ms;
        self
    }

    pub(super) fn advance(&mut self, ms: u64) -> &mut Self {
        self.now += ms;
        self
    }

    pub(super) fn t(&self) -> Timestamp {
        Timestamp(self.now)
    }

    pub(super) fn apply(&mut self, cmd: Command) -> Response {
        let r = self.m.apply(Timestamp(self.now), cmd.clone());
        if let Err(e) = self.m.check_invariants() {
            panic!("invariant broken after {cmd:?}: {e}");
        }
        r
    }

    /// Applies what the timeout handler asks for at the current time.
    pub(super) fn tick(&mut self) -> Vec<(Command, Response)> {
        let cmds = self.m.handle_timeout(Timestamp(self.now));
        cmds.into_iter()
            .map(|c| (c.clone(), self.apply(c)))
            .collect()
    }

    pub(super) fn mount(&mut self, client: u128, name: &str, size: u64) {
        self.try_mount(client, name, size).unwrap();
    }

    pub(super) fn try_mount(
        &mut self,
        client: u128,
        name: &str,
        size: u64,
    ) -> Result<(), ErrorCode> {
        let base = 0x1_0000_0000 * (self.m.segments().len() as u64 + 1);
        self.apply(Command::MountSegment {
            client_id: c(client),
            segment: SegmentSpec::new(name, base, size),
        })
        .into_unit()
    }

    pub(super) fn put_start_cfg(
        &mut self,
        client: u128,
        key: &str,
        size: u64,
        config: ReplicateConfig,
    ) -> Result<PutStartResponse, ErrorCode> {
        self.apply(Command::PutStart {
            client_id: c(client),
            key: key.into(),
            size,
            config,
        })
        .into_put_start()
    }

    pub(super) fn put_start(
        &mut self,
        client: u128,
        key: &str,
        size: u64,
        n: u32,
    ) -> Result<PutStartResponse, ErrorCode> {
        self.put_start_cfg(client, key, size, ReplicateConfig::with_replicas(n))
    }

    pub(super) fn put_end(&mut self, client: u128, key: &str) -> Result<(), ErrorCode> {
        self.apply(Command::PutEnd {
            client_id: c(client),
            key: key.into(),
        })
        .into_unit()
    }

    /// PutStart + PutEnd.
    pub(super) fn put(&mut self, client: u128, key: &str, size: u64, n: u32) -> PutStartResponse {
        let r = self.put_start(client, key, size, n).unwrap();
        self.put_end(client, key).unwrap();
        r
    }

    pub(super) fn put_cfg(&mut self, client: u128, key: &str, size: u64, config: ReplicateConfig) {
        self.put_start_cfg(client, key, size, config).unwrap();
        self.put_end(client, key).unwrap();
    }

    pub(super) fn get(&mut self, key: &str) -> Result<ReplicaList, ErrorCode> {
        self.apply(Command::GetReplicaList { key: key.into() })
            .into_replicas()
    }

    pub(super) fn remove(&mut self, key: &str, force: bool) -> Result<(), ErrorCode> {
        self.apply(Command::Remove {
            key: key.into(),
            force,
        })
        .into_unit()
    }

    pub(super) fn heartbeat(&mut self, client: u128) -> HeartbeatStatus {
        match self.apply(Command::Heartbeat {
            client_id: c(client),
        }) {
            Response::Heartbeat(s) => s,
            other => panic!("unexpected {other:?}"),
        }
    }

    pub(super) fn exists(&self, key: &str) -> bool {
        self.m.object(key).is_some()
    }

    pub(super) fn segment_names(desc: &[ReplicaDescriptor]) -> Vec<String> {
        desc.iter()
            .map(|d| d.memory().unwrap().segment_name.clone())
            .collect()
    }
}
