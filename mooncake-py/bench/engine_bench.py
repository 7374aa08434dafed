#!/usr/bin/env python3
"""Two-process benchmark of ``mooncake.engine.TransferEngine`` on 127.0.0.1.

A *target* process (this script with ``--target``, started by the driver with the same
interpreter) registers one buffer and waits; the driver writes to it and reads from it with
``transfer_sync_write`` / ``transfer_sync_read`` and ``batch_transfer_sync_write`` (``--batch``
requests per call), for each size, for ``--seconds`` each, and prints calls, GB/s (1e9 bytes/s
over the time inside calls) and p50/p99 per call. The first call of each case is checked:
the target reports a digest of what landed, and reads are compared with the target's pattern.

It runs against whichever ``mooncake`` the interpreter imports, so the same script measures
another implementation of the API from its own virtualenv (an engine that wants it may need
``MC_TCP_BIND_ADDRESS=127.0.0.1`` in the environment).

Usage: python engine_bench.py [--sizes 4K,64K,1M,16M] [--seconds 1.0] [--batch 16]
                              [--protocol tcp] [--managed]
``--managed`` uses ``allocate_managed_buffer`` buffers on both sides instead of registered numpy
arrays (memory that same-host peers may map directly).
"""

from __future__ import annotations

import argparse
import hashlib
import selectors
import subprocess
import sys
import time

import numpy as np


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def pattern(n: int) -> np.ndarray:
    return np.random.default_rng(1234).integers(0, 256, n, dtype=np.uint8)


def target_main(args: argparse.Namespace) -> None:
    from mooncake.engine import TransferEngine

    e = TransferEngine()
    if e.initialize("127.0.0.1", "P2PHANDSHAKE", args.protocol, "") != 0:
        print("ERROR initialize", flush=True)
        sys.exit(2)
    size = args.capacity
    if args.managed:
        base = e.allocate_managed_buffer(size)
        data = pattern(size).tobytes()
        e.write_bytes_to_buffer(base, data, size)
        keep = None
    else:
        keep = pattern(size)
        base = keep.ctypes.data
        if e.register_memory(base, size) != 0:
            print("ERROR register", flush=True)
            sys.exit(2)
    print("READY", e.get_rpc_port(), base, flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "digest":
            n = int(cmd[1])
            got = e.read_bytes_from_buffer(base, n)
            print("DIGEST", hashlib.sha256(got).hexdigest(), flush=True)
        elif cmd[0] == "reset":
            e.write_bytes_to_buffer(base, pattern(size).tobytes(), size)
            print("OK", flush=True)
        elif cmd[0] == "quit":
            break
    del keep


def readline(proc: subprocess.Popen, timeout: float = 60.0) -> list[str]:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise RuntimeError(f"target did not answer within {timeout}s")
    finally:
        sel.close()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"target exited with {proc.poll()}")
    return line.split()


def ask(proc: subprocess.Popen, cmd: str) -> list[str]:
    proc.stdin.write(cmd + "\n")
    proc.stdin.flush()
    return readline(proc)


def measure(call, seconds: float) -> list[float]:
    times = []
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        rc = call()
        t1 = time.perf_counter()
        if rc != 0:
            raise RuntimeError(f"call returned {rc}")
        times.append(t1 - t0)
        if t1 >= end:
            return times


def driver_main(args: argparse.Namespace) -> None:
    from mooncake.engine import TransferEngine

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    capacity = max(max(sizes) * args.batch, 1 << 20)
    cmd = [sys.executable, __file__, "--target", "--capacity", str(capacity), "--protocol", args.protocol]
    if args.managed:
        cmd.append("--managed")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready = readline(proc)
        if ready[0] != "READY":
            raise RuntimeError(" ".join(ready))
        target = f"127.0.0.1:{ready[1]}"
        remote = int(ready[2])
        e = TransferEngine()
        if e.initialize("127.0.0.1", "P2PHANDSHAKE", args.protocol, "") != 0:
            raise RuntimeError("initialize failed")
        if args.managed:
            local = e.allocate_managed_buffer(capacity)
            e.write_bytes_to_buffer(local, pattern(capacity)[::-1].tobytes(), capacity)
            keep = None
        else:
            keep = pattern(capacity)[::-1].copy()
            local = keep.ctypes.data
            if e.register_memory(local, capacity) != 0:
                raise RuntimeError("register_memory failed")
        want_remote = pattern(capacity)
        print(f"{'case':<28}{'size':>8}{'calls':>9}{'GB/s':>9}{'p50 us':>10}{'p99 us':>10}")
        for size in sizes:
            # Check first: a read brings the target's pattern, a write lands our bytes.
            assert ask(proc, "reset") == ["OK"]
            if e.transfer_sync_read(target, local, remote, size) != 0:
                raise RuntimeError("check read failed")
            if e.read_bytes_from_buffer(local, size) != want_remote[:size].tobytes():
                raise RuntimeError(f"read of {size} bytes brought wrong bytes")
            ours = want_remote[:size][::-1].tobytes()
            e.write_bytes_to_buffer(local, ours, size)
            if e.transfer_sync_write(target, local, remote, size) != 0:
                raise RuntimeError("check write failed")
            if ask(proc, f"digest {size}") != ["DIGEST", hashlib.sha256(ours).hexdigest()]:
                raise RuntimeError(f"write of {size} bytes did not land")
            n = args.batch
            cases = [
                ("transfer_sync_write", size, lambda: e.transfer_sync_write(target, local, remote, size)),
                ("transfer_sync_read", size, lambda: e.transfer_sync_read(target, local, remote, size)),
                (
                    f"batch_transfer_sync_write x{n}",
                    size * n,
                    lambda: e.batch_transfer_sync_write(
                        target,
                        [local + i * size for i in range(n)],
                        [remote + i * size for i in range(n)],
                        [size] * n,
                    ),
                ),
            ]
            for name, nbytes, call in cases:
                times = sorted(measure(call, args.seconds))
                gbps = nbytes * len(times) / sum(times) / 1e9
                p50 = times[len(times) // 2] * 1e6
                p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6
                label = f"{size >> 10}K" if size < (1 << 20) else f"{size >> 20}M"
                print(f"{name:<28}{label:>8}{len(times):>9}{gbps:>9.2f}{p50:>10.1f}{p99:>10.1f}", flush=True)
        del keep
        proc.stdin.write("quit\n")
        proc.stdin.flush()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4K,64K,1M,16M")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--protocol", default="tcp")
    p.add_argument("--managed", action="store_true")
    p.add_argument("--target", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--capacity", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.target:
        target_main(args)
    else:
        driver_main(args)


if __name__ == "__main__":
    main()
