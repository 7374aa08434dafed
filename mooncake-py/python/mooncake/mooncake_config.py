"""``MooncakeConfig``: a store client's settings from a JSON file (``MOONCAKE_CONFIG_PATH``) or
from ``MOONCAKE_*`` environment variables, as serving stacks and upstream's helper scripts read
them.

File keys: ``local_hostname``, ``metadata_server`` and ``master_server_address`` (required),
``global_segment_size`` and ``local_buffer_size`` (ints or strings like ``"4GB"``),
``protocol`` (``tcp``), ``device_name``, and upstream's optional ``enable_ssd_offload``,
``ssd_offload_path``, ``tenant_id``, ``enable_client_http_server``, ``client_http_port``.
Variables: ``MOONCAKE_MASTER`` (required without a file), ``MOONCAKE_LOCAL_HOSTNAME``,
``MOONCAKE_TE_META_DATA_SERVER``, ``MOONCAKE_GLOBAL_SEGMENT_SIZE``,
``MOONCAKE_LOCAL_BUFFER_SIZE``, ``MOONCAKE_PROTOCOL``, ``MOONCAKE_DEVICE``,
``MOONCAKE_OFFLOAD_ENABLED``, ``MOONCAKE_OFFLOAD_FILE_STORAGE_PATH``, ``MOONCAKE_TENANT_ID``,
``MOONCAKE_ENABLE_CLIENT_HTTP_SERVER``, ``MOONCAKE_CLIENT_HTTP_PORT``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)

#: Segment size when none is given (3.125 GiB, as upstream).
DEFAULT_GLOBAL_SEGMENT_SIZE = 3355443200
#: Local buffer size when none is given (1 GiB, as upstream).
DEFAULT_LOCAL_BUFFER_SIZE = 1073741824

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_PROTOCOLS = {"tcp", "rdma", "quic", "nvlink", "cxl", "efa", "barex", "ascend", "hip"}


def _size(value, what: str) -> int:
    """Bytes from an int or a string such as ``"4GB"``, ``"512 MiB"``, ``"1.5g"`` (units are
    powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: {value!r} is not a size")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"{what}: {value!r} is not a size (e.g. 4096, \"16MB\", \"4GB\")")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _flag(value, what: str) -> bool:
    """A boolean from a bool, a number or a string such as "true"/"off"."""
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    if isinstance(value, (int, float)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("", "false", "0", "no", "off", "disable"):
        return False
    if text in ("true", "1", "yes", "on", "enable"):
        return True
    raise ValueError(f"{what}: {value!r} is not a boolean")


@dataclass
class MooncakeConfig:
    """A store client's settings (see the module docs)."""

    local_hostname: str
    metadata_server: str
    global_segment_size: int
    local_buffer_size: int
    protocol: str
    device_name: Optional[str]
    master_server_address: str
    enable_ssd_offload: bool = False
    ssd_offload_path: str = ""
    tenant_id: str = "default"
    enable_client_http_server: bool = False
    client_http_port: int = 9300

    def __post_init__(self) -> None:
        if not isinstance(self.protocol, str) or not self.protocol.strip():
            raise ValueError(f"protocol must be a non-empty string such as 'tcp', not {self.protocol!r}")
        self.protocol = self.protocol.strip().lower()
        if self.protocol not in _PROTOCOLS:
            logger.warning("protocol %r is not one Mooncake knows; passed on as it is", self.protocol)
        self.global_segment_size = _size(self.global_segment_size, "global_segment_size")
        self.local_buffer_size = _size(self.local_buffer_size, "local_buffer_size")
        for name in ("global_segment_size", "local_buffer_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("local_hostname", "metadata_server", "master_server_address"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ValueError(f"{name} must be a non-empty string, not {v!r}")

    @staticmethod
    def from_file(file_path: str) -> "MooncakeConfig":
        """The settings of a JSON file; ``ValueError`` when a required key is missing."""
        with open(file_path, encoding="utf-8") as f:
            raw = json.load(f)
        missing = [k for k in ("local_hostname", "metadata_server", "master_server_address")
                   if k not in raw]
        if missing:
            raise ValueError(f"{file_path}: missing required key(s) {', '.join(missing)}")
        return MooncakeConfig(
            local_hostname=raw["local_hostname"],
            metadata_server=raw["metadata_server"],
            global_segment_size=_size(raw.get("global_segment_size", DEFAULT_GLOBAL_SEGMENT_SIZE),
                                      "global_segment_size"),
            local_buffer_size=_size(raw.get("local_buffer_size", DEFAULT_LOCAL_BUFFER_SIZE),
                                    "local_buffer_size"),
            protocol=raw.get("protocol", "tcp"),
            device_name=raw.get("device_name", ""),
            master_server_address=raw["master_server_address"],
            enable_ssd_offload=_flag(raw.get("enable_ssd_offload"), "enable_ssd_offload"),
            ssd_offload_path=str(raw.get("ssd_offload_path") or ""),
            tenant_id=str(raw.get("tenant_id") or "default"),
            enable_client_http_server=_flag(raw.get("enable_client_http_server"),
                                            "enable_client_http_server"),
            client_http_port=int(raw.get("client_http_port", 9300)),
        )

    @staticmethod
    def load_from_env() -> "MooncakeConfig":
        """The settings of the file ``MOONCAKE_CONFIG_PATH`` names, else of the ``MOONCAKE_*``
        variables (``MOONCAKE_MASTER`` required); ``ValueError`` when neither is set."""
        path = os.getenv("MOONCAKE_CONFIG_PATH")
        if path:
            return MooncakeConfig.from_file(path)
        env = os.getenv
        if not env("MOONCAKE_MASTER"):
            raise ValueError("set MOONCAKE_CONFIG_PATH (a JSON file) or MOONCAKE_MASTER")
        return MooncakeConfig(
            local_hostname=env("MOONCAKE_LOCAL_HOSTNAME", "localhost"),
            metadata_server=env("MOONCAKE_TE_META_DATA_SERVER", "P2PHANDSHAKE"),
            global_segment_size=_size(env("MOONCAKE_GLOBAL_SEGMENT_SIZE",
                                          DEFAULT_GLOBAL_SEGMENT_SIZE),
                                      "MOONCAKE_GLOBAL_SEGMENT_SIZE"),
            local_buffer_size=_size(env("MOONCAKE_LOCAL_BUFFER_SIZE", DEFAULT_LOCAL_BUFFER_SIZE),
                                    "MOONCAKE_LOCAL_BUFFER_SIZE"),
            protocol=env("MOONCAKE_PROTOCOL", "tcp"),
            device_name=env("MOONCAKE_DEVICE", ""),
            master_server_address=env("MOONCAKE_MASTER"),
            enable_ssd_offload=_flag(env("MOONCAKE_OFFLOAD_ENABLED"), "MOONCAKE_OFFLOAD_ENABLED"),
            ssd_offload_path=env("MOONCAKE_OFFLOAD_FILE_STORAGE_PATH", ""),
            tenant_id=env("MOONCAKE_TENANT_ID", "default"),
            enable_client_http_server=_flag(env("MOONCAKE_ENABLE_CLIENT_HTTP_SERVER"),
                                            "MOONCAKE_ENABLE_CLIENT_HTTP_SERVER"),
            client_http_port=int(env("MOONCAKE_CLIENT_HTTP_PORT", "9300")),
        )

    def setup_args(self) -> dict:
        """The ``setup(dict)`` form of these settings."""
        return {
            "local_hostname": self.local_hostname,
            "metadata_server": self.metadata_server,
            "global_segment_size": self.global_segment_size,
            "local_buffer_size": self.local_buffer_size,
            "protocol": self.protocol,
            "rdma_devices": self.device_name or "",
            "master_server_addr": self.master_server_address,
            "enable_ssd_offload": self.enable_ssd_offload,
            "ssd_offload_path": self.ssd_offload_path,
            "tenant_id": self.tenant_id,
            "enable_client_http_server": self.enable_client_http_server,
            "client_http_port": self.client_http_port,
        }
