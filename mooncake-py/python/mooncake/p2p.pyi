"""Type stubs of ``mooncake.p2p``."""

from __future__ import annotations

from collections.abc import Buffer
from typing import Any, List, Optional, Sequence, Tuple, Union

_BufferArg = Union[Tuple[int, int], Buffer, Any]
_Buffers = Union[Sequence[_BufferArg], Buffer, Any]

class P2PError(RuntimeError):
    kind: str
    code: Optional[int]

class PayloadInfo:
    @property
    def name(self) -> str: ...
    @property
    def max_shard_size(self) -> int: ...
    @property
    def total_size(self) -> int: ...
    @property
    def size_list(self) -> List[int]: ...

class P2PStore:
    def __init__(
        self,
        metadata_uri: str,
        local_segment_name: str,
        nic_priority_matrix: str = "",
        *,
        pull_timeout: float = 600.0,
        protocol: str = "tcp",
    ) -> None: ...
    @property
    def segment_name(self) -> str: ...
    def register(
        self,
        name: str,
        buffers: _Buffers,
        max_shard_size: int = 64 << 20,
        location: str = "cpu:0",
        force_create: bool = False,
    ) -> None: ...
    def unregister(self, name: str) -> None: ...
    def list(self, prefix: str = "") -> List[PayloadInfo]: ...
    def get_replica(
        self, name: str, buffers: _Buffers, timeout: Optional[float] = None
    ) -> None: ...
    def cancel(self, name: str) -> bool: ...
    def delete_replica(self, name: str) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> P2PStore: ...
    def __exit__(self, *exc: Any) -> None: ...

__all__: List[str]
