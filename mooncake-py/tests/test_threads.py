"""16 threads share one store; calls release the GIL, so they overlap."""

from __future__ import annotations

import threading
import time

import numpy as np

N_THREADS = 16
PER_THREAD = 40


def test_sixteen_threads_share_one_store(store, uniq):
    errors = []
    buf = np.zeros(N_THREADS * 65536, dtype=np.uint8)
    assert store.register_buffer(buf.ctypes.data, buf.nbytes) == 0
    start = threading.Barrier(N_THREADS)

    def worker(t: int):
        try:
            rng = np.random.default_rng(t)
            start.wait(10)
            mine = buf[t * 65536 : (t + 1) * 65536]
            for i in range(PER_THREAD):
                key = f"{uniq}{t}_{i}"
                value = rng.integers(0, 255, int(rng.integers(1, 60000)), dtype=np.uint8).tobytes()
                assert store.put(key, value) == 0
                assert store.get(key) == value
                assert store.is_exist(key) == 1
                assert store.get_size(key) == len(value)
                n = store.get_into(key, mine.ctypes.data, mine.nbytes)
                assert n == len(value) and mine[:n].tobytes() == value
                if i % 5 == 0:
                    assert store.batch_get_buffer([key])[0] is not None
        except BaseException as e:  # noqa: BLE001
            errors.append((t, repr(e)))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not any(th.is_alive() for th in threads), "threads hung"
    assert time.monotonic() - t0 < 120
    assert store.unregister_buffer(buf.ctypes.data) == 0
    assert not errors, errors[:3]


def test_gil_is_released_during_calls(store, uniq):
    """A Python thread keeps running while another waits in the store."""
    value = b"z" * (8 << 20)
    assert store.put(uniq + "g", value) == 0
    ticks = 0
    stop = threading.Event()

    def spin():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    th = threading.Thread(target=spin)
    th.start()
    try:
        before = ticks
        for _ in range(20):
            assert len(store.get(uniq + "g")) == len(value)
        assert ticks > before
    finally:
        stop.set()
        th.join()
