"""``mooncake.p2p``: the P2P store, for distributing checkpoints from one process to many.

``P2PStore(metadata_uri, local_segment_name, nic_priority_matrix="", *, pull_timeout=600.0,
protocol="tcp")`` starts a transfer engine on ``local_segment_name`` (``"host"`` or
``"host:port"``) and keeps its catalog in the metadata service at ``metadata_uri``. With
``protocol="quic"`` pieces move over QUIC with mutual TLS: every peer needs a certificate of the
same CA, from the PEM files ``MC_TLS_CA``, ``MC_TLS_CERT`` and ``MC_TLS_KEY`` name. The catalog:

- ``"http://host:port/metadata"``: the HTTP metadata server of ``mooncake_master
  --enable_http_metadata_server`` (the catalog needs compare-and-swap and listing from it);
- ``"memory"`` (or ``"local"``): one in-process catalog shared by every ``P2PStore`` of this
  process, for single-process use and tests. Other processes cannot see it.

The methods are the seed's: ``register(name, buffers, max_shard_size=64 MiB, location="cpu:0",
force_create=False)``, ``unregister(name)``, ``list(prefix="")`` (``PayloadInfo`` objects with
``name``, ``max_shard_size``, ``total_size``, ``size_list``), ``get_replica(name, buffers,
timeout=None)``, ``delete_replica(name)`` and ``close()``, plus ``cancel(name)``. A file is the
concatenation of its buffers, in order. A ``get_replica`` not done after ``timeout`` seconds
(default: the store's ``pull_timeout``) raises ``P2PError`` (kind ``"timeout"``, with how many
pieces were verified); ``cancel(name)`` from another thread ends it with kind ``"cancelled"``,
and Ctrl-C with ``KeyboardInterrupt``. Each first withdraws what the pull published; the name
may be pulled again. ``nic_priority_matrix`` is accepted and ignored (the transport is TCP).

Buffers are a list of ``(ptr, size)`` pairs, numpy arrays (or other contiguous bytes-like
objects) or contiguous CPU torch tensors. The store registers their memory with its engine and
serves it to peers until ``unregister`` / ``delete_replica`` / ``close``: the data must not
change before then. Arrays and tensors are kept alive by the store meanwhile; for ``(ptr, size)``
pairs the caller keeps the memory valid (a pair that is not mapped memory of this process
raises ``ValueError``). Buffers must be writable, for ``register`` too: the engine lets peers
write registered memory, so read-only objects (``bytes``) and mappings are refused.

Every call waits with the GIL released. Misuse raises ``TypeError``/``ValueError``; any other
failure raises :class:`P2PError` with the reason, and ``kind`` naming it: ``"already_exists"``
(register of a taken name without ``force_create``), ``"not_found"``, ``"already_pulled"`` (a
name is pulled at most once per instance), ``"no_replica"``, ``"not_registered_here"``,
``"timeout"``, ``"cancelled"``, ``"changed"``, ``"closed"``, ``"not_supported"``, ``"metadata"``, ``"engine"``,
``"bad_catalog_entry"``, ``"internal"``.
"""

from __future__ import annotations

from typing import Any

from mooncake import _store
from mooncake._closing import close_at_exit as _close_at_exit
from mooncake._store import P2PError, PayloadInfo

__all__ = ["P2PStore", "PayloadInfo", "P2PError"]

class P2PStore(_store.P2PStore):
    """A P2P store instance; see the module docs. Usable as a context manager (closes on exit)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        _close_at_exit(self)

    def __enter__(self) -> "P2PStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
