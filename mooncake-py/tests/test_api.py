"""Return conventions of each method (UPSTREAM_FACTS.md's table) and the value classes."""

from __future__ import annotations

import time
import uuid

import ctypes

import numpy as np
import pytest

import mooncake.store as ms
from conftest import MASTER, METADATA, new_store
from mooncake.store import (
    MooncakeDistributedStore,
    MooncakeHostMemAllocator,
    ReplicaStatus,
    ReplicateConfig,
    SoftPinAction,
    TaskStatus,
    TaskType,
    bind_to_numa_node,
)


# --- setup -----------------------------------------------------------------------------------


def test_setup_forms(master, monkeypatch):
    s = MooncakeDistributedStore()
    assert s.setup({"local_hostname": "localhost", "metadata_server": "P2PHANDSHAKE",
                    "global_segment_size": "16MB", "local_buffer_size": "1GB",
                    "protocol": "tcp", "rdma_devices": "", "master_server_addr": MASTER}) == 0
    assert s.get_hostname().startswith("localhost:")
    assert s.close() == 0
    assert s.setup({"local_hostname": "localhost", "metadata_server": "P2PHANDSHAKE",
                    "global_segment_size": "50%", "master_server_addr": MASTER}) != 0
    assert s.setup("localhost", METADATA, 16 << 20, 16 << 20, "rdma", "", MASTER) != 0
    assert s.setup("localhost", "etcd://nowhere", 16 << 20, 16 << 20, "tcp", "", MASTER) == -600
    assert s.setup("localhost", METADATA, 16 << 20, 16 << 20, "tcp", "", "127.0.0.1:1") == -1
    monkeypatch.setenv("MOONCAKE_MASTER", MASTER)
    monkeypatch.setenv("MOONCAKE_GLOBAL_SEGMENT_SIZE", "16MB")
    monkeypatch.setenv("MOONCAKE_LOCAL_BUFFER_SIZE", "16MB")
    assert s.setup() == 0
    assert s.put("envkey" + uuid.uuid4().hex, b"x") == 0
    assert s.close() == 0
    assert s.init_all("tcp", "", 16 << 20) == 0
    assert s.close() == 0
    # No real client there (tests/test_dummy.py covers the dummy mode).
    assert s.setup_dummy(1 << 20, 1 << 20, "127.0.0.1:1") == -1


def test_setup_size_spellings(master):
    """Sizes as upstream's string_to_byte_size reads them (powers of 1024, any case, optional
    space); a size it would read as 0 is -600 here."""
    s = MooncakeDistributedStore()
    for seg, buf in [("16 MiB", "8m"), ("16mb", "8192K"), ("0.015625GB", 8 << 20)]:
        assert s.setup("localhost", "P2PHANDSHAKE", seg, buf, "tcp", "", MASTER) == 0, (seg, buf)
        assert s.close() == 0
    for bad in ["", "-1GB", "4PB", "1e9", "GB", "99999999999TB", "50%"]:
        assert s.setup("localhost", "P2PHANDSHAKE", bad, 8 << 20, "tcp", "", MASTER) == -600, bad


# --- writes and reads -------------------------------------------------------------------------


def test_put_get_conventions(store, uniq):
    k = uniq + "a"
    assert store.put(k, b"one") == 0
    assert store.put(k, b"two") == 0  # exists: success, not overwritten
    assert store.get(k) == b"one"
    assert store.upsert(k, b"three") == 0
    assert store.get(k) == b"three"
    assert store.get(uniq + "missing") == b""
    assert store.put("", b"x") == -600
    assert store.put(uniq + "e", b"") == -600
    cfg = ReplicateConfig()
    cfg.replica_num = 0
    assert store.put(uniq + "z", b"x", cfg) == -600
    assert store.put(uniq + "big", b"x" * ((32 << 20) + 1)) == -600  # > local_buffer_size
    assert store.put(uniq + "ba", bytearray(b"ba")) == 0
    assert store.put(uniq + "np", np.arange(4, dtype=np.float32)) == 0
    assert store.get(uniq + "np") == np.arange(4, dtype=np.float32).tobytes()


def test_parts_and_batches(store, uniq):
    assert store.put_parts(uniq + "p", b"Hello, ", memoryview(b"World"), bytearray(b"!")) == 0
    assert store.get(uniq + "p") == b"Hello, World!"
    assert store.upsert_parts(uniq + "p", b"a", b"b") == 0
    assert store.get(uniq + "p") == b"ab"
    keys = [uniq + f"b{i}" for i in range(3)]
    assert store.put_batch(keys, [b"v0", b"v1", b"v2"]) == 0
    assert store.get_batch(keys + [uniq + "nope"]) == [b"v0", b"v1", b"v2", b""]
    assert store.upsert_batch(keys, [b"w0", b"w1", b"w2"]) == 0
    assert store.get_batch(keys) == [b"w0", b"w1", b"w2"]
    assert store.put_batch(keys, [b"x"]) == -600
    assert store.batch_is_exist(keys + [uniq + "nope"]) == [1, 1, 1, 0]
    assert store.is_exist(keys[0]) == 1 and store.is_exist(uniq + "nope") == 0


def test_buffer_handle(store, uniq):
    data = np.random.default_rng(1).integers(0, 255, 10_000, dtype=np.uint8)
    assert store.put(uniq + "buf", data) == 0
    buf = store.get_buffer(uniq + "buf")
    assert buf is not None and len(buf) == 10_000 and buf.size() == 10_000
    arr = np.array(buf, copy=False)
    assert arr.ctypes.data == buf.ptr()  # zero-copy
    assert np.array_equal(arr, data)
    assert np.frombuffer(buf, dtype=np.uint8).ctypes.data == buf.ptr()
    assert bytes(memoryview(buf)) == data.tobytes()
    assert store.get_buffer(uniq + "missing") is None
    handles = store.batch_get_buffer([uniq + "buf", uniq + "missing"])
    assert handles[1] is None and bytes(handles[0]) == data.tobytes()
    del arr, buf  # the handle outlives the array view safely


def test_size_and_remove(store, uniq):
    k = uniq + "r"
    assert store.put(k, b"12345") == 0
    assert store.get_size(k) == 5
    assert store.get_size(uniq + "missing") == -704
    assert store.get(k) == b"12345"  # grants a read lease
    assert store.remove(k) == -706
    assert store.remove(k, force=True) == 0
    assert store.remove(k) == -704
    keys = [uniq + f"x{i}" for i in range(3)]
    assert store.put_batch(keys, [b"1", b"2", b"3"]) == 0
    assert store.batch_remove(keys[:2] + [uniq + "nope"]) == [0, 0, -704]
    for i in range(4):
        assert store.put(uniq + f"session_{i}", b"s") == 0
    assert store.remove_by_regex("^" + uniq + "session_.*") == 4
    assert store.remove_by_regex("^" + uniq + "session_.*") == 0
    assert store.remove_all() >= 1


def test_zero_copy(store, uniq):
    src = np.arange(1 << 16, dtype=np.uint8)
    dst = np.zeros(1 << 17, dtype=np.uint8)
    assert store.register_buffer(src.ctypes.data, src.nbytes) == 0
    assert store.register_buffer(dst.ctypes.data, dst.nbytes) == 0
    try:
        assert store.put_from(uniq + "z", src.ctypes.data, src.nbytes) == 0
        assert store.get_into(uniq + "z", dst.ctypes.data, dst.nbytes) == src.nbytes
        assert np.array_equal(dst[: src.nbytes], src)
        assert store.get_into(uniq + "missing", dst.ctypes.data, dst.nbytes) == -704
        assert store.get_into(uniq + "z", dst.ctypes.data, 100) == -600  # too small
        assert store.upsert_from(uniq + "z", src.ctypes.data, 10) == 0
        assert store.get_size(uniq + "z") == 10
        keys = [uniq + "z1", uniq + "z2"]
        assert store.batch_put_from(keys, [src.ctypes.data, src.ctypes.data + 100], [100, 200]) == [0, 0]
        assert store.batch_upsert_from(keys, [src.ctypes.data, src.ctypes.data], [50, 60]) == [0, 0]
        assert store.batch_get_into(keys + [uniq + "no"], [dst.ctypes.data, dst.ctypes.data + 1000, dst.ctypes.data + 2000], [1000, 1000, 1000]) == [50, 60, -704]
        # Multi-buffer forms; the optional 4th argument of the get is accepted.
        parts = [[src.ctypes.data, src.ctypes.data + 1000], [src.ctypes.data + 5]]
        sizes = [[10, 20], [7]]
        assert store.batch_put_from_multi_buffers([uniq + "m1", uniq + "m2"], parts, sizes) == [0, 0]
        outs = [[dst.ctypes.data, dst.ctypes.data + 100], [dst.ctypes.data + 200]]
        assert store.batch_get_into_multi_buffers([uniq + "m1", uniq + "m2"], outs, sizes, True) == [30, 7]
        assert np.array_equal(dst[:10], src[:10]) and np.array_equal(dst[100:120], src[1000:1020])
        # put_from_with_metadata stores the metadata, then the data.
        meta = np.array([42, 100], dtype=np.int32)
        assert store.register_buffer(meta.ctypes.data, meta.nbytes) == 0
        assert store.put_from_with_metadata(uniq + "md", src.ctypes.data, meta.ctypes.data, 16, meta.nbytes) == 0
        assert store.get(uniq + "md") == meta.tobytes() + src[:16].tobytes()
        assert store.unregister_buffer(meta.ctypes.data) == 0
    finally:
        assert store.unregister_buffer(src.ctypes.data) == 0
        assert store.unregister_buffer(dst.ctypes.data) == 0
    assert store.unregister_buffer(src.ctypes.data) != 0


def test_unmapped_or_read_only_buffers_are_refused(store, uniq):
    import mmap

    # Not memory of this process: refused with -600, and nothing later can touch it (upstream
    # returns 0 and the next get_into kills the interpreter).
    assert store.register_buffer(0x10000, 4096) == -600
    assert store.put(uniq + "x", b"v" * 4096) == 0
    assert store.get_into(uniq + "x", 0x10000, 4096) == -600
    # Read-only memory: peers may write registered memory, so refused too.
    ro = mmap.mmap(-1, 4096, prot=mmap.PROT_READ)
    view = np.frombuffer(ro, dtype=np.uint8)
    assert store.register_buffer(view.ctypes.data, 4096) == -600
    del view
    ro.close()


def test_no_space_is_minus_200(store, uniq):
    big = np.zeros(8 << 30, dtype=np.uint8)  # 8 GiB, lazily mapped: never touched
    assert store.register_buffer(big.ctypes.data, big.nbytes) == 0
    try:
        assert store.put_from(uniq + "huge", big.ctypes.data, big.nbytes) == -200
    finally:
        store.unregister_buffer(big.ctypes.data)


def test_mem_pool(store, uniq):
    ptr = store.alloc_from_mem_pool(1 << 20)
    assert ptr != 0 and ptr % 4096 == 0
    assert store.put_from(uniq + "pool", ptr, 4096) == 0
    assert store.get_into(uniq + "pool", ptr + 8192, 4096) == 4096
    assert store.alloc_from_mem_pool(0) == 0


def test_replica_descriptors(store, uniq):
    assert store.put(uniq + "d", b"descr") == 0
    descs = store.get_replica_desc(uniq + "d")
    assert len(descs) == 1
    d = descs[0]
    assert d.status == ReplicaStatus.COMPLETE and d.status == 3
    assert d.is_memory_replica() and not d.is_disk_replica()
    bd = d.get_memory_descriptor().buffer_descriptor
    assert bd.size == 5 and bd.buffer_address > 0 and ":" in bd.transport_endpoint
    with pytest.raises(ValueError):
        d.get_disk_descriptor()
    assert store.get_replica_desc(uniq + "missing") == []
    m = store.batch_get_replica_desc([uniq + "d", uniq + "missing"])
    assert list(m) == [uniq + "d"] and len(m[uniq + "d"]) == 1


def wait_task(s, task_id, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp, code = s.query_task(task_id)
        assert code == 0
        if resp.status in (TaskStatus.SUCCESS, TaskStatus.FAILED):
            return resp
        time.sleep(0.2)
    raise AssertionError("task did not finish")


def test_copy_and_move_tasks(store, uniq):
    other = new_store()
    third = new_store()
    try:
        cfg = ReplicateConfig()
        cfg.preferred_segment = store.get_hostname()
        assert store.put(uniq + "c", b"copy me", cfg) == 0
        task_id, code = store.create_copy_task(uniq + "c", [other.get_hostname()])
        assert code == 0 and isinstance(task_id, uuid.UUID) and task_id.int != 0
        resp = wait_task(store, task_id)
        assert resp.status == TaskStatus.COMPLETED and resp.type == TaskType.REPLICA_COPY
        assert resp.id == task_id and resp.message == ""
        ends = {d.get_memory_descriptor().buffer_descriptor.transport_endpoint for d in store.get_replica_desc(uniq + "c")}
        assert ends == {store.get_hostname(), other.get_hostname()}
        task_id, code = store.create_move_task(uniq + "c", other.get_hostname(), third.get_hostname())
        assert code == 0
        resp = wait_task(store, task_id)
        assert resp.status == TaskStatus.SUCCESS and resp.type == TaskType.REPLICA_MOVE
        assert other.get(uniq + "c") == b"copy me"
        # Failures: zero id and the code; unknown task: (None, -1400).
        task_id, code = store.create_copy_task(uniq + "missing", [other.get_hostname()])
        assert task_id == uuid.UUID(int=0) and code < 0
        assert store.query_task(uuid.uuid4()) == (None, -1400)
        assert store.query_task(str(uuid.uuid4()))[1] == -1400
    finally:
        other.close()
        third.close()


def test_close_then_calls_return_codes(master, uniq):
    s = new_store()
    assert s.put(uniq + "c", b"x") == 0
    assert s.close() == 0
    assert s.close() == 0
    assert s.put(uniq + "c", b"x") == -1010
    assert s.get(uniq + "c") == b""
    assert s.get_buffer(uniq + "c") is None
    assert s.is_exist(uniq + "c") < 0
    assert s.get_size(uniq + "c") < 0
    assert s.get_into(uniq + "c", 4096, 10) < 0
    assert s.remove(uniq + "c") < 0
    assert s.batch_is_exist([uniq + "c"])[0] < 0
    assert s.register_buffer(4096, 10) < 0
    assert s.get_replica_desc(uniq + "c") == []
    assert s.query_task(uuid.uuid4()) [0] is None
    assert s.get_hostname() == ""
    fresh = MooncakeDistributedStore()  # never set up
    assert fresh.put("k", b"v") == -1010 and fresh.get("k") == b""


# --- value classes ----------------------------------------------------------------------------


def test_enums_and_module_values():
    assert ms.FAILED == TaskStatus.FAILED == 2
    assert ms.PROCESSING == TaskStatus.PROCESSING == 1
    assert ms.SUCCESS == 3 and ms.PENDING == 0 and ms.COMPLETE == ReplicaStatus.COMPLETE == 3
    assert ms.REPLICA_COPY == TaskType.REPLICA_COPY == 0 and ms.REPLICA_MOVE == 1
    assert ms.UNDEFINED == 0 and ms.INITIALIZED == 1 and ms.REMOVED == 4
    assert TaskStatus.COMPLETED == TaskStatus.SUCCESS
    assert [int(v) for v in (ReplicaStatus.UNDEFINED, ReplicaStatus.FAILED)] == [0, 5]
    assert SoftPinAction.DISABLE.value == 2 and SoftPinAction.ENABLE.name == "ENABLE"
    assert {TaskStatus.FAILED: 1}[TaskStatus.FAILED] == 1


def test_replicate_config_fields():
    c = ReplicateConfig()
    assert (c.replica_num, c.with_soft_pin, c.with_hard_pin, c.preferred_segment,
            c.preferred_segments, c.prefer_alloc_in_same_node, c.soft_pin_action,
            c.soft_pin_ttl_ms) == (1, False, False, "", [], False, SoftPinAction.PRESERVE, None)
    c.replica_num = 3
    c.with_soft_pin = True
    c.with_hard_pin = True
    c.preferred_segment = "localhost:12345"
    c.preferred_segments = ["a:1", "b:2"]
    c.prefer_alloc_in_same_node = True
    c.soft_pin_action = SoftPinAction.ENABLE
    c.soft_pin_ttl_ms = 5000
    assert c.replica_num == 3 and c.preferred_segments == ["a:1", "b:2"]
    c.prefer_alloc_in_same_node = "False"
    assert c.prefer_alloc_in_same_node is False
    assert "replica_num=3" in repr(c)
    assert ReplicateConfig(replica_num=2).replica_num == 2
    with pytest.raises(TypeError):
        c.replica_num = "three"
    with pytest.raises(TypeError):
        ReplicateConfig(no_such_field=1)


def test_host_allocator():
    a = MooncakeHostMemAllocator()
    ptr = a.alloc(1 << 20)
    assert ptr != 0 and ptr % 4096 == 0
    assert a.free(ptr) == 0
    assert a.free(ptr) != 0
    assert a.free(12345) != 0
    assert a.alloc(0) == 0


def test_bind_to_numa_node():
    import os
    import threading

    result = {}

    def run():
        result["ok"] = bind_to_numa_node(0)
        result["cpus"] = os.sched_getaffinity(0)
        result["bad"] = bind_to_numa_node(4096)
        result["neg"] = bind_to_numa_node(-1)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert result["ok"] == 0 and result["cpus"]
    if os.path.exists("/sys/devices/system/node"):
        assert result["bad"] != 0 and result["neg"] != 0
