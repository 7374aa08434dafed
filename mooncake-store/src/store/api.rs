//! [`StoreApi`]: the calls of a store client, whichever kind serves them.
//!
//! Performance-critical: every Python call goes through this trait (one dynamic call and one boxed
//! future per call; payloads are borrowed, never copied here).
//!
//! Two types implement it: [`Store`], a full client of this process, and
//! [`DummyClient`](crate::real_client::DummyClient), which forwards the calls to a real client on
//! the same host. Code that must work with either (the Python binding) holds an
//! `Arc<dyn StoreApi>`. Both types keep their inherent methods (`put`, `upsert_batch`, ...), which
//! are the convenient spellings when the type is known; the trait names each operation once, with
//! a [`WriteKind`] where a put and an upsert differ only in that.

use std::collections::HashMap;

use async_trait::async_trait;
use mooncake_core::{Error, Location, Result};
use mooncake_master::{MasterMetrics, ReplicaDescriptor, TaskId, TaskInfo};

use super::{ReplicateConfig, StagedValue, Store, WriteKind};

/// A store client: writes, reads, existence and removal, replica queries, copy and move tasks,
/// and the memory zero-copy calls use. Results and error codes are those of [`Store`]'s methods
/// of the same names.
#[async_trait]
pub trait StoreApi: Send + Sync {
    /// The segment name (`host:port`; for a dummy client, its real client's).
    fn hostname(&self) -> &str;

    // --- writes ------------------------------------------------------------------------------

    /// Stores the concatenation of `parts` under `key`: a put leaves a key that exists as it is
    /// (success), an upsert replaces its value.
    async fn write_parts(
        &self,
        kind: WriteKind,
        key: &str,
        parts: &[&[u8]],
        config: &ReplicateConfig,
    ) -> Result<()>;

    /// Puts or upserts each `(key, value)`; one result per item.
    async fn write_batch(
        &self,
        kind: WriteKind,
        items: &[(&str, &[u8])],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>>;

    /// Zero-copy batch put or upsert: `(key, address, size)` of registered memory each (for a
    /// dummy client, of its shared pool).
    async fn batch_write_from(
        &self,
        kind: WriteKind,
        items: &[(&str, u64, u64)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>>;

    /// Zero-copy batch put where each value is the concatenation of several buffers
    /// `(address, size)`.
    async fn batch_put_from_multi_buffers(
        &self,
        items: &[(&str, Vec<(u64, u64)>)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>>;

    /// Stores `value` under `key`; a key that exists is left as it is (success).
    async fn put(&self, key: &str, value: &[u8], config: &ReplicateConfig) -> Result<()> {
        self.write_parts(WriteKind::Put, key, &[value], config)
            .await
    }

    /// Stores `value` under `key`, replacing any current value.
    async fn upsert(&self, key: &str, value: &[u8], config: &ReplicateConfig) -> Result<()> {
        self.write_parts(WriteKind::Upsert, key, &[value], config)
            .await
    }

    // --- reads -------------------------------------------------------------------------------

    /// The value of `key`.
    async fn get(&self, key: &str) -> Result<Vec<u8>>;

    /// The values of `keys`, one result per key.
    async fn get_batch(&self, keys: &[&str]) -> Vec<Result<Vec<u8>>>;

    /// The value of `key`, left where it landed when it can be (a [`Store`]'s staging buffer;
    /// a dummy client's is owned).
    async fn get_staged(&self, key: &str) -> Result<StagedValue>;

    /// The values of `keys`, as [`get_staged`](Self::get_staged).
    async fn get_batch_staged(&self, keys: &[&str]) -> Vec<Result<StagedValue>>;

    /// Zero-copy reads: `(key, address, size)` each; the bytes read per item.
    async fn batch_get_into(&self, items: &[(&str, u64, u64)]) -> Vec<Result<u64>>;

    /// Zero-copy reads, each value spread over several buffers `(address, size)` in order.
    async fn batch_get_into_multi_buffers(
        &self,
        items: &[(&str, Vec<(u64, u64)>)],
    ) -> Vec<Result<u64>>;

    /// The size of the value of `key`.
    async fn get_size(&self, key: &str) -> Result<u64>;

    // --- existence, removal, replicas, tasks -------------------------------------------------

    /// Whether `key` exists (grants a read lease, as upstream).
    async fn is_exist(&self, key: &str) -> Result<bool>;

    /// Whether each of `keys` exists.
    async fn batch_is_exist(&self, keys: &[&str]) -> Result<Vec<bool>>;

    /// Removes `key`; a leased key only with `force`.
    async fn remove(&self, key: &str, force: bool) -> Result<()>;

    /// Removes each of `keys`; one result per key.
    async fn batch_remove(&self, keys: &[&str], force: bool) -> Result<Vec<Result<()>>>;

    /// Removes the keys matching `pattern`; the number removed.
    async fn remove_by_regex(&self, pattern: &str, force: bool) -> Result<u64>;

    /// Removes every key (leased ones only with `force`); the number removed.
    async fn remove_all(&self, force: bool) -> Result<u64>;

    /// The replicas of `key`.
    async fn get_replica_desc(&self, key: &str) -> Result<Vec<ReplicaDescriptor>>;

    /// The replicas of each of `keys` that exists (missing keys are left out).
    async fn batch_get_replica_desc(
        &self,
        keys: &[&str],
    ) -> Result<HashMap<String, Vec<ReplicaDescriptor>>>;

    /// Queues a copy of `key` to the `targets` segments.
    async fn create_copy_task(&self, key: &str, targets: &[String]) -> Result<TaskId>;

    /// Queues a move of `key`'s replica from segment `source` to `target`.
    async fn create_move_task(&self, key: &str, source: &str, target: &str) -> Result<TaskId>;

    /// The state of a copy or move task.
    async fn query_task(&self, id: TaskId) -> Result<TaskInfo>;

    /// The master's metrics.
    async fn master_metrics(&self) -> Result<MasterMetrics>;

    /// Stops the client; later calls fail with `UNAVAILABLE_IN_CURRENT_STATUS`. Idempotent.
    async fn close(&self) -> Result<()>;

    // --- memory for zero-copy calls ----------------------------------------------------------

    /// Makes `[addr, addr + len)` usable by the zero-copy calls. A dummy client can use only its
    /// shared pool: ranges inside it are accepted as they are, others are `INVALID_PARAMS`.
    ///
    /// # Safety
    /// As [`Store::register_buffer`]: the range must stay valid until
    /// [`unregister_buffer`](Self::unregister_buffer).
    unsafe fn register_buffer(&self, addr: u64, len: u64) -> Result<()>;

    /// Unregisters a buffer from [`register_buffer`](Self::register_buffer), waiting for
    /// transfers that use it.
    fn unregister_buffer(&self, addr: u64) -> Result<()>;

    /// Allocates `size` bytes usable with the zero-copy calls at once; the address.
    fn alloc_from_mem_pool(&self, size: u64) -> Result<u64>;
}

#[async_trait]
impl StoreApi for Store {
    fn hostname(&self) -> &str {
        Store::hostname(self)
    }

    async fn write_parts(
        &self,
        kind: WriteKind,
        key: &str,
        parts: &[&[u8]],
        config: &ReplicateConfig,
    ) -> Result<()> {
        Store::write_parts(self, kind, key, parts, config).await
    }

    async fn write_batch(
        &self,
        kind: WriteKind,
        items: &[(&str, &[u8])],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        Store::write_batch(self, kind, items, config).await
    }

    async fn batch_write_from(
        &self,
        kind: WriteKind,
        items: &[(&str, u64, u64)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        Store::batch_write_from(self, kind, items, config).await
    }

    async fn batch_put_from_multi_buffers(
        &self,
        items: &[(&str, Vec<(u64, u64)>)],
        config: &ReplicateConfig,
    ) -> Vec<Result<()>> {
        Store::batch_put_from_multi_buffers(self, items, config).await
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>> {
        Store::get(self, key).await
    }

    async fn get_batch(&self, keys: &[&str]) -> Vec<Result<Vec<u8>>> {
        Store::get_batch(self, keys).await
    }

    async fn get_staged(&self, key: &str) -> Result<StagedValue> {
        Store::get_staged(self, key).await
    }

    async fn get_batch_staged(&self, keys: &[&str]) -> Vec<Result<StagedValue>> {
        Store::get_batch_staged(self, keys).await
    }

    async fn batch_get_into(&self, items: &[(&str, u64, u64)]) -> Vec<Result<u64>> {
        Store::batch_get_into(self, items).await
    }

    async fn batch_get_into_multi_buffers(
        &self,
        items: &[(&str, Vec<(u64, u64)>)],
    ) -> Vec<Result<u64>> {
        Store::batch_get_into_multi_buffers(self, items).await
    }

    async fn get_size(&self, key: &str) -> Result<u64> {
        Store::get_size(self, key).await
    }

    async fn is_exist(&self, key: &str) -> Result<bool> {
        Store::is_exist(self, key).await
    }

    async fn batch_is_exist(&self, keys: &[&str]) -> Result<Vec<bool>> {
        Store::batch_is_exist(self, keys).await
    }

    async fn remove(&self, key: &str, force: bool) -> Result<()> {
        Store::remove(self, key, force).await
    }

    async fn batch_remove(&self, keys: &[&str], force: bool) -> Result<Vec<Result<()>>> {
        Store::batch_remove(self, keys, force).await
    }

    async fn remove_by_regex(&self, pattern: &str, force: bool) -> Result<u64> {
        Store::remove_by_regex(self, pattern, force).await
    }

    async fn remove_all(&self, force: bool) -> Result<u64> {
        Store::remove_all(self, force).await
    }

    async fn get_replica_desc(&self, key: &str) -> Result<Vec<ReplicaDescriptor>> {
        Store::get_replica_desc(self, key).await
    }

    async fn batch_get_replica_desc(
        &self,
        keys: &[&str],
    ) -> Result<HashMap<String, Vec<ReplicaDescriptor>>> {
        Store::batch_get_replica_desc(self, keys).await
    }

    async fn create_copy_task(&self, key: &str, targets: &[String]) -> Result<TaskId> {
        Store::create_copy_task(self, key, targets).await
    }

    async fn create_move_task(&self, key: &str, source: &str, target: &str) -> Result<TaskId> {
        Store::create_move_task(self, key, source, target).await
    }

    async fn query_task(&self, id: TaskId) -> Result<TaskInfo> {
        Store::query_task(self, id).await
    }

    async fn master_metrics(&self) -> Result<MasterMetrics> {
        Store::master_metrics(self).await
    }

    async fn close(&self) -> Result<()> {
        Store::close(self).await
    }

    unsafe fn register_buffer(&self, addr: u64, len: u64) -> Result<()> {
        // SAFETY: forwarded contract.
        unsafe { Store::register_buffer(self, addr, len) }
    }

    fn unregister_buffer(&self, addr: u64) -> Result<()> {
        Store::unregister_buffer(self, addr)
    }

    /// Page-aligned memory of the transfer engine, registered at once; freed at close.
    fn alloc_from_mem_pool(&self, size: u64) -> Result<u64> {
        let len = usize::try_from(size)
            .map_err(|_| Error::InvalidArgument(format!("{size} bytes is too large")))?;
        self.engine().allocate_buffer(len, Location::cpu(0))
    }
}
