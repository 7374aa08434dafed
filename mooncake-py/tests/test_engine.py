"""mooncake.engine.TransferEngine: engines of one process and of two processes on 127.0.0.1,
moving bytes between registered buffers, with upstream's return conventions for every error."""

from __future__ import annotations

import ast
import hashlib
import os
import pathlib
import selectors
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import mooncake.engine as engine_mod
from conftest import master_exe, stop, wait_ports
from mooncake.engine import Read, TransferEngine, TransferNotify, TransferOpcode, Write

HOST = "127.0.0.1"


def started(metadata="P2PHANDSHAKE", protocol="tcp"):
    e = TransferEngine()
    assert e.initialize(HOST, metadata, protocol, "") == 0
    return e


def name_of(e):
    return f"{HOST}:{e.get_rpc_port()}"


def addr(a):
    return a.ctypes.data


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture
def pair():
    a, b = started(), started()
    yield a, b
    del a, b


def pattern(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_write_then_read_between_two_engines(pair):
    a, b = pair
    assert a.get_rpc_port() != b.get_rpc_port() and a.get_rpc_port() > 0
    src = pattern(1 << 20, 1)
    dst = np.zeros(1 << 20, dtype=np.uint8)
    assert a.register_memory(addr(src), src.nbytes) == 0
    assert b.register_memory(addr(dst), dst.nbytes) == 0
    assert a.transfer_sync_write(name_of(b), addr(src), addr(dst), src.nbytes) == 0
    assert np.array_equal(src, dst)
    # The peer changes its buffer; a READ brings the new bytes back into a part of ours.
    dst[:4096] = pattern(4096, 2)
    assert a.transfer_sync_read(name_of(b), addr(src) + 8192, addr(dst), 4096) == 0
    assert np.array_equal(src[8192 : 8192 + 4096], pattern(4096, 2))
    # Offsets inside both buffers, and a zero-length request.
    assert a.transfer_sync_write(name_of(b), addr(src) + 1, addr(dst) + 100, 7) == 0
    assert np.array_equal(dst[100:107], src[1:8])
    assert a.transfer_sync_write(name_of(b), addr(src), addr(dst), 0) == 0
    assert b.unregister_memory(addr(dst)) == 0
    assert b.unregister_memory(addr(dst)) == -3
    assert a.unregister_memory(addr(src)) == 0


def test_an_engine_reaches_its_own_segment():
    e = started()
    src, dst = pattern(4096, 3), np.zeros(4096, dtype=np.uint8)
    assert e.batch_register_memory([addr(src), addr(dst)], [4096, 4096]) == 0
    assert e.transfer_sync_write(name_of(e), addr(src), addr(dst), 4096) == 0
    assert np.array_equal(src, dst)
    assert e.batch_unregister_memory([addr(src), addr(dst)]) == 0
    assert e.batch_unregister_memory([addr(src)]) == -3


def test_batch_transfers_sync_and_async(pair):
    a, b = pair
    n, piece = 8, 64 << 10
    src = pattern(n * piece, 4)
    dst = np.zeros(n * piece, dtype=np.uint8)
    back = np.zeros(n * piece, dtype=np.uint8)
    assert a.batch_register_memory([addr(src), addr(back)], [src.nbytes, back.nbytes]) == 0
    assert b.register_memory(addr(dst), dst.nbytes) == 0
    target = name_of(b)
    # Pieces land reversed on the peer.
    local = [addr(src) + i * piece for i in range(n)]
    remote = [addr(dst) + (n - 1 - i) * piece for i in range(n)]
    assert a.batch_transfer_sync_write(target, local, remote, [piece] * n) == 0
    for i in range(n):
        assert np.array_equal(dst[(n - 1 - i) * piece : (n - i) * piece], src[i * piece : (i + 1) * piece])
    back_addrs = [addr(back) + i * piece for i in range(n)]
    assert a.batch_transfer_sync_read(target, back_addrs, remote, [piece] * n) == 0
    assert np.array_equal(back, src)

    # Asynchronous: two batches in flight, collected together.
    dst[:] = 0
    half = n // 2
    b1 = a.batch_transfer_async_write(target, local[:half], remote[:half], [piece] * half)
    b2 = a.batch_transfer_async(target, local[half:], remote[half:], [piece] * half, TransferOpcode.Write)
    assert b1 > 0 and b2 > 0 and b1 != b2
    assert a.get_batch_transfer_status([b1, b2]) == 0
    for i in range(n):
        assert np.array_equal(dst[(n - 1 - i) * piece : (n - i) * piece], src[i * piece : (i + 1) * piece])
    # Collected ids are gone.
    assert a.get_batch_transfer_status([b1]) == -1
    back[:] = 0
    r = a.batch_transfer_async_read(target, back_addrs, remote, [piece] * n)
    assert a.get_batch_transfer_status([r]) == 0
    assert np.array_equal(back, src)
    assert a.get_batch_transfer_status([]) == 0

    # One submitted write, polled.
    dst[:16] = 0
    bid = a.transfer_submit_write(target, addr(src), addr(dst), 16)
    assert bid > 0
    deadline = time.monotonic() + 30
    status = 0
    while status == 0 and time.monotonic() < deadline:
        status = a.transfer_check_status(bid)
        time.sleep(0.001)
    assert status == 1
    assert np.array_equal(dst[:16], src[:16])
    assert a.transfer_check_status(bid) == -1

    # The opcode forms: the enum, its module-level aliases and plain ints.
    dst[:32] = 0
    assert a.transfer_sync(target, addr(src), addr(dst), 32, TransferOpcode.Write) == 0
    assert np.array_equal(dst[:32], src[:32])
    back[:32] = 0
    assert a.transfer_sync(target, addr(back), addr(dst), 32, Read) == 0
    assert np.array_equal(back[:32], src[:32])
    assert a.batch_transfer_sync(target, [addr(src)], [addr(dst) + 64], [8], 1) == 0
    assert np.array_equal(dst[64:72], src[:8])
    with pytest.raises(TypeError):
        a.transfer_sync(target, addr(src), addr(dst), 8, 5)
    assert a.batch_transfer_sync_write(target, [], [], []) == 0


def test_managed_buffers_and_bytes_helpers(pair):
    a, b = pair
    ma = a.allocate_managed_buffer(1 << 20)
    mb = b.allocate_managed_buffer(1 << 20)
    assert ma and mb and ma % 4096 == 0
    assert a.read_bytes_from_buffer(ma, 16) == bytes(16)
    data = bytes(pattern(1 << 20, 5))
    assert a.write_bytes_to_buffer(ma, data, len(data)) == 0
    assert a.read_bytes_from_buffer(ma, len(data)) == data
    # The peer's first buffer is its managed one; move it over (shared memory on this host).
    assert a.get_first_buffer_address(name_of(b)) == mb
    assert a.transfer_sync_write(name_of(b), ma, mb, len(data)) == 0
    assert b.read_bytes_from_buffer(mb, len(data)) == data
    assert b.write_bytes_to_buffer(mb + 10, "héllo", 6) == 0
    assert a.transfer_sync_read(name_of(b), ma, mb, 32) == 0
    assert a.read_bytes_from_buffer(ma + 10, 6) == "héllo".encode()
    # Only the first `length` bytes are copied, and never more than given.
    assert a.write_bytes_to_buffer(ma, b"abcdef", 2) == 0
    assert a.read_bytes_from_buffer(ma, 3) == b"ab" + data[2:3]
    assert a.write_bytes_to_buffer(ma, b"abc", 4) == -1
    with pytest.raises(TypeError):
        a.write_bytes_to_buffer(ma, 123, 1)
    # Plain memory of this process works too, as upstream's memcpy does; a bad pointer does not.
    plain = np.zeros(64, dtype=np.uint8)
    assert a.write_bytes_to_buffer(addr(plain), b"xyz", 3) == 0
    assert bytes(plain[:3]) == b"xyz"
    assert a.read_bytes_from_buffer(addr(plain), 3) == b"xyz"
    assert a.write_bytes_to_buffer(8, b"x", 1) == -1
    with pytest.raises(ValueError):
        a.read_bytes_from_buffer(8, 16)
    assert a.free_managed_buffer(ma, 1 << 20) == 0
    assert a.free_managed_buffer(ma, 1 << 20) == -1
    assert a.get_first_buffer_address(name_of(a)) == 0
    assert b.free_managed_buffer(mb, 1 << 20) == 0
    assert a.get_first_buffer_address(name_of(b)) == 0


def test_errors_are_codes_not_crashes(pair):
    a, b = pair
    src = pattern(8192, 6)
    dst = np.zeros(4096, dtype=np.uint8)
    assert a.register_memory(addr(src), src.nbytes) == 0
    assert b.register_memory(addr(dst), dst.nbytes) == 0
    target = name_of(b)
    # Remote ranges the peer did not register: refused by the peer, nothing written.
    assert a.transfer_sync_write(target, addr(src), 0x1000, 16) == -1
    assert a.transfer_sync_write(target, addr(src), addr(dst) + 4090, 16) == -1
    assert a.transfer_sync_read(target, addr(src), addr(dst) - 16, 32) == -1
    assert not dst.any()
    # In a batch, the good requests are done, the bad one fails the call.
    assert a.batch_transfer_sync_write(target, [addr(src), addr(src)], [addr(dst), 0x1000], [8, 8]) == -1
    assert np.array_equal(dst[:8], src[:8])
    dst[:8] = 0
    bid = a.batch_transfer_async_write(target, [addr(src)], [0x1000], [16])
    assert bid > 0 and a.get_batch_transfer_status([bid]) == -1
    bid = a.transfer_submit_write(target, addr(src), 0x1000, 16)
    deadline = time.monotonic() + 30
    status = 0
    while status == 0 and time.monotonic() < deadline:
        status = a.transfer_check_status(bid)
        time.sleep(0.001)
    assert status == -1
    assert not dst.any()
    # A local range outside our registered memory.
    loose = np.zeros(64, dtype=np.uint8)
    assert a.transfer_sync_write(target, addr(loose), addr(dst), 64) == -1
    assert a.transfer_sync_write(target, addr(src) + 8190, addr(dst), 16) == -1
    # Unknown targets fail fast; nothing is submitted.
    nobody = f"{HOST}:{free_port()}"
    t0 = time.monotonic()
    assert a.transfer_sync_write(nobody, addr(src), addr(dst), 16) == -1
    assert a.batch_transfer_async_write(nobody, [addr(src)], [addr(dst)], [16]) == 0
    assert a.transfer_submit_write(nobody, addr(src), addr(dst), 16) == 0
    assert a.get_first_buffer_address(nobody) == 0
    assert time.monotonic() - t0 < 20
    # Mismatched lists, unknown batch ids.
    assert a.batch_transfer_sync_write(target, [addr(src)], [], [1]) == -1
    assert a.batch_transfer_async_write(target, [addr(src)], [addr(dst)], []) == 0
    assert a.get_batch_transfer_status([987654]) == -1
    assert a.transfer_check_status(987654) == -1
    # Registration errors: overlap -7, unknown -3, unmapped or empty -1.
    assert a.register_memory(addr(src), 16) == -7
    assert a.register_memory(addr(src) + 100, 16) == -7
    assert a.batch_register_memory([addr(loose), addr(src)], [64, 64]) == -7
    assert a.register_memory(addr(loose), 64) == 0  # the failed batch registered nothing
    assert a.unregister_memory(addr(loose)) == 0
    assert a.unregister_memory(12345) == -3
    assert a.register_memory(8, 4096) == -1
    assert a.register_memory(addr(loose), 0) == -1
    assert a.batch_register_memory([addr(loose)], [1, 2]) == -1
    assert a.free_managed_buffer(addr(loose), 64) == -1
    # The engines still work.
    assert a.transfer_sync_write(target, addr(src), addr(dst), 4096) == 0
    assert np.array_equal(dst, src[:4096])


def test_calls_before_initialize():
    e = TransferEngine()
    buf = np.zeros(64, dtype=np.uint8)
    assert e.get_rpc_port() == -1
    assert e.register_memory(addr(buf), 64) == -1
    assert e.unregister_memory(addr(buf)) == -1
    assert e.batch_register_memory([addr(buf)], [64]) == -1
    assert e.transfer_sync_write(f"{HOST}:1", addr(buf), addr(buf), 8) == -1
    assert e.batch_transfer_sync_read(f"{HOST}:1", [addr(buf)], [addr(buf)], [8]) == -1
    assert e.batch_transfer_async_write(f"{HOST}:1", [addr(buf)], [addr(buf)], [8]) == 0
    assert e.transfer_submit_write(f"{HOST}:1", addr(buf), addr(buf), 8) == 0
    assert e.allocate_managed_buffer(4096) == 0
    assert e.get_first_buffer_address(f"{HOST}:1") == 0
    assert e.send_probe(f"{HOST}:1") == -1
    assert e.get_batch_transfer_status([1]) == -1
    assert "not initialized" in repr(e)


def test_protocols_and_metadata_servers():
    e = TransferEngine()
    for protocol in ("nvlink", "hip", "efa", "xgmi", "bogus"):
        assert e.initialize(HOST, "P2PHANDSHAKE", protocol, "") == -1
    assert e.initialize(HOST, "etcd://127.0.0.1:2379", "tcp", "") == -1
    assert e.initialize(HOST, "127.0.0.1:2379", "tcp", "") == -1
    assert e.initialize_ext(HOST, "127.0.0.1:2379", "tcp", "", "redis") == -1
    assert e.get_rpc_port() == -1
    # "rdma" runs on TCP, as on a host without RDMA devices; a device name is ignored.
    assert e.initialize(HOST, "P2PHANDSHAKE", "rdma", "mlx5_0") == 0
    peer = started()
    src, dst = pattern(4096, 7), np.zeros(4096, dtype=np.uint8)
    assert e.register_memory(addr(src), 4096) == 0
    assert peer.register_memory(addr(dst), 4096) == 0
    assert e.transfer_sync_write(name_of(peer), addr(src), addr(dst), 4096) == 0
    assert np.array_equal(src, dst)
    # Initializing again replaces the engine: a new port, the old registrations gone.
    old = e.get_rpc_port()
    assert e.initialize(HOST, "P2PHANDSHAKE", "tcp", "") == 0
    assert e.get_rpc_port() != old
    assert e.unregister_memory(addr(src)) == -3
    assert e.register_memory(addr(src), 4096) == 0
    assert e.unregister_memory(addr(src)) == 0
    assert peer.unregister_memory(addr(dst)) == 0


def test_notifications_are_refused_not_dropped(pair):
    a, b = pair
    src, dst = pattern(64, 8), np.zeros(64, dtype=np.uint8)
    assert a.register_memory(addr(src), 64) == 0
    assert b.register_memory(addr(dst), 64) == 0
    n = TransferNotify("prefill-0", "done")
    assert (n.name, n.msg) == ("prefill-0", "done")
    n.msg = "again"
    assert n.msg == "again" and TransferNotify().name == ""
    assert a.transfer_sync(name_of(b), addr(src), addr(dst), 64, Write, n) == -1
    assert a.batch_transfer_sync(name_of(b), [addr(src)], [addr(dst)], [64], Write, n) == -1
    assert not dst.any()
    assert b.get_notifies() == []
    assert a.transfer_sync(name_of(b), addr(src), addr(dst), 64, Write, None) == 0
    assert np.array_equal(src, dst)


def test_probe_warmup_and_topology(pair):
    a, b = pair
    assert a.send_probe(name_of(b)) == 0
    assert a.send_probe(f"{HOST}:{free_port()}") == -102
    assert a.warmup_efa_segment(name_of(b)) == 0
    assert a.warmup_efa_segment(f"{HOST}:{free_port()}") == -1
    import json

    topo = json.loads(a.get_local_topology())
    assert "cpu:0" in topo and topo["cpu:0"] == [[], []]
    assert name_of(a) in repr(a)


def test_opcode_enum_and_module_names():
    assert TransferEngine.TransferOpcode is TransferOpcode
    assert (Read, Write) == (TransferOpcode.Read, TransferOpcode.Write)
    assert (int(Read), int(Write)) == (0, 1)
    assert (Write.name, Write.value) == ("Write", 1)
    assert TransferOpcode(1) == Write and TransferOpcode(0) == Read
    with pytest.raises(ValueError):
        TransferOpcode(2)
    assert not (engine_mod.SUPPORT_CUDA or engine_mod.SUPPORT_EFA or engine_mod.SUPPORT_MNNVL)


def test_disaggregation_style_flow():
    """As vLLM's and SGLang's connectors drive it: protocol "rdma" (TCP here), the session id
    `host:rpc_port`, per-layer KV buffers registered in one call, pushed in one batch."""
    prefill, decode = TransferEngine(), TransferEngine()
    for e in (prefill, decode):
        assert e.initialize(HOST, "P2PHANDSHAKE", "rdma", "") == 0
    session = f"{HOST}:{decode.get_rpc_port()}"
    layers = 6
    kv_src = [pattern(96 << 10, 100 + i) for i in range(layers)]
    kv_dst = [np.zeros(96 << 10, dtype=np.uint8) for _ in range(layers)]
    assert prefill.batch_register_memory([addr(k) for k in kv_src], [k.nbytes for k in kv_src]) == 0
    assert decode.batch_register_memory([addr(k) for k in kv_dst], [k.nbytes for k in kv_dst]) == 0
    # Blocks 1 and 2 (of three 32 KiB blocks) of every layer.
    block = 32 << 10
    src, dst, lens = [], [], []
    for s_, d_ in zip(kv_src, kv_dst):
        for b in (1, 2):
            src.append(addr(s_) + b * block)
            dst.append(addr(d_) + b * block)
            lens.append(block)
    assert prefill.batch_transfer_sync_write(session, src, dst, lens) == 0
    for s_, d_ in zip(kv_src, kv_dst):
        assert np.array_equal(d_[block:], s_[block:]) and not d_[:block].any()
    assert decode.batch_unregister_memory([addr(k) for k in kv_dst]) == 0
    assert prefill.batch_transfer_sync_write(session, src, dst, lens) == -1
    assert prefill.batch_unregister_memory([addr(k) for k in kv_src]) == 0


def test_threads_share_an_engine(pair):
    a, b = pair
    n, piece, rounds = 6, 256 << 10, 10
    src = pattern(n * piece, 12)
    dst = np.zeros(n * piece, dtype=np.uint8)
    back = np.zeros(n * piece, dtype=np.uint8)
    assert a.batch_register_memory([addr(src), addr(back)], [src.nbytes, back.nbytes]) == 0
    assert b.register_memory(addr(dst), dst.nbytes) == 0
    target = name_of(b)
    codes = [[] for _ in range(n)]

    def work(i):
        off = i * piece
        for _ in range(rounds):
            codes[i].append(a.transfer_sync_write(target, addr(src) + off, addr(dst) + off, piece))
            codes[i].append(a.transfer_sync_read(target, addr(back) + off, addr(dst) + off, piece))
            bid = a.batch_transfer_async_write(target, [addr(src) + off], [addr(dst) + off], [piece])
            codes[i].append(a.get_batch_transfer_status([bid]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert all(c == [0] * (3 * rounds) for c in codes), codes
    assert np.array_equal(dst, src) and np.array_equal(back, src)


def _wait(pid, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung")


def test_a_forked_child_gets_errors_from_the_parents_engine(pair):
    a, b = pair
    src, dst = pattern(4096, 13), np.zeros(4096, dtype=np.uint8)
    assert a.register_memory(addr(src), 4096) == 0
    assert b.register_memory(addr(dst), 4096) == 0
    target = name_of(b)
    pid = os.fork()
    if pid == 0:
        # The child reports through its exit code only, never returning into pytest.
        code = 0
        try:
            if a.get_rpc_port() != -1:
                code = 10
            elif b.get_rpc_port() != -1 or b.register_memory(addr(src), 16) != -1:
                code = 11
            elif a.transfer_sync_write(target, addr(src), addr(dst), 16) != -1:
                code = 11
            else:
                mine = started()
                buf = pattern(64, 14)
                if mine.register_memory(addr(buf), 64) != 0:
                    code = 12
                # Into the parent's engine `b`, which serves from the parent process.
                elif mine.transfer_sync_write(target, addr(buf), addr(dst) + 64, 64) != 0:
                    code = 13
        except BaseException:  # noqa: BLE001 - any failure becomes an exit code
            code = 14
        os._exit(code)
    assert _wait(pid) == 0
    assert np.array_equal(dst[64:128], pattern(64, 14))
    assert a.transfer_sync_write(target, addr(src), addr(dst), 16) == 0
    assert np.array_equal(dst[:16], src[:16])


CHILD = textwrap.dedent(
    """
    import hashlib, sys
    import numpy as np
    from mooncake.engine import TransferEngine
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0, "initialize"
    buf = np.random.default_rng(9).integers(0, 256, 4 << 20, dtype=np.uint8)
    assert e.register_memory(buf.ctypes.data, buf.nbytes) == 0, "register"
    managed = e.allocate_managed_buffer(1 << 20)
    e.write_bytes_to_buffer(managed, b"managed in the child", 20)
    print("READY", e.get_rpc_port(), buf.ctypes.data, managed, flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "digest":
            start, n = int(cmd[1]), int(cmd[2])
            print("DIGEST", hashlib.sha256(buf[start : start + n].tobytes()).hexdigest(), flush=True)
        elif cmd[0] == "quit":
            print("BYE", e.unregister_memory(buf.ctypes.data), flush=True)
            break
    """
)


def readline(proc, timeout=30.0):
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError(f"no answer from the child within {timeout}s")
    finally:
        sel.close()
    line = proc.stdout.readline()
    assert line, f"the child exited: {proc.poll()} {proc.stderr.read()}"
    return line.split()


def test_two_processes_write_then_read():
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = readline(child)
        assert ready[0] == "READY", ready
        port, remote, managed = int(ready[1]), int(ready[2]), int(ready[3])
        target = f"{HOST}:{port}"
        e = started()
        theirs = np.random.default_rng(9).integers(0, 256, 4 << 20, dtype=np.uint8)
        ours = pattern(1 << 20, 10)
        back = np.zeros(4 << 20, dtype=np.uint8)
        assert e.batch_register_memory([addr(ours), addr(back)], [ours.nbytes, back.nbytes]) == 0
        assert e.get_first_buffer_address(target) in (remote, managed)
        # Write 1 MiB into the middle of the child's buffer; the child hashes what landed.
        assert e.transfer_sync_write(target, addr(ours), remote + (1 << 20), ours.nbytes) == 0
        child.stdin.write(f"digest {1 << 20} {1 << 20}\n")
        child.stdin.flush()
        assert readline(child) == ["DIGEST", hashlib.sha256(ours.tobytes()).hexdigest()]
        # Read the whole buffer back: the child's bytes with ours in the middle.
        assert e.transfer_sync_read(target, addr(back), remote, back.nbytes) == 0
        theirs[1 << 20 : 2 << 20] = ours
        assert np.array_equal(back, theirs)
        # Batches across processes, and the child's managed buffer.
        pieces = [(i * 4096, (3 - i) * 4096) for i in range(4)]
        assert e.batch_transfer_sync_read(
            target, [addr(back) + l for l, _ in pieces], [remote + r for _, r in pieces], [4096] * 4
        ) == 0
        for l, r in pieces:
            assert np.array_equal(back[l : l + 4096], theirs[r : r + 4096])
        bid = e.batch_transfer_async_read(target, [addr(back)], [managed], [20])
        assert e.get_batch_transfer_status([bid]) == 0
        assert bytes(back[:20]) == b"managed in the child"
        assert e.transfer_sync_write(target, addr(ours), remote + (4 << 20) - 8, 16) == -1
        child.stdin.write("quit\n")
        child.stdin.flush()
        assert readline(child) == ["BYE", "0"]
        assert child.wait(30) == 0
        # The peer is gone: a clean error, then a fresh look-up on the next call.
        assert e.transfer_sync_read(target, addr(back), remote, 16) == -1
        assert e.send_probe(target) == -102
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


@pytest.fixture
def http_metadata():
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind((HOST, 0))
    rpc, http, metrics = (s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    p = subprocess.Popen(
        [
            master_exe(),
            f"--rpc_port={rpc}",
            f"--metrics_port={metrics}",
            "--enable_http_metadata_server=true",
            f"--http_metadata_server_host={HOST}",
            f"--http_metadata_server_port={http}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ports([rpc, http], p)
        yield f"{HOST}:{http}/metadata"
    finally:
        stop(p)


def test_http_metadata(http_metadata):
    a = started(metadata=f"http://{http_metadata}")
    b = TransferEngine()
    assert b.initialize_ext(HOST, http_metadata, "tcp", "", "http") == 0
    src, dst = pattern(1 << 16, 11), np.zeros(1 << 16, dtype=np.uint8)
    assert a.register_memory(addr(src), src.nbytes) == 0
    assert b.register_memory(addr(dst), dst.nbytes) == 0
    # Found through the metadata service, with the buffers registered since.
    assert a.get_first_buffer_address(name_of(b)) == addr(dst)
    assert a.transfer_sync_write(name_of(b), addr(src), addr(dst), src.nbytes) == 0
    assert np.array_equal(src, dst)
    assert b.unregister_memory(addr(dst)) == 0
    assert a.get_first_buffer_address(name_of(b)) == 0
    assert a.get_first_buffer_address(f"{HOST}:1") == 0


def test_stub_matches_module():
    stub = pathlib.Path(engine_mod.__file__).with_suffix(".pyi")
    tree = ast.parse(stub.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    top = set(classes)
    for n in tree.body:
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            top.add(n.target.id)
    assert set(engine_mod.__all__) == {n for n in top if not n.startswith("_")}
    for cls, node in classes.items():
        obj = getattr(engine_mod, cls)
        declared = set()
        for item in node.body:
            if isinstance(item, ast.FunctionDef):
                declared.add(item.name)
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                declared.add(item.target.id)
            elif isinstance(item, ast.Assign):
                declared.update(t.id for t in item.targets if isinstance(t, ast.Name))
        for name in declared:
            if not name.startswith("__"):
                assert hasattr(obj, name), f"{cls}.{name}"
        public = {n for n in dir(obj) if not n.startswith("_")}
        assert public <= declared, f"{cls}: undeclared {sorted(public - declared)}"
