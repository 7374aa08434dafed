"""Misuse: wrong types raise TypeError; raw pointers outside registered buffers return -600 and
touch no memory; nothing crashes the interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from mooncake.store import MooncakeDistributedStore, ReplicateConfig


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.put(123, b"x"),
        lambda s: s.put("k", "a str is not bytes"),
        lambda s: s.put("k", 123),
        lambda s: s.put("k", b"x", "not a config"),
        lambda s: s.get(None),
        lambda s: s.get_batch("not a list"),
        lambda s: s.put_batch(["k"], ["str"]),
        lambda s: s.put_parts("k", b"a", 5),
        lambda s: s.put_from("k", "ptr", 1),
        lambda s: s.get_into("k", 1.5, 1),
        lambda s: s.batch_put_from(["k"], ["p"], [1]),
        lambda s: s.register_buffer("x", 1),
        lambda s: s.is_exist(5),
        lambda s: s.remove(["k"]),
        lambda s: s.query_task(object()),
        lambda s: s.create_copy_task("k", 5),
        lambda s: s.setup(123, "P2PHANDSHAKE", 1, 1, "tcp", "", "localhost:50051"),
        lambda s: s.setup("localhost", "P2PHANDSHAKE", [1], 1, "tcp", "", "localhost:50051"),
    ],
)
def test_wrong_types_raise_type_error(store, call):
    with pytest.raises(TypeError):
        call(store)


def test_negative_pointer_is_refused(store):
    with pytest.raises((TypeError, OverflowError)):
        store.put_from("k", -1, 10)


def test_unregistered_pointers_touch_no_memory(store, uniq):
    assert store.put(uniq + "v", b"y" * 1000) == 0
    victim = np.zeros(4096, dtype=np.uint8)  # not registered
    assert store.get_into(uniq + "v", victim.ctypes.data, victim.nbytes) == -600
    assert not victim.any()
    assert store.put_from(uniq + "w", victim.ctypes.data, 100) == -600
    assert store.put_from(uniq + "w", 0x1000, 100) == -600  # unmapped address
    assert store.get_into(uniq + "v", 0x1000, 4096) == -600
    assert store.batch_get_into([uniq + "v"], [0x10], [4096]) == [-600]
    reg = np.zeros(4096, dtype=np.uint8)
    assert store.register_buffer(reg.ctypes.data, reg.nbytes) == 0
    try:
        # Starts inside, ends past the registration.
        assert store.get_into(uniq + "v", reg.ctypes.data + 4000, 1000) == -600
        assert store.put_from(uniq + "w", reg.ctypes.data + 4000, 1000) == -600
        assert store.batch_put_from_multi_buffers([uniq + "w"], [[reg.ctypes.data, 0x2000]], [[10, 10]]) == [-600]
        assert not reg.any()
        # Overlapping registrations are refused.
        assert store.register_buffer(reg.ctypes.data + 10, 10) != 0
    finally:
        store.unregister_buffer(reg.ctypes.data)
    assert store.get(uniq + "w") == b""


def test_noncontiguous_value_is_refused(store):
    a = np.arange(100, dtype=np.int32)[::2]
    with pytest.raises((BufferError, TypeError)):
        store.put("k", a)


def test_mismatched_lengths_return_codes(store, uniq):
    assert store.batch_put_from([uniq + "a", uniq + "b"], [4096], [1]) == [-600, -600]
    assert store.batch_get_into([uniq + "a"], [], []) == [-600]
    assert store.batch_put_from_multi_buffers([uniq + "a"], [[1, 2]], [[1]]) == [-600]


def test_calls_before_setup_return_codes():
    s = MooncakeDistributedStore()
    assert s.put("k", b"v") < 0
    assert s.get("k") == b""
    assert s.get_size("k") < 0
    assert s.is_exist("k") < 0
    assert s.put_from("k", 4096, 1) < 0
    assert s.batch_get_into(["k"], [4096], [1]) == [s.get_size("k")]
    assert s.remove_all() < 0
    assert s.alloc_from_mem_pool(4096) == 0
    assert s.close() == 0
    assert s.get_replica_desc("k") == [] and s.batch_get_replica_desc(["k"]) == {}
    assert s.create_copy_task("k", ["x"])[1] < 0


def test_setup_value_errors_return_codes(master):
    s = MooncakeDistributedStore()
    assert s.setup("localhost", "P2PHANDSHAKE", -5, 1 << 20, "tcp", "", "localhost:50051") == -600
    assert s.setup("localhost", "P2PHANDSHAKE", "lots", 1 << 20, "tcp", "", "localhost:50051") == -600
    assert s.setup({"local_hostname": "localhost"}) == -600  # no metadata_server
    # As upstream: an unknown key is ignored (here: still no metadata_server, so -600).
    assert s.setup({"bogus_key": 1, "local_hostname": "localhost"}) == -600
    cfg = ReplicateConfig()
    with pytest.raises(ValueError):
        cfg.prefer_alloc_in_same_node = "maybe"
