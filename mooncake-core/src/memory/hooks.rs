//! What transports plug into registered memory: the hooks told of registrations and the
//! providers of buffer memory.

use std::any::Any;
use std::fmt;

use super::{AlignedBuffer, RegisteredBuffer};
use crate::error::Result;

/// Memory for buffers that a [`MemoryProvider`] makes, wrapped into an [`AlignedBuffer`] with
/// [`AlignedBuffer::from_provided`]. The buffer owns the value and drops it (releasing the
/// memory) once the buffer is unregistered and no region of it is left.
///
/// # Safety
/// [`addr`](Self::addr) and [`len`](Self::len) never change (not even when the value is moved:
/// the memory is not inside it), `len` is non-zero, `addr` is aligned to [`AlignedBuffer::ALIGN`],
/// and `[addr, addr + len)` stays valid for reads and writes by any thread until the value is
/// dropped.
pub unsafe trait ProvidedMemory: Any + Send + Sync {
    /// Start address.
    fn addr(&self) -> u64;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Always false: provided memory is non-empty.
    fn is_empty(&self) -> bool {
        false
    }
}

/// Where the engine takes memory for the buffers it allocates, when a transport needs them to be
/// of a particular kind (the shared-memory transport: memfds that peers of this host can map).
/// A transport offers one in its [`Capabilities`](crate::transport::Capabilities).
pub trait MemoryProvider: Send + Sync + fmt::Debug {
    /// A zeroed buffer of `len` bytes (non-zero), page-aligned.
    fn allocate(&self, len: usize) -> Result<AlignedBuffer>;
}

/// What a [`RegistrationHook`] tells the registry about a buffer being registered.
#[derive(Default)]
pub struct Registration {
    /// Keys to publish in the buffer's descriptor under the hook's protocol (`Some(vec![])`
    /// publishes an empty entry, which can itself mean something to the transport's peers).
    pub keys: Option<Vec<u64>>,
    /// Kept with the buffer until it is released (unregistered and no region left), then
    /// dropped before its memory is: RDMA memory regions, a shared-memory slot. Found again with
    /// [`RegisteredBuffer::attachment`]. It drops on whatever thread lets go of the buffer last,
    /// possibly an async worker on a transfer's path: keep its drop short.
    pub attachment: Option<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("keys", &self.keys)
            .field("attachment", &self.attachment.is_some())
            .finish()
    }
}

/// Told of every buffer registered in a [`MemoryRegistry`] and of every one being unregistered,
/// including those registered after the engine started. The engine installs one per transport,
/// forwarding to [`Transport::on_register`](crate::Transport::on_register) and
/// [`Transport::on_unregister`](crate::Transport::on_unregister).
pub trait RegistrationHook: Send + Sync + fmt::Debug {
    /// Protocol the keys are published under.
    fn protocol(&self) -> &str;
    /// `buffer` is about to be registered. An error fails the registration (hooks that already
    /// accepted it get [`on_unregister`](Self::on_unregister)).
    fn on_register(&self, buffer: &RegisteredBuffer) -> Result<Registration>;
    /// `buffer` was registered and is being unregistered (or its registration failed after
    /// this hook accepted it): peers must not reach it through this hook's transport from now
    /// on. Regions of it may still be in use by local transfers; its memory and attachments
    /// stay until they are gone.
    fn on_unregister(&self, buffer: &RegisteredBuffer);
}
