"""The `mooncake_master` console script: the Rust master inside a Python process."""

from __future__ import annotations

import signal
import subprocess

import pytest

from conftest import master_exe, port_open, stop, wait_ports


def test_help_and_bad_flags():
    r = subprocess.run([master_exe(), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--rpc_port" in r.stdout
    r = subprocess.run([master_exe(), "--no_such_flag=1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown flag" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_exit_on_signal(sig):
    rpc, metrics = 50071, 9073
    p = subprocess.Popen(
        [master_exe(), f"--rpc_port={rpc}", f"--metrics_port={metrics}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_ports([rpc], p)
        assert stop(p, sig) == 0
        assert "stopped" in p.stdout.read()
        assert not port_open(rpc)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
