//! [`StoreApi`] for [`DummyClient`]: each call forwarded to the inherent method of the same
//! name, plus the pool-only memory rules of a dummy client.
//!
//! Performance-critical: the Python data path of a dummy client goes through here.

use std::collections::HashMap;

use async_trait::async_trait;
use mooncake_core::{Error, ErrorCode, Result};
use mooncake_master::{MasterMetrics, ReplicaDescriptor, TaskId, TaskInfo};

use super::DummyClient;
use crate::store::{ReplicateConfig, StagedValue, StoreApi, WriteKind};

#[async_trait]
impl StoreApi for DummyClient {
    fn hostname(&self) -> &str {
        DummyClient::hostname(self)
    }

    async fn write_parts(
        &self,
        kind: WriteKind,
        key: &str,
        parts: &[&[u8]],
        config: &ReplicateConfig,
    ) -> Result<()> {
        DummyClient::write_parts(self, kind, key, parts, config).await
    }

    async fn write_batch(
        &self,
        kind: WriteKind,
        items: &[(&str, &[u8])],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        DummyClient::write_batch(self, kind, items, config).await
    }

    async fn batch_write_from(
        &self,
        kind: WriteKind,
        items: &[(&str, u64, u64)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        DummyClient::batch_write_from(self, kind, items, config).await
    }

    async fn batch_put_from_multi_buffers(
        &self,
        items: &[(&str, Vec<(u64, u64)>)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        DummyClient::batch_put_from_multi_buffers(self, items, config).await
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>> {
        DummyClient::get(self, key).await
    }

    async fn get_batch(&self, keys: &[&str]) -> Vec<Result<Vec<u8>>> {
        DummyClient::get_batch(self, keys).await
    }

    /// The value, owned: a dummy client's staging area is not the caller's to hold.
    async fn get_staged(&self, key: &str) -> Result<StagedValue> {
        DummyClient::get(self, key).await.map(StagedValue::from)
    }

    async fn get_batch_staged(&self, keys: &[&str]) -> Vec<Result<StagedValue>> {
        DummyClient::get_batch(self, keys)
            .await
            .into_iter()
            .map(|r| r.map(StagedValue::from))
            .collect()
    }

    async fn batch_get_into(&self, items: &[(&str, u64, u64)]) -> Vec<Result<u64>> {
        DummyClient::batch_get_into(self, items).await
    }

    async fn batch_get_into_multi_buffers(
        &self,
        items: &[(&str, Vec<(u64, u64)>)],
    ) -> Vec<Result<u64>> {
        DummyClient::batch_get_into_multi_buffers(self, items).await
    }

    async fn get_size(&self, key: &str) -> Result<u64> {
        DummyClient::get_size(self, key).await
    }

    async fn is_exist(&self, key: &str) -> Result<bool> {
        DummyClient::is_exist(self, key).await
    }

    async fn batch_is_exist(&self, keys: &[&str]) -> Result<Vec<bool>> {
        DummyClient::batch_is_exist(self, keys).await
    }

    async fn remove(&self, key: &str, force: bool) -> Result<()> {
        DummyClient::remove(self, key, force).await
    }

    async fn batch_remove(&self, keys: &[&str], force: bool) -> Result<Vec<Result<()>>> {
        DummyClient::batch_remove(self, keys, force).await
    }

    async fn remove_by_regex(&self, pattern: &str, force: bool) -> Result<u64> {
        DummyClient::remove_by_regex(self, pattern, force).await
    }

    async fn remove_all(&self, force: bool) -> Result<u64> {
        DummyClient::remove_all(self, force).await
    }

    async fn get_replica_desc(&self, key: &str) -> Result<Vec<ReplicaDescriptor>> {
        DummyClient::get_replica_desc(self, key).await
    }

    async fn batch_get_replica_desc(
        &self,
        keys: &[&str],
    ) -> Result<HashMap<String, Vec<ReplicaDescriptor>>> {
        DummyClient::batch_get_replica_desc(self, keys).await
    }

    async fn create_copy_task(&self, key: &str, targets: &[String]) -> Result<TaskId> {
        DummyClient::create_copy_task(self, key, targets).await
    }

    async fn create_move_task(&self, key: &str, source: &str, target: &str) -> Result<TaskId> {
        DummyClient::create_move_task(self, key, source, target).await
    }

    async fn query_task(&self, id: TaskId) -> Result<TaskInfo> {
        DummyClient::query_task(self, id).await
    }

    async fn master_metrics(&self) -> Result<MasterMetrics> {
        DummyClient::master_metrics(self).await
    }

    async fn close(&self) -> Result<()> {
        DummyClient::close(self).await
    }

    /// Only ranges inside the shared pool, which the real client has registered already.
    unsafe fn register_buffer(&self, addr: u64, len: u64) -> Result<()> {
        if self.pool_contains(addr, len) {
            return Ok(());
        }
        Err(Error::with_code(
            ErrorCode::INVALID_PARAMS,
            "a dummy client shares only its memory pool with the real client: use \
             alloc_from_mem_pool buffers",
        ))
    }

    fn unregister_buffer(&self, addr: u64) -> Result<()> {
        if self.pool_contains(addr, 1) {
            return Ok(());
        }
        Err(Error::NotRegistered(addr))
    }

    fn alloc_from_mem_pool(&self, size: u64) -> Result<u64> {
        DummyClient::alloc_from_mem_pool(self, size)
    }
}
