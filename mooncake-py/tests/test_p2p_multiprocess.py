"""mooncake.p2p across processes: an origin process registers a payload in the catalog of a
`mooncake_master --enable_http_metadata_server` (on free ports of 127.0.0.1) and this process
pulls it; when the origin leaves, a second reader pulls from the first. Skipped, with the
reason, if the metadata server lacks the compare-and-swap and listing the catalog needs."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import master_exe, stop, wait_ports
from mooncake.p2p import P2PError, P2PStore

ORIGIN = textwrap.dedent(
    """
    import sys
    import numpy as np
    from mooncake.p2p import P2PStore, P2PError
    uri, name = sys.argv[1], sys.argv[2]
    data = np.random.default_rng(42).integers(0, 256, 6 << 20, dtype=np.uint8)
    s = P2PStore(uri, "127.0.0.1")
    try:
        s.register(name, [data[: 1 << 20], data[1 << 20 :]], max_shard_size=2 << 20)
    except P2PError as e:
        print("ERROR", e.kind, e, flush=True)
        sys.exit(3)
    print("READY", flush=True)
    sys.stdin.readline()  # serve until told to stop
    s.unregister(name)
    s.close()
    print("DONE", flush=True)
    """
)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def http_metadata():
    rpc, http, metrics = free_ports(3)
    p = subprocess.Popen(
        [
            master_exe(),
            f"--rpc_port={rpc}",
            f"--metrics_port={metrics}",
            "--enable_http_metadata_server=true",
            "--http_metadata_server_host=127.0.0.1",
            f"--http_metadata_server_port={http}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_ports([rpc, http], p)
        yield f"http://127.0.0.1:{http}/metadata"
    finally:
        stop(p)


def test_pull_from_another_process(http_metadata):
    name = "ckpt/multiprocess"
    origin = subprocess.Popen(
        [sys.executable, "-c", ORIGIN, http_metadata, name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = origin.stdout.readline().split()
        if line[:2] == ["ERROR", "not_supported"]:
            pytest.skip(
                "the HTTP metadata protocol has no compare-and-swap/listing yet: "
                + " ".join(line[2:])
            )
        assert line == ["READY"], (line, origin.stderr.read() if origin.poll() is not None else "")
        want = np.random.default_rng(42).integers(0, 256, 6 << 20, dtype=np.uint8)
        with P2PStore(http_metadata, "127.0.0.1") as reader, P2PStore(
            http_metadata, "127.0.0.1"
        ) as second:
            [info] = reader.list("ckpt/")
            assert (info.name, info.total_size, info.size_list) == (name, 6 << 20, [1 << 20, 5 << 20])
            dst = np.zeros(6 << 20, dtype=np.uint8)
            reader.get_replica(name, [dst])
            assert np.array_equal(dst, want)
            with pytest.raises(P2PError) as e:
                second.register(name, [dst[:16].copy()])
            assert e.value.kind == "already_exists"
            # The origin leaves; the second reader pulls from the first.
            origin.stdin.write("\n")
            origin.stdin.flush()
            assert origin.stdout.readline().strip() == "DONE"
            assert origin.wait(30) == 0
            dst2 = np.zeros(6 << 20, dtype=np.uint8)
            second.get_replica(name, [dst2])
            assert np.array_equal(dst2, want)
    finally:
        if origin.poll() is None:
            origin.kill()
            origin.wait(5)
