"""A cluster started with certificates, end to end: the CA and certificates made with the wheel's
``mooncake_certs``, a three-member master group with ``--tls_ca/--tls_cert/--tls_key``, storage
nodes and clients whose identity comes from ``MC_TLS_CA/_CERT/_KEY``. Members get in; a node
without a certificate, with another CA's, or with too small a role does not."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import master_exe, port_open, stop


def exe(name: str) -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def certs(d: Path, *args: str) -> None:
    out = subprocess.run([exe("mooncake_certs"), *args, "--dir", str(d)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def identity(d: Path, name: str, ca: str = "ca") -> dict[str, str]:
    return {
        "MC_TLS_CA": str(d / f"{ca}.pem"),
        "MC_TLS_CERT": str(d / f"{name}.pem"),
        "MC_TLS_KEY": str(d / f"{name}-key.pem"),
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    certs(d, "init")
    for i in (1, 2, 3):
        certs(d, "issue", f"master-{i}", "--name", "127.0.0.1", "--role", "master")
    certs(d, "issue", "node-a", "--name", "127.0.0.1")
    certs(d, "issue", "node-b", "--name", "127.0.0.1", "--role", "storage")
    certs(d, "issue", "ops", "--name", "127.0.0.1", "--role", "admin")
    other = tmp_path_factory.mktemp("other-ca")
    certs(other, "init")
    certs(other, "issue", "intruder", "--name", "127.0.0.1", "--role", "client,admin")
    ports = free_ports(9)
    raft, rpc, metrics = ports[0:3], ports[3:6], ports[6:9]
    peers = ",".join(f"{i + 1}=127.0.0.1:{raft[i]}/127.0.0.1:{rpc[i]}" for i in range(3))
    procs = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("MC_TLS_")}
    for i in range(3):
        log = open(d / f"master-{i + 1}.log", "w+")
        cmd = [
            master_exe(),
            "--rpc_address=127.0.0.1",
            f"--rpc_port={rpc[i]}",
            f"--metrics_port={metrics[i]}",
            f"--raft_id={i + 1}",
            f"--raft_peers={peers}",
            f"--raft_data_dir={d / f'raft-{i + 1}'}",
            f"--tls_ca={d / 'ca.pem'}",
            f"--tls_cert={d / f'master-{i + 1}.pem'}",
            f"--tls_key={d / f'master-{i + 1}-key.pem'}",
        ]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    try:
        deadline = time.monotonic() + 30
        while not all(port_open(p) for p in rpc):
            for p, log in procs:
                if p.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"a master exited with {p.returncode}:\n{log.read()}")
            assert time.monotonic() < deadline, "the master group did not open its ports"
            time.sleep(0.1)
        # Wait for the group's first leader: the admin's member listing answers then.
        env_ops = {**env, **identity(d, "ops")}
        while True:
            out = subprocess.run(
                [master_exe(), "admin", "members", f"--master_server_addr={','.join(f'127.0.0.1:{p}' for p in rpc)}"],
                capture_output=True, text=True, env=env_ops, timeout=60,
            )
            if out.returncode == 0:
                break
            assert time.monotonic() < deadline + 30, out.stdout + out.stderr
            time.sleep(0.3)
        yield {
            "dir": d,
            "other": other,
            "masters": ",".join(f"127.0.0.1:{p}" for p in rpc),
            "logs": [log for _, log in procs],
        }
    finally:
        for p, log in procs:
            stop(p)
            log.close()


def setup_store(monkeypatch, cluster, env: dict[str, str] | None, protocol="tcp"):
    from mooncake.store import MooncakeDistributedStore

    for k in ("MC_TLS_CA", "MC_TLS_CERT", "MC_TLS_KEY"):
        monkeypatch.delenv(k, raising=False)
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    s = MooncakeDistributedStore()
    rc = s.setup("127.0.0.1", "P2PHANDSHAKE", 32 << 20, 16 << 20, protocol, "", cluster["masters"])
    return s, rc


@pytest.mark.parametrize("protocol", ["tcp", "quic"])
def test_members_store_and_read_each_others_values(monkeypatch, cluster, protocol):
    d = cluster["dir"]
    # Between hosts, as it would be: over the network transport, not same-host shared memory.
    monkeypatch.setenv("MC_SAME_HOST_SHM", "0")
    a, rc = setup_store(monkeypatch, cluster, identity(d, "node-a"), protocol)
    assert rc == 0
    b, rc = setup_store(monkeypatch, cluster, identity(d, "node-b"), protocol)
    assert rc == 0
    try:
        value = os.urandom(1 << 20)
        key = f"secure-{protocol}"
        assert a.put(key, value) == 0
        # b reads a's bytes over authenticated TCP or QUIC.
        assert b.get(key) == value
        assert b.is_exist(key) == 1
        assert a.get_size(key) == len(value)
    finally:
        a.close()
        b.close()


def test_nodes_outside_the_cluster_are_refused(monkeypatch, cluster):
    d, other = cluster["dir"], cluster["other"]
    s, rc = setup_store(monkeypatch, cluster, None)
    assert rc != 0, "a node without a certificate joined a secured cluster"
    s.close()
    s, rc = setup_store(monkeypatch, cluster, identity(other, "intruder"))
    assert rc != 0, "a node with another CA's certificate joined"
    s.close()
    # Another CA's certificate presented to a node that trusts ours: refused as well.
    foreign = identity(other, "intruder")
    foreign["MC_TLS_CA"] = str(d / "ca.pem")
    s, rc = setup_store(monkeypatch, cluster, foreign)
    assert rc != 0
    s.close()


def test_membership_changes_need_the_admin_role(cluster):
    d = cluster["dir"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("MC_TLS_")}

    def admin(name: str, *args: str):
        env = {**base, **identity(d, name)}
        return subprocess.run(
            [master_exe(), "admin", *args, f"--master_server_addr={cluster['masters']}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    ok = admin("ops", "members")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "voter" in ok.stdout
    refused = admin("node-a", "remove", "3")
    assert refused.returncode != 0
    assert "admin" in (refused.stdout + refused.stderr)
    # Nothing changed: still three voters.
    again = admin("ops", "members")
    assert again.stdout.count("voter") == ok.stdout.count("voter")
