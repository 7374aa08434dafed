"""Console scripts: ``mooncake_master`` runs the Rust master, ``mooncake_client`` the real
client (which ``setup_dummy`` clients forward to) and ``mooncake_certs`` makes a cluster's
certificates, inside this Python process."""

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


def mooncake_client(argv=None) -> int:
    """``mooncake_client [--flag=value ...]``: a store client serving dummy clients on this host
    (``--master_server_address``, ``--host``, ``--port``, ``--global_segment_size``, ...; see
    ``--help``). Runs until SIGINT (Ctrl-C) or SIGTERM and exits with its exit code.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    code = _store.run_client(args)
    if argv is None:
        sys.exit(code)
    return code


def mooncake_certs(argv=None) -> int:
    """``mooncake_certs init|issue NAME ...``: makes the cluster CA (``init --dir DIR``) or a
    node's certificate (``issue NAME --dir DIR --name ADDRESS [--role master,client,admin]``)
    as PEM files; see ``--help``."""
    args = list(sys.argv[1:] if argv is None else argv)
    code = _store.run_certs(args)
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    mooncake_master()
