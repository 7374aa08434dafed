"""A store client run as a service with a REST API, for scripts and languages without the
Python binding.

``MooncakeStoreService(config_path, cli_config)`` reads a ``MooncakeConfig`` (the JSON file, or
the ``MOONCAKE_*`` variables) with ``cli_config`` overriding its keys, and
``start_store_service()`` sets up the store. ``start_http_service(port)`` serves:

* ``PUT /api/put`` with JSON ``{"key": ..., "value": ...}`` (a string): ``{"status": "success"}``
* ``GET /api/get/{key}``: the value's bytes, 404 when missing
* ``GET /api/exist/{key}``: ``{"exists": true|false}``
* ``DELETE /api/remove/{key}``, ``DELETE /api/remove_all``: ``{"status": "success"}``
* ``POST /api/mount``, ``/api/unmount``, ``/api/mount_shm``, ``/api/unmount_shm``,
  ``/api/unmount_local_disk``, ``/api/reconfigure``: the segment calls of the store; extra
  segments are not supported here, so mounts answer 500 with the store's code.

Errors are ``{"error": ...}`` with status 400 (bad request), 404 or 500.
Run: ``python -m mooncake.mooncake_store_service --config cfg.json --port 8080``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote, urlsplit

from mooncake.mooncake_config import MooncakeConfig
from mooncake.store import MooncakeDistributedStore

_log = logging.getLogger(__name__)


class _Request:
    """What a handler sees of an HTTP request: ``method``, ``match_info`` (path parameters),
    ``body`` and ``json()``."""

    def __init__(self, method: str, match_info: dict, body: bytes):
        self.method = method
        self.match_info = match_info
        self.body = body

    def json(self):
        return json.loads(self.body.decode() or "null")


def _json(status: int, obj) -> tuple:
    return status, "application/json", json.dumps(obj).encode()


class MooncakeStoreService:
    """A store client with a REST API (see the module docs)."""

    def __init__(self, config_path: str = None, cli_config: dict = None):
        self.config_path = config_path
        self.cli_config = dict(cli_config or {})
        self.store: Optional[MooncakeDistributedStore] = None
        self.config: Optional[MooncakeConfig] = None
        self._http: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def _load_config(self) -> MooncakeConfig:
        if self.config_path:
            base = MooncakeConfig.from_file(self.config_path)
        else:
            base = MooncakeConfig.load_from_env()
        fields = dict(base.__dict__)
        for k, v in self.cli_config.items():
            if k not in fields:
                raise ValueError(f"unknown config key {k!r}")
            fields[k] = v
        return MooncakeConfig(**fields)

    async def start_store_service(self, max_wait_time: float = 60, shutdown_event=None):
        """Sets up the store, retrying for up to `max_wait_time` seconds while the master is
        unreachable. True on success."""
        self.config = self._load_config()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait_time
        delay = 0.2
        while True:
            store = MooncakeDistributedStore()
            rc = await loop.run_in_executor(None, store.setup, self.config.setup_args())
            if rc == 0:
                self.store = store
                _log.info("store service: set up (%s)", store.get_hostname())
                return True
            if (shutdown_event is not None and shutdown_event.is_set()) or loop.time() >= deadline:
                raise RuntimeError(f"store setup failed ({rc})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    # -- handlers: each takes a request and returns (status, content type, body) ---------------

    def handle_put(self, request):
        """PUT /api/put, JSON ``{"key", "value"}``."""
        try:
            data = request.json() or {}
        except ValueError as e:
            return _json(400, {"error": f"bad JSON: {e}"})
        key, value = data.get("key"), data.get("value")
        if not key or value is None:
            return _json(400, {"error": "Missing key or value"})
        raw = value.encode() if isinstance(value, str) else bytes(value)
        rc = self.store.put(key, raw)
        if rc != 0:
            return _json(500, {"error": f"PUT operation failed ({rc})"})
        return _json(200, {"status": "success"})

    def handle_get(self, request):
        """GET /api/get/{key}: the value."""
        key = request.match_info["key"]
        found = self.store.is_exist(key)
        if found == 0:
            return _json(404, {"error": "Key not found"})
        if found < 0:
            return _json(500, {"error": f"Exist check failed ({found})"})
        value = self.store.get(key)
        if not value and self.store.is_exist(key) != 1:
            return _json(404, {"error": "Key not found"})
        return 200, "application/octet-stream", bytes(value)

    def handle_exist(self, request):
        """GET /api/exist/{key}."""
        rc = self.store.is_exist(request.match_info["key"])
        if rc < 0:
            return _json(500, {"error": f"Exist check failed ({rc})"})
        return _json(200, {"exists": rc > 0})

    def handle_remove(self, request):
        """DELETE /api/remove/{key}."""
        rc = self.store.remove(request.match_info["key"])
        if rc != 0:
            return _json(500, {"error": f"REMOVE operation failed ({rc})"})
        return _json(200, {"status": "success"})

    def handle_remove_all(self, request):
        """DELETE /api/remove_all: ``{"status": "success", "removed": n}``."""
        n = self.store.remove_all()
        if n < 0:
            return _json(500, {"error": f"REMOVE_ALL operation failed ({n})"})
        return _json(200, {"status": "success", "removed": n})

    def _body(self, request):
        try:
            return request.json() or {}, None
        except ValueError as e:
            return None, _json(400, {"error": f"bad JSON: {e}"})

    def handle_mount(self, request):
        """POST /api/mount ``{"path", "size", "offset"?, "protocol"?, "location"?}``."""
        data, err = self._body(request)
        if err:
            return err
        if "path" not in data or "size" not in data:
            return _json(400, {"error": "Missing path or size"})
        r = self.store.mount_segment(data["path"], int(data["size"]), int(data.get("offset", 0)),
                                     data.get("protocol", "tcp"), data.get("location", ""))
        return _json(200 if r.get("ret") == 0 else 500, r)

    def handle_mount_shm(self, request):
        """POST /api/mount_shm ``{"size", "protocol"?, "location"?}``."""
        data, err = self._body(request)
        if err:
            return err
        if "size" not in data:
            return _json(400, {"error": "Missing size"})
        r = self.store.allocate_and_mount_segment(int(data["size"]), data.get("protocol", "tcp"),
                                                  data.get("location", ""))
        return _json(200 if r.get("ret") == 0 else 500, r)

    def _unmount(self, request, call):
        data, err = self._body(request)
        if err:
            return err
        ids = data.get("segment_ids")
        if not isinstance(ids, list):
            return _json(400, {"error": "Missing segment_ids"})
        rc = call(ids, int(data.get("grace_period_seconds", 0)))
        return _json(200 if rc == 0 else 500, {"ret": rc})

    def handle_unmount(self, request):
        """POST /api/unmount ``{"segment_ids", "grace_period_seconds"?}``."""
        return self._unmount(request, self.store.unmount_segment)

    def handle_unmount_shm(self, request):
        """POST /api/unmount_shm ``{"segment_ids", "grace_period_seconds"?}``."""
        return self._unmount(request, self.store.unmount_and_free_segment)

    def handle_unmount_local_disk(self, request):
        """POST /api/unmount_local_disk ``{"grace_period_seconds"?}``."""
        data, err = self._body(request)
        if err:
            return err
        grace = data.get("grace_period_seconds", 0)
        if not isinstance(grace, int) or grace < 0:
            return _json(400, {"error": "grace_period_seconds must be a non-negative int"})
        rc = self.store.unmount_local_disk_segment(grace)
        return _json(200 if rc == 0 else 500, {"ret": rc})

    def handle_reconfigure(self, request):
        """POST /api/reconfigure: live reconfiguration is not supported by this store (400)."""
        return _json(400, {"error": "reconfiguration is not supported by this store"})

    # -- HTTP --------------------------------------------------------------------------------

    def _route(self, method: str, path: str):
        p = urlsplit(path).path
        fixed = {
            ("PUT", "/api/put"): self.handle_put,
            ("DELETE", "/api/remove_all"): self.handle_remove_all,
            ("POST", "/api/mount"): self.handle_mount,
            ("POST", "/api/unmount"): self.handle_unmount,
            ("POST", "/api/mount_shm"): self.handle_mount_shm,
            ("POST", "/api/unmount_shm"): self.handle_unmount_shm,
            ("POST", "/api/unmount_local_disk"): self.handle_unmount_local_disk,
            ("POST", "/api/reconfigure"): self.handle_reconfigure,
        }
        if (method, p) in fixed:
            return fixed[(method, p)], {}
        for m, prefix, h in (("GET", "/api/get/", self.handle_get),
                             ("GET", "/api/exist/", self.handle_exist),
                             ("DELETE", "/api/remove/", self.handle_remove)):
            if method == m and p.startswith(prefix) and len(p) > len(prefix):
                return h, {"key": unquote(p[len(prefix):])}
        return None, {}

    async def start_http_service(self, port: int = 8080):
        """Serves the REST API on `port` (0: any free port, then in ``self.port``) from a
        background thread. True."""
        svc = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                handler, params = svc._route(self.command, self.path)
                if handler is None:
                    status, ctype, out = _json(404, {"error": "no such endpoint"})
                elif svc.store is None:
                    status, ctype, out = _json(500, {"error": "the store is not set up"})
                else:
                    try:
                        status, ctype, out = handler(_Request(self.command, params, body))
                    except Exception as e:  # noqa: BLE001 - report, keep serving
                        status, ctype, out = _json(500, {"error": str(e)})
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_PUT = do_POST = do_DELETE = _serve

            def log_message(self, fmt, *args):
                _log.debug("store service: " + fmt, *args)

        self._http = ThreadingHTTPServer(("0.0.0.0", port), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True,
                                        name="mooncake-store-service")
        self._thread.start()
        _log.info("store service: REST API on port %d", self.port)
        return True

    async def stop(self):
        """Stops the REST API and closes the store."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self.store is not None:
            self.store.close()
            self.store = None


def parse_arguments():
    """``--config`` (JSON file), ``--define key=value`` (repeatable overrides), ``--port``
    (8080), ``--max-wait-time`` (60 s)."""
    p = argparse.ArgumentParser(description="Mooncake store client with a REST API")
    p.add_argument("--config", type=str, required=False, help="MooncakeConfig JSON file")
    p.add_argument("--define", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--port", type=int, default=8080, help="REST API port")
    p.add_argument("--max-wait-time", type=float, default=60,
                   help="seconds to keep retrying the store setup")
    return p.parse_args()


async def main():
    """Runs the service until SIGINT or SIGTERM."""
    args = parse_arguments()
    logging.basicConfig(level=logging.INFO)
    overrides = {}
    for d in args.define:
        k, sep, v = d.partition("=")
        if not sep:
            raise SystemExit(f"--define {d!r}: expected KEY=VALUE")
        overrides[k.strip()] = v
    svc = MooncakeStoreService(args.config, overrides)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await svc.start_store_service(args.max_wait_time, stop)
    await svc.start_http_service(args.port)
    await stop.wait()
    await svc.stop()


def sync_main():
    """Entry point: runs ``main()``."""
    asyncio.run(main())


if __name__ == "__main__":
    sync_main()
