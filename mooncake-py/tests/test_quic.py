"""protocol="quic": stores move bytes over QUIC with mutual TLS, with the certificates the
MC_TLS_CA / MC_TLS_CERT / MC_TLS_KEY files hold (made here with the openssl command, so without
roles: such certificates count as client certificates). A node with a certificate also speaks
TLS to its master, so these stores use a master started with certificates of the same CA."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import MASTER, master_exe, port_open, stop
import numpy as np

from mooncake.p2p import P2PStore
from mooncake.store import MooncakeDistributedStore, ReplicateConfig


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}-key.pem", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )


def make_node(d, ca, name):
    (d / f"{name}.ext").write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "keyUsage=critical,digitalSignature\n"
        "basicConstraints=CA:FALSE\n"
    )
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}-key.pem",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=d,
    )


def use(monkeypatch, d, ca, name):
    monkeypatch.setenv("MC_TLS_CA", str(d / f"{ca}.pem"))
    monkeypatch.setenv("MC_TLS_CERT", str(d / f"{name}.pem"))
    monkeypatch.setenv("MC_TLS_KEY", str(d / f"{name}-key.pem"))


def quic_store(segment, master=MASTER):
    s = MooncakeDistributedStore()
    rc = s.setup("localhost", "P2PHANDSHAKE", segment, 16 << 20, "quic", "", master)
    return s, rc


def tls_master(d, ca, name):
    """A master serving TLS with `name`'s certificate; returns (process, its address)."""
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    rpc, metrics = ports
    log = open(d / "master.log", "w+")
    proc = subprocess.Popen(
        [
            master_exe(),
            "--rpc_address=127.0.0.1",
            f"--rpc_port={rpc}",
            f"--metrics_port={metrics}",
            f"--tls_ca={d / f'{ca}.pem'}",
            f"--tls_cert={d / f'{name}.pem'}",
            f"--tls_key={d / f'{name}-key.pem'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    for _ in range(300):
        if port_open(rpc):
            return proc, f"127.0.0.1:{rpc}", log
        if proc.poll() is not None:
            break
        import time

        time.sleep(0.1)
    log.seek(0)
    stop(proc)
    pytest.fail(f"the TLS master did not start:\n{log.read()}")


def test_quic_stores_within_one_ca(master, uniq, tmp_path, monkeypatch):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    # Between hosts, as it would be: not through same-host shared memory.
    monkeypatch.setenv("MC_SAME_HOST_SHM", "0")
    for var in ("MC_TLS_CA", "MC_TLS_CERT", "MC_TLS_KEY"):
        monkeypatch.delenv(var, raising=False)
    s, rc = quic_store(32 << 20)
    assert rc != 0, "quic without a certificate must be refused"
    s.close()

    make_ca(tmp_path, "ca")
    for name in ("master", "storage", "reader"):
        make_node(tmp_path, "ca", name)
    proc, master, log = tls_master(tmp_path, "ca", "master")
    use(monkeypatch, tmp_path, "ca", "storage")
    storage, rc = quic_store(32 << 20, master)
    assert rc == 0
    use(monkeypatch, tmp_path, "ca", "reader")
    reader, rc = quic_store(0, master)
    assert rc == 0
    try:
        config = ReplicateConfig()
        config.preferred_segment = storage.get_hostname()
        value = bytes(range(256)) * 4096  # 1 MiB
        assert reader.put(uniq + "q", value, config) == 0
        assert reader.get(uniq + "q") == value
        assert storage.get(uniq + "q") == value

        # A node whose certificate comes from another CA is refused by the master.
        make_ca(tmp_path, "other")
        make_node(tmp_path, "other", "intruder")
        use(monkeypatch, tmp_path, "other", "intruder")
        intruder, rc = quic_store(0, master)
        intruder.close()
        assert rc != 0
    finally:
        reader.close()
        storage.close()
        stop(proc)
        log.close()


def test_p2p_over_quic(tmp_path, monkeypatch):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    make_ca(tmp_path, "ca")
    for name in ("origin", "reader"):
        make_node(tmp_path, "ca", name)
    use(monkeypatch, tmp_path, "ca", "origin")
    origin = P2PStore("memory", "127.0.0.1", protocol="quic")
    use(monkeypatch, tmp_path, "ca", "reader")
    reader = P2PStore("memory", "127.0.0.1", protocol="quic")
    try:
        src = np.random.default_rng(7).integers(0, 256, 3 << 20, dtype=np.uint8)
        origin.register("quic/ckpt", [src], max_shard_size=1 << 20)
        dst = np.zeros_like(src)
        reader.get_replica("quic/ckpt", [dst], timeout=30)
        assert np.array_equal(dst, src)
    finally:
        reader.close()
        origin.close()
