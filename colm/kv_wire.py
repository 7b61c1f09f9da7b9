"""Wire format of the prefill -> decode KV hand-off, free of gRPC so both engines can use it.

A request's K/V travel as chunks; each chunk is the tensor ``kv[layers, tokens, 2, kv_heads, head_dim]``
(k then v; token ranges slice without a copy) for a layer range and a token range, as raw little-endian bytes with a crc32. On the
same-host path the bytes sit in a POSIX shared-memory segment created by the sender (one per
request, named ``colm-kv-<hash>``) and the chunk message only carries the offset.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CHECKSUMS = ("crc32", "none")


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"dtype={dtype}: KV transfer supports {sorted(DTYPES)}")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r}: KV transfer supports {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class KVLayout:
    """What one request's K/V stream holds: ``num_tokens`` positions of every layer."""

    num_layers: int
    num_tokens: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.num_tokens < 0:
            raise ValueError(f"num_tokens={self.num_tokens}: must be >= 0")
        parse_dtype(self.dtype)

    @property
    def bytes_per_token_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * parse_dtype(self.dtype).itemsize

    @property
    def num_bytes(self) -> int:
        return self.num_layers * self.num_tokens * self.bytes_per_token_layer


def checksum(buf, kind: str = "crc32") -> int:
    return zlib.crc32(buf) if kind == "crc32" else 0


def tensor_bytes(kv: torch.Tensor) -> memoryview:
    """A CPU contiguous tensor's bytes without a copy (bf16 viewed as int16: numpy has no bf16)."""
    if kv.device.type != "cpu" or not kv.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    raw = kv.view(torch.int16) if kv.dtype == torch.bfloat16 else kv
    return memoryview(raw.numpy()).cast("B")


def bytes_to_tensor(buf, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``tensor_bytes``; shares memory with ``buf`` (copy before the buffer goes away)."""
    d = parse_dtype(dtype)
    expect = int(np.prod(shape)) * d.itemsize
    if len(buf) != expect:
        raise ValueError(f"payload of {len(buf)} bytes, shape {list(shape)} of {dtype} needs {expect}")
    if d == torch.bfloat16:
        arr = np.frombuffer(buf, dtype=np.int16).reshape(shape)
        return torch.from_numpy(arr).view(torch.bfloat16)
    return torch.from_numpy(np.frombuffer(buf, dtype=torch.empty(0, dtype=d).numpy().dtype).reshape(shape))


def shm_name_for(request_id: str, nonce: str = "") -> str:
    return "colm-kv-" + hashlib.sha1(f"{request_id}|{nonce}".encode()).hexdigest()[:20]


def create_segment(name: str, size: int) -> shared_memory.SharedMemory:
    return shared_memory.SharedMemory(name=name, create=True, size=max(size, 1))


def open_segment(name: str) -> shared_memory.SharedMemory:
    """Attach to a segment the sender created; the sender owns (and unlinks) it."""
    try:
        seg = shared_memory.SharedMemory(name=name, create=False)
    except FileNotFoundError:
        raise ValueError(f"shared-memory segment {name!r} does not exist on this host") from None
    _untrack(seg)
    return seg


def _untrack(seg: shared_memory.SharedMemory) -> None:
    # The resource tracker would unlink a segment this process merely attached to when it exits.
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(seg._name, "shared_memory")  # noqa: SLF001
    except Exception:  # noqa: BLE001 - tracking is best effort
        pass
