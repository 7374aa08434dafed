"""Console scripts: ``mooncake_master`` runs the Rust master inside this Python process."""

import signal
import sys

from mooncake import _store


def mooncake_master(argv=None) -> int:
    """``mooncake_master [--flag=value ...]``: same flags as the Rust binary (``--help``).

    Runs until SIGINT (Ctrl-C) or SIGTERM and exits with the master's exit code.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    # Let the master's own handlers own SIGINT/SIGTERM: Python's SIGINT handler would otherwise
    # raise KeyboardInterrupt once the call returns.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    code = _store.run_master(args)
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    mooncake_master()
