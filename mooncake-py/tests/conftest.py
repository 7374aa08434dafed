"""Shared fixtures: one `mooncake_master` for the session, started with the seed document's own
command line (RPC on the default port 50051, HTTP metadata on 8080), and stores connected to it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

# The document's command line, verbatim (tests/test_seed_examples.py checks it matches).
MASTER_ARGS = [
    "--enable_http_metadata_server=true",
    "--http_metadata_server_host=0.0.0.0",
    "--http_metadata_server_port=8080",
]
RPC_PORT = 50051
HTTP_PORT = 8080
METRICS_PORT = 9003
MASTER = f"localhost:{RPC_PORT}"
METADATA = f"http://localhost:{HTTP_PORT}/metadata"


def master_exe() -> str:
    """The `mooncake_master` console script of the interpreter running the tests."""
    here = Path(sys.executable).parent / "mooncake_master"
    if here.exists():
        return str(here)
    found = shutil.which("mooncake_master")
    if not found:
        pytest.fail("mooncake_master is not installed (pip install the mooncake-py wheel)")
    return found


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_ports(ports, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mooncake_master exited with {proc.returncode}")
        if all(port_open(p) for p in ports):
            return
        time.sleep(0.05)
    raise RuntimeError(f"mooncake_master did not open {ports} within {timeout}s")


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout=10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@pytest.fixture(scope="session")
def master():
    """The session's master, as the document starts it; killed at the end."""
    busy = [p for p in (RPC_PORT, HTTP_PORT, METRICS_PORT) if port_open(p)]
    if busy:
        pytest.fail(
            f"ports {busy} are already in use: the seed examples need a master on "
            f"{RPC_PORT}/{HTTP_PORT} (metrics {METRICS_PORT}); stop whatever holds them"
        )
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"mooncake_master_{os.getpid()}.log", "w+")
    proc = subprocess.Popen(
        [master_exe(), *MASTER_ARGS], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_ports([RPC_PORT, HTTP_PORT], proc)
        yield proc
    finally:
        code = stop(proc)
        log.seek(0)
        out = log.read()
        log.close()
        if code not in (0, -signal.SIGTERM):
            print(out, file=sys.stderr)


def new_store(metadata=METADATA, segment=64 << 20, local_buffer=32 << 20):
    from mooncake.store import MooncakeDistributedStore

    s = MooncakeDistributedStore()
    rc = s.setup("localhost", metadata, segment, local_buffer, "tcp", "", MASTER)
    assert rc == 0, f"setup returned {rc}"
    return s


@pytest.fixture
def store(master):
    s = new_store()
    yield s
    s.close()


@pytest.fixture
def p2p_store(master):
    s = new_store(metadata="P2PHANDSHAKE")
    yield s
    s.close()


@pytest.fixture
def uniq():
    """A prefix unique to the test, for keys."""
    return f"t{uuid.uuid4().hex[:12]}_"
