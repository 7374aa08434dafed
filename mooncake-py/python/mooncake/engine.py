"""``mooncake.engine``: the transfer engine alone, for moving bytes between registered buffers of
processes (what vLLM's and SGLang's prefill/decode disaggregation use).

``TransferEngine()`` then ``initialize(local_hostname, metadata_server, protocol, device_name)``
starts it:

- ``metadata_server``: ``"P2PHANDSHAKE"`` (no metadata service: a peer is asked for its buffers
  directly when first named) or ``"http://host:port/metadata"`` (the HTTP metadata server of
  ``mooncake_master --enable_http_metadata_server``);
- ``protocol``: ``"tcp"``. ``"rdma"`` is accepted and runs on TCP too, with a warning, as an
  engine does on a host without RDMA devices; protocols needing other hardware (``"nvlink"``,
  ``"hip"``, ``"efa"``, ...) fail with -1;
- ``device_name`` is ignored (no RDMA devices are used).

A peer is named by its segment name ``"host:port"``: its ``local_hostname`` and its
``get_rpc_port()``. Buffers are raw addresses (``array.ctypes.data``, ``tensor.data_ptr()``):
``register_memory(addr, size)`` lets peers read and write them (the memory must stay valid
until ``unregister_memory``), ``allocate_managed_buffer(size)`` gives registered memory owned by
the engine. ``transfer_sync_write/read(target, local, peer_addr, length)`` and the
``batch_transfer_*`` calls move bytes directly between a local registered buffer and one the peer
registered; the asynchronous calls return a batch id for ``get_batch_transfer_status`` or
``transfer_check_status``.

Results follow upstream's conventions: 0 or a negative code (-1 for a failed transfer or call,
-3 for an unregistered address, -7 for an overlapping registration, -102 for an unreachable
probe), addresses and batch ids as ints (0 for none); the reason of a failure is logged
(``MC_LOG_LEVEL``). Every call waits with the GIL released. Addresses are checked before this
process touches them, so a wrong pointer is an error code, never a crash.

Not supported by this build: transfer notifications (``transfer_sync``/``batch_transfer_sync``
with ``notify`` return -1; ``get_notifies`` is always empty) and CUDA-stream transfers.
"""

from mooncake._store import TransferEngine, TransferNotify, TransferOpcode

__all__ = [
    "TransferEngine",
    "TransferOpcode",
    "TransferNotify",
    "Read",
    "Write",
    "SUPPORT_CUDA",
    "SUPPORT_EFA",
    "SUPPORT_HIP",
    "SUPPORT_INTRA_NVLINK",
    "SUPPORT_MNNVL",
    "SUPPORT_MUSA",
]

Read = TransferOpcode.Read
Write = TransferOpcode.Write

# Accelerator transports this build has: none.
SUPPORT_CUDA = False
SUPPORT_EFA = False
SUPPORT_HIP = False
SUPPORT_INTRA_NVLINK = False
SUPPORT_MNNVL = False
SUPPORT_MUSA = False
