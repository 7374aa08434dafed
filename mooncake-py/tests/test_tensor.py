"""The tensor API: dtype/shape header + raw bytes, batches, tensor parallel shards, zero-copy."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from mooncake.store import ReplicateConfig  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool]


def sample(dtype, shape):
    t = torch.randn(shape) * 50
    return (t > 0) if dtype == torch.bool else t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_dtypes(store, uniq, dtype):
    t = sample(dtype, (7, 5))
    assert store.put_tensor(uniq + "t", t) == 0
    got = store.get_tensor(uniq + "t")
    assert got.dtype == dtype and got.shape == t.shape and torch.equal(got, t)


@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (2, 3, 4), (2, 1, 3, 2), (0, 4)])
def test_round_trip_shapes(store, uniq, shape):
    t = torch.randn(shape)
    assert store.put_tensor(uniq + "s", t) == 0
    got = store.get_tensor(uniq + "s")
    assert got.shape == t.shape and torch.equal(got, t)


def test_noncontiguous_and_errors(store, uniq):
    t = torch.arange(24.0).reshape(4, 6).t()
    assert store.put_tensor(uniq + "nc", t) == 0
    assert torch.equal(store.get_tensor(uniq + "nc"), t)
    assert store.put_tensor(uniq + "5d", torch.zeros(1, 1, 1, 1, 2)) == -600
    with pytest.raises(TypeError):
        store.put_tensor(uniq + "x", [1, 2, 3])
    assert store.get_tensor(uniq + "missing") is None
    assert store.put(uniq + "junk", b"\xff" * 64) == 0
    assert store.get_tensor(uniq + "junk") is None


def test_batches_and_pub(store, uniq):
    ts = [torch.randn(10, 10), torch.arange(5), torch.ones(2, 2, dtype=torch.bfloat16)]
    keys = [uniq + f"b{i}" for i in range(3)]
    assert store.batch_put_tensor(keys, ts) == [0, 0, 0]
    got = store.batch_get_tensor(keys + [uniq + "missing"])
    assert got[3] is None and all(torch.equal(a, b) for a, b in zip(got, ts))
    cfg = ReplicateConfig()
    cfg.with_soft_pin = True
    assert store.pub_tensor(uniq + "pub", ts[0], cfg) == 0
    assert store.batch_pub_tensor([uniq + "p1", uniq + "p2"], ts[:2], cfg) == [0, 0]
    assert torch.equal(store.get_tensor(uniq + "p2"), ts[1])
    assert store.batch_put_tensor(keys, ts[:2]) == [-600, -600, -600]


@pytest.mark.parametrize("split_dim", [0, 1])
def test_tensor_parallel(store, uniq, split_dim):
    t = torch.arange(48.0).reshape(6, 8)
    assert store.put_tensor_with_tp(uniq + "w", t, tp_rank=0, tp_size=2, split_dim=split_dim) == 0
    shards = [store.get_tensor_with_tp(uniq + "w", tp_rank=r, tp_size=2, split_dim=split_dim) for r in range(2)]
    assert torch.equal(torch.cat(shards, dim=split_dim), t)
    assert store.get_tensor(uniq + "w_tp_1") is not None
    assert store.get_tensor_with_tp(uniq + "w", tp_rank=0, tp_size=1) is None  # whole key absent
    cfg = ReplicateConfig()
    assert store.pub_tensor_with_tp(uniq + "v", t, cfg, 0, 3, split_dim) == 0
    base = [uniq + "x", uniq + "y"]
    assert store.batch_put_tensor_with_tp(base, [t, t * 2], tp_size=2, split_dim=split_dim) == [0, 0]
    assert store.batch_pub_tensor_with_tp(base, [t, t], cfg, 0, 1, 0) == [0, 0]
    rank1 = store.batch_get_tensor_with_tp(base, tp_rank=1, tp_size=2)
    assert torch.equal(rank1[1], torch.tensor_split(t * 2, 2, dim=split_dim)[1])
    assert torch.equal(store.batch_get_tensor_with_tp(base)[0], t)


def test_zero_copy_into(store, uniq):
    t = torch.randn(64, 64)
    assert store.put_tensor(uniq + "z", t) == 0
    assert store.put_tensor_with_tp(uniq + "zt", t, tp_size=4) == 0
    buf = torch.zeros(1 << 20, dtype=torch.uint8)
    ptr, size = buf.data_ptr(), buf.numel()
    assert store.register_buffer(ptr, size) == 0
    try:
        got = store.get_tensor_into(uniq + "z", ptr, size)
        assert torch.equal(got, t) and got.data_ptr() == ptr + 40  # a view of the buffer
        half = size // 2
        got = store.batch_get_tensor_into([uniq + "z", uniq + "none"], [ptr, ptr + half], [half, half])
        assert torch.equal(got[0], t) and got[1] is None
        shard = store.get_tensor_with_tp_into(uniq + "zt", ptr, size, tp_rank=3, tp_size=4)
        assert torch.equal(shard, torch.tensor_split(t, 4)[3])
        shards = store.batch_get_tensor_with_tp_into([uniq + "zt"], [ptr + half], [half], tp_rank=2, tp_size=4)
        assert torch.equal(shards[0], torch.tensor_split(t, 4)[2])
        assert store.get_tensor_into(uniq + "z", ptr, 100) is None  # buffer too small
    finally:
        store.unregister_buffer(ptr)


def test_without_torch_the_error_names_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from mooncake.store import MooncakeDistributedStore\n"
        "try:\n    MooncakeDistributedStore().get_tensor('k')\n"
        "except ImportError as e:\n    print('IMPORTERROR', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "IMPORTERROR" in r.stdout and "torch" in r.stdout, r.stdout + r.stderr
