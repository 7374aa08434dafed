#!/usr/bin/env python3
"""Two-process benchmark of ``mooncake.store`` through its Python API.

The same workload as the Rust store benchmark (``src/bin/store_bench``): a *storage* process (a
store with a large ``global_segment_size``) and a *client* process with ``global_segment_size=0``,
so every object byte crosses processes over loopback TCP. The client measures

    put / get                       bytes API, one object per call
    put_batch / get_batch           bytes API, --batch objects per call
    put_from / get_into             zero-copy, buffers registered with register_buffer (numpy)
    batch_put_from / batch_get_into zero-copy, --batch objects per call

for each size (default 4K,64K,1M,16M) and prints calls, ops/s (objects/s), GB/s (1e9 bytes/s over
the time spent inside timed calls) and p50/p99 per call. Keys are fresh for every put; each case
first checks its data (the first call's bytes are compared).

The script runs against whichever ``mooncake`` the interpreter imports, so the implementation is
chosen by the interpreter / virtualenv:

    VENV/bin/python store_bench.py bench --start-master            # master from VENV/bin
    VENV/bin/python store_bench.py bench --master 127.0.0.1:50051 \\
        --metadata http://127.0.0.1:8080/metadata                   # an already running master

Roles (first argument):
    bench    (default) the client; starts the storage process (``storage``) with the same
             interpreter, and with --start-master the master from the interpreter's directory
    storage  internal: the storage process (serves until its stdin closes)
    compare  the driver's side-by-side comparison (needs no ``mooncake`` import): for several
             rounds it starts each implementation's own master on loopback, runs ``bench`` with
             that implementation's interpreter, optionally runs the Rust store_bench, then prints
             medians, ratios ours/upstream, the Python overhead over the Rust client, and targets.
             See ``run_bench.sh`` (the usual entry point) and ``compare --help``.

Every child process is bounded in time and killed on exit or failure.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

# Execution order within a size (as the Rust bench): the puts (the first put_batch batch becomes
# the get working set), then the gets.
ORDER = ["put", "put_batch", "put_from", "batch_put_from", "get", "get_batch", "get_into", "batch_get_into"]
# Report order.
SHOW = ["put", "get", "put_batch", "get_batch", "put_from", "get_into", "batch_put_from", "batch_get_into"]
BATCH_CASES = {"put_batch", "get_batch", "batch_put_from", "batch_get_into"}
POISON = 0xA5
SEED = 0x53544F524542454E
REMOVE_CHUNK = 16384
OURS_DIST = "mooncake-rs"
UPSTREAM_DISTS = ["mooncake-transfer-engine-non-cuda", "mooncake-transfer-engine"]

# --------------------------------------------------------------------------------------------
# Formatting and parsing helpers
# --------------------------------------------------------------------------------------------


def parse_size(s: str) -> int:
    u = s.strip().upper()
    for suf, m in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("G", 1 << 30), ("M", 1 << 20),
                   ("K", 1 << 10), ("B", 1)):
        if u.endswith(suf):
            return int(u[: -len(suf)].strip()) * m
    return int(u)


def fmt_bytes(n: int) -> str:
    for unit, m in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} B"


def fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    if ns < 1e6:
        return f"{ns / 1e3:.1f}us"
    if ns < 1e9:
        return f"{ns / 1e6:.2f}ms"
    return f"{ns / 1e9:.2f}s"


def fmt_rate(r: float | None) -> str:
    if r is None:
        return "-"
    if r >= 1e6:
        return f"{r / 1e6:.2f}M"
    if r >= 1e4:
        return f"{r / 1e3:.1f}k"
    if r >= 100:
        return f"{r:.0f}"
    return f"{r:.1f}"


def parse_rate(s: str) -> float:
    s = s.strip()
    if s.endswith("M"):
        return float(s[:-1]) * 1e6
    if s.endswith("k"):
        return float(s[:-1]) * 1e3
    return float(s)


def parse_ns(s: str) -> float:
    s = s.strip()
    for suf, m in (("us", 1e3), ("ms", 1e6), ("ns", 1.0), ("s", 1e9)):
        if s.endswith(suf):
            return float(s[: -len(suf)]) * m
    return float(s)


def percentiles(samples: list[int]) -> tuple[int, int]:
    """p50 and p99, nearest rank (as the Rust bench)."""
    if not samples:
        return 0, 0
    s = sorted(samples)

    def at(q: float) -> int:
        return s[max(1, min(len(s), math.ceil(q * len(s)))) - 1]

    return at(0.50), at(0.99)


EMIT = {"on": False}


def emit(tag: str, obj) -> None:
    """A machine-readable line for `compare` (only with --json-lines)."""
    if EMIT["on"]:
        print(f"@@{tag} {json.dumps(obj, sort_keys=True)}", flush=True)


# --------------------------------------------------------------------------------------------
# Processes: every child is tracked and killed on exit
# --------------------------------------------------------------------------------------------

_children: list[subprocess.Popen] = []
_children_lock = threading.Lock()


def track(p: subprocess.Popen) -> subprocess.Popen:
    with _children_lock:
        _children.append(p)
    return p


def stop_proc(p: subprocess.Popen, sig=signal.SIGTERM, timeout=10.0, group=False) -> int | None:
    """Stops `p` (and its process group when `group`): `sig`, then SIGKILL after `timeout`."""
    if p.poll() is None:
        try:
            if group:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                if group:
                    os.killpg(p.pid, signal.SIGKILL)
                else:
                    p.kill()
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
    elif group:
        # The leader is gone; make sure nothing of its group is left behind.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    with _children_lock:
        if p in _children:
            _children.remove(p)
    return p.returncode


def kill_all_children() -> None:
    with _children_lock:
        procs = list(_children)
    for p in procs:
        stop_proc(p, signal.SIGKILL, timeout=3.0, group=getattr(p, "_own_group", False))


def _on_signal(signum, _frame):
    kill_all_children()
    sys.stderr.write(f"store_bench: signal {signum}: children stopped\n")
    os._exit(128 + signum)


def install_cleanup() -> None:
    atexit.register(kill_all_children)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, _on_signal)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def listen_sockets(pid: int) -> list[str]:
    """The TCP listening addresses of process `pid` (from /proc), e.g. ['127.0.0.1:50051']."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return []
    out = []
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            addr, port = f[1].split(":")
            if v6:
                raw = bytes.fromhex(addr)
                words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                ip = socket.inet_ntop(socket.AF_INET6, b"".join(words))
                out.append(f"[{ip}]:{int(port, 16)}")
            else:
                ip = socket.inet_ntoa(bytes.fromhex(addr)[::-1])
                out.append(f"{ip}:{int(port, 16)}")
    return sorted(set(out))


def non_loopback(addrs: list[str]) -> list[str]:
    return [a for a in addrs if not (a.startswith("127.") or a.startswith("[::1]") or a.startswith("[::ffff:127."))]


def master_args(rpc_port: int, http_port: int, metrics_port: int, upstream_flags: bool) -> list[str]:
    """The seed's master command line (HTTP metadata server on) with loopback binds and our ports.
    `upstream_flags` adds flags only upstream's master knows (--metrics_host)."""
    a = [
        "--enable_http_metadata_server=true",
        "--http_metadata_server_host=127.0.0.1",
        f"--http_metadata_server_port={http_port}",
        "--rpc_address=127.0.0.1",
        f"--rpc_port={rpc_port}",
        f"--metrics_port={metrics_port}",
    ]
    if upstream_flags:
        a.append("--metrics_host=127.0.0.1")
    return a


def start_master(exe: str, args: list[str], ports: list[int], log_path: str, env=None,
                 timeout: float = 30.0) -> subprocess.Popen:
    busy = [p for p in ports if port_open(p)]
    if busy:
        raise RuntimeError(f"ports {busy} are already in use on 127.0.0.1; pick others (--*-port flags)")
    log = open(log_path, "ab")
    p = subprocess.Popen([exe, *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, env=env)
    p._own_group = True  # type: ignore[attr-defined]
    log.close()
    track(p)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            stop_proc(p, group=True)
            raise RuntimeError(f"{exe} exited with {p.returncode} before opening its ports (log {log_path})")
        if all(port_open(x) for x in ports):
            return p
        time.sleep(0.05)
    stop_proc(p, group=True)
    raise RuntimeError(f"{exe} did not open {ports} within {timeout}s (log {log_path})")


def read_line_with_timeout(stream, timeout: float) -> str | None:
    box: list[str] = []

    def rd():
        try:
            box.append(stream.readline().decode(errors="replace"))
        except Exception:  # noqa: BLE001
            box.append("")

    t = threading.Thread(target=rd, daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else None


# --------------------------------------------------------------------------------------------
# Role: storage
# --------------------------------------------------------------------------------------------


def role_storage(a) -> int:
    from mooncake.store import MooncakeDistributedStore

    s = MooncakeDistributedStore()
    rc = s.setup(a.hostname, a.metadata, a.segment_size, 16 << 20, "tcp", "", a.master)
    if rc != 0:
        print(f"STORAGE-SETUP-FAILED {rc}", flush=True)
        return 1
    print(f"READY pid={os.getpid()} segment={a.segment_size}", flush=True)
    # Serve until the client closes our stdin (or dies), bounded by --deadline.
    t = threading.Thread(target=lambda: sys.stdin.buffer.read(), daemon=True)
    t.start()
    t.join(a.deadline)
    try:
        s.close()
    except Exception:  # noqa: BLE001
        pass
    os._exit(0)


# --------------------------------------------------------------------------------------------
# Role: bench (the client)
# --------------------------------------------------------------------------------------------


class CaseError(Exception):
    pass


class Meter:
    """Timed calls of one case (as the Rust bench's Meter): a warm-up of seconds/10 (10-100 ms),
    and at least the first call (which pays the page faults of memory the case touches first),
    is not counted; done after `seconds` of busy time and `min_calls` calls, or after 20x
    `seconds` of wall time with at least one call."""

    def __init__(self, seconds: float, min_calls: int):
        self.start = time.perf_counter_ns()
        self.warm_until = self.start + int(min(max(seconds / 10, 0.01), 0.1) * 1e9)
        self.timed = int(seconds * 1e9)
        self.min_calls = min_calls
        self.samples: list[int] = []
        self.objects = 0
        self.bytes = 0
        self.busy = 0
        self.first = True

    def record(self, took: int, objects: int, nbytes: int) -> None:
        if self.first or time.perf_counter_ns() < self.warm_until:
            self.first = False
            return
        self.samples.append(took)
        self.objects += objects
        self.bytes += nbytes
        self.busy += took

    def done(self) -> bool:
        n = len(self.samples)
        wall = time.perf_counter_ns() - self.start
        return (self.busy >= self.timed and n >= self.min_calls) or n >= 2_000_000 or (
            wall >= self.timed * 20 and n >= 1)

    def finish(self, case: str, size: int, batch: int) -> dict:
        p50, p99 = percentiles(self.samples)
        busy_s = max(self.busy / 1e9, 1e-9)
        return {
            "case": case, "size": size, "batch": batch, "calls": len(self.samples),
            "calls_per_s": len(self.samples) / busy_s, "ops_per_s": self.objects / busy_s,
            "gb_per_s": self.bytes / busy_s / 1e9, "p50_ns": p50, "p99_ns": p99,
        }


def impl_info() -> dict:
    import importlib.metadata as md

    import mooncake

    info = {"module": getattr(mooncake, "__file__", "?"), "python": sys.version.split()[0]}
    for d in [OURS_DIST, *UPSTREAM_DISTS]:
        try:
            info["dist"] = d
            info["version"] = md.version(d)
            info["impl"] = "ours" if d == OURS_DIST else "upstream"
            return info
        except md.PackageNotFoundError:
            continue
    info.update(dist="?", version="?", impl="?")
    return info


class Bench:
    def __init__(self, a, store, np):
        self.a = a
        self.s = store
        self.np = np
        self.batch = a.batch
        self.region = max(a.sizes) * a.batch
        self.prefix = f"pyb{os.getpid()}"
        self.n = 0
        rng = np.random.default_rng(SEED)
        # An odd-length random block repeated: every slot of every size holds different bytes.
        block = rng.integers(0, 256, (1 << 20) + 4093, dtype=np.uint8)
        self.src = np.resize(block, self.region).tobytes()
        self.srcv = memoryview(self.src)
        # Registered memory: [0, region) a copy of src (zero-copy puts read it), [region, 2 region)
        # where zero-copy gets land.
        self.reg = np.empty(2 * self.region, dtype=np.uint8)
        self.reg[: self.region] = np.frombuffer(self.src, dtype=np.uint8)
        self.reg[self.region:] = POISON
        self.base = self.reg.ctypes.data
        rc = store.register_buffer(self.base, self.reg.nbytes)
        if rc != 0:
            raise CaseError(f"register_buffer({self.reg.nbytes} bytes) returned {rc}")

    # -- helpers ---------------------------------------------------------------------------
    def key(self, size: int, tag: str) -> str:
        self.n += 1
        return f"{self.prefix}/{size}/{tag}/{self.n}"

    def keys(self, size: int, tag: str, n: int) -> list[str]:
        return [self.key(size, tag) for _ in range(n)]

    def slot(self, size: int, j: int):
        return self.srcv[j * size:(j + 1) * size]

    def src_addr(self, size: int, j: int) -> int:
        return self.base + j * size

    def dst_addr(self, size: int, j: int) -> int:
        return self.base + self.region + j * size

    def check(self, what: str, got, size: int, j: int) -> None:
        want = self.slot(size, j)
        if len(got) != size or bytes(got) != want:
            n = min(len(got), size)
            a = self.np.frombuffer(bytes(got)[:n], dtype=self.np.uint8)
            b = self.np.frombuffer(want[:n], dtype=self.np.uint8)
            diff = self.np.nonzero(a != b)[0]
            at = int(diff[0]) if len(diff) else n
            raise CaseError(f"data check failed: {what} ({fmt_bytes(size)}, object {j}): {len(got)} bytes read, "
                            f"byte {at} differs")

    def poison_dst(self, size: int, j: int) -> None:
        o = self.region + j * size
        self.reg[o:o + size] = POISON

    def check_dst(self, what: str, size: int, j: int) -> None:
        o = self.region + j * size
        got = self.reg[o:o + size]
        want = self.reg[j * size:(j + 1) * size]
        if not self.np.array_equal(got, want):
            at = int(self.np.nonzero(got != want)[0][0])
            raise CaseError(f"data check failed: {what} ({fmt_bytes(size)}, object {j}): byte {at} differs")

    def remove(self, keys: list[str]) -> None:
        for i in range(0, len(keys), REMOVE_CHUNK):
            chunk = keys[i:i + REMOVE_CHUNK]
            codes = self.s.batch_remove(chunk, True)
            bad = [(k, c) for k, c in zip(chunk, codes) if c != 0]
            if len(codes) != len(chunk) or bad:
                raise CaseError(f"batch_remove: {len(codes)} codes for {len(chunk)} keys, failures {bad[:3]}")

    def budget(self, size: int) -> int:
        return max(size * self.batch, 128 << 20)

    def expect_ok(self, what: str, rc) -> None:
        if rc != 0:
            raise CaseError(f"{what} returned {rc}")

    def expect_all(self, what: str, keys: list[str], codes, want) -> None:
        if not isinstance(codes, list) or len(codes) != len(keys):
            raise CaseError(f"{what}: got {codes!r:.200} for {len(keys)} keys")
        bad = [(k, c) for k, c in zip(keys, codes) if c != want]
        if bad:
            raise CaseError(f"{what}: {len(bad)} of {len(keys)} failed, first {bad[0][0]!r} -> {bad[0][1]}")

    def meter(self) -> Meter:
        return Meter(self.a.seconds, self.a.min_calls)

    # -- puts --------------------------------------------------------------------------------
    class Live:
        def __init__(self, bench: "Bench"):
            self.b = bench
            self.keys: list[str] = []
            self.bytes = 0

        def add(self, keys, size):
            self.keys.extend(keys)
            self.bytes += size * len(keys)

        def flush_if_over(self, budget, nxt):
            if self.bytes + nxt > budget or len(self.keys) >= 4 * REMOVE_CHUNK:
                self.flush()

        def flush(self):
            self.b.remove(self.keys)
            self.keys = []
            self.bytes = 0

    def case_put(self, size: int) -> dict:
        s, batch, live = self.s, self.batch, Bench.Live(self)
        k = self.key(size, "put")
        self.expect_ok(f"put {k!r}", s.put(k, self.slot(size, 0)))
        self.check("put, read back with get", s.get(k), size, 0)
        live.add([k], size)
        m, i = self.meter(), 1
        while not m.done():
            k = self.key(size, "put")
            v = self.slot(size, i % batch)
            t = time.perf_counter_ns()
            rc = s.put(k, v)
            m.record(time.perf_counter_ns() - t, 1, size)
            self.expect_ok(f"put {k!r}", rc)
            live.add([k], size)
            live.flush_if_over(self.budget(size), size)
            i += 1
        live.flush()
        return m.finish("put", size, 1)

    def case_put_from(self, size: int) -> dict:
        s, batch, live = self.s, self.batch, Bench.Live(self)
        k = self.key(size, "put_from")
        self.expect_ok(f"put_from {k!r}", s.put_from(k, self.src_addr(size, 0), size))
        self.check("put_from, read back with get", s.get(k), size, 0)
        live.add([k], size)
        m, i = self.meter(), 1
        while not m.done():
            k = self.key(size, "put_from")
            addr = self.src_addr(size, i % batch)
            t = time.perf_counter_ns()
            rc = s.put_from(k, addr, size)
            m.record(time.perf_counter_ns() - t, 1, size)
            self.expect_ok(f"put_from {k!r}", rc)
            live.add([k], size)
            live.flush_if_over(self.budget(size), size)
            i += 1
        live.flush()
        return m.finish("put_from", size, 1)

    def verify_batch(self, what: str, keys: list[str], size: int) -> None:
        got = self.s.get_batch(keys)
        if len(got) != len(keys):
            raise CaseError(f"{what}: get_batch returned {len(got)} values for {len(keys)} keys")
        for j, v in enumerate(got):
            self.check(what, v, size, j)

    def put_batch_slots(self, keys: list[str], size: int):
        # The value list is built inside the timed call, as a caller would.
        return self.s.put_batch(keys, [self.slot(size, j) for j in range(len(keys))])

    def batch_put_from_slots(self, keys: list[str], size: int):
        return self.s.batch_put_from(keys, [self.src_addr(size, j) for j in range(len(keys))], [size] * len(keys))

    def case_put_batch(self, size: int, g: dict) -> dict:
        batch, live = self.batch, Bench.Live(self)
        keys = self.keys(size, "put_batch", batch)
        self.expect_ok("put_batch", self.put_batch_slots(keys, size))
        self.verify_batch("put_batch, read back with get_batch", keys, size)
        if "keys" not in g:
            g["keys"] = keys
        else:
            live.add(keys, size)
        m = self.meter()
        while not m.done():
            live.flush_if_over(self.budget(size), size * batch)
            keys = self.keys(size, "put_batch", batch)
            t = time.perf_counter_ns()
            rc = self.put_batch_slots(keys, size)
            m.record(time.perf_counter_ns() - t, batch, size * batch)
            self.expect_ok("put_batch", rc)
            live.add(keys, size)
        live.flush()
        return m.finish("put_batch", size, batch)

    def case_batch_put_from(self, size: int) -> dict:
        batch, live = self.batch, Bench.Live(self)
        keys = self.keys(size, "batch_put_from", batch)
        self.expect_all("batch_put_from", keys, self.batch_put_from_slots(keys, size), 0)
        self.verify_batch("batch_put_from, read back with get_batch", keys, size)
        live.add(keys, size)
        m = self.meter()
        while not m.done():
            live.flush_if_over(self.budget(size), size * batch)
            keys = self.keys(size, "batch_put_from", batch)
            t = time.perf_counter_ns()
            r = self.batch_put_from_slots(keys, size)
            m.record(time.perf_counter_ns() - t, batch, size * batch)
            self.expect_all("batch_put_from", keys, r, 0)
            live.add(keys, size)
        live.flush()
        return m.finish("batch_put_from", size, batch)

    # -- gets --------------------------------------------------------------------------------
    def working_set(self, size: int, g: dict) -> list[str]:
        if "keys" not in g:
            keys = self.keys(size, "g", self.batch)
            self.expect_ok("put_batch (get working set)", self.put_batch_slots(keys, size))
            g["keys"] = keys
        return g["keys"]

    def case_get(self, size: int, g: list[str]) -> dict:
        s = self.s
        self.check("get", s.get(g[0]), size, 0)
        m, i = self.meter(), 1
        while not m.done():
            k = g[i % len(g)]
            t = time.perf_counter_ns()
            v = s.get(k)
            m.record(time.perf_counter_ns() - t, 1, size)
            if len(v) != size:
                raise CaseError(f"get {k!r}: {len(v)} bytes, expected {size}")
            i += 1
        return m.finish("get", size, 1)

    def case_get_batch(self, size: int, g: list[str]) -> dict:
        self.verify_batch("get_batch", g, size)
        m = self.meter()
        while not m.done():
            t = time.perf_counter_ns()
            r = self.s.get_batch(g)
            m.record(time.perf_counter_ns() - t, len(g), size * len(g))
            if len(r) != len(g) or any(len(v) != size for v in r):
                raise CaseError(f"get_batch: sizes {[len(v) for v in r][:4]}..., expected {size}")
        return m.finish("get_batch", size, len(g))

    def case_get_into(self, size: int, g: list[str]) -> dict:
        s = self.s
        self.poison_dst(size, 0)
        n = s.get_into(g[0], self.dst_addr(size, 0), size)
        if n != size:
            raise CaseError(f"get_into {g[0]!r} returned {n}, expected {size}")
        self.check_dst("get_into", size, 0)
        m, i = self.meter(), 1
        while not m.done():
            j = i % len(g)
            k, addr = g[j], self.dst_addr(size, j)
            t = time.perf_counter_ns()
            n = s.get_into(k, addr, size)
            m.record(time.perf_counter_ns() - t, 1, size)
            if n != size:
                raise CaseError(f"get_into {k!r} returned {n}, expected {size}")
            i += 1
        return m.finish("get_into", size, 1)

    def case_batch_get_into(self, size: int, g: list[str]) -> dict:
        ptrs = [self.dst_addr(size, j) for j in range(len(g))]
        sizes = [size] * len(g)
        for j in range(len(g)):
            self.poison_dst(size, j)
        self.expect_all("batch_get_into", g, self.s.batch_get_into(g, ptrs, sizes), size)
        for j in range(len(g)):
            self.check_dst("batch_get_into", size, j)
        m = self.meter()
        while not m.done():
            t = time.perf_counter_ns()
            r = self.s.batch_get_into(g, ptrs, sizes)
            m.record(time.perf_counter_ns() - t, len(g), size * len(g))
            self.expect_all("batch_get_into", g, r, size)
        return m.finish("batch_get_into", size, len(g))

    def run_case(self, case: str, size: int, g: dict) -> dict:
        if case == "put":
            return self.case_put(size)
        if case == "put_from":
            return self.case_put_from(size)
        if case == "put_batch":
            return self.case_put_batch(size, g)
        if case == "batch_put_from":
            return self.case_batch_put_from(size)
        keys = self.working_set(size, g)
        return getattr(self, f"case_{case}")(size, keys)


def print_header(size: int, batch: int) -> None:
    print(f"\n== {fmt_bytes(size)} objects, batch {batch} ==")
    print(f"{'case':<16} {'calls':>8} {'calls/s':>9} {'ops/s':>10} {'GB/s':>7} {'p50/call':>9} {'p99/call':>9}")


def print_row(r: dict) -> None:
    print(f"{r['case']:<16} {r['calls']:>8} {fmt_rate(r['calls_per_s']):>9} {fmt_rate(r['ops_per_s']):>10} "
          f"{r['gb_per_s']:>7.3f} {fmt_ns(r['p50_ns']):>9} {fmt_ns(r['p99_ns']):>9}", flush=True)


def role_bench(a) -> int:
    deadline_at = time.monotonic() + a.deadline
    current = {"case": None, "since": time.monotonic()}

    def watchdog():
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            c = current["case"]
            if c is not None and now - current["since"] > a.case_timeout:
                emit("TIMEOUT", {"size": c[0], "case": c[1], "after_s": round(now - current["since"], 1)})
                print(f"store_bench.py: {fmt_bytes(c[0])} {c[1]} exceeded --case-timeout", file=sys.stderr, flush=True)
                kill_all_children()
                os._exit(4)
            if now > deadline_at:
                emit("TIMEOUT", {"size": c[0] if c else None, "case": c[1] if c else None, "deadline_s": a.deadline})
                print(f"store_bench.py: --deadline {a.deadline}s exceeded", file=sys.stderr, flush=True)
                kill_all_children()
                os._exit(4)

    threading.Thread(target=watchdog, daemon=True).start()

    import numpy as np
    from mooncake.store import MooncakeDistributedStore

    info = impl_info()
    info.update(pid=os.getpid(), sizes=a.sizes, batch=a.batch, seconds=a.seconds)
    emit("INFO", info)
    print(f"store_bench.py: {info['impl']} ({info['dist']} {info['version']}, {info['module']}), "
          f"python {info['python']}, pid {os.getpid()}")

    master_proc = None
    if a.start_master:
        exe = a.master_exe or str(Path(sys.executable).parent / "mooncake_master")
        margs = master_args(a.rpc_port, a.http_port, a.metrics_port, info["impl"] == "upstream")
        master_proc = start_master(exe, margs, [a.rpc_port, a.http_port], a.log_prefix + "master.log")
        a.master = f"127.0.0.1:{a.rpc_port}"
        a.metadata = f"http://127.0.0.1:{a.http_port}/metadata"
        print(f"master: {exe} {' '.join(margs)} (pid {master_proc.pid})")
    if not a.master or not a.metadata:
        print("store_bench.py: need --master and --metadata, or --start-master", file=sys.stderr)
        return 2

    seg = a.segment_size or max(1 << 30, 4 * max(a.sizes) * a.batch)
    storage_err = open(a.log_prefix + "storage.log", "ab")
    storage = track(subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "storage", "--master", a.master, "--metadata", a.metadata,
         "--segment-size", str(seg), "--hostname", "127.0.0.1", "--deadline", str(a.deadline + 30)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=storage_err))
    storage_err.close()
    line = read_line_with_timeout(storage.stdout, 60.0)
    if not line or not line.startswith("READY"):
        emit("FATAL", {"error": f"storage process not ready: {line!r}, rc {storage.poll()}"})
        print(f"store_bench.py: storage process not ready: {line!r} (log {a.log_prefix}storage.log)", file=sys.stderr)
        return 1
    print(f"storage: pid {storage.pid}, global_segment_size {fmt_bytes(seg)} ({line.strip()})")

    store = MooncakeDistributedStore()
    local_buf = max(a.sizes) * a.batch + (64 << 20)
    rc = store.setup("127.0.0.1", a.metadata, 0, local_buf, "tcp", "", a.master)
    if rc != 0:
        emit("FATAL", {"error": f"client setup returned {rc}"})
        print(f"store_bench.py: client setup returned {rc}", file=sys.stderr)
        return 1
    print(f"client: global_segment_size 0, local_buffer_size {fmt_bytes(local_buf)}, master {a.master}, "
          f"metadata {a.metadata}")
    for who, pid in (("master", master_proc.pid if master_proc else None), ("storage", storage.pid),
                     ("client", os.getpid())):
        if pid is None:
            continue
        addrs = listen_sockets(pid)
        emit("LISTEN", {"who": who, "pid": pid, "addrs": addrs})
        bad = non_loopback(addrs)
        if bad:
            print(f"NOTE: {who} (pid {pid}) listens on non-loopback addresses {bad}")

    bench = Bench(a, store, np)
    skip = set(a.skip.split(",")) if a.skip else set()
    errors = 0
    t0 = time.monotonic()
    for size in a.sizes:
        print_header(size, a.batch)
        g: dict = {}
        for case in ORDER:
            if a.cases and case not in a.cases:
                continue
            if f"{size}:{case}" in skip:
                continue
            emit("START", {"size": size, "case": case})
            current.update(case=(size, case), since=time.monotonic())
            try:
                r = bench.run_case(case, size, g)
                r["impl"] = info["impl"]
                print_row(r)
                emit("RESULT", r)
            except CaseError as e:
                errors += 1
                print(f"{case:<16} ERROR: {e}", flush=True)
                emit("ERROR", {"size": size, "case": case, "error": str(e)})
            current["case"] = None
        if "keys" in g:
            try:
                bench.remove(g["keys"])
            except CaseError as e:
                print(f"removing the working set: {e}", flush=True)
    print(f"\n{len(a.sizes)} sizes in {time.monotonic() - t0:.1f} s, {errors} case errors", flush=True)
    store.unregister_buffer(bench.base)
    rc = store.close()
    emit("DONE", {"errors": errors, "close": rc})
    try:
        storage.stdin.close()
    except Exception:  # noqa: BLE001
        pass
    try:
        src = storage.wait(15)
    except subprocess.TimeoutExpired:
        src = stop_proc(storage, signal.SIGTERM, timeout=5.0)
    if src not in (0, None):
        print(f"NOTE: storage process exited with {src}")
    if master_proc is not None:
        stop_proc(master_proc, group=True)
    return 1 if errors else 0


# --------------------------------------------------------------------------------------------
# Role: compare (the driver's comparison)
# --------------------------------------------------------------------------------------------

RUST_HEADER = re.compile(r"^== (\d+) (B|KiB|MiB|GiB) objects, batch (\d+) ==")
RUST_ROW = re.compile(r"^(\w+)\s+(\d+)\s+(\S+)\s+(\S+)\s+([\d.]+)\s+(\S+)\s+(\S+)\s*$")
UNIT = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


class RunOutcome:
    def __init__(self, impl: str, rnd: int):
        self.impl = impl
        self.round = rnd
        self.results: dict[tuple[int, str], dict] = {}
        self.errors: dict[tuple[int, str], str] = {}
        self.crashes: list[str] = []
        self.info: dict = {}
        self.listen: list[dict] = []
        self.seconds = 0.0


def run_with_timeout(cmd, env, timeout, out_path, cwd=None) -> tuple[int | None, str, bool]:
    """Runs cmd in its own process group; stdout to out_path (and returned), stderr appended to
    out_path + '.err'. Returns (returncode, stdout, timed_out)."""
    with open(out_path, "wb") as out, open(out_path + ".err", "ab") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                             start_new_session=True)
        p._own_group = True  # type: ignore[attr-defined]
        track(p)
        timed_out = False
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        rc = stop_proc(p, signal.SIGTERM, timeout=5.0, group=True)
    return rc, Path(out_path).read_text(errors="replace"), timed_out


def describe_rc(rc: int | None) -> str:
    if rc is None:
        return "did not exit"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


def tail(path: str, n: int = 6) -> str:
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines()
                 if ln.strip() and not re.match(r"^I\d{4} ", ln)]  # glog INFO lines left out
    except OSError:
        return ""
    return "\n".join("      | " + ln[:220] for ln in lines[-n:])


def run_python_impl(c, impl: str, py: str, rnd: int, ports: tuple[int, int, int]) -> RunOutcome:
    o = RunOutcome(impl, rnd)
    env = dict(os.environ)
    env["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
    env.setdefault("MC_LOG_LEVEL", "warn")
    env["PYTHONUNBUFFERED"] = "1"
    master_exe = str(Path(py).parent / "mooncake_master")
    rpc, http, metrics = ports
    todo = [(s, k) for s in c.sizes for k in ORDER]
    done: set[tuple[int, str]] = set()
    attempt = 0
    t0 = time.monotonic()
    while attempt < c.max_restarts + 1:
        attempt += 1
        remaining = [x for x in todo if x not in done]
        if not remaining:
            break
        tag = f"{c.log_dir}/r{rnd}-{impl}-a{attempt}"
        try:
            margs = master_args(rpc, http, metrics, impl == "upstream")
            master = start_master(master_exe, margs, [rpc, http], tag + "-master.log", env=env)
        except Exception as e:  # noqa: BLE001
            o.crashes.append(f"master did not start: {e}")
            break
        mlisten = listen_sockets(master.pid)
        o.listen.append({"who": "master", "addrs": mlisten})
        skip = ",".join(f"{s}:{k}" for (s, k) in done)
        cmd = [py, os.path.abspath(__file__), "bench", "--master", f"127.0.0.1:{rpc}",
               "--metadata", f"http://127.0.0.1:{http}/metadata",
               "--sizes", ",".join(str(s) for s in c.sizes), "--batch", str(c.batch),
               "--seconds", str(c.seconds), "--min-calls", str(c.min_calls),
               "--case-timeout", str(c.case_timeout), "--deadline", str(c.run_timeout),
               "--log-prefix", tag + "-", "--json-lines"]
        if skip:
            cmd += ["--skip", skip]
        rc, out, timed_out = run_with_timeout(cmd, env, c.run_timeout + 30, tag + "-client.out")
        mrc = master.poll()
        stop_proc(master, group=True)
        started = None
        finished_cleanly = False
        for line in out.splitlines():
            if not line.startswith("@@"):
                continue
            tagname, _, js = line[2:].partition(" ")
            try:
                d = json.loads(js)
            except json.JSONDecodeError:
                continue
            if tagname == "INFO":
                o.info = d
            elif tagname == "LISTEN":
                o.listen.append(d)
            elif tagname == "START":
                started = (d["size"], d["case"])
            elif tagname == "RESULT":
                o.results[(d["size"], d["case"])] = d
                done.add((d["size"], d["case"]))
                started = None
            elif tagname == "ERROR":
                o.errors[(d["size"], d["case"])] = d["error"]
                done.add((d["size"], d["case"]))
                started = None
            elif tagname == "TIMEOUT":
                o.crashes.append(f"case timed out: {d}")
            elif tagname == "FATAL":
                o.crashes.append(f"fatal: {d['error']}")
            elif tagname == "DONE":
                finished_cleanly = True
        if mrc is not None:
            o.crashes.append(f"master exited during the run ({describe_rc(mrc)}); log {tag}-master.log")
        if finished_cleanly and rc in (0, 1):
            break
        where = f"{fmt_bytes(started[0])} {started[1]}" if started else "outside a case"
        why = "timed out" if timed_out else describe_rc(rc)
        o.crashes.append(f"attempt {attempt}: client {why} during {where}; stderr tail ({tag}-client.out.err):\n"
                         + tail(tag + "-client.out.err"))
        if started:
            o.errors[started] = f"CRASH: client {why} during this case"
            done.add(started)
        elif not finished_cleanly and not any(x not in done for x in todo):
            break
        elif not finished_cleanly and not o.results and not o.errors:
            break  # it fails before any case: retrying will not help
    o.seconds = time.monotonic() - t0
    return o


def run_rust(c, rnd: int) -> RunOutcome:
    o = RunOutcome("rust", rnd)
    tag = f"{c.log_dir}/r{rnd}-rust"
    # The Rust bench's master runs inside its storage process, where the master advises
    # committing puts as their WRITEs land; the Python runs use a mooncake_master process of
    # their own, where it advises committing after the WRITE. The Rust client is told to do the
    # same, so the comparison measures the binding, not where the master runs. Its storage
    # node leaves its segment untouched at setup, as the Python storage process does.
    cmd = [c.rust_bench, "--sizes", ",".join(str(s) for s in c.sizes), "--batch", str(c.batch),
           "--seconds", str(c.seconds), "--min-calls", str(c.min_calls), "--no-profile",
           "--commit-after-write", "--no-prefault", "--cases", ",".join(ORDER)]
    env = dict(os.environ)
    env["MC_TCP_BIND_ADDRESS"] = "127.0.0.1"
    t0 = time.monotonic()
    rc, out, timed_out = run_with_timeout(cmd, env, c.run_timeout, tag + ".out")
    o.seconds = time.monotonic() - t0
    size = None
    for line in out.splitlines():
        m = RUST_HEADER.match(line)
        if m:
            size = int(m.group(1)) * UNIT[m.group(2)]
            continue
        if size is None:
            continue
        if " ERROR: " in line:
            case = line.split()[0]
            o.errors[(size, case)] = line.split(" ERROR: ", 1)[1]
            continue
        m = RUST_ROW.match(line)
        if m and m.group(1) in ORDER:
            try:
                o.results[(size, m.group(1))] = {
                    "case": m.group(1), "size": size, "calls": int(m.group(2)),
                    "calls_per_s": parse_rate(m.group(3)), "ops_per_s": parse_rate(m.group(4)),
                    "gb_per_s": float(m.group(5)), "p50_ns": parse_ns(m.group(6)), "p99_ns": parse_ns(m.group(7)),
                }
            except ValueError:
                pass
    if timed_out or rc not in (0, 1):
        o.crashes.append(f"rust store_bench {'timed out' if timed_out else describe_rc(rc)}; log {tag}.out(.err)")
    return o


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(outcomes: list[RunOutcome], sizes, impl: str) -> dict:
    agg = {}
    runs = [o for o in outcomes if o.impl == impl]
    for s in sizes:
        for k in ORDER:
            rs = [o.results[(s, k)] for o in runs if (s, k) in o.results]
            errs = [o.errors[(s, k)] for o in runs if (s, k) in o.errors]
            agg[(s, k)] = {
                "n": len(rs), "errors": errs, "rounds": len(runs),
                "ops_per_s": median([r["ops_per_s"] for r in rs]),
                "gb_per_s": median([r["gb_per_s"] for r in rs]),
                "p50_ns": median([r["p50_ns"] for r in rs]),
                "p99_ns": median([r["p99_ns"] for r in rs]),
                "gb_all": [round(r["gb_per_s"], 3) for r in rs],
            }
    return agg


def cell(a: dict | None) -> str:
    if a is None:
        return f"{'(not run)':>38}"
    if a["n"] == 0:
        what = "CRASH" if any(e.startswith("CRASH") for e in a["errors"]) else ("FAIL" if a["errors"] else "n/a")
        return f"{what + ' x' + str(len(a['errors'])) if a['errors'] else what:>38}"
    return (f"{fmt_rate(a['ops_per_s']):>8} {a['gb_per_s']:>7.3f} {fmt_ns(a['p50_ns']):>9} "
            f"{fmt_ns(a['p99_ns']):>9}" + ("*" if a["errors"] else " "))


def ratio(x, y) -> float | None:
    if x is None or y is None or y == 0:
        return None
    return x / y


def fr(r: float | None, fmt="{:.2f}x") -> str:
    return "-" if r is None else fmt.format(r)


def role_compare(c) -> int:
    install_cleanup()
    c.sizes = [parse_size(s) for s in c.sizes.split(",")]
    os.makedirs(c.log_dir, exist_ok=True)
    impls = []
    if c.ours:
        impls.append(("ours", c.ours, (c.ours_rpc_port, c.ours_http_port, c.ours_metrics_port)))
    if c.upstream:
        impls.append(("upstream", c.upstream, (c.up_rpc_port, c.up_http_port, c.up_metrics_port)))
    ports = [p for _, _, ps in impls for p in ps]
    if len(set(ports)) != len(ports):
        print(f"compare: port collision among {ports}", file=sys.stderr)
        return 2
    rust = c.rust_bench if c.rust_bench and os.access(c.rust_bench, os.X_OK) else None
    print(f"compare: {c.rounds} rounds, sizes {','.join(fmt_bytes(s) for s in c.sizes)}, batch {c.batch}, "
          f"{c.seconds} s per case, logs in {c.log_dir}")
    for name, py, ps in impls:
        print(f"  {name:<9} {py}  (master {Path(py).parent / 'mooncake_master'}, rpc {ps[0]}, http {ps[1]}, "
              f"metrics {ps[2]})")
    print(f"  rust      {rust or '(not available: no Python-overhead comparison)'}")
    print(f"  load average at start: {os.getloadavg()}", flush=True)
    outcomes: list[RunOutcome] = []
    t_start = time.monotonic()
    for rnd in range(1, c.rounds + 1):
        seq = list(impls) if rnd % 2 == 1 else list(reversed(impls))
        plan: list = [seq[0]] + ([("rust", None, None)] if rust else []) + seq[1:]
        for name, py, ps in plan:
            if time.monotonic() - t_start > c.total_timeout:
                print(f"compare: total time limit {c.total_timeout}s reached; skipping the rest", flush=True)
                break
            if name == "rust":
                o = run_rust(c, rnd)
            else:
                o = run_python_impl(c, name, py, rnd, ps)
            outcomes.append(o)
            status = "ok" if not o.crashes and not o.errors else (
                f"{len(o.errors)} case errors, {len(o.crashes)} crash/timeout notes")
            print(f"round {rnd}: {name:<9} {len(o.results):>2} cases in {o.seconds:5.1f} s  [{status}]  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
            for (s, k), e in sorted(o.errors.items()):
                print(f"    {fmt_bytes(s)} {k}: {e[:300]}")
            for cr in o.crashes:
                print(f"    {cr}")

    names = [n for n, _, _ in impls]
    aggs = {n: aggregate(outcomes, c.sizes, n) for n in names}
    if rust:
        aggs["rust"] = aggregate(outcomes, c.sizes, "rust")
    info = {n: next((o.info for o in outcomes if o.impl == n and o.info), {}) for n in names}

    print("\n" + "=" * 118)
    print("MEDIANS over rounds (ops/s = objects/s; GB/s = 1e9 payload bytes/s over time inside timed calls; "
          "p50/p99 per call,\nper batch of %d for batch cases). ratio thr = ours/upstream GB/s (>1: ours faster); "
          "ratio p50 = ours/upstream p50 (<1: ours faster)." % c.batch)
    for n in names:
        i = info[n]
        print(f"  {n}: {i.get('dist', '?')} {i.get('version', '?')} ({i.get('module', '?')})")
    print("  * = some rounds of this case failed (see above); FAIL/CRASH xN = failed in every round it ran")
    hdr = f"{'size':>7} {'case':<15}|" + "".join(
        f"{n + ': ops/s   GB/s       p50       p99':>40}|" for n in names)
    if "ours" in aggs and "upstream" in aggs:
        hdr += f"{'thr':>7} {'p50':>7}"
    print(hdr)
    for s in c.sizes:
        for k in SHOW:
            line = f"{fmt_bytes(s):>7} {k:<15}|"
            for n in names:
                line += f" {cell(aggs[n][(s, k)])}|"
            if "ours" in aggs and "upstream" in aggs:
                a, b = aggs["ours"][(s, k)], aggs["upstream"][(s, k)]
                line += f"{fr(ratio(a['gb_per_s'], b['gb_per_s'])):>7} {fr(ratio(a['p50_ns'], b['p50_ns'])):>7}"
            print(line)
        print()

    checks = []
    if rust and "ours" in aggs:
        print("=" * 118)
        print("PYTHON OVERHEAD over the Rust client (same workload, same run; medians): overhead = Rust GB/s / "
              "Python GB/s - 1\n(time per call in Python over time per call in Rust); p50 overhead = Python p50 / "
              "Rust p50 - 1. Target: <= 15% for values >= 64 KiB.")
        print(f"{'size':>7} {'case':<15} {'rust GB/s':>10} {'py GB/s':>9} {'overhead':>9} {'rust p50':>9} "
              f"{'py p50':>9} {'p50 ovh':>8}  verdict")
        worst = None
        for s in c.sizes:
            if s < 64 << 10:
                continue
            for k in SHOW:
                r, p = aggs["rust"][(s, k)], aggs["ours"][(s, k)]
                if r["gb_per_s"] is None or p["gb_per_s"] is None:
                    print(f"{fmt_bytes(s):>7} {k:<15} {'missing data':>30}")
                    checks.append((False, f"Python overhead {fmt_bytes(s)} {k}: missing data"))
                    continue
                ovh = r["gb_per_s"] / p["gb_per_s"] - 1
                povh = p["p50_ns"] / r["p50_ns"] - 1 if r["p50_ns"] else None
                ok = ovh <= 0.15
                worst = ovh if worst is None else max(worst, ovh)
                print(f"{fmt_bytes(s):>7} {k:<15} {r['gb_per_s']:>10.3f} {p['gb_per_s']:>9.3f} {ovh * 100:>8.1f}% "
                      f"{fmt_ns(r['p50_ns']):>9} {fmt_ns(p['p50_ns']):>9} "
                      f"{'-' if povh is None else f'{povh * 100:.1f}%':>8}  {'PASS' if ok else 'MISS'}")
                checks.append((ok, f"Python overhead {fmt_bytes(s)} {k}: {ovh * 100:+.1f}% (<= 15%)"))
        if worst is not None:
            print(f"worst case overhead {worst * 100:+.1f}%")
        print()

    print("=" * 118)
    print("TARGETS (evaluated from this run's medians)")
    if "ours" in aggs and "upstream" in aggs:
        for k in ("get_into", "batch_get_into"):
            s = 1 << 20
            if s not in c.sizes:
                continue
            a, b = aggs["ours"][(s, k)], aggs["upstream"][(s, k)]
            r = ratio(a["gb_per_s"], b["gb_per_s"])
            if r is None:
                why = "upstream failed" if b["n"] == 0 and a["n"] else "missing data"
                checks.append((a["n"] > 0 and b["n"] == 0,
                               f"zero-copy 1 MiB {k}: ours {a['gb_per_s']} GB/s vs upstream: {why}"))
            else:
                checks.append((r >= 2.5, f"zero-copy 1 MiB {k} >= 2.5x upstream's wheel: {r:.2f}x "
                                         f"(ours {a['gb_per_s']:.3f} GB/s, upstream {b['gb_per_s']:.3f} GB/s; "
                                         f"p50 {fmt_ns(a['p50_ns'])} vs {fmt_ns(b['p50_ns'])})"))
    ovh_checks = [x for x in checks if x[1].startswith("Python overhead")]
    other = [x for x in checks if not x[1].startswith("Python overhead")]
    if ovh_checks:
        miss = [t for ok, t in ovh_checks if not ok]
        print(f"{'PASS' if not miss else 'MISS'}  Python overhead <= 15% over the Rust client for values >= 64 KiB: "
              f"{len(ovh_checks) - len(miss)}/{len(ovh_checks)} cases within")
        for t in miss:
            print(f"        miss: {t}")
    elif not rust:
        print("n/a   Python overhead over the Rust client: no Rust store_bench figures in this run")
    for ok, t in other:
        print(f"{'PASS' if ok else 'MISS'}  {t}")

    failures = []
    for o in outcomes:
        for (s, k), e in o.errors.items():
            failures.append(f"round {o.round} {o.impl} {fmt_bytes(s)} {k}: {e[:200]}")
        for cr in o.crashes:
            failures.append(f"round {o.round} {o.impl}: {cr.splitlines()[0]}")
    print()
    if failures:
        print(f"FAILURES / CRASHES recorded ({len(failures)}):")
        for f in failures:
            print(f"  {f}")
    else:
        print("no failures: every case of every implementation passed its data check in every round")
    nl = {}
    for o in outcomes:
        for d in o.listen:
            bad = non_loopback(d.get("addrs", []))
            if bad:
                nl.setdefault(f"{o.impl} {d.get('who')}", set()).update(bad)
    if nl:
        print("NOTE: non-loopback listening sockets seen (despite 127.0.0.1 bind flags/MC_TCP_BIND_ADDRESS):")
        for who, addrs in sorted(nl.items()):
            print(f"  {who}: {sorted(addrs)}")
    else:
        print("all listening sockets of masters, storage and client processes were on loopback")
    print(f"total {time.monotonic() - t_start:.0f} s; load average at end {os.getloadavg()}")
    summary = {
        "sizes": c.sizes, "batch": c.batch, "seconds": c.seconds, "rounds": c.rounds,
        "medians": {n: {f"{s}:{k}": v for (s, k), v in a.items()} for n, a in aggs.items()},
        "checks": [{"pass": ok, "text": t} for ok, t in checks], "failures": failures, "info": info,
    }
    Path(c.log_dir, "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"summary: {c.log_dir}/summary.json")
    return 0


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    role = "bench"
    if argv and argv[0] in ("bench", "storage", "compare"):
        role = argv.pop(0)
    if role == "storage":
        p = argparse.ArgumentParser(prog="store_bench.py storage")
        p.add_argument("--master", required=True)
        p.add_argument("--metadata", required=True)
        p.add_argument("--segment-size", type=int, required=True)
        p.add_argument("--hostname", default="127.0.0.1")
        p.add_argument("--deadline", type=float, default=900)
        return role_storage(p.parse_args(argv))
    if role == "bench":
        p = argparse.ArgumentParser(prog="store_bench.py [bench]", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--master", help="master RPC address host:port")
        p.add_argument("--metadata", help="transfer-engine metadata URL (http://127.0.0.1:8080/metadata)")
        p.add_argument("--start-master", action="store_true", help="start mooncake_master from the "
                       "interpreter's directory on 127.0.0.1 (ports --rpc-port/--http-port/--metrics-port)")
        p.add_argument("--master-exe")
        p.add_argument("--rpc-port", type=int, default=50151)
        p.add_argument("--http-port", type=int, default=8180)
        p.add_argument("--metrics-port", type=int, default=9103)
        p.add_argument("--sizes", default="4K,64K,1M,16M")
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--seconds", type=float, default=0.6, help="timed phase of each case")
        p.add_argument("--min-calls", type=int, default=3)
        p.add_argument("--segment-size", type=parse_size, default=None,
                       help="storage process's global_segment_size (default max(1G, 4 x batch x largest size))")
        p.add_argument("--cases", default="", help=f"only these cases (comma list of {','.join(ORDER)})")
        p.add_argument("--skip", default="", help="SIZE:CASE,... pairs to skip (used by compare to resume)")
        p.add_argument("--case-timeout", type=float, default=120.0)
        p.add_argument("--deadline", type=float, default=900.0, help="whole run, seconds")
        p.add_argument("--log-prefix", default="/tmp/store_bench_py-")
        p.add_argument("--json-lines", action="store_true", help="also print @@TAG {json} lines (for compare)")
        a = p.parse_args(argv)
        EMIT["on"] = a.json_lines
        a.sizes = [parse_size(s) for s in a.sizes.split(",") if s.strip()]
        a.cases = [x.strip() for x in a.cases.split(",") if x.strip()]
        bad = [x for x in a.cases if x not in ORDER]
        if bad:
            p.error(f"unknown cases {bad}")
        install_cleanup()
        os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
        return role_bench(a)
    p = argparse.ArgumentParser(prog="store_bench.py compare", description="Side-by-side: ours vs upstream "
                                "(and the Rust store_bench), interleaved rounds, medians.")
    p.add_argument("--ours", help="our venv's python (with the mooncake-rs wheel)")
    p.add_argument("--upstream", help="upstream's venv's python (mooncake-transfer-engine-non-cuda)")
    p.add_argument("--rust-bench", help="path of the Rust store_bench binary")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", default="4K,64K,1M,16M")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=0.6)
    p.add_argument("--min-calls", type=int, default=3)
    p.add_argument("--case-timeout", type=float, default=120.0)
    p.add_argument("--run-timeout", type=float, default=600.0, help="one implementation's run, seconds")
    p.add_argument("--total-timeout", type=float, default=3600.0, help="no new run starts after this")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts of a crashed run per round")
    p.add_argument("--log-dir", default=f"/tmp/mooncake-py-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--ours-rpc-port", type=int, default=50151)
    p.add_argument("--ours-http-port", type=int, default=8180)
    p.add_argument("--ours-metrics-port", type=int, default=9103)
    p.add_argument("--up-rpc-port", type=int, default=50251)
    p.add_argument("--up-http-port", type=int, default=8280)
    p.add_argument("--up-metrics-port", type=int, default=9203)
    return role_compare(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
