"""``MooncakeDistributedStoreAsync``: the store with an ``async_<name>`` coroutine for every
method ``<name>``, run in the event loop's default executor (the calls release the GIL while
they wait, so several run at once)."""

from __future__ import annotations

import asyncio
import functools

from mooncake.store import MooncakeDistributedStore

__all__ = ["MooncakeDistributedStore", "MooncakeDistributedStoreAsync"]


class MooncakeDistributedStoreAsync(MooncakeDistributedStore):
    """``await store.async_put(key, value)`` runs ``store.put(key, value)`` off the loop."""

    def __getattr__(self, name: str):
        # Only reached for names the instance and class do not have.
        if not name.startswith("async_") or len(name) == len("async_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        sync = getattr(self, name[len("async_"):], None)
        if not callable(sync):
            raise AttributeError(f"{type(self).__name__!r} object has no method {name[6:]!r}")

        @functools.wraps(sync)
        async def call(*args, **kwargs):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, functools.partial(sync, *args, **kwargs))

        # Kept on the instance: the next lookup finds it without coming here.
        setattr(self, name, call)
        return call
