"""``mooncake.store``: the Mooncake Store client API, as upstream's ``mooncake.store``.

The classes and functions come from the native module ``mooncake._store`` (Rust); this module
adds the PyTorch tensor helpers (``put_tensor``, ``get_tensor``, their batch, tensor-parallel and
zero-copy forms), a config-less ``setup()`` from the environment, and closes live stores when
the interpreter exits.

Tensors are stored as upstream lays them out: a 40-byte header (``int32 dtype, int32 ndim,
int64 shape[4]``, native byte order) followed by the raw bytes, so at most 4 dimensions.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import struct
from typing import Any, List, Optional, Sequence

from mooncake import _store
from mooncake._closing import close_at_exit as _close_at_exit
from mooncake._parallel import (  # noqa: F401  (re-exported)
    ParallelAxis,
    ParallelTensorCalls as _ParallelTensorCalls,
    ReadTarget,
    TensorParallelism,
)
from mooncake._pool import (  # noqa: F401  (re-exported)
    BufferLease,
    BufferLeaseView,
    BufferPool,
    RegisteredBufferLease,
    RegisteredBufferLeaseView,
    RegisteredBufferPool,
)
from mooncake._ranges import RangeCalls as _RangeCalls
from mooncake._store import (  # noqa: F401  (re-exported)
    BufferDescriptor,
    BufferHandle,
    Descriptor,
    DiskDescriptor,
    MemoryDescriptor,
    MooncakeHostMemAllocator,
    ObjectDataType,
    QueryTaskResponse,
    ReplicaDescriptor,
    ReplicaStatus,
    ReplicateConfig,
    SoftPinAction,
    TaskStatus,
    TaskType,
    bind_to_numa_node,
    get_alloc_func_addr,
    get_free_func_addr,
)

# Enum values at module level, as upstream exports them (TaskStatus wins FAILED/PROCESSING).
UNDEFINED = _store.UNDEFINED
INITIALIZED = _store.INITIALIZED
COMPLETE = _store.COMPLETE
REMOVED = _store.REMOVED
REPLICA_COPY = _store.REPLICA_COPY
REPLICA_MOVE = _store.REPLICA_MOVE
PENDING = _store.PENDING
PROCESSING = _store.PROCESSING
FAILED = _store.FAILED
SUCCESS = _store.SUCCESS
UNKNOWN = ObjectDataType.UNKNOWN
KVCACHE = ObjectDataType.KVCACHE
TENSOR = ObjectDataType.TENSOR
WEIGHT = ObjectDataType.WEIGHT
SAMPLE = ObjectDataType.SAMPLE
ACTIVATION = ObjectDataType.ACTIVATION
GRADIENT = ObjectDataType.GRADIENT
OPTIMIZER_STATE = ObjectDataType.OPTIMIZER_STATE
METADATA = ObjectDataType.METADATA
GENERAL = ObjectDataType.GENERAL

__all__ = [
    "MooncakeDistributedStore",
    "ReplicateConfig",
    "BufferHandle",
    "ReplicaDescriptor",
    "MemoryDescriptor",
    "DiskDescriptor",
    "Descriptor",
    "BufferDescriptor",
    "QueryTaskResponse",
    "ReplicaStatus",
    "TaskType",
    "TaskStatus",
    "SoftPinAction",
    "MooncakeHostMemAllocator",
    "bind_to_numa_node",
    "UNDEFINED",
    "INITIALIZED",
    "COMPLETE",
    "REMOVED",
    "REPLICA_COPY",
    "REPLICA_MOVE",
    "PENDING",
    "PROCESSING",
    "FAILED",
    "SUCCESS",
    "ObjectDataType",
    "UNKNOWN",
    "KVCACHE",
    "TENSOR",
    "WEIGHT",
    "SAMPLE",
    "ACTIVATION",
    "GRADIENT",
    "OPTIMIZER_STATE",
    "METADATA",
    "GENERAL",
    "ParallelAxis",
    "TensorParallelism",
    "ReadTarget",
    "BufferPool",
    "RegisteredBufferPool",
    "BufferLease",
    "BufferLeaseView",
    "RegisteredBufferLease",
    "RegisteredBufferLeaseView",
    "MooncakeDistributedNoFRegister",
    "get_alloc_func_addr",
    "get_free_func_addr",
]

_log = logging.getLogger("mooncake.store")

INVALID_PARAMS = -600

# --- tensors -------------------------------------------------------------------------------------

_HEADER = struct.Struct("=ii4q")  # dtype, ndim, shape[4]
HEADER_SIZE = _HEADER.size  # 40
_MAX_DIMS = 4

# Upstream's TensorDtype numbering.
_DTYPE_NAMES = [
    "float32",
    "float64",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "bool",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e5m2",
]


def _torch():
    try:
        import torch  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the tensor API of mooncake.store requires torch (pip install torch)"
        ) from e
    return torch


def _dtype_code(torch, dtype) -> int:
    for i, name in enumerate(_DTYPE_NAMES):
        if getattr(torch, name, None) == dtype:
            return i
    return -1


def _encode(torch, tensor, what="tensor"):
    """(header bytes, uint8 numpy view of the data) of `tensor`, or raise TypeError/ValueError."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, not {type(tensor).__name__}")
    code = _dtype_code(torch, tensor.dtype)
    if code < 0:
        raise ValueError(f"unsupported tensor dtype {tensor.dtype}")
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"tensors of more than {_MAX_DIMS} dimensions are not supported")
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    shape = list(t.shape) + [-1] * (_MAX_DIMS - t.dim())
    header = _HEADER.pack(code, t.dim(), *shape)
    data = t.reshape(-1).view(torch.uint8).numpy()
    return header, data


def _decode(torch, buf, nbytes: Optional[int] = None):
    """A tensor over `buf` (header + data), sharing its memory; None when malformed."""
    mv = memoryview(buf).cast("B")
    total = len(mv) if nbytes is None else nbytes
    if total < HEADER_SIZE:
        return None
    code, ndim, *shape = _HEADER.unpack(mv[:HEADER_SIZE])
    if not (0 <= code < len(_DTYPE_NAMES)) or not (0 <= ndim <= _MAX_DIMS):
        _log.error("invalid tensor header: dtype=%d ndim=%d", code, ndim)
        return None
    dtype = getattr(torch, _DTYPE_NAMES[code], None)
    if dtype is None:
        _log.error("this torch has no dtype %s", _DTYPE_NAMES[code])
        return None
    shape = shape[:ndim]
    count = total - HEADER_SIZE
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=count, offset=HEADER_SIZE)
    try:
        return raw.view(dtype).reshape(shape)
    except RuntimeError as e:
        _log.error("tensor data does not match its header: %s", e)
        return None


def _decode_at(torch, ptr: int, nbytes: int):
    """A tensor over `nbytes` at address `ptr` (header + data), sharing that memory."""
    if nbytes < HEADER_SIZE:
        return None
    return _decode(torch, (ctypes.c_uint8 * nbytes).from_address(ptr), nbytes)


def _tp_key(key: str, rank: int) -> str:
    return f"{key}_tp_{rank}"


def _shards(tensor, tp_size: int, split_dim: int):
    return tensor.tensor_split(tp_size, dim=split_dim)


# --- config from the environment -----------------------------------------------------------------


def _env_config() -> dict:
    """setup()'s configuration from MOONCAKE_CONFIG_PATH (JSON) or MOONCAKE_* variables."""
    path = os.environ.get("MOONCAKE_CONFIG_PATH")
    if path:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        cfg = {
            "local_hostname": raw.get("local_hostname", "localhost"),
            "metadata_server": raw.get("metadata_server", "P2PHANDSHAKE"),
            "global_segment_size": raw.get("global_segment_size", 16 << 20),
            "local_buffer_size": raw.get("local_buffer_size", 1 << 30),
            "protocol": raw.get("protocol", "tcp"),
            "rdma_devices": raw.get("device_name", raw.get("rdma_devices", "")),
            "master_server_addr": raw.get(
                "master_server_address", raw.get("master_server_addr", "localhost:50051")
            ),
        }
        return cfg
    env = os.environ.get
    return {
        "local_hostname": env("MOONCAKE_LOCAL_HOSTNAME", "localhost"),
        "metadata_server": env("MOONCAKE_TE_META_DATA_SERVER")
        or env("MC_METADATA_SERVER")
        or "P2PHANDSHAKE",
        "global_segment_size": env("MOONCAKE_GLOBAL_SEGMENT_SIZE", str(16 << 20)),
        "local_buffer_size": env("MOONCAKE_LOCAL_BUFFER_SIZE", str(1 << 30)),
        "protocol": env("MOONCAKE_PROTOCOL", "tcp"),
        "rdma_devices": env("MOONCAKE_DEVICE", ""),
        "master_server_addr": env("MOONCAKE_MASTER", "localhost:50051"),
    }


# --- the store -----------------------------------------------------------------------------------

class MooncakeDistributedNoFRegister:
    """Upstream's registration of NVMe-oF devices with the master. This store has no NVMe-oF
    tier: every call logs why and returns -1012 (NOT_SUPPORTED)."""

    def real_register(self, *args: Any) -> int:
        """Registers an NVMe-oF target: -1012 (not supported here)."""
        _log.error("MooncakeDistributedNoFRegister: this store has no NVMe-oF tier")
        return -1012

    def real_unregister_by_endpoint(self, *args: Any) -> int:
        """Unregisters an NVMe-oF target: -1012 (not supported here)."""
        _log.error("MooncakeDistributedNoFRegister: this store has no NVMe-oF tier")
        return -1012


class MooncakeDistributedStore(
    _RangeCalls, _ParallelTensorCalls, _store.MooncakeDistributedStore
):
    """A Mooncake Store client. Call :meth:`setup` first; :meth:`close` when done. Subclasses
    and instances may add attributes (upstream's async wrapper does)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        _close_at_exit(self)

    def setup(self, *args: Any, **kwargs: Any) -> int:
        """setup(local_hostname, metadata_server, global_segment_size, local_buffer_size,
        protocol, rdma_devices, master_server_addr) or setup(config_dict); with no arguments,
        the configuration comes from MOONCAKE_CONFIG_PATH or the MOONCAKE_* variables."""
        if not args and not kwargs:
            try:
                cfg = _env_config()
            except (OSError, ValueError) as e:
                _log.error("setup(): cannot read the configuration: %s", e)
                return INVALID_PARAMS
            return super().setup(cfg)
        return super().setup(*args, **kwargs)

    # -- tensors ------------------------------------------------------------------------------

    def put_tensor(self, key: str, tensor) -> int:
        """Stores a tensor (dtype and shape header + bytes). 0 or an error code."""
        return self.pub_tensor(key, tensor)

    def pub_tensor(self, key: str, tensor, config: Optional[ReplicateConfig] = None) -> int:
        """put_tensor with a replication config."""
        torch = _torch()
        try:
            header, data = _encode(torch, tensor)
        except ValueError as e:
            _log.error("put_tensor %r: %s", key, e)
            return INVALID_PARAMS
        return self.put_parts(key, header, data, config=config)

    def batch_put_tensor(self, keys: List[str], tensors_list: list) -> List[int]:
        """Stores several tensors; one code per key."""
        return self.batch_pub_tensor(keys, tensors_list)

    def batch_pub_tensor(
        self, keys: List[str], tensors_list: list, config: Optional[ReplicateConfig] = None
    ) -> List[int]:
        """batch_put_tensor with a replication config."""
        torch = _torch()
        keys = list(keys)
        tensors_list = list(tensors_list)
        if len(keys) != len(tensors_list):
            _log.error("batch_put_tensor: %d keys for %d tensors", len(keys), len(tensors_list))
            return [INVALID_PARAMS] * len(keys)
        values, out, index = [], [INVALID_PARAMS] * len(keys), []
        for i, t in enumerate(tensors_list):
            try:
                header, data = _encode(torch, t, f"tensors_list[{i}]")
            except ValueError as e:
                _log.error("batch_put_tensor %r: %s", keys[i], e)
                continue
            buf = bytearray(len(header) + data.nbytes)
            buf[: len(header)] = header
            buf[len(header) :] = data.data.cast("B")
            values.append(buf)
            index.append(i)
        if index:
            codes = self._put_batch_codes([keys[i] for i in index], values, config)
            for i, c in zip(index, codes):
                out[i] = c
        return out

    def get_tensor(self, key: str):
        """The tensor stored under `key`, or None."""
        torch = _torch()
        buf = self.get_buffer(key)
        return None if buf is None else _decode(torch, buf)

    def batch_get_tensor(self, keys: List[str]) -> list:
        """Tensors for `keys`, None for each miss."""
        torch = _torch()
        return [None if b is None else _decode(torch, b) for b in self.batch_get_buffer(keys)]

    def get_tensor_into(self, key: str, buffer_ptr: int, size: int):
        """Reads the tensor into registered memory at `buffer_ptr` and returns a tensor over
        that memory (the data follows the 40-byte header), or None."""
        torch = _torch()
        n = self.get_into(key, buffer_ptr, size)
        return _decode_at(torch, buffer_ptr, n) if n > 0 else None

    def batch_get_tensor_into(
        self, keys: List[str], buffer_ptrs: List[int], sizes: List[int]
    ) -> list:
        """get_tensor_into for several keys; None for each miss."""
        torch = _torch()
        results = self.batch_get_into(keys, buffer_ptrs, sizes)
        return [
            _decode_at(torch, p, n) if n > 0 else None for p, n in zip(buffer_ptrs, results)
        ]

    def put_tensor_with_tp(
        self, key: str, tensor, tp_rank: int = 0, tp_size: int = 1, split_dim: int = 0
    ) -> int:
        """Splits `tensor` along `split_dim` into `tp_size` shards stored as `key_tp_{rank}`
        (all ranks, whatever `tp_rank` is); `tp_size` 1 stores it whole under `key`."""
        return self.pub_tensor_with_tp(key, tensor, None, tp_rank, tp_size, split_dim)

    def pub_tensor_with_tp(
        self,
        key: str,
        tensor,
        config: Optional[ReplicateConfig] = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> int:
        """put_tensor_with_tp with a replication config."""
        torch = _torch()
        if tp_size <= 1:
            return self.pub_tensor(key, tensor, config)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor must be a torch.Tensor, not {type(tensor).__name__}")
        try:
            shards = _shards(tensor, tp_size, split_dim)
        except (IndexError, RuntimeError) as e:
            _log.error("put_tensor_with_tp %r: %s", key, e)
            return INVALID_PARAMS
        codes = self.batch_pub_tensor(
            [_tp_key(key, r) for r in range(tp_size)], list(shards), config
        )
        return next((c for c in codes if c != 0), 0)

    def batch_put_tensor_with_tp(
        self,
        base_keys: List[str],
        tensors_list: list,
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> List[int]:
        """put_tensor_with_tp for several tensors; one code per base key."""
        return self.batch_pub_tensor_with_tp(
            base_keys, tensors_list, None, tp_rank, tp_size, split_dim
        )

    def batch_pub_tensor_with_tp(
        self,
        base_keys: List[str],
        tensors_list: list,
        config: Optional[ReplicateConfig] = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ) -> List[int]:
        """batch_put_tensor_with_tp with a replication config."""
        torch = _torch()
        if tp_size <= 1:
            return self.batch_pub_tensor(base_keys, tensors_list, config)
        base_keys, tensors_list = list(base_keys), list(tensors_list)
        if len(base_keys) != len(tensors_list):
            return [INVALID_PARAMS] * len(base_keys)
        keys, shards, owner = [], [], []
        out = [0] * len(base_keys)
        for i, (k, t) in enumerate(zip(base_keys, tensors_list)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensors_list[{i}] must be a torch.Tensor")
            try:
                parts = _shards(t, tp_size, split_dim)
            except (IndexError, RuntimeError) as e:
                _log.error("batch_put_tensor_with_tp %r: %s", k, e)
                out[i] = INVALID_PARAMS
                continue
            for r, p in enumerate(parts):
                keys.append(_tp_key(k, r))
                shards.append(p)
                owner.append(i)
        for i, c in zip(owner, self.batch_pub_tensor(keys, shards, config)):
            if c != 0 and out[i] == 0:
                out[i] = c
        return out

    def get_tensor_with_tp(
        self, key: str, tp_rank: int = 0, tp_size: int = 1, split_dim: int = 0
    ):
        """The shard of rank `tp_rank` (`key_tp_{rank}`), or the whole tensor when
        `tp_size` is 1; None when missing."""
        return self.get_tensor(key if tp_size <= 1 else _tp_key(key, tp_rank))

    def batch_get_tensor_with_tp(
        self, base_keys: List[str], tp_rank: int = 0, tp_size: int = 1
    ) -> list:
        """get_tensor_with_tp for several base keys."""
        if tp_size <= 1:
            return self.batch_get_tensor(base_keys)
        return self.batch_get_tensor([_tp_key(k, tp_rank) for k in base_keys])

    def get_tensor_with_tp_into(
        self,
        key: str,
        buffer_ptr: int,
        size: int,
        tp_rank: int = 0,
        tp_size: int = 1,
        split_dim: int = 0,
    ):
        """get_tensor_with_tp into registered memory (see get_tensor_into)."""
        k = key if tp_size <= 1 else _tp_key(key, tp_rank)
        return self.get_tensor_into(k, buffer_ptr, size)

    def batch_get_tensor_with_tp_into(
        self,
        base_keys: List[str],
        buffer_ptrs: List[int],
        sizes: List[int],
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> list:
        """batch_get_tensor_with_tp into registered memory."""
        keys = list(base_keys) if tp_size <= 1 else [_tp_key(k, tp_rank) for k in base_keys]
        return self.batch_get_tensor_into(keys, buffer_ptrs, sizes)


