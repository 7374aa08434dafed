"""Closes, when the interpreter exits, the stores of this process still open (a store left open
would keep its segment mounted and its buffers served until the master expires it)."""

from __future__ import annotations

import atexit
import weakref
from typing import Any

_live: "weakref.WeakSet[Any]" = weakref.WeakSet()


def close_at_exit(store: Any) -> None:
    """Closes `store` at exit if it is still alive then (it is not kept alive by this)."""
    _live.add(store)


@atexit.register
def _close_all() -> None:
    for s in list(_live):
        try:
            s.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
