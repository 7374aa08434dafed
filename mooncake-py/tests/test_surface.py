"""Every public name of upstream's package (``data/upstream_surface.txt``) imports from ours,
apart from the few the README lists as not provided, with the reason."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SURFACE = Path(__file__).parent / "data" / "upstream_surface.txt"

# Not provided (see README, "Python package: what is not provided").
NOT_PROVIDED = {
    # Embedding-table lookups on top of the store: a separate product.
    "mooncake.store.EngramStore",
    "mooncake.store.EngramStoreConfig",
    # The transfer engine's coroutine RPC layer, shared GPU segments and the raw C++ engine
    # handle: CUDA/C++-only internals.
    "mooncake.engine.CoroRPCInterface",
    "mooncake.engine.RpcInterface",
    "mooncake.engine.ReceivedData",
    "mooncake.engine.ReceivedTensor",
    "mooncake.engine.SharedSegment",
    "mooncake.engine.InnerTransferEngine",
    "mooncake.engine.create_rpc_client",
    "mooncake.engine.create_rpc_server",
    "mooncake.engine.TransferEngine.get_engine",
    "mooncake.engine.TransferEngine.get_engine_ptr",
}


def names():
    return [line for line in SURFACE.read_text().splitlines() if line and not line.startswith("#")]


def resolve(name: str):
    """The object `name` names: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def test_surface_list_is_complete_enough():
    n = names()
    assert len(n) > 600 and "mooncake.store.MooncakeDistributedStore.get_into_ranges" in n


def test_every_upstream_name_imports():
    missing = []
    for name in names():
        if any(name == x or name.startswith(x + ".") for x in NOT_PROVIDED):
            continue
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name}: {e}")
    assert not missing, "missing from our package:\n" + "\n".join(missing)


@pytest.mark.parametrize("name", sorted(NOT_PROVIDED))
def test_not_provided_names_are_really_missing(name):
    """A name listed as not provided that we do provide should leave the list (and README)."""
    with pytest.raises((ImportError, AttributeError)):
        resolve(name)
