"""``BufferPool`` and ``RegisteredBufferPool``: reusable, page-aligned host buffers for the
zero-copy calls, handed out as leases.

A request of ``size`` bytes is served from the size class above it (powers of two from
``min_size_class``); released buffers go back to their class and are reused. ``max_bytes``
(0: no limit) caps the memory the pool holds; when it is reached, ``acquire`` waits for a
release (``block_on_exhaustion``, up to ``timeout`` seconds) or raises ``MemoryError``.
A ``RegisteredBufferPool`` registers each region with its store (``register_buffer``), so its
leases can be passed to ``put_from``/``get_into`` as they are; ``close()`` unregisters them.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
import time
from typing import Dict, List, Optional


class BufferLease:
    """A buffer of a pool: ``ptr`` (address), ``size`` (bytes asked for), ``buffer`` (a
    writable memoryview of ``size`` bytes). ``release()`` (or leaving a ``with`` block) gives it
    back; a lease is released at most once."""

    def __init__(self, pool: "BufferPool", region: "_Region", size: int) -> None:
        self._pool = pool
        self._region = region
        self._size = size

    @property
    def ptr(self) -> int:
        """The address of the buffer."""
        self._live()
        return self._region.addr

    @property
    def size(self) -> int:
        """The bytes asked for (the region may be larger)."""
        return self._size

    @property
    def buffer(self) -> memoryview:
        """A writable memoryview of the leased bytes."""
        self._live()
        return memoryview(self._region.map)[: self._size]

    def view(self) -> "BufferLeaseView":
        """A view object over the leased bytes."""
        return BufferLeaseView(self)

    def release(self) -> None:
        """Gives the buffer back to its pool (no effect the second time)."""
        region, self._region = self._region, None
        if region is not None:
            self._pool._give_back(region)

    def _live(self) -> None:
        if self._region is None:
            raise ValueError("the lease was released")

    def __enter__(self) -> "BufferLease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    def __repr__(self) -> str:
        state = "released" if self._region is None else f"ptr={self._region.addr:#x}"
        return f"<{type(self).__name__} {state} size={self._size}>"


class BufferLeaseView:
    """The bytes of a lease as a memoryview (``buffer``)."""

    def __init__(self, lease: BufferLease) -> None:
        self._lease = lease

    @property
    def buffer(self) -> memoryview:
        """A writable memoryview of the leased bytes."""
        return self._lease.buffer


class RegisteredBufferLease(BufferLease):
    """A lease of a ``RegisteredBufferPool``: its memory is registered with the store."""


class RegisteredBufferLeaseView(BufferLeaseView):
    """The bytes of a registered lease as a memoryview."""


class _Region:
    __slots__ = ("map", "addr", "capacity")

    def __init__(self, capacity: int) -> None:
        self.map = mmap.mmap(-1, capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        self.capacity = capacity


class BufferPool:
    """A pool of host buffers (see the module docs). ``store`` is the store the buffers are
    meant for; a plain ``BufferPool`` does not register them."""

    _lease_type = BufferLease

    def __init__(
        self,
        store: object,
        max_bytes: int = 0,
        min_size_class: int = 65536,
        max_size_class: Optional[int] = None,
        alignment: int = 8388608,
        block_on_exhaustion: bool = True,
        default_timeout: Optional[float] = None,
        max_regions: Optional[int] = None,
        prewarm_size: Optional[int] = None,
        prewarm_count: int = 0,
    ) -> None:
        if min_size_class <= 0 or (max_size_class is not None and max_size_class < min_size_class):
            raise ValueError("size classes: need 0 < min_size_class <= max_size_class")
        if max_bytes < 0 or alignment <= 0:
            raise ValueError("max_bytes must be >= 0 and alignment > 0")
        self._store = store
        self._max_bytes = max_bytes
        self._min = min_size_class
        self._max = max_size_class
        self._block = block_on_exhaustion
        self._timeout = default_timeout
        self._max_regions = max_regions
        self._free: Dict[int, List[_Region]] = {}
        self._all: List[_Region] = []
        self._held = 0
        self._closed = False
        self._cond = threading.Condition()
        if prewarm_size and prewarm_count:
            self.prewarm(prewarm_size, prewarm_count)

    def _class_of(self, size: int) -> int:
        if size <= 0:
            raise ValueError(f"size must be positive, not {size}")
        c = self._min
        while c < size:
            c *= 2
        if self._max is not None and c > self._max:
            raise ValueError(f"{size} bytes is above the largest size class ({self._max})")
        # Whole pages, so that every region is page-aligned and registrable.
        return -(-c // mmap.PAGESIZE) * mmap.PAGESIZE

    def _new_region(self, capacity: int) -> _Region:
        region = _Region(capacity)
        self._on_new_region(region)
        self._all.append(region)
        self._held += capacity
        return region

    def _on_new_region(self, region: _Region) -> None:
        """Hook for registering a region (RegisteredBufferPool)."""

    def _can_grow(self, capacity: int) -> bool:
        if self._max_regions is not None and len(self._all) >= self._max_regions:
            return False
        return not self._max_bytes or self._held + capacity <= self._max_bytes

    def acquire(self, size: int, block: Optional[bool] = None, timeout: Optional[float] = None):
        """A lease of at least `size` bytes. When the pool is at ``max_bytes``: waits for a
        release if `block` (default ``block_on_exhaustion``) for up to `timeout` seconds
        (default ``default_timeout``; None: no limit), else raises ``MemoryError``."""
        capacity = self._class_of(size)
        block = self._block if block is None else block
        timeout = self._timeout if timeout is None else timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    raise ValueError("the pool is closed")
                free = self._free.get(capacity)
                if free:
                    return self._lease_type(self, free.pop(), size)
                if self._can_grow(capacity):
                    return self._lease_type(self, self._new_region(capacity), size)
                if not block:
                    raise MemoryError(f"the pool is exhausted ({self._held} of {self._max_bytes})")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise MemoryError(f"no buffer of {size} bytes freed within {timeout}s")
                self._cond.wait(left)

    buffer = acquire

    def prewarm(self, size: int, count: int) -> None:
        """Allocates `count` buffers of `size`'s class ahead of use."""
        capacity = self._class_of(size)
        with self._cond:
            for _ in range(count):
                if not self._can_grow(capacity):
                    break
                self._free.setdefault(capacity, []).append(self._new_region(capacity))

    def _give_back(self, region: _Region) -> None:
        with self._cond:
            closed = self._closed
            if not closed:
                self._free.setdefault(region.capacity, []).append(region)
            self._cond.notify_all()
        if closed:
            self._on_free_region(region)

    def close(self) -> None:
        """Frees the pool's free buffers and refuses new leases (leased ones stay valid until
        released and the pool is collected)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            free = [r for rs in self._free.values() for r in rs]
            self._free.clear()
            self._cond.notify_all()
        for r in free:
            self._on_free_region(r)

    def _on_free_region(self, region: _Region) -> None:
        """Hook for unregistering a region (RegisteredBufferPool)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RegisteredBufferPool(BufferPool):
    """A ``BufferPool`` whose buffers are registered with `store` (usable with ``put_from``,
    ``get_into`` and the other zero-copy calls as they are)."""

    _lease_type = RegisteredBufferLease

    def _on_new_region(self, region: _Region) -> None:
        rc = self._store.register_buffer(region.addr, region.capacity)
        if rc != 0:
            raise MemoryError(f"register_buffer of a {region.capacity}-byte region failed ({rc})")

    def _on_free_region(self, region: _Region) -> None:
        self._store.unregister_buffer(region.addr)
