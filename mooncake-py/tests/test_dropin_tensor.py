"""Tensor calls beyond put/get: parallel layouts, tensors from raw buffers, tensor upserts,
safetensors files, CUDA reads on a machine without CUDA, and the buffer pools."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from mooncake.store import (  # noqa: E402
    HEADER_SIZE,
    BufferPool,
    ParallelAxis,
    ReadTarget,
    RegisteredBufferPool,
    TensorParallelism,
)


def par(rank, size=2, dim=0, kind="tp", **kw):
    ax = ParallelAxis()
    ax.kind, ax.rank, ax.size, ax.split_dim = kind, rank, size, dim
    for k, v in kw.items():
        setattr(ax, k, v)
    p = TensorParallelism()
    p.axes = [ax]
    return p


def target(mode, parallelism=None):
    t = ReadTarget()
    t.mode = mode
    t.parallelism = parallelism
    return t


def test_classes_defaults():
    a, t, r = ParallelAxis(), TensorParallelism(), ReadTarget()
    assert (a.kind, a.rank, a.size, a.split_dim, a.stage_id, a.expert_id) == (
        "", 0, 1, None, None, None)
    assert t.axes == [] and r.mode == "as_stored" and r.parallelism is None
    r.mode = "FULL"
    assert r.mode == "full"
    with pytest.raises(RuntimeError):
        r.mode = "bogus"


def test_tensor_parallel_write_and_reads(store, uniq):
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    k = uniq + "pt"
    assert store.put_tensor_with_parallelism(k, t[:2], par(0)) == 0
    assert store.put_tensor_with_parallelism(k, t[2:], par(1)) == 0
    assert store.batch_is_exist([k, k + "_tp_0", k + "_tp_1"]) == [0, 1, 1]
    assert torch.equal(store.get_tensor_with_parallelism(k, target("full", par(0))), t)
    assert torch.equal(store.get_tensor_with_parallelism(k, target("shard", par(1))), t[2:])
    # Re-split for a reader of another parallel size.
    assert torch.equal(store.get_tensor_with_parallelism(k, target("shard", par(1, size=4))),
                       t[1:2])
    assert torch.equal(store.get_tensor_with_parallelism(k, target("shard", par(0, size=1))), t)
    assert torch.equal(store.get_tensor_with_parallelism(k, target("as_stored", par(1))), t[2:])
    assert store.get_tensor_with_parallelism(uniq + "missing", target("full")) is None
    # put_tensor_with_tp's shards read back joined.
    assert store.put_tensor_with_tp(uniq + "tp", t, 0, 2, 1) == 0
    assert torch.equal(store.get_tensor_with_parallelism(uniq + "tp", target("full", par(0, dim=1))),
                       t)
    got = store.batch_get_tensor_with_parallelism([k, uniq + "nope"], target("full", par(0)))
    assert torch.equal(got[0], t) and got[1] is None


def test_parallel_layout_validation(store, uniq):
    t = torch.ones(4, 4)
    assert store.put_tensor_with_parallelism(uniq + "n", t) == 0
    assert torch.equal(store.get_tensor_with_parallelism(uniq + "n"), t)
    empty = TensorParallelism()
    assert store.put_tensor_with_parallelism(uniq + "e", t, empty) == -600
    assert store.put_tensor_with_parallelism(uniq + "x", t, par(0, kind="cp")) == -600
    assert store.put_tensor_with_parallelism(uniq + "x", t, par(2, size=2)) == -600
    assert store.put_tensor_with_parallelism(uniq + "x", t, par(0, dim=None)) == -600
    assert store.put_tensor_with_parallelism(uniq + "x", t, par(0, kind="dp")) == -600
    assert store.put_tensor_with_parallelism(uniq + "x", t, par(0, kind="pp", dim=None)) == -600
    assert store.put_tensor_with_parallelism(uniq + "x", t, par(0, kind="ep", dim=None)) == -600
    assert store.put_tensor_with_parallelism(uniq + "d", t, par(1, kind="dp", dim=None)) == 0
    assert store.put_tensor_with_parallelism(uniq + "p", t,
                                             par(1, kind="pp", dim=None, stage_id=3)) == 0
    assert store.is_exist(uniq + "p_pp_3") == 1
    # writer_partition: rank, size and split_dim all required.
    assert store.put_tensor_with_parallelism(uniq + "w", t, None, None, {"rank": 0}) == -600
    assert store.put_tensor_with_parallelism(uniq + "w", t, None, None,
                                             {"rank": 1, "size": 2, "split_dim": 0}) == 0
    assert store.is_exist(uniq + "w_tp_1") == 1
    # dict form of a layout.
    assert store.put_tensor_with_parallelism(
        uniq + "dict", t, {"axes": [{"kind": "tp", "rank": 0, "size": 1, "split_dim": 1}]}) == 0
    assert store.is_exist(uniq + "dict_tp_0") == 1
    codes = store.batch_put_tensor_with_parallelism([uniq + "b0", uniq + "b1"], [t, t],
                                                    [par(0), par(1)])
    assert codes == [0, 0]


def test_upsert_tensor_family(store, uniq):
    k = uniq + "u"
    a, b = torch.zeros(3), torch.ones(3)
    assert store.put_tensor(k, a) == 0
    assert store.put_tensor(k, b) == 0  # a put keeps the first value
    assert torch.equal(store.get_tensor(k), a)
    assert store.upsert_tensor(k, b) == 0
    assert torch.equal(store.get_tensor(k), b)
    assert store.upsert_pub_tensor(k, a * 2) == 0
    assert torch.equal(store.get_tensor(k), a * 2)
    assert store.batch_upsert_tensor([k, uniq + "u2"], [b, b]) == [0, 0]
    assert store.batch_upsert_pub_tensor([k], [b * 3]) == [0]
    assert torch.equal(store.get_tensor(k), b * 3)
    p = par(0, size=1)
    assert store.upsert_tensor_with_parallelism(k, a, p) == 0
    assert store.batch_upsert_tensor_with_parallelism([k], [b], p) == [0]
    assert torch.equal(store.get_tensor(k + "_tp_0"), b)


def test_tensor_from_buffers(store, uniq):
    t = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    src = uniq + "src"
    assert store.put_tensor(src, t) == 0
    size = HEADER_SIZE + t.numel() * 4
    buf = np.zeros(1 << 16, dtype=np.uint8)
    p = buf.ctypes.data
    assert store.register_buffer(p, buf.nbytes) == 0
    try:
        got = store.get_tensor_into(src, p, size)
        assert torch.equal(got, t)
        assert store.put_tensor_from(uniq + "f", p, size) == 0
        assert torch.equal(store.get_tensor(uniq + "f"), t)
        assert store.upsert_tensor_from(uniq + "f", p, size) == 0
        assert store.batch_put_tensor_from([uniq + "g"], [p], [size]) == [0]
        assert store.batch_upsert_tensor_from([uniq + "g"], [p], [size]) == [0]
        assert torch.equal(store.get_tensor(uniq + "g"), t)
        # Not a tensor layout: refused.
        assert store.put_tensor_from(uniq + "bad", p + 1, 10) == -600
        assert store.put_tensor_with_tp_from(uniq + "tpf", p, size, 0, 2, 0) == 0
        assert torch.equal(store.get_tensor(uniq + "tpf_tp_1"), t[2:])
        assert store.batch_put_tensor_with_tp_from([uniq + "tpg"], [p], [size], 0, 1, 0) == [0]
        assert store.put_tensor_with_parallelism_from(uniq + "pf", p, size, par(1)) == 0
        assert torch.equal(store.get_tensor(uniq + "pf_tp_1"), t)
        assert store.upsert_tensor_with_parallelism_from(uniq + "pf", p, size, par(1)) == 0
        assert store.batch_put_tensor_with_parallelism_from([uniq + "pg"], [p], [size],
                                                            par(0)) == [0]
        assert store.batch_upsert_tensor_with_parallelism_from([uniq + "pg"], [p], [size],
                                                               par(0)) == [0]
        # Parallel read into the caller's buffer.
        out = store.get_tensor_with_parallelism_into(uniq + "pf", p + 8192, 8192,
                                                     target("shard", par(1)))
        assert torch.equal(out, t)
        outs = store.batch_get_tensor_with_parallelism_into([uniq + "pf"], [p + 8192], [8],
                                                            target("shard", par(1)))
        assert outs == [None]  # does not fit
    finally:
        store.unregister_buffer(p)


def test_safetensors_round_trip(store, uniq, tmp_path):
    t = torch.randn(3, 5, dtype=torch.float32)
    k = uniq + "st"
    assert store.put_tensor(k, t) == 0
    path = tmp_path / "t.safetensors"
    assert store.save_tensor_to_safetensor(k, str(path)) == 0
    assert store.save_tensor_to_safetensor(uniq + "missing", str(path) + "2") == -704
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert b'"F32"' in raw[8:8 + n]
    assert store.remove(k, force=True) == 0  # the read above holds a lease
    got = store.load_tensor_from_safetensor(k, str(path))
    assert torch.equal(got, t) and torch.equal(store.get_tensor(k), t)
    # A key not in the file: the first tensor, stored under that key.
    got = store.load_tensor_from_safetensor(uniq + "other", str(path))
    assert torch.equal(got, t) and torch.equal(store.get_tensor(uniq + "other"), t)
    assert store.load_tensor_from_safetensor(uniq + "x", str(tmp_path / "absent")) is None


def test_cuda_reads_without_cuda(store, uniq):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert store.put_tensor(uniq + "c", torch.ones(2)) == 0
    assert store.get_tensor_into_cuda(uniq + "c", torch.empty(2)) == -1012
    assert store.batch_get_tensor_into_cuda([uniq + "c"], [torch.empty(2)]) == [-1012]


def test_buffer_pools(store, uniq):
    pool = BufferPool(store, max_bytes=8192, min_size_class=4096)
    with pool.acquire(100) as lease:
        assert lease.size == 100 and lease.ptr % 4096 == 0
        lease.buffer[:3] = b"abc"
        assert bytes(lease.view().buffer[:3]) == b"abc"
        first = lease.ptr
    with pool.acquire(4000) as again:
        assert again.ptr == first  # reused from its size class
    x, y = pool.acquire(4096), pool.acquire(4096)
    with pytest.raises(MemoryError):
        pool.acquire(4096, block=False)
    with pytest.raises(MemoryError):
        pool.acquire(4096, timeout=0.05)
    with pytest.raises(ValueError):
        pool.acquire(0)
    x.release()
    x.release()  # once only
    z = pool.acquire(4096, timeout=1)
    assert z.size == 4096
    z.release()
    y.release()
    pool.close()
    with pytest.raises(ValueError):
        pool.acquire(10)

    rpool = RegisteredBufferPool(store, min_size_class=65536, prewarm_size=65536,
                                 prewarm_count=1)
    lease = rpool.acquire(1000)
    lease.buffer[:5] = b"hello"
    assert store.put_from(uniq + "pool", lease.ptr, 5) == 0
    assert store.get(uniq + "pool") == b"hello"
    assert store.get_into(uniq + "pool", lease.ptr + 100, 5) == 5
    assert bytes(lease.buffer[100:105]) == b"hello"
    lease.release()
    rpool.close()
