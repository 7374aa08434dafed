"""Two Python processes share objects through one master: each reads what the other wrote, with
HTTP metadata and with P2P handshakes, through same-host shared memory and through TCP alone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import MASTER, METADATA, new_store

CHILD = textwrap.dedent(
    """
    import sys
    from mooncake.store import MooncakeDistributedStore
    metadata, master, prefix = sys.argv[1:4]
    s = MooncakeDistributedStore()
    assert s.setup("localhost", metadata, 64 << 20, 32 << 20, "tcp", "", master) == 0
    # Read what the parent wrote.
    for i in range(20):
        v = s.get(f"{prefix}parent_{i}")
        assert v == f"parent value {i}".encode() * 100, (i, v[:40])
    # Write for the parent, placed in this process's own segment, then wait to be told to exit.
    from mooncake.store import ReplicateConfig
    cfg = ReplicateConfig()
    cfg.preferred_segment = s.get_hostname()
    for i in range(20):
        assert s.put(f"{prefix}child_{i}", f"child value {i}".encode() * 1000, cfg) == 0
    print("READY", flush=True)
    sys.stdin.readline()
    assert s.close() == 0
    print("BYE", flush=True)
    """
)


def shared_segments_mapped() -> int:
    """Mappings of segment memfds in this process (its own, and peers' it reads through)."""
    with open("/proc/self/maps") as f:
        return sum("memfd:mooncake-segment" in line for line in f)


@pytest.mark.parametrize("shm", ["shm", "tcp-only"])
@pytest.mark.parametrize("metadata", [METADATA, "P2PHANDSHAKE"])
def test_two_processes_share_objects(master, uniq, metadata, shm, monkeypatch):
    if shm == "tcp-only":
        # Read at setup, by this process's store and by the child's.
        monkeypatch.setenv("MC_SAME_HOST_SHM", "0")
        # The child's calls also sleep at once rather than spin first (read on first call).
        monkeypatch.setenv("MC_SPIN_WAIT_US", "0")
    s = new_store(metadata=metadata)
    try:
        from mooncake.store import ReplicateConfig

        cfg = ReplicateConfig()
        cfg.preferred_segment = s.get_hostname()
        for i in range(20):
            assert s.put(f"{uniq}parent_{i}", f"parent value {i}".encode() * 100, cfg) == 0
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, metadata, MASTER, uniq],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            line = child.stdout.readline()
            assert line.strip() == "READY", child.stderr.read() if child.poll() is not None else line
            mapped = shared_segments_mapped()
            for i in range(20):
                key = f"{uniq}child_{i}"
                assert s.get(key) == f"child value {i}".encode() * 1000
                desc = s.get_replica_desc(key)[0].get_memory_descriptor().buffer_descriptor
                assert desc.transport_endpoint != s.get_hostname()  # really remote
            # Through shared memory, reading the child's objects mapped its segment here.
            if shm == "shm":
                assert shared_segments_mapped() > mapped
            else:
                assert shared_segments_mapped() == mapped
            out, err = child.communicate("exit\n", timeout=30)
            assert child.returncode == 0, err
            assert "BYE" in out
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(5)
        # The child unmounted its segment at close: its objects are gone.
        assert s.get(f"{uniq}child_0") == b""
    finally:
        s.close()
