"""Tensor calls beyond put/get: parallel layouts (``ParallelAxis``, ``TensorParallelism``,
``ReadTarget`` and the ``*_with_parallelism*`` calls), tensors written from raw buffers
(``*_tensor_from``), tensor upserts, safetensors files, and reads into CUDA tensors (mixed into
``MooncakeDistributedStore`` by ``mooncake.store``).

Keys of a parallel layout: a tensor-parallel shard of rank ``r`` is ``{key}_tp_{r}`` (as
``put_tensor_with_tp`` stores them); a pipeline stage adds ``_pp_{stage_id}``, an expert
``_ep_{expert_id}``; data-parallel replicas hold the same bytes and share one key. A read in
``full`` mode joins the shards along the tensor-parallel ``split_dim`` (from the target's
parallelism, else 0); a read in ``shard`` mode returns the rank's shard, re-splitting when the
stored shard count differs from the target's.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from typing import Any, List, Optional

_log = logging.getLogger("mooncake.store")

OK = 0
INVALID_PARAMS = -600
OBJECT_NOT_FOUND = -704
NOT_SUPPORTED = -1012
FILE_OPEN_FAIL = -1101
FILE_WRITE_FAIL = -1103

_KINDS = ("tp", "dp", "pp", "ep")
_MODES = ("as_stored", "full", "shard")
# Most shards looked for when a read does not say how many were stored.
_MAX_PROBED_SHARDS = 256


class ParallelAxis:
    """One axis of a parallel layout: ``kind`` (``tp``, ``dp``, ``pp`` or ``ep``), this
    writer's ``rank`` of ``size``, and ``split_dim`` (tensor parallel), ``stage_id``
    (pipeline) or ``expert_id`` (expert parallel)."""

    __slots__ = ("kind", "rank", "size", "split_dim", "stage_id", "expert_id")

    def __init__(self) -> None:
        self.kind = ""
        self.rank = 0
        self.size = 1
        self.split_dim: Optional[int] = None
        self.stage_id: Optional[int] = None
        self.expert_id: Optional[int] = None

    def __repr__(self) -> str:
        return (
            f"ParallelAxis(kind={self.kind!r}, rank={self.rank}, size={self.size}, "
            f"split_dim={self.split_dim}, stage_id={self.stage_id}, expert_id={self.expert_id})"
        )


class TensorParallelism:
    """A parallel layout: a list of ``ParallelAxis`` in ``axes``."""

    __slots__ = ("axes",)

    def __init__(self) -> None:
        self.axes: List[ParallelAxis] = []

    def __repr__(self) -> str:
        return f"TensorParallelism(axes={self.axes!r})"


class ReadTarget:
    """What a parallel read returns: ``mode`` ``as_stored`` (the object under the layout's
    key), ``full`` (the shards joined) or ``shard`` (this reader's shard of ``parallelism``)."""

    __slots__ = ("_mode", "parallelism")

    def __init__(self) -> None:
        self._mode = "as_stored"
        self.parallelism: Optional[TensorParallelism] = None

    @property
    def mode(self) -> str:
        """``as_stored`` (default), ``full`` or ``shard``; any case."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        m = str(value).strip().lower()
        if m not in _MODES:
            raise RuntimeError(f"Unsupported ReadTarget mode {value!r} (expected {_MODES})")
        self._mode = m

    def __repr__(self) -> str:
        return f"ReadTarget(mode={self._mode!r}, parallelism={self.parallelism!r})"


def _field(obj, name):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _axes(parallelism) -> Optional[list]:
    """The axes of a TensorParallelism, a dict ``{"axes": [...]}``, a list of axes or one axis,
    each axis a ParallelAxis or a dict; None when `parallelism` is None."""
    if parallelism is None:
        return None
    if isinstance(parallelism, (ParallelAxis, dict)) and _field(parallelism, "axes") is None:
        raw = [parallelism]
    elif isinstance(parallelism, (list, tuple)):
        raw = list(parallelism)
    else:
        raw = list(_field(parallelism, "axes") or [])
    out = []
    for a in raw:
        ax = ParallelAxis()
        for name in ParallelAxis.__slots__:
            v = _field(a, name)
            if v is not None:
                setattr(ax, name, v)
        ax.kind = str(ax.kind).strip().lower()
        out.append(ax)
    return out


def _check_axes(axes: list, what: str) -> Optional[str]:
    """Why `axes` is not a valid layout, or None."""
    if not axes:
        return f"{what}: parallelism axes cannot be empty"
    seen = set()
    for ax in axes:
        if ax.kind not in _KINDS:
            return f"{what}: unsupported parallel axis kind {ax.kind!r}"
        if ax.kind in seen:
            return f"{what}: axis kind {ax.kind!r} given twice"
        seen.add(ax.kind)
        if not (isinstance(ax.size, int) and isinstance(ax.rank, int)) or ax.size < 1 or not (
            0 <= ax.rank < ax.size
        ):
            return f"{what}: invalid rank/size for axis {ax.kind}"
        if ax.kind == "tp" and ax.split_dim is None:
            return f"{what}: TP axis requires split_dim"
        if ax.kind == "dp" and ax.split_dim is not None:
            return f"{what}: DP axis must not provide split_dim"
        if ax.kind == "pp" and ax.stage_id is None:
            return f"{what}: PP axis requires stage_id"
        if ax.kind == "ep" and ax.expert_id is None:
            return f"{what}: EP axis requires expert_id"
    return None


def _base_key(key: str, axes: list) -> str:
    """The key of the layout without its tensor-parallel rank."""
    by = {a.kind: a for a in axes}
    k = key
    if "pp" in by:
        k += f"_pp_{by['pp'].stage_id}"
    if "ep" in by:
        k += f"_ep_{by['ep'].expert_id}"
    return k


def _layout_key(key: str, axes: list) -> str:
    tp = next((a for a in axes if a.kind == "tp"), None)
    base = _base_key(key, axes)
    return base if tp is None else f"{base}_tp_{tp.rank}"


def _writer_axes(writer_partition) -> Optional[list]:
    """The layout of a writer_partition ({rank, size, split_dim}), or None when incomplete."""
    rank, size, dim = (_field(writer_partition, n) for n in ("rank", "size", "split_dim"))
    if rank is None or size is None or dim is None:
        return None
    ax = ParallelAxis()
    ax.kind, ax.rank, ax.size, ax.split_dim = "tp", int(rank), int(size), int(dim)
    return [ax]


def _s():
    from mooncake import store  # noqa: PLC0415

    return store


class ParallelTensorCalls:
    """The calls of this module, for a class that has the tensor calls of ``mooncake.store``."""

    # -- parallel writes ---------------------------------------------------------------------

    def _parallel_write(self, upsert, key, tensor, parallelism, config, writer_partition):
        what = "upsert_tensor_with_parallelism" if upsert else "put_tensor_with_parallelism"
        if writer_partition is not None:
            axes = _writer_axes(writer_partition)
            if axes is None:
                _log.error("%s: writer_partition must provide rank, size, and split_dim", what)
                return INVALID_PARAMS
        else:
            axes = _axes(parallelism)
        if axes is None:
            target = key
        else:
            why = _check_axes(axes, what)
            if why:
                _log.error("%s", why)
                return INVALID_PARAMS
            target = _layout_key(key, axes)
        if upsert:
            return self.upsert_pub_tensor(target, tensor, config)
        return self.pub_tensor(target, tensor, config)

    def put_tensor_with_parallelism(
        self, key: str, tensor, parallelism=None, config=None, writer_partition=None
    ) -> int:
        """Stores `tensor` as this writer's part of a parallel layout (`parallelism`, or a
        `writer_partition` ``{rank, size, split_dim}``); with neither, whole under `key`.
        0, or -600 for an invalid layout."""
        return self._parallel_write(False, key, tensor, parallelism, config, writer_partition)

    def upsert_tensor_with_parallelism(
        self, key: str, tensor, parallelism=None, config=None, writer_partition=None
    ) -> int:
        """put_tensor_with_parallelism, replacing the current value."""
        return self._parallel_write(True, key, tensor, parallelism, config, writer_partition)

    def batch_put_tensor_with_parallelism(
        self, keys: List[str], tensors_list: list, parallelisms=None, config=None,
        writer_partitions=None,
    ) -> List[int]:
        """put_tensor_with_parallelism for each key (one layout each, or one for all)."""
        return self._batch_parallel(False, keys, tensors_list, parallelisms, config,
                                    writer_partitions)

    def batch_upsert_tensor_with_parallelism(
        self, keys: List[str], tensors_list: list, parallelisms=None, config=None,
        writer_partitions=None,
    ) -> List[int]:
        """upsert_tensor_with_parallelism for each key."""
        return self._batch_parallel(True, keys, tensors_list, parallelisms, config,
                                    writer_partitions)

    def _batch_parallel(self, upsert, keys, tensors, pars, config, wps):
        keys, tensors = list(keys), list(tensors)
        n = len(keys)
        if len(tensors) != n:
            _log.error("batch tensor call: %d keys for %d tensors", n, len(tensors))
            return [INVALID_PARAMS] * n
        pars = _per_item(pars, n)
        wps = _per_item(wps, n)
        if pars is None or wps is None:
            return [INVALID_PARAMS] * n
        return [
            self._parallel_write(upsert, k, t, p, config, w)
            for k, t, p, w in zip(keys, tensors, pars, wps)
        ]

    def _tensor_at(self, buffer_ptr: int, size: int):
        s = _s()
        return s._decode_at(s._torch(), buffer_ptr, size)

    def put_tensor_with_parallelism_from(
        self, key: str, buffer_ptr: int, size: int, parallelism=None, config=None,
        writer_partition=None,
    ) -> int:
        """put_tensor_with_parallelism of the tensor in a buffer laid out as get_tensor_into
        leaves it (header, then data)."""
        t = self._tensor_at(buffer_ptr, size)
        if t is None:
            return INVALID_PARAMS
        return self.put_tensor_with_parallelism(key, t, parallelism, config, writer_partition)

    def upsert_tensor_with_parallelism_from(
        self, key: str, buffer_ptr: int, size: int, parallelism=None, config=None,
        writer_partition=None,
    ) -> int:
        """upsert_tensor_with_parallelism of the tensor in a buffer (see put_tensor_from)."""
        t = self._tensor_at(buffer_ptr, size)
        if t is None:
            return INVALID_PARAMS
        return self.upsert_tensor_with_parallelism(key, t, parallelism, config, writer_partition)

    def batch_put_tensor_with_parallelism_from(
        self, keys: List[str], buffer_ptrs: List[int], sizes: List[int], parallelisms=None,
        config=None, writer_partitions=None,
    ) -> List[int]:
        """put_tensor_with_parallelism_from for each key."""
        return self._batch_parallel_from(False, keys, buffer_ptrs, sizes, parallelisms, config,
                                         writer_partitions)

    def batch_upsert_tensor_with_parallelism_from(
        self, keys: List[str], buffer_ptrs: List[int], sizes: List[int], parallelisms=None,
        config=None, writer_partitions=None,
    ) -> List[int]:
        """upsert_tensor_with_parallelism_from for each key."""
        return self._batch_parallel_from(True, keys, buffer_ptrs, sizes, parallelisms, config,
                                         writer_partitions)

    def _batch_parallel_from(self, upsert, keys, ptrs, sizes, pars, config, wps):
        keys, ptrs, sizes = list(keys), list(ptrs), list(sizes)
        if not (len(keys) == len(ptrs) == len(sizes)):
            return [INVALID_PARAMS] * len(keys)
        tensors = [self._tensor_at(p, n) for p, n in zip(ptrs, sizes)]
        out = [INVALID_PARAMS] * len(keys)
        good = [i for i, t in enumerate(tensors) if t is not None]
        pars, wps = _per_item(pars, len(keys)), _per_item(wps, len(keys))
        if pars is None or wps is None:
            return out
        for i in good:
            out[i] = self._parallel_write(upsert, keys[i], tensors[i], pars[i], config, wps[i])
        return out

    # -- parallel reads ----------------------------------------------------------------------

    def _stored_shards(self, base: str) -> int:
        """How many shards ``{base}_tp_{r}`` exist, from rank 0 on."""
        keys = [f"{base}_tp_{r}" for r in range(_MAX_PROBED_SHARDS)]
        found = self.batch_is_exist(keys)
        return next((i for i, f in enumerate(found) if f != 1), len(found))

    def _full(self, base: str, split_dim: int):
        torch = _s()._torch()
        n = self._stored_shards(base)
        if n == 0:
            return self.get_tensor(base)
        parts = self.batch_get_tensor([f"{base}_tp_{r}" for r in range(n)])
        missing = [r for r, p in enumerate(parts) if p is None]
        if missing:
            _log.error("parallel read: missing shard %s_tp_%d", base, missing[0])
            return None
        try:
            return torch.cat(parts, dim=split_dim)
        except (RuntimeError, IndexError) as e:
            _log.error("parallel read of %r: shards do not join: %s", base, e)
            return None

    def get_tensor_with_parallelism(self, key: str, target=None):
        """The tensor of `key` as `target` (a ReadTarget) asks: as stored (default), the
        shards joined (``full``), or this reader's shard (``shard``). None when missing."""
        mode = "as_stored" if target is None else getattr(target, "mode", "as_stored")
        mode = str(mode).lower()
        axes = None if target is None else _axes(getattr(target, "parallelism", None))
        if axes:
            why = _check_axes(axes, "get_tensor_with_parallelism")
            if why:
                _log.error("%s", why)
                return None
        if mode == "as_stored":
            return self.get_tensor(key if not axes else _layout_key(key, axes))
        base = key if not axes else _base_key(key, axes)
        tp = next((a for a in axes or [] if a.kind == "tp"), None)
        dim = 0 if tp is None or tp.split_dim is None else int(tp.split_dim)
        if mode == "full":
            return self._full(base, dim)
        if mode == "shard":
            if tp is None:
                _log.error("get_tensor_with_parallelism: shard mode needs a TP axis")
                return None
            stored = self._stored_shards(base)
            if stored == tp.size:
                return self.get_tensor(f"{base}_tp_{tp.rank}")
            if stored == 0:
                # Shards written by some ranks only (rank 0 missing): this rank's own, if any.
                own = self.get_tensor(f"{base}_tp_{tp.rank}")
                if own is not None:
                    return own
            whole = self._full(base, dim)
            if whole is None:
                return None
            try:
                return whole.tensor_split(tp.size, dim=dim)[tp.rank].contiguous()
            except (RuntimeError, IndexError) as e:
                _log.error("get_tensor_with_parallelism %r: %s", key, e)
                return None
        _log.error("get_tensor_with_parallelism: unsupported ReadTarget mode %r", mode)
        return None

    def batch_get_tensor_with_parallelism(self, keys: List[str], targets=None) -> list:
        """get_tensor_with_parallelism for each key (one target each, or one for all)."""
        keys = list(keys)
        ts = _per_item(targets, len(keys))
        if ts is None:
            return [None] * len(keys)
        return [self.get_tensor_with_parallelism(k, t) for k, t in zip(keys, ts)]

    def get_tensor_with_parallelism_into(
        self, key: str, buffer_ptr: int, size: int, target=None
    ):
        """get_tensor_with_parallelism, written into the caller's buffer as get_tensor_into
        writes it (header, then data); a tensor over that memory, or None."""
        s = _s()
        torch = s._torch()
        t = self.get_tensor_with_parallelism(key, target)
        if t is None:
            return None
        header, data = s._encode(torch, t)
        need = len(header) + data.nbytes
        if need > size:
            _log.error("get_tensor_with_parallelism_into %r: %d bytes do not fit %d", key, need,
                       size)
            return None
        from mooncake import _store  # noqa: PLC0415

        try:
            _store._copy_to_ptr(buffer_ptr, header)
            _store._copy_to_ptr(buffer_ptr + len(header), data)
        except ValueError as e:
            _log.error("get_tensor_with_parallelism_into %r: %s", key, e)
            return None
        return s._decode_at(torch, buffer_ptr, need)

    def batch_get_tensor_with_parallelism_into(
        self, keys: List[str], buffer_ptrs: List[int], sizes: List[int], targets=None
    ) -> list:
        """get_tensor_with_parallelism_into for each key."""
        keys, ptrs, sizes = list(keys), list(buffer_ptrs), list(sizes)
        ts = _per_item(targets, len(keys))
        if ts is None or not (len(keys) == len(ptrs) == len(sizes)):
            return [None] * len(keys)
        return [
            self.get_tensor_with_parallelism_into(k, p, n, t)
            for k, p, n, t in zip(keys, ptrs, sizes, ts)
        ]

    # -- tensors from raw buffers ------------------------------------------------------------

    def _checked_from(self, what, key, ptr, size) -> bool:
        if self._tensor_at(ptr, size) is None:
            _log.error("%s %r: the buffer does not hold a tensor (header, then data)", what, key)
            return False
        return True

    def put_tensor_from(self, key: str, buffer_ptr: int, size: int) -> int:
        """Stores a tensor from registered memory laid out as get_tensor_into leaves it (the
        header, then the data), with no copy. 0, or -600 when it does not hold a tensor."""
        if not self._checked_from("put_tensor_from", key, buffer_ptr, size):
            return INVALID_PARAMS
        return self.put_from(key, buffer_ptr, size)

    def upsert_tensor_from(self, key: str, buffer_ptr: int, size: int) -> int:
        """put_tensor_from, replacing the current value."""
        if not self._checked_from("upsert_tensor_from", key, buffer_ptr, size):
            return INVALID_PARAMS
        return self.upsert_from(key, buffer_ptr, size)

    def batch_put_tensor_from(
        self, keys: List[str], buffer_ptrs: List[int], sizes: List[int]
    ) -> List[int]:
        """put_tensor_from for each key."""
        return self._batch_from(False, keys, buffer_ptrs, sizes)

    def batch_upsert_tensor_from(
        self, keys: List[str], buffer_ptrs: List[int], sizes: List[int]
    ) -> List[int]:
        """upsert_tensor_from for each key."""
        return self._batch_from(True, keys, buffer_ptrs, sizes)

    def _batch_from(self, upsert, keys, ptrs, sizes):
        keys, ptrs, sizes = list(keys), list(ptrs), list(sizes)
        if not (len(keys) == len(ptrs) == len(sizes)):
            return [INVALID_PARAMS] * len(keys)
        out = [INVALID_PARAMS] * len(keys)
        good = [i for i in range(len(keys))
                if self._checked_from("batch tensor from", keys[i], ptrs[i], sizes[i])]
        if good:
            call = self.batch_upsert_from if upsert else self.batch_put_from
            codes = call([keys[i] for i in good], [ptrs[i] for i in good],
                         [sizes[i] for i in good])
            for i, c in zip(good, codes):
                out[i] = c
        return out

    def put_tensor_with_tp_from(
        self, key: str, buffer_ptr: int, size: int, tp_rank: int = 0, tp_size: int = 1,
        split_dim: int = 0,
    ) -> int:
        """put_tensor_with_tp of the whole tensor held in a buffer (header, then data)."""
        t = self._tensor_at(buffer_ptr, size)
        if t is None:
            return INVALID_PARAMS
        return self.put_tensor_with_tp(key, t, tp_rank, tp_size, split_dim)

    def batch_put_tensor_with_tp_from(
        self, base_keys: List[str], buffer_ptrs: List[int], sizes: List[int], tp_rank: int = 0,
        tp_size: int = 1, split_dim: int = 0,
    ) -> List[int]:
        """put_tensor_with_tp_from for each key."""
        keys, ptrs, sizes = list(base_keys), list(buffer_ptrs), list(sizes)
        if not (len(keys) == len(ptrs) == len(sizes)):
            return [INVALID_PARAMS] * len(keys)
        return [
            self.put_tensor_with_tp_from(k, p, n, tp_rank, tp_size, split_dim)
            for k, p, n in zip(keys, ptrs, sizes)
        ]

    # -- tensor upserts ----------------------------------------------------------------------

    def upsert_tensor(self, key: str, tensor) -> int:
        """Stores a tensor under `key`, replacing the current value."""
        return self.upsert_pub_tensor(key, tensor)

    def upsert_pub_tensor(self, key: str, tensor, config=None) -> int:
        """upsert_tensor with a replication config."""
        s = _s()
        try:
            header, data = s._encode(s._torch(), tensor)
        except ValueError as e:
            _log.error("upsert_tensor %r: %s", key, e)
            return INVALID_PARAMS
        if config is None:
            return self.upsert_parts(key, header, data)
        return self.upsert_parts(key, header, data, config=config)

    def batch_upsert_tensor(self, keys: List[str], tensors_list: list) -> List[int]:
        """upsert_tensor for each key."""
        return self.batch_upsert_pub_tensor(keys, tensors_list)

    def batch_upsert_pub_tensor(
        self, keys: List[str], tensors_list: list, config=None
    ) -> List[int]:
        """upsert_pub_tensor for each key."""
        keys, tensors_list = list(keys), list(tensors_list)
        if len(keys) != len(tensors_list):
            return [INVALID_PARAMS] * len(keys)
        return [self.upsert_pub_tensor(k, t, config) for k, t in zip(keys, tensors_list)]

    # -- CUDA --------------------------------------------------------------------------------

    def get_tensor_into_cuda(self, key: str, tensor) -> int:
        """Reads the tensor of `key` into a preallocated CUDA tensor of as many elements and
        the same dtype: the bytes read, -704 when missing, -600 for a tensor that does not
        fit or is not on a CUDA device, -1012 when this machine has no CUDA."""
        torch = _s()._torch()
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor must be a torch.Tensor, not {type(tensor).__name__}")
        if not torch.cuda.is_available():
            _log.error("get_tensor_into_cuda: CUDA is not available on this machine")
            return NOT_SUPPORTED
        if not tensor.is_cuda:
            _log.error("get_tensor_into_cuda: the destination is not a CUDA tensor")
            return INVALID_PARAMS
        src = self.get_tensor(key)
        if src is None:
            return OBJECT_NOT_FOUND
        if src.dtype != tensor.dtype or src.numel() != tensor.numel():
            _log.error("get_tensor_into_cuda %r: stored %s%s, destination %s%s", key, src.dtype,
                       tuple(src.shape), tensor.dtype, tuple(tensor.shape))
            return INVALID_PARAMS
        tensor.copy_(src.reshape(tensor.shape))
        return src.numel() * src.element_size()

    def batch_get_tensor_into_cuda(self, keys: List[str], tensors_list: list) -> List[int]:
        """get_tensor_into_cuda for each key."""
        keys, tensors_list = list(keys), list(tensors_list)
        if len(keys) != len(tensors_list):
            return [INVALID_PARAMS] * len(keys)
        return [self.get_tensor_into_cuda(k, t) for k, t in zip(keys, tensors_list)]

    # -- safetensors -------------------------------------------------------------------------

    def save_tensor_to_safetensor(self, key: str, file_name: Optional[str] = None) -> int:
        """Writes the tensor of `key` to a safetensors file (`file_name`, else the key) as one
        tensor named after the key: 0, -704 when missing, -1103 when the file cannot be
        written."""
        t = self.get_tensor(key)
        if t is None:
            return OBJECT_NOT_FOUND
        path = key if file_name is None else str(file_name)
        try:
            _write_safetensors(path, {key: t})
        except (OSError, ValueError) as e:
            _log.error("save_tensor_to_safetensor %r -> %s: %s", key, path, e)
            return FILE_WRITE_FAIL
        return OK

    def load_tensor_from_safetensor(self, key: Any = None, file_name: str = None):
        """Reads a tensor from a safetensors file and stores it under `key` (the file name when
        None): the tensor named `key` in the file, else its first tensor (with a warning).
        The tensor, or None when the file cannot be read or the put fails."""
        if file_name is None:
            raise TypeError("load_tensor_from_safetensor() missing argument 'file_name'")
        try:
            tensors = _read_safetensors(str(file_name))
        except (OSError, ValueError, KeyError) as e:
            _log.error("load_tensor_from_safetensor %s: %s", file_name, e)
            return None
        if not tensors:
            _log.error("load_tensor_from_safetensor %s: the file holds no tensor", file_name)
            return None
        store_key = str(file_name) if key is None else str(key)
        if store_key in tensors:
            t = tensors[store_key]
        else:
            name, t = next(iter(tensors.items()))
            if key is not None:
                _log.warning("load_tensor_from_safetensor: no tensor %r in %s; using %r",
                             store_key, file_name, name)
        rc = self.upsert_tensor(store_key, t)
        if rc != OK:
            _log.error("load_tensor_from_safetensor: storing %r failed (%d)", store_key, rc)
            return None
        return t


def _per_item(value, n: int):
    """`value` for each of `n` items: a list of n, or one value (or None) for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            _log.error("batch tensor call: %d layouts for %d keys", len(value), n)
            return None
        return list(value)
    return [value] * n


# safetensors: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
# data_offsets}}, then the data.
_ST_DTYPES = {
    "float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16", "int8": "I8",
    "uint8": "U8", "int16": "I16", "uint16": "U16", "int32": "I32", "uint32": "U32",
    "int64": "I64", "uint64": "U64", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def _write_safetensors(path: str, tensors: dict) -> None:
    torch = _s()._torch()
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        code = _ST_DTYPES.get(str(t.dtype).replace("torch.", ""))
        if code is None:
            raise ValueError(f"dtype {t.dtype} has no safetensors name")
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": code, "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def _read_safetensors(path: str) -> dict:
    torch = _s()._torch()
    by_code = {v: k for k, v in _ST_DTYPES.items()}
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError("not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise ValueError("not a safetensors file (header past the end)")
    header = json.loads(blob[8 : 8 + n].decode())
    data = memoryview(blob)[8 + n :]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = getattr(torch, by_code.get(meta["dtype"], ""), None)
        if dtype is None:
            raise ValueError(f"tensor {name!r}: unsupported dtype {meta['dtype']}")
        start, end = meta["data_offsets"]
        if not (0 <= start <= end <= len(data)):
            raise ValueError(f"tensor {name!r}: data outside the file")
        raw = torch.frombuffer(bytearray(data[start:end]), dtype=torch.uint8)
        out[name] = raw.view(dtype).reshape(meta["shape"])
    return out
