"""Every code example of the Mooncake Store Python API document runs unchanged against a master
started with the document's command line. The document is read from the project's shared seeds
(`../shared/seeds/` beside the repository; `MOONCAKE_SEED_DOC` names another copy).

Python blocks run in document order in one namespace, as a reader runs them in a notebook:
names defined by one block (``allocator``, ``ptr``) stay visible to the next. Fragments that use
names the document assumes from context get them from a prelude: ``store`` (a fresh, set-up
store before each block), ``self`` (the same store, for ``self.get_hostname()``), ``rank`` (0),
``np``, ``torch`` and the ``mooncake.store`` names. Blocks that are only a signature
(``def f(...) -> int``) are not examples and are checked to be signatures; the one block that is
not valid Python in the document (an unterminated string) is checked to be exactly that.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MASTER_ARGS, new_store

DOC = Path(
    os.environ.get(
        "MOONCAKE_SEED_DOC",
        Path(__file__).resolve().parents[3] / "shared" / "seeds" / "004_dac6844148a17896.txt",
    )
)
if not DOC.is_file():
    raise RuntimeError(
        f"the Python API document is not at {DOC}: put the shared seeds beside the repository "
        "or set MOONCAKE_SEED_DOC"
    )

try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False


def blocks():
    text = DOC.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"```(\w+)\n(.*?)```", text, re.S):
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, m.group(1), m.group(2)))
    return out


BLOCKS = blocks()
PY = [(line, code) for line, lang, code in BLOCKS if lang == "python"]
SH = [(line, code) for line, lang, code in BLOCKS if lang == "bash"]


def _no_body(code: str) -> bool:
    try:
        compile(code, "<sig>", "exec")
        return False
    except SyntaxError:
        return True


# Output a few examples must print (their own print statements), keyed by a line of the block.
EXPECTED_OUTPUT = {
    'print(data.decode())  # Output: Hello, Mooncake Store!': "Hello, Mooncake Store!",
    'print(store.get("hello_key").decode())': "Hello, Mooncake Store!",
    'print("Config OK:", config["model"])': "Config OK: llama-7b",
    'print(f"Data matches: {np.array_equal(original_data, retrieved_data)}")': "Data matches: True",
    'print("Retrieved all keys successfully:", retrieved == values)': "Retrieved all keys successfully: True",
    'print("Buffer registered successfully.")': "Buffer registered successfully.",
    'print("All tasks completed")': "All tasks completed",
    'print("Data with metadata stored successfully")': "Data with metadata stored successfully",
    'print(f"Allocated memory at address: {ptr}")': "Allocated memory at address:",
    'print("Memory freed successfully")': "Memory freed successfully",
    'print("Tensor published successfully")': "Tensor published successfully",
    'print(f"Retrieved tensor with shape: {retrieved_tensor.shape}")': "Retrieved tensor with shape: torch.Size([100, 100])",
    'print(f"Tensor {i} not found")': "Tensor 2 not found",
}


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def on_alarm(signum, frame):
        raise _Timeout(f"example did not finish within {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def notebook(master):
    import numpy as np

    import mooncake.store as ms

    ns = {"np": np, "rank": 0, "__name__": "__seed__"}
    ns.update({k: getattr(ms, k) for k in ms.__all__})
    if HAVE_TORCH:
        import torch

        ns["torch"] = torch
    ns["_prelude_stores"] = []
    yield ns
    for s in ns["_prelude_stores"]:
        s.close()
    s = ns.get("store")
    if s is not None:
        s.close()


def test_document_has_examples():
    assert len(PY) >= 30 and len(SH) >= 3


@pytest.mark.parametrize("line,code", PY, ids=[f"L{l}" for l, _ in PY])
def test_python_example(notebook, line, code):
    if 'config.prefer_alloc_in_same_node = "True\n' in code:
        # The document's own typo (unterminated string): not runnable as written.
        with pytest.raises(SyntaxError):
            compile(code, f"doc:{line}", "exec")
        pytest.skip("the document's block is not valid Python (unterminated string)")
    if _no_body(code):
        # `def f(...) -> int` with no body, or `f(node: int)`: a signature, not an example.
        assert re.search(r"^(def \w+\(|\w+\(\w+: \w+\)$)", code, re.M), (
            f"block at line {line} is neither valid Python nor a signature"
        )
        pytest.skip("API signature, not an example")
    uses_torch = re.search(r"\btorch\.", code) is not None
    if uses_torch and not HAVE_TORCH:
        pytest.skip("needs torch, which is not installed")
    ns = notebook
    # A fresh store for fragments that use the document's `store` without creating one.
    if "store" in code and "store = MooncakeDistributedStore()" not in code:
        s = new_store(segment=512 << 20, local_buffer=128 << 20)
        ns["_prelude_stores"].append(s)
        ns["store"] = s
        ns["self"] = s
    out = io.StringIO()
    with time_limit(120), contextlib.redirect_stdout(out):
        exec(compile(code, f"doc:{line}", "exec"), ns)
    printed = out.getvalue()
    sys.stdout.write(printed)
    for marker, expected in EXPECTED_OUTPUT.items():
        if marker in code:
            assert expected in printed, f"expected {expected!r} in the output:\n{printed}"


@pytest.mark.parametrize("line,code", SH, ids=[f"L{l}" for l, _ in SH])
def test_shell_example(master, line, code, tmp_path):
    if code.startswith("pip install"):
        pytest.skip("installs upstream's package from the network")
    if code.startswith("mooncake_master"):
        args = shlex.split(code.replace("\\\n", " "))
        assert args == ["mooncake_master", *MASTER_ARGS], "the fixture must start the master as the document does"
        return
    # The RDMA examples: run as written; this build has TCP only, so setup refuses "rdma" with a
    # logged reason and the scripts end normally.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    r = subprocess.run(
        ["bash", "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert "rdma" in r.stderr and "not available" in r.stderr, r.stderr
