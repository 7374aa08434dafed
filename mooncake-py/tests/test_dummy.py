"""The dummy-client mode: a `mooncake_client` process (the real client) serves the store, and
`setup_dummy(mem_pool_size, local_buffer_size, "host:port")` clients in other processes forward
to it, sharing a memory pool with it for zero-copy calls."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import MASTER, METADATA, new_store, stop

POOL = 32 << 20
STAGING = 4 << 20


def client_exe() -> str:
    here = Path(sys.executable).parent / "mooncake_client"
    if here.exists():
        return str(here)
    found = shutil.which("mooncake_client")
    if not found:
        pytest.fail("mooncake_client is not installed (pip install the mooncake-py wheel)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_client(port: int, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [
            client_exe(),
            f"--master_server_address={MASTER}",
            "--host=127.0.0.1",
            f"--port={port}",
            "--global_segment_size=64MB",
            "--local_buffer_size=16MB",
            f"--metadata_server={METADATA}",
            "--protocol=tcp",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "MC_LOG_LEVEL": "info"},
    )
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"mooncake_client exited with {proc.returncode}: {log.read()}")
        log.seek(0)
        if "mooncake_client listening" in log.read():
            return proc
        time.sleep(0.05)
    stop(proc)
    raise RuntimeError("mooncake_client did not start within 30 s")


def log_text(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


@pytest.fixture(scope="module")
def real_client(master, tmp_path_factory):
    port = free_port()
    proc = start_client(port, tmp_path_factory.mktemp("dummy") / "mooncake_client.log")
    try:
        yield proc, f"127.0.0.1:{port}"
    finally:
        code = stop(proc)
        if code != 0:
            print(log_text(proc), file=sys.stderr)
        proc.log.close()


@pytest.fixture
def dummy(real_client):
    from mooncake.store import MooncakeDistributedStore

    s = MooncakeDistributedStore()
    assert s.setup_dummy(POOL, STAGING, real_client[1]) == 0
    yield s
    s.close()


def test_dummy_put_get_and_batches(dummy, uniq):
    k = uniq + "a"
    assert dummy.put(k, b"hello dummy") == 0
    assert dummy.get(k) == b"hello dummy"
    assert dummy.put(k, b"other") == 0  # exists: success, not overwritten
    assert dummy.get(k) == b"hello dummy"
    assert dummy.upsert(k, b"replaced") == 0
    assert dummy.get(k) == b"replaced"
    assert dummy.put_parts(uniq + "parts", b"ab", memoryview(b"cd"), bytearray(b"ef")) == 0
    assert dummy.get(uniq + "parts") == b"abcdef"
    assert bytes(dummy.get_buffer(uniq + "parts")) == b"abcdef"
    assert dummy.is_exist(k) == 1
    assert dummy.get_size(k) == len(b"replaced")

    # Larger than the staging buffer: travels inline.
    big = os.urandom(STAGING + 12345)
    assert dummy.put(uniq + "big", big) == 0
    assert dummy.get(uniq + "big") == big

    keys = [f"{uniq}b{i}" for i in range(20)]
    values = [bytes([i]) * (1000 * (i + 1)) for i in range(20)]
    assert dummy.put_batch(keys, values) == 0
    got = dummy.get_batch(keys + [uniq + "missing"])
    assert got[:-1] == values
    assert got[-1] == b""
    assert dummy.batch_is_exist([keys[0], uniq + "missing"]) == [1, 0]
    assert dummy.get(uniq + "missing") == b""
    assert dummy.get_size(uniq + "missing") == -704

    assert len(dummy.get_replica_desc(keys[0])) == 1
    assert set(dummy.batch_get_replica_desc([keys[0], uniq + "missing"])) == {keys[0]}
    assert dummy.remove(keys[0], force=True) == 0
    assert dummy.remove(keys[0], force=True) == -704
    assert dummy.batch_remove(keys[1:3], force=True) == [0, 0]
    assert dummy.remove_by_regex(f"^{uniq}b1[0-9]$", force=True) == 10
    assert dummy.get_hostname()  # the real client's segment


def test_dummy_zero_copy_through_the_pool(dummy, uniq):
    size = 1 << 20
    src = dummy.alloc_from_mem_pool(size)
    dst = dummy.alloc_from_mem_pool(size)
    assert src and dst and src != dst
    data = os.urandom(size)
    ctypes.memmove(src, data, size)
    assert dummy.register_buffer(src, size) == 0  # already shared: accepted as is
    assert dummy.put_from(uniq + "zc", src, size) == 0
    assert dummy.get_into(uniq + "zc", dst, size) == size
    assert ctypes.string_at(dst, size) == data
    assert dummy.get(uniq + "zc") == data

    half = size // 2
    assert dummy.batch_put_from([uniq + "h1", uniq + "h2"], [src, src + half], [half, half]) == [0, 0]
    ctypes.memset(dst, 0, size)
    assert dummy.batch_get_into([uniq + "h2", uniq + "h1"], [dst, dst + half], [half, half]) == [
        half,
        half,
    ]
    assert ctypes.string_at(dst, size) == data[half:] + data[:half]
    assert dummy.upsert_from(uniq + "h1", src + half, half) == 0
    assert dummy.get(uniq + "h1") == data[half:]
    assert dummy.batch_put_from_multi_buffers(
        [uniq + "multi"], [[src + half, src]], [[half, half]]
    ) == [0]
    assert dummy.get(uniq + "multi") == data[half:] + data[:half]

    # Memory outside the pool is refused with -600 and never touched.
    outside = ctypes.create_string_buffer(4096)
    addr = ctypes.addressof(outside)
    assert dummy.put_from(uniq + "bad", addr, 4096) == -600
    assert dummy.get_into(uniq + "zc", addr, 4096) == -600
    assert dummy.put_from(uniq + "bad", src + POOL, 16) == -600
    assert dummy.batch_put_from([uniq + "ok", uniq + "bad"], [src, addr], [16, 16]) == [0, -600]
    assert dummy.register_buffer(addr, 4096) == -600
    assert dummy.is_exist(uniq + "bad") == 0
    assert dummy.get_into(uniq + "zc", dst, 100) < 0  # too small for the object

    # Not supported for a dummy client, as upstream.
    assert dummy.batch_get_buffer([uniq + "zc"]) == [None]
    assert dummy.put_from_with_metadata(uniq + "meta", src, dst, 16, 16) == -600

    assert dummy.alloc_from_mem_pool(POOL * 2) == 0


def test_a_full_client_reads_what_a_dummy_wrote(master, dummy, uniq):
    full = new_store()
    try:
        assert dummy.put(uniq + "from_dummy", b"d" * 50000) == 0
        assert full.get(uniq + "from_dummy") == b"d" * 50000
        assert full.put(uniq + "from_full", b"f" * 70000) == 0
        assert dummy.get(uniq + "from_full") == b"f" * 70000
    finally:
        full.close()


CHILD = textwrap.dedent(
    """
    import ctypes, sys
    from mooncake.store import MooncakeDistributedStore
    server, prefix = sys.argv[1:3]
    s = MooncakeDistributedStore()
    assert s.setup_dummy(8 << 20, 2 << 20, server) == 0
    ptr = s.alloc_from_mem_pool(1 << 16)
    assert s.get_into(prefix + "parent", ptr, 1 << 16) == 40000
    assert ctypes.string_at(ptr, 40000) == b"p" * 40000
    ctypes.memmove(ptr, b"c" * 30000, 30000)
    assert s.put_from(prefix + "child", ptr, 30000) == 0
    assert s.put(prefix + "child_bytes", b"cb" * 1000) == 0
    print("READY", flush=True)
    sys.stdin.readline()
    assert s.close() == 0
    print("BYE", flush=True)
    """
)


def test_two_dummy_processes_share_objects(real_client, dummy, uniq):
    proc, server = real_client
    assert dummy.put(uniq + "parent", b"p" * 40000) == 0
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, server, uniq],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == "READY", child.stderr.read() if child.poll() is not None else line
        ptr = dummy.alloc_from_mem_pool(1 << 16)
        assert dummy.get_into(uniq + "child", ptr, 1 << 16) == 30000
        assert ctypes.string_at(ptr, 30000) == b"c" * 30000
        assert dummy.get(uniq + "child_bytes") == b"cb" * 1000
        out, err = child.communicate("\n", timeout=30)
        assert child.returncode == 0, err
        assert "BYE" in out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


def test_a_killed_dummy_releases_its_pool(real_client, dummy, uniq):
    proc, server = real_client
    before = log_text(proc).count("its pool is released")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from mooncake.store import MooncakeDistributedStore as S; "
            "s = S(); assert s.setup_dummy(4 << 20, 1 << 20, sys.argv[1]) == 0; "
            "print('UP', flush=True); sys.stdin.readline()",
            server,
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline().strip() == "UP"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 10
        while log_text(proc).count("its pool is released") <= before:
            assert time.monotonic() < deadline, "the real client did not release the pool"
            time.sleep(0.05)
        # The real client still serves the others.
        assert dummy.put(uniq + "after", b"still here") == 0
        assert dummy.get(uniq + "after") == b"still here"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


def test_real_client_stops_on_sigterm_and_dummies_see_errors(master, tmp_path):
    from mooncake.store import MooncakeDistributedStore

    port = free_port()
    proc = start_client(port, tmp_path / "client.log")
    try:
        s = MooncakeDistributedStore()
        assert s.setup_dummy(1 << 20, 1 << 20, f"127.0.0.1:{port}") == 0
        assert s.put("sigterm_probe_" + str(port), b"x") == 0
        assert stop(proc, signal.SIGTERM) == 0
        assert "mooncake_client stopped" in log_text(proc)
        assert s.put("sigterm_probe2_" + str(port), b"x") < 0
        assert s.get("sigterm_probe_" + str(port)) == b""
        assert s.close() == 0
    finally:
        stop(proc)
        proc.log.close()


def test_client_cli_help_and_bad_flags():
    out = subprocess.run([client_exe(), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--master_server_address" in out.stdout
    bad = subprocess.run([client_exe(), "--bogus=1"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown flag" in bad.stderr
