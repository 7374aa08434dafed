"""Byte-range reads and writes, put and get sessions, replica clearing and the segment calls of
``MooncakeDistributedStore`` (mixed into the class by ``mooncake.store``).

Sessions live in this client:

* A put session (``batch_put_session_start``) holds each key's bytes in this process until
  ``batch_put_session_end`` stores them (a put: a key that exists stays as it is) or
  ``batch_put_session_revoke`` drops them. Until the end the object is not visible to anyone,
  as upstream; unlike upstream, the space is taken on the master at the end, not at the start,
  so an end can fail with -200 when the cluster is full.
* A get session (``batch_get_session_start``) records which keys exist; ranged reads of a key
  are allowed while its session is open. Each ranged call reads the current value once.
"""

from __future__ import annotations

import logging
import threading
from typing import Dict, List, Sequence

_log = logging.getLogger("mooncake.store")

OK = 0
INVALID_PARAMS = -600
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
NOT_SUPPORTED = -1012


def _native():
    from mooncake import _store  # noqa: PLC0415

    return _store


class _Sessions:
    """The open put and get sessions of one store."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.puts: Dict[str, bytearray] = {}
        self.gets: Dict[str, int] = {}


class RangeCalls:
    """The calls of this module, for a class that has the native store methods."""

    def _sessions(self) -> _Sessions:
        s = self.__dict__.get("_mc_sessions")
        if s is None:
            s = self.__dict__.setdefault("_mc_sessions", _Sessions())
        return s

    # -- ranged reads ------------------------------------------------------------------------

    def get_into_ranges(
        self,
        buffer_ptrs: List[int],
        all_keys: List[List[str]],
        all_dst_offsets: List[List[List[int]]],
        all_src_offsets: List[List[List[int]]],
        all_sizes: List[List[List[int]]],
    ) -> List[List[List[int]]]:
        """Copies byte ranges of objects into buffers: for buffer ``i``, key ``j`` of
        ``all_keys[i]`` and range ``k``, ``all_sizes[i][j][k]`` bytes from offset
        ``all_src_offsets[i][j][k]`` of the value to ``buffer_ptrs[i] +
        all_dst_offsets[i][j][k]``. The same nesting back: bytes copied per range, or a
        negative code (-704 missing key, -600 a range outside the value or bad arguments)."""
        n = len(buffer_ptrs)
        shape_ok = len(all_keys) == n and len(all_dst_offsets) == n
        shape_ok = shape_ok and len(all_src_offsets) == n and len(all_sizes) == n
        if shape_ok:
            for keys, dsts, srcs, sizes in zip(all_keys, all_dst_offsets, all_src_offsets, all_sizes):
                if not (len(keys) == len(dsts) == len(srcs) == len(sizes)):
                    shape_ok = False
                    break
                if any(not (len(d) == len(s) == len(z)) for d, s, z in zip(dsts, srcs, sizes)):
                    shape_ok = False
                    break
        if not shape_ok:
            _log.error("get_into_ranges: the argument lists do not have the same shape")
            return [
                [[INVALID_PARAMS] * max(1, _len_at(all_sizes, i, j)) for j in range(len(keys))]
                for i, keys in enumerate(all_keys)
            ]
        out = []
        for base, keys, dsts, srcs, sizes in zip(
            buffer_ptrs, all_keys, all_dst_offsets, all_src_offsets, all_sizes
        ):
            per_key = []
            for key, d, s, z in zip(keys, dsts, srcs, sizes):
                if any(v < 0 for v in (*d, *s, *z)):
                    per_key.append([INVALID_PARAMS] * len(z))
                    continue
                ranges = [(base + do, so, sz) for do, so, sz in zip(d, s, z)]
                per_key.append(self._read_ranges(key, ranges))
            out.append(per_key)
        return out

    def batch_get_into_multi_buffer_ranges(
        self,
        keys: List[str],
        all_buffer_ptrs: List[List[int]],
        all_sizes: List[List[int]],
        all_src_offsets: List[List[int]],
    ) -> List[int]:
        """Ranged reads within get sessions: buffer ``b`` of key ``i`` receives
        ``all_sizes[i][b]`` bytes from offset ``all_src_offsets[i][b]`` of the value. The total
        bytes read per key, or a negative code (-600 when the key has no open get session, a
        range is outside the value or a buffer is not memory of this process)."""
        n = len(keys)
        if not (len(all_buffer_ptrs) == n and len(all_sizes) == n and len(all_src_offsets) == n):
            _log.error("batch_get_into_multi_buffer_ranges: the argument lists differ in length")
            return [INVALID_PARAMS] * n
        sessions = self._sessions()
        out = []
        for key, ptrs, sizes, offs in zip(keys, all_buffer_ptrs, all_sizes, all_src_offsets):
            with sessions.lock:
                open_ = key in sessions.gets
            if not open_ or not (len(ptrs) == len(sizes) == len(offs)):
                if not open_:
                    _log.error("batch_get_into_multi_buffer_ranges: no get session for %r", key)
                out.append(INVALID_PARAMS)
                continue
            if any(v < 0 for v in (*sizes, *offs)):
                out.append(INVALID_PARAMS)
                continue
            codes = self._read_ranges(key, list(zip(ptrs, offs, sizes)))
            bad = next((c for c in codes if c < 0), None)
            out.append(bad if bad is not None else sum(codes))
        return out

    # -- get sessions ------------------------------------------------------------------------

    def batch_get_session_start(self, keys: List[str]) -> List[int]:
        """Opens a get session for each key: 0, or -704 for a key that does not exist."""
        keys = list(keys)
        found = self.batch_is_exist(keys) if keys else []
        sessions = self._sessions()
        out = []
        with sessions.lock:
            for key, f in zip(keys, found):
                if f == 1:
                    sessions.gets[key] = sessions.gets.get(key, 0) + 1
                    out.append(OK)
                else:
                    out.append(OBJECT_NOT_FOUND if f == 0 else f)
        return out

    def batch_get_session_end(self, keys: List[str]) -> int:
        """Closes the get sessions of `keys` (keys without one are ignored). 0."""
        sessions = self._sessions()
        with sessions.lock:
            for key in keys:
                sessions.gets.pop(key, None)
        return OK

    # -- put sessions ------------------------------------------------------------------------

    def batch_put_session_start(
        self, keys: List[str], sizes: List[int], config=None
    ) -> List[int]:
        """Opens a put session of ``sizes[i]`` bytes for each key: 0; -705 when the key
        exists, -600 for a size of 0, a repeated key or a key with an open session."""
        keys, sizes = list(keys), list(sizes)
        if len(keys) != len(sizes):
            _log.error("batch_put_session_start: %d keys for %d sizes", len(keys), len(sizes))
            return [INVALID_PARAMS] * len(keys)
        found = self.batch_is_exist(keys) if keys else []
        sessions = self._sessions()
        out = []
        with sessions.lock:
            for key, size, f in zip(keys, sizes, found):
                if f == 1:
                    out.append(OBJECT_ALREADY_EXISTS)
                elif not key or size <= 0 or key in sessions.puts:
                    if key in sessions.puts:
                        _log.error("put session already open for %r", key)
                    out.append(INVALID_PARAMS)
                else:
                    buf = bytearray(size)
                    sessions.puts[key] = buf
                    out.append(OK)
            if config is not None:
                self.__dict__.setdefault("_mc_session_configs", {}).update(
                    {k: config for k, c in zip(keys, out) if c == OK}
                )
        return out

    def batch_put_from_multi_buffer_ranges(
        self,
        keys: List[str],
        all_buffer_ptrs: List[List[int]],
        all_sizes: List[List[int]],
        all_dst_offsets: List[List[int]],
    ) -> List[int]:
        """Writes into open put sessions: buffer ``b`` of key ``i`` (``all_sizes[i][b]`` bytes
        of this process's memory) lands at offset ``all_dst_offsets[i][b]`` of the object. The
        bytes written per key, or -600 (no open session, a range outside the reserved size,
        memory that is not this process's)."""
        n = len(keys)
        if not (len(all_buffer_ptrs) == n and len(all_sizes) == n and len(all_dst_offsets) == n):
            _log.error("batch_put_from_multi_buffer_ranges: the argument lists differ in length")
            return [INVALID_PARAMS] * n
        copy_from = _native()._copy_from_ptr
        sessions = self._sessions()
        out = []
        for key, ptrs, sizes, offs in zip(keys, all_buffer_ptrs, all_sizes, all_dst_offsets):
            with sessions.lock:
                buf = sessions.puts.get(key)
            if buf is None or not (len(ptrs) == len(sizes) == len(offs)):
                if buf is None:
                    _log.error("batch_put_from_multi_buffer_ranges: no put session for %r", key)
                out.append(INVALID_PARAMS)
                continue
            if any(s < 0 or o < 0 or o + s > len(buf) for s, o in zip(sizes, offs)):
                _log.error("batch_put_from_multi_buffer_ranges: a range is outside %r", key)
                out.append(INVALID_PARAMS)
                continue
            total = 0
            try:
                for p, s, o in zip(ptrs, sizes, offs):
                    buf[o : o + s] = copy_from(p, s)
                    total += s
            except ValueError as e:
                _log.error("batch_put_from_multi_buffer_ranges %r: %s", key, e)
                out.append(INVALID_PARAMS)
                continue
            out.append(total)
        return out

    def batch_put_session_end(self, keys: List[str]) -> List[int]:
        """Stores the bytes of each key's put session and closes it: 0, -600 for a key without
        an open session, or the put's code."""
        sessions = self._sessions()
        configs = self.__dict__.get("_mc_session_configs", {})
        out = []
        for key in keys:
            with sessions.lock:
                buf = sessions.puts.pop(key, None)
                config = configs.pop(key, None)
            if buf is None:
                _log.error("batch_put_session_end: no put session for %r", key)
                out.append(INVALID_PARAMS)
                continue
            out.append(self.put(key, buf) if config is None else self.put(key, buf, config))
        return out

    def batch_put_session_revoke(self, keys: List[str]) -> List[int]:
        """Drops the put sessions of `keys`: 0, or -600 for a key without one."""
        sessions = self._sessions()
        configs = self.__dict__.get("_mc_session_configs", {})
        out = []
        with sessions.lock:
            for key in keys:
                configs.pop(key, None)
                out.append(OK if sessions.puts.pop(key, None) is not None else INVALID_PARAMS)
        return out

    # -- replicas and segments ---------------------------------------------------------------

    def batch_replica_clear(self, keys: List[str], segment_name: str = "") -> List[str]:
        """Drops the replicas of `keys` (those on `segment_name` only, when given) whose read
        lease has expired; the keys cleared. This store drops an object only when all its
        replicas go: a key with replicas on other segments as well is left as it is."""
        keys = list(keys)
        if not keys:
            return []
        if segment_name:
            descs = self.batch_get_replica_desc(keys)
            wanted = []
            for key in keys:
                reps = descs.get(key) or []
                on = [_segment_of(r) for r in reps]
                if reps and all(s == segment_name for s in on):
                    wanted.append(key)
            # Our own query above took a lease; what it guards against is another reader.
            codes = self.batch_remove(wanted, True) if wanted else []
            return [k for k, c in zip(wanted, codes) if c == OK]
        codes = self.batch_remove(keys, False)
        return [k for k, c in zip(keys, codes) if c == OK]

    def get_offload_rpc_read_count(self) -> int:
        """Reads served from upstream's SSD offload tier: always 0 (this store has none)."""
        return 0

    def mount_segment(
        self, path: str, size: int, offset: int = 0, protocol: str = "tcp", location: str = ""
    ) -> dict:
        """Mounting a further segment from a file is not supported by this store (each client
        contributes one segment, ``global_segment_size`` bytes, at setup): ``ret`` -1012."""
        _log.error("mount_segment(%r): extra segments are not supported by this store", path)
        return {"ret": NOT_SUPPORTED, "segment_ids": []}

    def allocate_and_mount_segment(
        self, size: int, protocol: str = "tcp", location: str = ""
    ) -> dict:
        """Mounting a further segment is not supported by this store (see mount_segment):
        ``ret`` -1012."""
        _log.error("allocate_and_mount_segment(%d): extra segments are not supported", size)
        return {"ret": NOT_SUPPORTED, "segment_ids": [], "allocated_size": 0}

    def unmount_segment(self, segment_ids: List[str], grace_period_seconds: int = 0) -> int:
        """Unmounts segments from mount_segment: none can exist here, so -1 (as upstream for
        an unknown id); 0 for an empty list."""
        if segment_ids:
            _log.error("unmount_segment: unknown segment ids %s", list(segment_ids))
            return -1
        return OK

    def unmount_and_free_segment(
        self, segment_ids: List[str], grace_period_seconds: int = 0
    ) -> int:
        """As unmount_segment (no extra segments exist here)."""
        return self.unmount_segment(segment_ids, grace_period_seconds)

    def unmount_local_disk_segment(self, grace_period_seconds: int = 0) -> int:
        """Drains upstream's local SSD segment: nothing to do without SSD offload, 0 (as
        upstream when offload is off)."""
        _log.info("unmount_local_disk_segment: SSD offload is not enabled")
        return OK


def _len_at(nested: Sequence, i: int, j: int) -> int:
    try:
        return len(nested[i][j])
    except (IndexError, TypeError):
        return 1


def _segment_of(desc) -> str:
    try:
        return desc.get_memory_descriptor().buffer_descriptor.transport_endpoint
    except Exception:  # noqa: BLE001 - a disk replica has no memory descriptor
        return ""
