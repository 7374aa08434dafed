//! What a `MooncakeDistributedStore` drives: its own store client (`setup`) or a dummy client
//! forwarding to a `mooncake_client` process (`setup_dummy`). Both implement [`StoreApi`]; the
//! binding calls them through it.

use std::ops::Deref;
use std::sync::Arc;

use mooncake::real_client::DummyClient;
use mooncake::store::{Store, StoreApi};

/// A live client of either kind.
#[derive(Clone)]
pub(crate) struct Backend {
    client: Arc<dyn StoreApi>,
    /// Whether `client` is a dummy client (some calls are refused for one, as upstream).
    dummy: bool,
}

impl Backend {
    /// A full store client of this process.
    pub(crate) fn store(store: Arc<Store>) -> Self {
        Backend {
            client: store,
            dummy: false,
        }
    }

    /// A dummy client of a real client on this host.
    pub(crate) fn dummy(dummy: Arc<DummyClient>) -> Self {
        Backend {
            client: dummy,
            dummy: true,
        }
    }

    /// Whether this is a dummy client.
    pub(crate) fn is_dummy(&self) -> bool {
        self.dummy
    }
}

impl Deref for Backend {
    type Target = dyn StoreApi;

    fn deref(&self) -> &Self::Target {
        &*self.client
    }
}
