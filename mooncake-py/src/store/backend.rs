//! What a `MooncakeDistributedStore` drives: its own store client (`setup`) or a dummy client
//! forwarding to a `mooncake_client` process (`setup_dummy`). Both offer the same calls.

use std::collections::HashMap;
use std::sync::Arc;

use mooncake::master::{ReplicaDescriptor, ReplicateConfig, TaskId, TaskInfo};
use mooncake::real_client::DummyClient;
use mooncake::store::{StagedValue, Store};
use mooncake::{Error, ErrorCode, Location, Result};

/// A live client of either kind.
#[derive(Clone)]
pub(crate) enum Backend {
    /// A full store client of this process.
    Store(Arc<Store>),
    /// A dummy client of a real client on this host.
    Dummy(Arc<DummyClient>),
}

macro_rules! forward {
    ($( $name:ident ( $( $arg:ident : $ty:ty ),* ) -> $ret:ty; )*) => {
        impl Backend {
            $(
                pub(crate) async fn $name(&self, $( $arg: $ty ),*) -> $ret {
                    match self {
                        Backend::Store(s) => s.$name($( $arg ),*).await,
                        Backend::Dummy(d) => d.$name($( $arg ),*).await,
                    }
                }
            )*
        }
    };
}

forward! {
    put_parts(key: &str, parts: &[&[u8]], config: &ReplicateConfig) -> Result<()>;
    upsert_parts(key: &str, parts: &[&[u8]], config: &ReplicateConfig) -> Result<()>;
    put_batch(items: &[(&str, &[u8])], config: &ReplicateConfig) -> Vec<Result<()>>;
    upsert_batch(items: &[(&str, &[u8])], config: &ReplicateConfig) -> Vec<Result<()>>;
    batch_put_from(items: &[(&str, u64, u64)], config: &ReplicateConfig) -> Vec<Result<()>>;
    batch_upsert_from(items: &[(&str, u64, u64)], config: &ReplicateConfig) -> Vec<Result<()>>;
    batch_put_from_multi_buffers(
        items: &[(&str, Vec<(u64, u64)>)],
        config: &ReplicateConfig
    ) -> Vec<Result<()>>;
    get(key: &str) -> Result<Vec<u8>>;
    get_batch(keys: &[&str]) -> Vec<Result<Vec<u8>>>;
    batch_get_into(items: &[(&str, u64, u64)]) -> Vec<Result<u64>>;
    batch_get_into_multi_buffers(items: &[(&str, Vec<(u64, u64)>)]) -> Vec<Result<u64>>;
    get_size(key: &str) -> Result<u64>;
    is_exist(key: &str) -> Result<bool>;
    batch_is_exist(keys: &[&str]) -> Result<Vec<bool>>;
    remove(key: &str, force: bool) -> Result<()>;
    batch_remove(keys: &[&str], force: bool) -> Result<Vec<Result<()>>>;
    remove_by_regex(pattern: &str, force: bool) -> Result<u64>;
    remove_all(force: bool) -> Result<u64>;
    get_replica_desc(key: &str) -> Result<Vec<ReplicaDescriptor>>;
    batch_get_replica_desc(keys: &[&str]) -> Result<HashMap<String, Vec<ReplicaDescriptor>>>;
    create_copy_task(key: &str, targets: &[String]) -> Result<TaskId>;
    create_move_task(key: &str, source: &str, target: &str) -> Result<TaskId>;
    query_task(id: TaskId) -> Result<TaskInfo>;
    close() -> Result<()>;
}

impl Backend {
    /// The value of `key`, left in the staging buffer where it landed (a dummy client's is
    /// owned).
    pub(crate) async fn get_staged(&self, key: &str) -> Result<StagedValue> {
        match self {
            Backend::Store(s) => s.get_staged(key).await,
            Backend::Dummy(d) => d.get(key).await.map(StagedValue::from),
        }
    }

    /// The values of `keys`, as [`get_staged`](Self::get_staged).
    pub(crate) async fn get_batch_staged(&self, keys: &[&str]) -> Vec<Result<StagedValue>> {
        match self {
            Backend::Store(s) => s.get_batch_staged(keys).await,
            Backend::Dummy(d) => d
                .get_batch(keys)
                .await
                .into_iter()
                .map(|r| r.map(StagedValue::from))
                .collect(),
        }
    }

    /// Whether this is a dummy client.
    pub(crate) fn is_dummy(&self) -> bool {
        matches!(self, Backend::Dummy(_))
    }

    /// The segment name (for a dummy, its real client's).
    pub(crate) fn hostname(&self) -> &str {
        match self {
            Backend::Store(s) => s.hostname(),
            Backend::Dummy(d) => d.hostname(),
        }
    }

    /// Registers caller memory for zero-copy calls. A dummy client can only use its shared pool:
    /// ranges inside it are accepted as they are, others are `INVALID_PARAMS`.
    ///
    /// # Safety
    /// As [`Store::register_buffer`].
    pub(crate) unsafe fn register_buffer(&self, addr: u64, len: u64) -> Result<()> {
        match self {
            // SAFETY: forwarded contract.
            Backend::Store(s) => unsafe { s.register_buffer(addr, len) },
            Backend::Dummy(d) if d.pool_contains(addr, len) => Ok(()),
            Backend::Dummy(_) => Err(Error::with_code(
                ErrorCode::INVALID_PARAMS,
                "a dummy client shares only its memory pool with the real client: use \
                 alloc_from_mem_pool buffers",
            )),
        }
    }

    /// Unregisters a buffer from [`register_buffer`](Self::register_buffer).
    pub(crate) fn unregister_buffer(&self, addr: u64) -> Result<()> {
        match self {
            Backend::Store(s) => s.unregister_buffer(addr),
            Backend::Dummy(d) if d.pool_contains(addr, 1) => Ok(()),
            Backend::Dummy(_) => Err(Error::NotRegistered(addr)),
        }
    }

    /// Allocates `size` bytes usable with the zero-copy calls at once.
    pub(crate) fn alloc_from_mem_pool(&self, size: u64) -> Result<u64> {
        match self {
            Backend::Store(s) => {
                let len = usize::try_from(size)
                    .map_err(|_| Error::InvalidArgument(format!("{size} bytes is too large")))?;
                s.engine().allocate_buffer(len, Location::cpu(0))
            }
            Backend::Dummy(d) => d.alloc_from_mem_pool(size),
        }
    }
}
