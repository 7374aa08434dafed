#!/usr/bin/env python3
"""batch_is_exist as serving stacks call it: 1k and 32k keys per call, half of them present,
and the p99 of a 32k-key call while another client writes at full speed (target <= 10 ms).

Runs ours and, when given, upstream's wheel in the same run, each against its own master:

    python mooncake-py/bench/exist_bench.py --ours target/py-venv/bin/python \
        --upstream /path/to/upstream-venv/bin/python [--rounds 30]

Upstream's venv needs mooncake-transfer-engine-non-cuda==0.3.13.post1 (its master is taken
from the same venv; MC_TCP_BIND_ADDRESS=127.0.0.1 is set for it). Each implementation runs in
a fresh process with its own master on its own ports; figures are milliseconds per call.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

VALUE = b"v" * 4096


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"master exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("master did not start")


def new_store(master: str, segment: int):
    from mooncake.store import MooncakeDistributedStore

    s = MooncakeDistributedStore()
    rc = s.setup("127.0.0.1", "P2PHANDSHAKE", segment, 64 << 20, "tcp", "", master)
    if rc != 0:
        raise RuntimeError(f"setup returned {rc}")
    return s


def timed(call, rounds):
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def worker(master: str, rounds: int) -> dict:
    s = new_store(master, 512 << 20)
    present = [f"k{i}" for i in range(16384)]
    for i in range(0, len(present), 512):
        rc = s.put_batch(present[i:i + 512], [VALUE[:64]] * len(present[i:i + 512]))
        if rc != 0:
            raise RuntimeError(f"put_batch returned {rc}")
    absent = [f"absent{i}" for i in range(16384)]
    keys_1k = present[:500] + absent[:500]
    keys_32k = present + absent
    assert s.batch_is_exist(keys_1k).count(1) == 500
    res = {}
    s.batch_is_exist(keys_32k)  # warm-up
    res["1k"] = timed(lambda: s.batch_is_exist(keys_1k), rounds * 10)
    res["32k"] = timed(lambda: s.batch_is_exist(keys_32k), rounds)
    # Another client writes at full speed meanwhile.
    writer = subprocess.Popen([sys.executable, __file__, "writer", "--master", master],
                              stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        line = writer.stdout.readline()  # "ready" once it writes
        if line.strip() != "ready":
            raise RuntimeError(f"writer did not start: {line!r}")
        time.sleep(0.5)
        res["32k_under_writes"] = timed(lambda: s.batch_is_exist(keys_32k), rounds)
    finally:
        writer.send_signal(signal.SIGTERM)
        out, _ = writer.communicate(timeout=30)
    res["writer_puts_per_s"] = float(out.strip().splitlines()[-1]) if out.strip() else 0.0
    s.close()
    return res


def writer(master: str) -> None:
    s = new_store(master, 512 << 20)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("ready", flush=True)
    n, i, t0 = 0, 0, time.perf_counter()
    while not stop:
        keys = [f"w{i}_{j}" for j in range(32)]
        s.put_batch(keys, [VALUE] * 32)
        n += 32
        i += 1
        if i % 64 == 0:
            s.remove_by_regex("^w.*")  # keep the segment from filling up
    print(f"{n / (time.perf_counter() - t0):.0f}", flush=True)
    s.close()


def run_one(python: str, rounds: int, upstream: bool) -> dict:
    master_exe = str(Path(python).parent / "mooncake_master")
    rpc, metrics = free_port(), free_port()
    env = os.environ.copy()
    if upstream:
        env["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
    args = [master_exe, f"--rpc_port={rpc}", f"--metrics_port={metrics}"]
    log = open(f"/tmp/exist_bench_master_{rpc}.log", "w")
    m = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                         start_new_session=True)
    try:
        wait_port(rpc, m)
        r = subprocess.run([python, __file__, "worker", "--master", f"127.0.0.1:{rpc}",
                            "--rounds", str(rounds)], capture_output=True, text=True, env=env,
                           timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"worker failed:\n{r.stderr[-2000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        m.terminate()
        try:
            m.wait(10)
        except subprocess.TimeoutExpired:
            m.kill()
        log.close()


def summary(res: dict) -> dict:
    out = {}
    for k in ("1k", "32k", "32k_under_writes"):
        xs = res[k]
        out[k] = {"median_ms": statistics.median(xs), "p99_ms": pct(xs, 99)}
    out["writer_puts_per_s"] = res["writer_puts_per_s"]
    return out


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in ("worker", "writer"):
        p = argparse.ArgumentParser()
        p.add_argument("role")
        p.add_argument("--master", required=True)
        p.add_argument("--rounds", type=int, default=30)
        a = p.parse_args(argv)
        if a.role == "writer":
            writer(a.master)
        else:
            print(json.dumps(worker(a.master, a.rounds)))
        return 0
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", default=sys.executable)
    p.add_argument("--upstream")
    p.add_argument("--rounds", type=int, default=30)
    a = p.parse_args(argv)
    results = {"ours": summary(run_one(a.ours, a.rounds, False))}
    if a.upstream:
        results["upstream"] = summary(run_one(a.upstream, a.rounds, True))
    print(json.dumps(results, indent=1))
    print(f"\n{'batch_is_exist (half present)':34} " + " ".join(f"{n:>22}" for n in results))
    for k in ("1k", "32k", "32k_under_writes"):
        cells = [f"{r[k]['median_ms']:8.2f} / p99 {r[k]['p99_ms']:7.2f}" for r in results.values()]
        print(f"{k + ' keys, ms median / p99':34} " + " ".join(f"{c:>22}" for c in cells))
    print(f"{'writer puts/s meanwhile':34} "
          + " ".join(f"{r['writer_puts_per_s']:>22.0f}" for r in results.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
