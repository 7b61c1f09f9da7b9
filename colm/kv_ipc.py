"""CUDA IPC side of the KV hand-off (no gRPC): export a device staging tensor, open it in another process.

Path of one request: the sender allocates one staging tensor ``[layers, tokens, 2, kv_heads, head_dim]``
through torch (the caching allocator reuses its segment for later requests) and ``export_staging``
registers it in this process and shares its allocation (``storage._share_cuda_()``); the handle
fields travel in the ``KVHeader`` -> the receiver's ``StagingOpener.open`` maps the allocation
(``UntypedStorage._new_shared_cuda``; mappings are cached per (device, handle), so a reused segment
is not reopened) or, in the sender's own process (CUDA cannot open a handle there), takes the
registered tensor itself -> the receiver copies ranges out of it as chunk messages arrive -> the
sender frees the staging tensor after the receiver's ack (``release_staging``).

Lifetime: torch's IPC ref-counting would keep a freed staging block out of the caching allocator
("limbo") until the receiver's mapping dies, and forever if the receiver dies first. The sender
therefore drops torch's counter right after sharing and the KV protocol owns the lifetime: the
receiver finishes (and synchronises) its copies before it acks, the sender frees only after the ack
or once the stream has failed.

The cuda_pool path turns this around: the decode worker exports its whole K/V pool once
(``export_pool``; it lives as long as the engine) and the prefill worker opens it (``open_pool``,
cached like any handle) and writes into the granted blocks itself.
"""

from __future__ import annotations

import collections
import math
import os
import socket
import threading
import uuid
from dataclasses import dataclass

import torch

from colm.errors import TransferError
from colm.kv_wire import KVLayout, parse_dtype

_local: dict[str, torch.Tensor] = {}  # ipc_key -> staging tensor of a sender in this process
_pools: dict[str, torch.Tensor] = {}  # ipc_key -> K/V pool of a decode engine in this process (cuda_pool)
_local_lock = threading.Lock()
_process = {"pid": None, "id": ""}


def process_id() -> str:
    """``"<host>:<pid>:<nonce>"``, new in every process (a forked child gets its own)."""
    if _process["pid"] != os.getpid():
        _process.update(pid=os.getpid(), id=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}")
    return _process["id"]


def device_uuid(index: int) -> str:
    try:
        return str(torch.cuda.get_device_properties(index).uuid)
    except (AttributeError, RuntimeError, AssertionError):
        return ""


@dataclass(frozen=True)
class StagingExport:
    """What the ``KVHeader``'s ``ipc_*`` fields carry."""

    ipc_process: str
    ipc_key: str
    ipc_handle: bytes = b""
    ipc_device: int = 0
    ipc_device_uuid: str = ""
    ipc_offset_bytes: int = 0
    ipc_size_bytes: int = 0

    def header_fields(self) -> dict:
        return dict(self.__dict__)


def export_staging(staging: torch.Tensor) -> StagingExport:
    """Register ``staging`` (contiguous, storage offset 0) for receivers in this process and, on CUDA,
    share its allocation for receivers in other processes of this host."""
    return _export(staging, _local)


def export_pool(kv: torch.Tensor) -> StagingExport:
    """The same for a decode engine's K/V pool (cuda_pool path); ``release_pool`` when the engine stops."""
    return _export(kv, _pools)


def release_pool(key: str) -> None:
    _release(_pools, key)


def _release(registry: dict, key: str) -> None:
    with _local_lock:
        registry.pop(key, None)


def _export(t: torch.Tensor, registry: dict) -> StagingExport:
    if not t.is_contiguous() or t.storage_offset() != 0:
        raise ValueError("a tensor shared over CUDA IPC must be contiguous and start its storage")
    key = uuid.uuid4().hex
    with _local_lock:
        registry[key] = t
    if t.device.type != "cuda":  # CPU: only a receiver in this process can read it (tests)
        return StagingExport(process_id(), key, ipc_size_bytes=t.numel() * t.element_size())
    try:
        (device, handle, size_bytes, offset_bytes, ref_counter_handle, ref_counter_offset, _event_handle,
         _event_sync_required) = t.untyped_storage()._share_cuda_()
        # Give torch's IPC counter back at once (see the module docstring): the block returns to the caching
        # allocator as soon as this process frees the tensor, whatever happens to the receiver.
        torch.UntypedStorage._release_ipc_counter_cuda(ref_counter_handle, ref_counter_offset)
    except BaseException:
        _release(registry, key)
        raise
    return StagingExport(process_id(), key, bytes(handle), int(device), device_uuid(int(device)), int(offset_bytes),
                         int(size_bytes))


def release_staging(key: str) -> None:
    _release(_local, key)


class StagingOpener:
    """The receiver's side: header fields -> the sender's staging tensor, viewed in this process."""

    def __init__(self, max_handles: int = 16) -> None:
        self.max_handles = max_handles
        self._cache: collections.OrderedDict = collections.OrderedDict()  # (device, handle) -> (offset, size, storage)
        self._lock = threading.Lock()
        self.num_opened = 0  # cudaIpcOpenMemHandle-level opens (cache misses), for tests and stats

    def open(self, header, layout: KVLayout) -> torch.Tensor:
        """``header``: a ``KVHeader`` (or anything with its ``ipc_*`` fields and ``request_id``)."""
        shape = (layout.num_layers, layout.num_tokens, 2, layout.num_kv_heads, layout.head_dim)
        return self._open(header, shape, parse_dtype(layout.dtype), _local, "staging tensor")

    def open_pool(self, grant, layout: KVLayout) -> torch.Tensor:
        """``grant``: a ``KVPoolGrant`` -> decode's pool ``[2, layers, num_blocks, block_size, kv_heads, head_dim]``."""
        if grant.dtype != layout.dtype:
            raise TransferError(f"request {grant.request_id}: decode's pool holds {grant.dtype}, the K/V are {layout.dtype}")
        shape = (2, layout.num_layers, grant.num_blocks, grant.block_size, layout.num_kv_heads, layout.head_dim)
        return self._open(grant, shape, parse_dtype(layout.dtype), _pools, "K/V pool")

    def _open(self, f, shape: tuple, dtype: torch.dtype, registry: dict, what: str) -> torch.Tensor:
        rid = f.request_id
        num_bytes = math.prod(shape) * dtype.itemsize
        if f.ipc_size_bytes < num_bytes:
            raise TransferError(f"request {rid}: CUDA IPC {what} of {f.ipc_size_bytes} bytes, the layout needs "
                                f"{num_bytes}")
        if f.ipc_process == process_id():  # the sender is this process: CUDA IPC cannot open its own handle
            with _local_lock:
                t = registry.get(f.ipc_key)
            if t is None:
                raise TransferError(f"request {rid}: {what} {f.ipc_key!r} is not registered in this process "
                                    "(its owner released it)")
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise TransferError(f"request {rid}: the {what} is {list(t.shape)} {t.dtype}, the layout needs "
                                    f"{list(shape)} {dtype}")
            return t
        owner_host = f.ipc_process.split(":", 1)[0]
        if owner_host != socket.gethostname():
            raise TransferError(f"request {rid}: CUDA IPC needs both workers on one host; the {what} is on "
                                f"{owner_host!r}, this worker on {socket.gethostname()!r}")
        if not f.ipc_handle:
            raise TransferError(f"request {rid}: the {what} is not on CUDA (no IPC handle); only a worker in the "
                                "same process can use it")
        if not torch.cuda.is_available():
            raise ValueError(f"request {rid}: a CUDA IPC path needs CUDA on this worker; it has none "
                             "(use path 'shm' or 'grpc')")
        device = self._local_device(f)
        storage = self._storage(device, bytes(f.ipc_handle), int(f.ipc_offset_bytes), int(f.ipc_size_bytes), rid)
        flat = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", device)).set_(storage)
        return flat[:num_bytes].view(dtype).view(shape)

    def _local_device(self, header) -> int:
        n = torch.cuda.device_count()
        if header.ipc_device_uuid:
            for i in range(n):
                if device_uuid(i) == header.ipc_device_uuid:
                    return i
            if any(device_uuid(i) for i in range(n)):
                raise TransferError(f"request {header.request_id}: the other worker's GPU {header.ipc_device_uuid} "
                                    "is not visible to this one (CUDA_VISIBLE_DEVICES)")
        if header.ipc_device >= n:
            raise TransferError(f"request {header.request_id}: the prefill worker's cuda:{header.ipc_device} does not "
                                f"exist here ({n} devices)")
        return int(header.ipc_device)

    def _storage(self, device: int, handle: bytes, offset: int, size: int, rid: str):
        key = (device, handle)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == offset and hit[1] == size:
                self._cache.move_to_end(key)
                return hit[2]
            if hit is None:
                self.num_opened += 1
            try:
                # (device, handle, size, offset, ref counter handle, ref counter offset, event handle, event sync):
                # the sender gave its ref counter back and orders the data itself (a chunk message is sent once
                # its copy has finished), so no counter and no event here. While an older view of the same
                # allocation is cached, torch reuses its mapping instead of reopening the handle.
                storage = torch.UntypedStorage._new_shared_cuda(device, handle, size, offset, b"", 0, b"", False)
            except Exception as e:  # noqa: BLE001 - driver errors surface as RuntimeError of several kinds
                raise TransferError(f"request {rid}: cannot open the other worker's CUDA IPC handle on cuda:{device} "
                                    f"({type(e).__name__}: {str(e).strip()[:200]}); CUDA IPC needs both workers "
                                    "on one host, in different processes, with the GPU visible to both") from None
            self._cache[key] = (offset, size, storage)
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_handles:
                self._cache.popitem(last=False)
            return storage
