"""mooncake.p2p.P2PStore: the seed's P2P API from Python, with stores of one process sharing the
in-process catalog (metadata_uri="memory")."""

from __future__ import annotations

import ast
import ctypes
import gc
import os
import pathlib
import signal
import threading
import time
import uuid

import numpy as np
import pytest

import mooncake.p2p as p2p
from mooncake.p2p import P2PError, P2PStore

HOST = "127.0.0.1"


def stores(n):
    return [P2PStore("memory", HOST) for _ in range(n)]


@pytest.fixture
def trio():
    s = stores(3)
    yield s
    for x in s:
        x.close()


@pytest.fixture
def name():
    return f"ckpt/{uuid.uuid4().hex}"


def payload(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_register_list_and_pull_numpy(trio, name):
    origin, a, b = trio
    # Two buffers (one float32 array): the file is their concatenation.
    first = payload(3 << 20, 1)
    second = np.random.default_rng(2).random(1 << 18, dtype=np.float32)
    origin.register(name, [first, second], max_shard_size=1 << 20)

    [info] = a.list(name)
    assert info.name == name
    assert info.max_shard_size == 1 << 20
    assert info.size_list == [3 << 20, 1 << 20]
    assert info.total_size == 4 << 20
    assert name in [p.name for p in origin.list()]
    assert a.list("no-such-prefix/") == []

    want = np.concatenate([first, second.view(np.uint8)])
    dst = np.zeros(4 << 20, dtype=np.uint8)
    assert a.get_replica(name, [dst]) is None
    assert np.array_equal(dst, want)

    # The third pulls into two buffers of another split, from the origin and the replica.
    d1, d2 = np.zeros(1 << 20, dtype=np.uint8), np.zeros(3 << 20, dtype=np.uint8)
    b.get_replica(name, [d1, d2])
    assert np.array_equal(np.concatenate([d1, d2]), want)

    # The origin leaves; the replicas still serve and the payload is still listed.
    origin.unregister(name)
    assert [p.name for p in a.list(name)] == [name]
    a.delete_replica(name)
    b.delete_replica(name)
    assert a.list(name) == []


def test_raw_pointer_pairs(trio, name):
    origin, a, _ = trio
    src = ctypes.create_string_buffer(b"x" * 5000 + b"y" * 3000, 8000)
    origin.register(name, [(ctypes.addressof(src), 5000), (ctypes.addressof(src) + 5000, 3000)])
    dst = ctypes.create_string_buffer(8000)
    a.get_replica(name, [(ctypes.addressof(dst), 8000)])
    assert dst.raw == src.raw


def test_duplicate_name_refused_without_force_create(trio, name):
    origin, other, reader = trio
    old, new = payload(1 << 16, 3), payload(1 << 16, 4)
    origin.register(name, [old])
    with pytest.raises(P2PError, match="already exists") as e:
        other.register(name, [new])
    assert e.value.kind == "already_exists"
    with pytest.raises(P2PError) as e:
        origin.register(name, [payload(1 << 16, 5)])
    assert e.value.kind == "already_exists"

    other.register(name, [new], force_create=True)
    dst = np.zeros(1 << 16, dtype=np.uint8)
    reader.get_replica(name, [dst])
    assert np.array_equal(dst, new)
    # The replaced origin no longer owns the name.
    with pytest.raises(P2PError) as e:
        origin.unregister(name)
    assert e.value.kind == "not_registered_here"


def test_pull_twice_refused(trio, name):
    origin, a, _ = trio
    src = payload(1 << 20, 6)
    origin.register(name, [src])
    dst = np.zeros_like(src)
    a.get_replica(name, [dst])
    with pytest.raises(P2PError, match="already") as e:
        a.get_replica(name, [np.zeros_like(src)])
    assert e.value.kind == "already_pulled"
    with pytest.raises(P2PError) as e:
        origin.get_replica(name, [np.zeros_like(src)])
    assert e.value.kind == "already_pulled"
    # After delete_replica it may be pulled again, into the same buffer.
    a.delete_replica(name)
    dst[:] = 0
    a.get_replica(name, [dst])
    assert np.array_equal(dst, src)
    with pytest.raises(P2PError) as e:
        origin.delete_replica(name)
    assert e.value.kind == "no_replica"


def test_missing_names(trio, name):
    a = trio[0]
    with pytest.raises(P2PError) as e:
        a.get_replica(name, [np.zeros(16, dtype=np.uint8)])
    assert e.value.kind == "not_found"
    with pytest.raises(P2PError) as e:
        a.unregister(name)
    assert e.value.kind == "not_registered_here"
    with pytest.raises(P2PError) as e:
        a.delete_replica(name)
    assert e.value.kind == "no_replica"


def test_bad_buffers_raise(trio, name):
    origin, a, _ = trio
    good = payload(4096, 7)
    bad = [
        ([(0, 4096)], ValueError, "null"),
        ([(1 << 20, 4096)], ValueError, "not mapped"),  # first MiB: never mapped
        ([(good.ctypes.data, 1 << 40)], ValueError, "not mapped"),
        ([(good.ctypes.data, -1)], ValueError, "non-negative"),
        ([(good.ctypes.data, 0)], ValueError, "empty"),
        ([(2**64 - 16, 4096)], ValueError, "wraps"),
        ([(good.ctypes.data, "x")], TypeError, "two integers"),
        ([], ValueError, "empty"),
        (None, TypeError, "list"),
        ("abc", TypeError, "list"),
        ((good.ctypes.data, 4096), TypeError, "wrap"),
        ([object()], TypeError, "expected"),
        ([good[::2]], ValueError, "contiguous"),
        ([np.zeros(0, dtype=np.uint8)], ValueError, "empty"),
    ]
    for buffers, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            origin.register(name, buffers)
        with pytest.raises(exc, match=msg):
            a.get_replica(name, buffers)
    assert origin.list(name) == []

    # Peers may write registered memory: read-only buffers and mappings are refused.
    readonly_map = next(
        int(line.split("-")[0], 16)
        for line in open("/proc/self/maps")
        if line.split()[1].startswith("r-")
    )
    for store in (origin, a):
        for call in (store.register, store.get_replica):
            with pytest.raises(ValueError, match="read-only"):
                call(name, [bytes(4096)])
            with pytest.raises(ValueError, match="not readable and writable"):
                call(name, [(readonly_map, 4096)])

    origin.register(name, [good])
    # The wrong size is refused, not overrun.
    with pytest.raises(ValueError, match="4096"):
        a.get_replica(name, [np.zeros(100, dtype=np.uint8)])
    with pytest.raises(ValueError):
        origin.register(name + "/x", [good], max_shard_size=0)
    # A buffer overlapping (not inside) one registered already is refused.
    wide = payload(8192, 8)
    origin.register(name + "/a", [wide[:4096]])
    with pytest.raises(ValueError, match="overlaps"):
        origin.register(name + "/b", [wide[2048:]])
    # After all those failures the store still works.
    dst = np.zeros(4096, dtype=np.uint8)
    a.get_replica(name, [dst])
    assert np.array_equal(dst, good)


def test_buffers_shared_and_released(trio, name):
    origin, a, _ = trio
    buf = payload(1 << 16, 9)
    # The same memory under two names, and a slice of it under a third.
    origin.register(name + "/1", [buf])
    origin.register(name + "/2", [buf])
    origin.register(name + "/3", [buf[:1024]])
    origin.unregister(name + "/1")
    dst = np.zeros(1 << 16, dtype=np.uint8)
    a.get_replica(name + "/2", [dst])
    assert np.array_equal(dst, buf)
    origin.unregister(name + "/2")
    origin.unregister(name + "/3")
    # Fully unregistered: the memory can be registered again, also with another extent.
    origin.register(name + "/4", [buf[100:]])
    a.delete_replica(name + "/2")
    a.get_replica(name + "/4", [dst[100:]])
    assert np.array_equal(dst[100:], buf[100:])


def test_pulls_from_threads_release_the_gil(name):
    origin, *readers = stores(4)
    try:
        src = payload(8 << 20, 10)
        origin.register(name, [src], max_shard_size=1 << 20)
        dsts = [np.zeros_like(src) for _ in readers]
        errors = []

        def pull(s, d):
            try:
                s.get_replica(name, [d])
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=pull, args=(s, d)) for s, d in zip(readers, dsts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert all(np.array_equal(d, src) for d in dsts)
    finally:
        for s in [origin, *readers]:
            s.close()


def test_gil_released_while_pulling(trio, name):
    origin, a, _ = trio
    src = payload(64 << 20, 13)
    origin.register(name, [src], max_shard_size=8 << 20)
    dst = np.zeros_like(src)
    t = threading.Thread(target=a.get_replica, args=(name, [dst]))
    spins = 0
    t.start()
    while t.is_alive():
        spins += 1
    t.join()
    assert np.array_equal(dst, src)
    # Holding the GIL for the whole pull would leave this thread a few switch intervals.
    assert spins > 10_000, spins


def test_dropped_store_is_closed_in_the_background(name):
    s = P2PStore("memory", HOST)
    s.register(name, [payload(1 << 16, 14)])
    del s
    gc.collect()
    with P2PStore("memory", HOST) as other:
        deadline = time.monotonic() + 10
        while other.list(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert other.list(name) == []


def test_forked_child_cannot_use_the_parents_store(trio, name):
    origin = trio[0]
    origin.register(name, [payload(4096, 15)])
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            origin.list()
        except P2PError as e:
            code = 0 if (e.kind == "closed" and "fork" in str(e)) else 2
        except BaseException:  # noqa: BLE001
            code = 3
        try:
            origin.close()  # forgets the parent's store, touches nothing
        except BaseException:  # noqa: BLE001
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [p.name for p in origin.list(name)] == [name]


def test_close(name):
    origin, a = stores(2)
    src = payload(1 << 16, 11)
    origin.register(name, [src])
    dst = np.zeros_like(src)
    a.get_replica(name, [dst])
    assert "P2PStore" in repr(origin)
    origin.close()
    origin.close()  # idempotent
    assert "closed" in repr(origin)
    for call in (
        lambda: origin.list(),
        lambda: origin.register(name + "x", [src]),
        lambda: origin.get_replica(name, [dst]),
        lambda: origin.unregister(name),
        lambda: origin.delete_replica(name),
    ):
        with pytest.raises(P2PError) as e:
            call()
        assert e.value.kind == "closed"
    # The replica still serves after the origin left; closing it removes the payload.
    with P2PStore("memory", HOST) as b:
        d2 = np.zeros_like(src)
        b.get_replica(name, [d2])
        assert np.array_equal(d2, src)
    a.close()
    with P2PStore("memory", HOST) as c:
        assert c.list(name) == []


def test_pull_timeout(trio, name):
    origin = trio[0]
    src = payload(64 << 20, 12)
    origin.register(name, [src], max_shard_size=4 << 20)
    with P2PStore("memory", HOST, pull_timeout=0.001) as hasty:
        dst = np.zeros_like(src)
        with pytest.raises(P2PError, match="timed out") as e:
            hasty.get_replica(name, [dst])
        assert e.value.kind == "timeout"
    # The failed pull left nothing behind: another store pulls the whole file from the origin.
    patient = trio[1]
    patient.get_replica(name, [dst])
    assert np.array_equal(dst, src)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="pull_timeout"):
            P2PStore("memory", HOST, pull_timeout=bad)


def test_call_timeout_cancel_and_ctrl_c_end_a_pull_cleanly(trio, name):
    origin, a, _ = trio
    src = payload(8 << 20, 16)
    origin.register(name, [src], max_shard_size=1 << 20)
    src ^= 0xFF  # every piece now fails verification: pulls stall until ended
    dst = np.zeros_like(src)
    started = time.monotonic()
    with pytest.raises(P2PError, match="timed out") as e:
        a.get_replica(name, [dst], timeout=0.3)
    assert e.value.kind == "timeout"
    assert time.monotonic() - started < 10
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            a.get_replica(name, [dst], timeout=bad)

    # cancel() from another thread.
    assert not a.cancel(name), "nothing is being pulled"
    errors = []

    def pull():
        try:
            a.get_replica(name, [dst])
        except P2PError as err:
            errors.append(err)

    t = threading.Thread(target=pull)
    t.start()
    deadline = time.monotonic() + 10
    while not a.cancel(name) and time.monotonic() < deadline:
        time.sleep(0.01)
    t.join(10)
    assert not t.is_alive()
    assert [err.kind for err in errors] == ["cancelled"]

    # Ctrl-C while the main thread waits: KeyboardInterrupt, after the pull withdrew.
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            a.get_replica(name, [dst], timeout=30)
    finally:
        timer.cancel()

    # Nothing was left half-done: with sound bytes again, the same store pulls the file.
    src ^= 0xFF
    a.get_replica(name, [dst])
    assert np.array_equal(dst, src)


def test_constructor_arguments():
    with pytest.raises(ValueError, match="not supported"):
        P2PStore("etcd://127.0.0.1:2379", HOST)
    with pytest.raises(ValueError):
        P2PStore("memory", "127.0.0.1:notaport")
    # Upstream's positions and names.
    s = P2PStore(metadata_uri="local", local_segment_name=HOST, nic_priority_matrix="")
    assert s.segment_name.startswith(HOST + ":")
    s.close()
    P2PStore("memory", HOST, "{}").close()
    with pytest.raises(ValueError, match="protocol"):
        P2PStore("memory", HOST, protocol="rdma")


def test_quic_needs_a_certificate(monkeypatch):
    for var in ("MC_TLS_CA", "MC_TLS_CERT", "MC_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="MC_TLS_CA"):
        P2PStore("memory", HOST, protocol="quic")


def test_torch_tensors(trio, name):
    torch = pytest.importorskip("torch")
    origin, a, _ = trio
    src = torch.arange(1 << 16, dtype=torch.float32)
    origin.register(name, [src])
    dst = torch.zeros(1 << 16, dtype=torch.float32)
    a.get_replica(name, [dst])
    assert torch.equal(src, dst)
    with pytest.raises(ValueError, match="contiguous"):
        a.get_replica(name + "x", [torch.zeros(8, 8).t()])


class _Device:
    def __init__(self, type_):
        self.type = type_


class TensorLike:
    """What the binding asks of a torch tensor, over a numpy array (torch is optional here)."""

    def __init__(self, array, device="cpu", contiguous=True):
        self.array, self.device, self.contiguous = array, _Device(device), contiguous

    def data_ptr(self):
        return self.array.ctypes.data

    def numel(self):
        return self.array.size

    def element_size(self):
        return self.array.itemsize

    def is_contiguous(self):
        return self.contiguous


def test_tensor_like_objects(trio, name):
    origin, a, _ = trio
    src = np.arange(1 << 14, dtype=np.float64)
    origin.register(name, [TensorLike(src)])
    dst = np.zeros_like(src)
    a.get_replica(name, [TensorLike(dst)])
    assert np.array_equal(src, dst)
    with pytest.raises(ValueError, match="only CPU"):
        a.get_replica(name + "x", [TensorLike(dst, device="cuda")])
    with pytest.raises(ValueError, match="contiguous"):
        a.get_replica(name + "x", [TensorLike(dst, contiguous=False)])


def test_stub_matches_module():
    stub = pathlib.Path(p2p.__file__).with_suffix(".pyi")
    tree = ast.parse(stub.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert set(p2p.__all__) <= set(classes)
    for cls, node in classes.items():
        obj = getattr(p2p, cls)
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and not item.name.startswith("__"):
                assert hasattr(obj, item.name), f"{cls}.{item.name}"
    methods = {n for n in dir(P2PStore) if not n.startswith("_")}
    assert methods <= {i.name for i in classes["P2PStore"].body if isinstance(i, ast.FunctionDef)}
