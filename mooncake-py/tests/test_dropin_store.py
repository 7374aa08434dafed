"""The store calls beyond put/get that upstream 0.3.13.post1 has: ranged reads and writes, put
and get sessions, replica clearing, health, the segment calls, and setup's optional settings."""

from __future__ import annotations

import ctypes

import pytest

from conftest import MASTER, METADATA

np = pytest.importorskip("numpy")


@pytest.fixture
def reg(store):
    """A registered 1 MiB numpy buffer of `store`: (array, address)."""
    buf = np.zeros(1 << 20, dtype=np.uint8)
    ptr = buf.ctypes.data
    assert store.register_buffer(ptr, buf.nbytes) == 0
    yield buf, ptr
    store.unregister_buffer(ptr)


def test_get_into_ranges(store, reg, uniq):
    buf, p = reg
    assert store.put(uniq + "a", bytes(range(100))) == 0
    assert store.put(uniq + "b", bytes(range(50, 150))) == 0
    r = store.get_into_ranges(
        [p + 4096], [[uniq + "a", uniq + "b"]], [[[0, 10], [20]]], [[[5, 50], [0]]],
        [[[3, 4], [6]]],
    )
    assert r == [[[3, 4], [6]]]
    assert list(buf[4096:4099]) == [5, 6, 7]
    assert list(buf[4106:4110]) == [50, 51, 52, 53]
    assert list(buf[4116:4122]) == [50, 51, 52, 53, 54, 55]
    # A missing key, a range past the end, mismatched shapes.
    assert store.get_into_ranges([p], [[uniq + "zz"]], [[[0]]], [[[0]]], [[[1]]]) == [[[-704]]]
    assert store.get_into_ranges([p], [[uniq + "a"]], [[[0]]], [[[98]]], [[[5]]]) == [[[-600]]]
    bad = store.get_into_ranges([p], [[uniq + "a", uniq + "b"]], [[[0]]], [[[0]]], [[[1]]])
    assert all(c == -600 for per_key in bad[0] for c in per_key)
    # A destination that is not memory of this process: an error, not a crash.
    assert store.get_into_ranges([8], [[uniq + "a"]], [[[0]]], [[[0]]], [[[4]]]) == [[[-600]]]


def test_get_session_and_ranged_reads(store, reg, uniq):
    buf, p = reg
    k = uniq + "g"
    assert store.put(k, bytes(range(100))) == 0
    # Without a session: -600.
    assert store.batch_get_into_multi_buffer_ranges([k], [[p]], [[4]], [[0]]) == [-600]
    assert store.batch_get_session_start([k, uniq + "missing"]) == [0, -704]
    got = store.batch_get_into_multi_buffer_ranges([k], [[p, p + 100]], [[4, 6]], [[10, 90]])
    assert got == [10]
    assert list(buf[:4]) == [10, 11, 12, 13] and list(buf[100:106]) == [90, 91, 92, 93, 94, 95]
    assert store.batch_get_into_multi_buffer_ranges([k], [[p]], [[20]], [[90]]) == [-600]
    assert store.batch_get_session_end([k, uniq + "never"]) == 0
    assert store.batch_get_into_multi_buffer_ranges([k], [[p]], [[4]], [[0]]) == [-600]


def test_put_session(store, reg, uniq):
    buf, p = reg
    buf[:100] = np.arange(100, dtype=np.uint8)
    s1, s2, s3 = uniq + "s1", uniq + "s2", uniq + "s3"
    assert store.put(uniq + "old", b"x") == 0
    assert store.batch_put_session_start([s1, s2, uniq + "old", s3], [100, 20, 5, 0]) == [
        0, 0, -705, -600]
    assert store.batch_put_session_start([s1], [10]) == [-600]  # already open
    # Invisible until the end.
    assert store.batch_is_exist([s1, s2]) == [0, 0]
    assert store.batch_put_from_multi_buffer_ranges([s1], [[p, p + 50]], [[50, 50]],
                                                    [[0, 50]]) == [100]
    assert store.batch_put_from_multi_buffer_ranges([s2], [[p]], [[5]], [[18]]) == [-600]
    assert store.batch_put_from_multi_buffer_ranges([uniq + "none"], [[p]], [[1]], [[0]]) == [-600]
    assert store.batch_put_session_end([s1, uniq + "none"]) == [0, -600]
    assert store.get(s1) == bytes(range(100))
    assert store.batch_put_session_revoke([s2, uniq + "none"]) == [0, -600]
    assert store.is_exist(s2) == 0
    # A partly written session stores zeros where nothing was written.
    assert store.batch_put_session_start([s3], [10]) == [0]
    assert store.batch_put_from_multi_buffer_ranges([s3], [[p + 10]], [[3]], [[0]]) == [3]
    assert store.batch_put_session_end([s3]) == [0]
    assert store.get(s3) == bytes([10, 11, 12]) + bytes(7)


def test_batch_replica_clear(store, uniq):
    a, b = uniq + "a", uniq + "b"
    assert store.put_batch([a, b], [b"1" * 10, b"2" * 10]) == 0
    assert store.batch_replica_clear([]) == []
    # Replicas on another segment only: nothing to clear.
    assert store.batch_replica_clear([a], "127.0.0.1:1") == []
    assert store.is_exist(a) == 1
    seg = store.get_replica_desc(b)[0].get_memory_descriptor().buffer_descriptor
    assert store.batch_replica_clear([b, uniq + "missing"], seg.transport_endpoint) == [b]
    assert store.is_exist(b) == 0


def test_batch_replica_clear_without_segment_skips_leased(store, uniq):
    k, leased = uniq + "free", uniq + "leased"
    assert store.put_batch([k, leased], [b"1", b"2"]) == 0
    assert store.get(leased) == b"2"  # takes a read lease
    assert store.batch_replica_clear([k, leased]) == [k]
    assert store.batch_is_exist([k, leased]) == [0, 1]


def test_health_check(master):
    from mooncake.store import MooncakeDistributedStore

    s = MooncakeDistributedStore()
    assert s.health_check() == 1
    assert s.setup("localhost", METADATA, 16 << 20, 16 << 20, "tcp", "", MASTER) == 0
    assert s.health_check() == 0
    assert s.close() == 0
    assert s.health_check() == 1


def test_health_check_master_gone(tmp_path):
    """A master that stopped answering: 2, within a bounded time."""
    import socket
    import subprocess
    import time

    from conftest import master_exe, stop, wait_ports
    from mooncake.store import MooncakeDistributedStore

    ports = []
    for _ in range(2):
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            ports.append(sk.getsockname()[1])
    rpc, metrics = ports
    log = open(tmp_path / "master.log", "w")
    proc = subprocess.Popen([master_exe(), f"--rpc_port={rpc}", f"--metrics_port={metrics}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    s = MooncakeDistributedStore()
    try:
        wait_ports([rpc], proc)
        assert s.setup("localhost", "P2PHANDSHAKE", 0, 16 << 20, "tcp", "", f"localhost:{rpc}") == 0
        assert s.health_check() == 0
        stop(proc)
        t0 = time.monotonic()
        assert s.health_check() == 2
        assert time.monotonic() - t0 < 30
    finally:
        stop(proc)
        s.close()
        log.close()


def test_segment_calls_are_refused_cleanly(store):
    r = store.mount_segment("/dev/shm/nothing", 1 << 20)
    assert r == {"ret": -1012, "segment_ids": []}
    r = store.allocate_and_mount_segment(8 << 20)
    assert r["ret"] == -1012 and r["segment_ids"] == [] and r["allocated_size"] == 0
    assert store.unmount_segment(["nope"]) == -1
    assert store.unmount_segment([]) == 0
    assert store.unmount_and_free_segment(["nope"]) == -1
    assert store.unmount_local_disk_segment() == 0
    assert store.get_offload_rpc_read_count() == 0


def test_setup_optional_settings(master):
    from mooncake.store import MooncakeDistributedStore

    s = MooncakeDistributedStore()
    base = dict(local_hostname="localhost", metadata_server=METADATA,
                global_segment_size="16MB", local_buffer_size="16MB", protocol="tcp",
                master_server_addr=MASTER)
    # Upstream's optional keys, off: accepted; keys upstream does not know: ignored.
    ok = dict(base, enable_ssd_offload=False, ssd_offload_path="/tmp/x", tenant_id="default",
              enable_client_http_server="false", client_http_port=9300, ipc_socket_path="",
              some_future_key=1)
    assert s.setup(ok) == 0
    assert s.close() == 0
    # Turned on: refused with NOT_SUPPORTED.
    for k, v in (("enable_ssd_offload", True), ("enable_client_http_server", "true"),
                 ("tenant_id", "team-a")):
        assert s.setup(dict(base, **{k: v})) == -1012, k
    assert s.setup("localhost", METADATA, 16 << 20, 16 << 20, "tcp", "", MASTER, None,
                   enable_ssd_offload=True) == -1012
    assert s.setup("localhost", METADATA, 16 << 20, 16 << 20, "tcp", "", MASTER, None,
                   enable_ssd_offload=False, tenant_id="default") == 0
    s.close()


def test_local_buffer_size_zero(master, uniq):
    """No staging buffer: zero-copy calls work, byte calls of a value refuse with -600."""
    from mooncake.store import MooncakeDistributedStore

    s = MooncakeDistributedStore()
    assert s.setup("localhost", METADATA, 16 << 20, 0, "tcp", "", MASTER) == 0
    try:
        buf = np.arange(64, dtype=np.uint8)
        p = buf.ctypes.data
        assert s.register_buffer(p, buf.nbytes) == 0
        assert s.put_from(uniq + "z", p, 64) == 0
        out = np.zeros(64, dtype=np.uint8)
        assert s.register_buffer(out.ctypes.data, 64) == 0
        assert s.get_into(uniq + "z", out.ctypes.data, 64) == 64
        assert bytes(out) == bytes(buf)
        assert s.put(uniq + "b", b"abc") == -600
        s.unregister_buffer(p)
        s.unregister_buffer(out.ctypes.data)
    finally:
        s.close()


def test_hostname_without_port_gets_one_in_upstream_range(master):
    from mooncake.store import MooncakeDistributedStore

    stores = []
    try:
        for _ in range(2):
            s = MooncakeDistributedStore()
            assert s.setup("localhost", "P2PHANDSHAKE", 16 << 20, 16 << 20, "tcp", "", MASTER) == 0
            stores.append(s)
        names = [s.get_hostname() for s in stores]
        for n in names:
            host, port = n.rsplit(":", 1)
            assert host == "localhost" and 12300 <= int(port) <= 14300
        assert names[0] != names[1]
    finally:
        for s in stores:
            s.close()


def test_replicate_config_fields():
    from mooncake.store import ObjectDataType, ReplicateConfig
    import mooncake.store as ms

    c = ReplicateConfig()
    assert c.soft_pin_ttl_ms is None
    assert c.data_type == ObjectDataType.UNKNOWN
    assert c.group_ids is None
    assert (c.dfs_replica_num, c.nof_replica_num, c.preferred_nof_segments) == (0, 0, [])
    c.data_type = ObjectDataType.KVCACHE
    c.group_ids = ["g1", "g2"]
    c.soft_pin_ttl_ms = 1000
    assert (c.data_type, c.group_ids, c.soft_pin_ttl_ms) == (ObjectDataType.KVCACHE, ["g1", "g2"],
                                                             1000)
    c.soft_pin_ttl_ms = None
    assert c.soft_pin_ttl_ms is None
    assert [int(v) for v in (ms.UNKNOWN, ms.KVCACHE, ms.TENSOR, ms.WEIGHT, ms.SAMPLE,
                             ms.ACTIVATION, ms.GRADIENT, ms.OPTIMIZER_STATE, ms.METADATA,
                             ms.GENERAL)] == list(range(10))
    assert ObjectDataType.GENERAL.name == "GENERAL" and ObjectDataType.GENERAL.value == 9


def test_put_with_new_config_fields(store, uniq):
    from mooncake.store import ObjectDataType, ReplicateConfig

    c = ReplicateConfig()
    c.data_type = ObjectDataType.WEIGHT
    c.group_ids = ["g"]
    assert store.put(uniq + "w", b"w" * 10, c) == 0
    assert store.get(uniq + "w") == b"w" * 10


def test_replica_descriptor_local_disk(store, uniq):
    assert store.put(uniq + "d", b"d") == 0
    (d,) = store.get_replica_desc(uniq + "d")
    assert d.is_memory_replica() and not d.is_local_disk_replica()


def test_subclass_takes_attributes(store):
    store.my_attr = 5
    assert store.my_attr == 5


def test_nof_register_and_allocator_functions():
    from mooncake.store import MooncakeDistributedNoFRegister, get_alloc_func_addr, \
        get_free_func_addr

    r = MooncakeDistributedNoFRegister()
    assert r.real_register("a", 1, "b", 2, 3, 4, "c") == -1012
    assert r.real_unregister_by_endpoint("a", 1, "b", 2, "c") == -1012
    alloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)(
        get_alloc_func_addr())
    free = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                            ctypes.c_void_p)(get_free_func_addr())
    p = alloc(8192, 0, None)
    assert p and p % 4096 == 0
    ctypes.memset(p, 7, 8192)
    assert ctypes.string_at(p + 8000, 4) == b"\x07" * 4
    free(p, 8192, 0, None)
    free(12345, 1, 0, None)  # not ours: logged, ignored
