"""The helper modules clients and scripts import: mooncake_config, async_store,
mooncake_store_service and http_metadata_server."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import pytest

from conftest import MASTER, METADATA


def test_config_from_file(tmp_path, monkeypatch):
    from mooncake.mooncake_config import DEFAULT_LOCAL_BUFFER_SIZE, MooncakeConfig

    path = tmp_path / "mooncake.json"
    path.write_text(json.dumps({
        "local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE",
        "master_server_address": "127.0.0.1:50051", "global_segment_size": "4GB",
        "protocol": "TCP", "device_name": "", "enable_ssd_offload": "false"}))
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(path))
    c = MooncakeConfig.load_from_env()
    assert c.global_segment_size == 4 << 30 and c.local_buffer_size == DEFAULT_LOCAL_BUFFER_SIZE
    assert c.protocol == "tcp" and c.enable_ssd_offload is False and c.tenant_id == "default"
    path.write_text(json.dumps({"local_hostname": "h"}))
    with pytest.raises(ValueError):
        MooncakeConfig.from_file(str(path))


def test_config_from_env(monkeypatch):
    from mooncake.mooncake_config import DEFAULT_GLOBAL_SEGMENT_SIZE, MooncakeConfig

    for k in ("MOONCAKE_CONFIG_PATH", "MOONCAKE_MASTER", "MOONCAKE_GLOBAL_SEGMENT_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError):
        MooncakeConfig.load_from_env()
    monkeypatch.setenv("MOONCAKE_MASTER", "m:1")
    monkeypatch.setenv("MOONCAKE_LOCAL_BUFFER_SIZE", "512MB")
    monkeypatch.setenv("MOONCAKE_ENABLE_CLIENT_HTTP_SERVER", "yes")
    c = MooncakeConfig.load_from_env()
    assert (c.master_server_address, c.metadata_server, c.local_hostname) == (
        "m:1", "P2PHANDSHAKE", "localhost")
    assert c.global_segment_size == DEFAULT_GLOBAL_SEGMENT_SIZE
    assert c.local_buffer_size == 512 << 20 and c.enable_client_http_server is True
    monkeypatch.setenv("MOONCAKE_LOCAL_BUFFER_SIZE", "lots")
    with pytest.raises(ValueError):
        MooncakeConfig.load_from_env()


def test_config_drives_setup(master, monkeypatch):
    from mooncake.mooncake_config import MooncakeConfig
    from mooncake.store import MooncakeDistributedStore

    monkeypatch.delenv("MOONCAKE_CONFIG_PATH", raising=False)
    monkeypatch.setenv("MOONCAKE_MASTER", MASTER)
    monkeypatch.setenv("MOONCAKE_GLOBAL_SEGMENT_SIZE", "16MB")
    monkeypatch.setenv("MOONCAKE_LOCAL_BUFFER_SIZE", "16MB")
    s = MooncakeDistributedStore()
    assert s.setup(MooncakeConfig.load_from_env().setup_args()) == 0
    assert s.close() == 0


def test_async_store(master, uniq):
    from mooncake.async_store import MooncakeDistributedStoreAsync

    s = MooncakeDistributedStoreAsync()
    assert s.setup("localhost", METADATA, 16 << 20, 16 << 20, "tcp", "", MASTER) == 0

    async def go():
        assert await s.async_put(uniq + "a", b"v") == 0
        got = await asyncio.gather(*(s.async_get(uniq + "a") for _ in range(4)))
        assert got == [b"v"] * 4
        return await s.async_batch_is_exist([uniq + "a", uniq + "b"])

    try:
        assert asyncio.run(go()) == [1, 0]
        assert "async_put" in s.__dict__  # made once, then kept on the instance
        with pytest.raises(AttributeError):
            s.async_no_such_method
        with pytest.raises(AttributeError):
            s.no_such_attribute
    finally:
        s.close()


def _http(method, url, body=None):
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_http_metadata_server():
    from mooncake.http_metadata_server import KVBootstrapServer, KVPoll

    srv = KVBootstrapServer(0, "127.0.0.1")
    assert srv.poll() == KVPoll.Failed
    srv.run()
    try:
        base = f"http://127.0.0.1:{srv.port}/metadata"
        assert srv.poll() == KVPoll.Success
        assert _http("GET", base + "?key=a")[0] == 404
        assert _http("GET", base)[0] == 400
        assert _http("PUT", base + "?key=a", b'{"x":1}')[0] == 200
        assert _http("GET", base + "?key=a") == (200, b'{"x":1}')
        assert _http("PUT", base + "?key=rpc_meta/p", b"1")[0] == 200
        assert _http("PUT", base + "?key=rpc_meta/p", b"2")[0] == 400
        assert _http("DELETE", base + "?key=a")[0] == 200
        assert _http("DELETE", base + "?key=a")[0] == 404
    finally:
        srv.close()
    assert srv.poll() == KVPoll.Failed


def test_store_with_http_metadata_server(master, uniq):
    """A store whose transfer-engine metadata lives on the helper server."""
    from mooncake.http_metadata_server import KVBootstrapServer
    from mooncake.store import MooncakeDistributedStore

    srv = KVBootstrapServer(0, "127.0.0.1")
    srv.run()
    a, b = MooncakeDistributedStore(), MooncakeDistributedStore()
    try:
        meta = f"http://127.0.0.1:{srv.port}/metadata"
        assert a.setup("localhost", meta, 16 << 20, 16 << 20, "tcp", "", MASTER) == 0
        assert b.setup("localhost", meta, 16 << 20, 16 << 20, "tcp", "", MASTER) == 0
        assert a.put(uniq + "x", b"across") == 0
        assert b.get(uniq + "x") == b"across"
    finally:
        a.close()
        b.close()
        srv.close()


def test_store_service(master, uniq, tmp_path):
    from mooncake.mooncake_store_service import MooncakeStoreService

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"local_hostname": "localhost", "metadata_server": METADATA,
                               "master_server_address": MASTER,
                               "global_segment_size": "16MB", "local_buffer_size": "16MB"}))
    svc = MooncakeStoreService(str(cfg), {"protocol": "tcp"})

    async def start():
        await svc.start_store_service(10)
        await svc.start_http_service(0)

    asyncio.run(start())
    try:
        base = f"http://127.0.0.1:{svc.port}/api"
        k = uniq + "k"
        body = json.dumps({"key": k, "value": "hello"}).encode()
        assert _http("PUT", base + "/put", body) == (200, b'{"status": "success"}')
        assert _http("PUT", base + "/put", b'{"key": "x"}')[0] == 400
        assert _http("GET", f"{base}/get/{k}") == (200, b"hello")
        assert _http("GET", f"{base}/get/{uniq}none")[0] == 404
        assert json.loads(_http("GET", f"{base}/exist/{k}")[1]) == {"exists": True}
        assert _http("POST", base + "/mount_shm", b'{"size": 1048576}')[0] == 500
        assert _http("POST", base + "/unmount_local_disk", b"{}")[0] == 200
        assert _http("GET", base + "/nothing")[0] == 404
        assert _http("DELETE", f"{base}/remove/{k}")[0] in (200, 500)  # 500 while leased
        assert _http("DELETE", base + "/remove_all")[0] == 200
    finally:
        asyncio.run(svc.stop())
