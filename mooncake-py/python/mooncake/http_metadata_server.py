"""A standalone HTTP metadata server for the transfer engine (``metadata_server`` =
``http://host:port/metadata``), for deployments that do not run the master's
(``--enable_http_metadata_server``).

``GET|PUT|DELETE /metadata?key=K``: 200 with the value / "metadata updated" / "metadata
deleted", 404 when the key is missing, 400 without a key or for a second PUT of an ``rpc_meta``
key (those are written once per peer). Values are held in memory.

Run: ``python -m mooncake.http_metadata_server --port 8080 [--host 0.0.0.0]``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from time import sleep
from typing import Dict, Optional
from urllib.parse import parse_qs, urlsplit

_log = logging.getLogger(__name__)


class KVPoll(Enum):
    """The state of a ``KVBootstrapServer``."""

    Failed = 0
    Bootstrapping = 1
    WaitingForInput = 2
    Transferring = 3
    Success = 4


class KVBootstrapServer:
    """The metadata server (see the module docs); ``run()`` serves from a background thread."""

    def __init__(self, port: int, host: str = "0.0.0.0"):
        self.port = port
        self.host = host
        self.store: Dict[str, bytes] = {}
        self.lock = threading.Lock()
        self.thread: Optional[threading.Thread] = None
        self._server: Optional[ThreadingHTTPServer] = None

    def _answer(self, method: str, path: str, body: bytes):
        parts = urlsplit(path)
        if parts.path.rstrip("/") != "/metadata":
            return 404, b"not found"
        key = (parse_qs(parts.query).get("key") or [""])[0].strip()
        if not key:
            return 400, b"metadata key is required"
        with self.lock:
            if method == "GET":
                value = self.store.get(key)
                return (404, b"metadata not found") if value is None else (200, value)
            if method == "PUT":
                if "rpc_meta" in key and key in self.store:
                    return 400, b"Duplicate rpc_meta key not allowed"
                self.store[key] = body
                return 200, b"metadata updated"
            if method == "DELETE":
                if self.store.pop(key, None) is None:
                    return 404, b"metadata not found"
                return 200, b"metadata deleted"
        return 405, b"Method not allowed"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                status, out = server._answer(self.command, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_PUT = do_DELETE = do_POST = _serve

            def log_message(self, fmt, *args):
                _log.debug("metadata server: " + fmt, *args)

        return Handler

    def run(self) -> None:
        """Starts serving in a background thread (returns once the port is bound)."""
        self._server = ThreadingHTTPServer((self.host, self.port), self._handler())
        self._server.daemon_threads = True
        if self.port == 0:
            self.port = self._server.server_address[1]
        self.thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                       name="mooncake-metadata")
        self.thread.start()
        _log.info("HTTP metadata server on %s:%d", self.host, self.port)

    def close(self) -> None:
        """Stops serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self.thread is not None:
            self.thread.join(5)

    def poll(self) -> KVPoll:
        """``Success`` while serving, ``Failed`` otherwise."""
        if self.thread is None or not self.thread.is_alive():
            return KVPoll.Failed
        return KVPoll.Success


def parse_args():
    """The command line: ``--port`` (8080), ``--host`` (0.0.0.0), ``--log-level`` (INFO)."""
    p = argparse.ArgumentParser(description="HTTP metadata server for the Mooncake transfer engine")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument("--host", type=str, default="0.0.0.0", help="address to bind")
    p.add_argument("--log-level", type=str, default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    return p.parse_args()


def main():
    """Serves until SIGINT or SIGTERM."""
    args = parse_args()
    logging.basicConfig(level=getattr(logging, args.log_level))
    server = KVBootstrapServer(args.port, args.host)
    server.run()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set() and server.poll() == KVPoll.Success:
        sleep(0.2)
    server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
