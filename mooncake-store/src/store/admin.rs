//! Existence checks, removal, replica descriptors, copy/move tasks and metrics.

use std::collections::HashMap;

use mooncake_core::{Error, Result};
use mooncake_master::{Command, MasterMetrics, ReplicaDescriptor, Response, TaskId, TaskInfo};

use super::Store;
use mooncake_rpc::{MasterReply, MasterRequest};

impl Store {
    /// Whether `key` has a readable value (grants a read lease when it does).
    pub async fn is_exist(&self, key: &str) -> Result<bool> {
        match self
            .apply(Command::ExistKey {
                key: key.to_owned(),
            })
            .await?
            .1
        {
            Response::Exists(b) => Ok(b),
            other => Err(Error::Protocol(format!("ExistKey answered {other:?}"))),
        }
    }

    /// [`is_exist`](Self::is_exist) for several keys.
    pub async fn batch_is_exist(&self, keys: &[&str]) -> Result<Vec<bool>> {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        let n = keys.len();
        match self.apply(Command::BatchExistKey { keys }).await?.1 {
            Response::ExistsBatch(v) if v.len() == n => Ok(v),
            other => Err(Error::Protocol(format!("BatchExistKey answered {other:?}"))),
        }
    }

    /// Removes `key`. A leased object is refused with `OBJECT_HAS_LEASE` unless `force`.
    pub async fn remove(&self, key: &str, force: bool) -> Result<()> {
        self.apply(Command::Remove {
            key: key.to_owned(),
            force,
        })
        .await?
        .1
        .into_unit()
        .map_err(|c| Error::with_code(c, format!("removing {key:?}")))
    }

    /// Removes each key; one result per key.
    pub async fn batch_remove(&self, keys: &[&str], force: bool) -> Result<Vec<Result<()>>> {
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        let n = keys.len();
        match self.apply(Command::BatchRemove { keys, force }).await?.1 {
            Response::UnitBatch(v) if v.len() == n => Ok(v
                .into_iter()
                .map(|r| r.map_err(|c| Error::with_code(c, "removing")))
                .collect()),
            Response::Unit(Err(c)) => Err(Error::with_code(c, "batch remove")),
            other => Err(Error::Protocol(format!("BatchRemove answered {other:?}"))),
        }
    }

    /// Removes every object whose key matches `pattern` (leased ones are skipped unless `force`);
    /// returns how many were removed.
    pub async fn remove_by_regex(&self, pattern: &str, force: bool) -> Result<u64> {
        self.apply(Command::RemoveByRegex {
            pattern: pattern.to_owned(),
            force,
        })
        .await?
        .1
        .into_count()
        .map_err(|c| Error::with_code(c, format!("removing keys matching {pattern:?}")))
    }

    /// Removes every object (leased ones are skipped unless `force`); returns how many.
    pub async fn remove_all(&self, force: bool) -> Result<u64> {
        self.apply(Command::RemoveAll { force })
            .await?
            .1
            .into_count()
            .map_err(|c| Error::with_code(c, "removing all keys"))
    }

    /// Descriptors of `key`'s COMPLETE replicas (grants a read lease).
    pub async fn get_replica_desc(&self, key: &str) -> Result<Vec<ReplicaDescriptor>> {
        Ok(self
            .replica_lists(&[key])
            .await?
            .0
            .pop()
            .expect("one")?
            .replicas)
    }

    /// Descriptors for several keys; keys without a readable value are left out.
    pub async fn batch_get_replica_desc(
        &self,
        keys: &[&str],
    ) -> Result<HashMap<String, Vec<ReplicaDescriptor>>> {
        let (lists, _) = self.replica_lists(keys).await?;
        Ok(keys
            .iter()
            .zip(lists)
            .filter_map(|(k, l)| l.ok().map(|l| ((*k).to_owned(), l.replicas)))
            .collect())
    }

    /// Queues a task that copies `key` to each of `targets` (segment names).
    pub async fn create_copy_task(&self, key: &str, targets: &[String]) -> Result<TaskId> {
        self.apply(Command::CreateCopyTask {
            key: key.to_owned(),
            targets: targets.to_vec(),
        })
        .await?
        .1
        .into_task_id()
        .map_err(|c| Error::with_code(c, format!("creating a copy task for {key:?}")))
    }

    /// Queues a task that moves `key`'s replica from segment `source` to segment `target`.
    pub async fn create_move_task(&self, key: &str, source: &str, target: &str) -> Result<TaskId> {
        self.apply(Command::CreateMoveTask {
            key: key.to_owned(),
            source: source.to_owned(),
            target: target.to_owned(),
        })
        .await?
        .1
        .into_task_id()
        .map_err(|c| Error::with_code(c, format!("creating a move task for {key:?}")))
    }

    /// The status of a copy or move task; `TASK_NOT_FOUND` for an unknown id.
    pub async fn query_task(&self, id: TaskId) -> Result<TaskInfo> {
        self.check_open()?;
        match self.master.call(MasterRequest::QueryTask(id)).await? {
            MasterReply::Task(r) => r.map_err(|c| Error::with_code(c, format!("task {id}"))),
            MasterReply::Failed { code, message } => Err(Error::with_code(code, message)),
            other => Err(Error::Protocol(format!("QueryTask answered {other:?}"))),
        }
    }

    /// The master's metrics.
    pub async fn master_metrics(&self) -> Result<MasterMetrics> {
        self.check_open()?;
        match self.master.call(MasterRequest::Metrics).await? {
            MasterReply::Metrics(m) => Ok(m),
            MasterReply::Failed { code, message } => Err(Error::with_code(code, message)),
            other => Err(Error::Protocol(format!("Metrics answered {other:?}"))),
        }
    }
}
