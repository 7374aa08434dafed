"""A process forked after setup: the parent's store answers an error code at once in the child
(its threads did not survive the fork) instead of hanging, a new store set up in the child works,
and the parent's store is unaffected."""

from __future__ import annotations

import os
import time

from conftest import new_store
from mooncake.store import ReplicateConfig


def _wait(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung")


def test_a_forked_child_gets_errors_from_the_parents_store_and_can_set_up_its_own(master, uniq):
    s = new_store()
    try:
        assert s.put(f"{uniq}k", b"before fork" * 100) == 0
        # The child's value goes to the parent's segment: the child's own goes away with it.
        on_parent = ReplicateConfig()
        on_parent.preferred_segment = s.get_hostname()
        pid = os.fork()
        if pid == 0:
            # The child: report through the exit code only, never return into pytest.
            code = 0
            try:
                if s.put(f"{uniq}child", b"x") != -1010:
                    code = 10
                elif s.is_exist(f"{uniq}k") >= 0:
                    code = 11
                else:
                    mine = new_store()
                    if mine.get(f"{uniq}k") != b"before fork" * 100:
                        code = 12
                    elif mine.put(f"{uniq}from_child", b"child" * 100, on_parent) != 0:
                        code = 13
                    mine.close()
            except BaseException:  # noqa: BLE001 - any failure becomes an exit code
                code = 14
            os._exit(code)
        assert _wait(pid) == 0
        # The parent's store still works and sees the child's write.
        assert s.get(f"{uniq}from_child") == b"child" * 100
        assert s.get(f"{uniq}k") == b"before fork" * 100
    finally:
        s.close()
