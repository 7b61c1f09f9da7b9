"""Wire format of the prefill -> decode KV hand-off, free of gRPC so both engines can use it.

A request's K/V travel as chunks; each chunk is the tensor ``kv[layers, tokens, 2, kv_heads, head_dim]``
(k then v; token ranges slice without a copy) for a layer range and a token range, as raw little-endian bytes with a
checksum (``crc32c``, hardware CRC through the ``crc32c`` package, when it is installed; else zlib's
``crc32``; ``wsum32`` where the bytes lie on a GPU, computed there; the header names the kind). On the same-host path the bytes sit in a POSIX shared-memory
segment created by the sender (one per request, named ``colm-kv-<hash>``) and the chunk message only
carries the offset.

The gRPC bytes path skips protobuf for the payload, which would copy it twice per side:
``encode_chunk_message`` writes a serialised ``KVMessage{chunk}`` (metadata from protobuf, the
payload appended as field 8 in one copy) and ``split_chunk_message`` finds the payload in a received
message as a view, so the decode side parses only the small metadata. Both follow the protobuf wire
format, so either end also interoperates with plain protobuf messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import queue
import re
import sys
import threading
import warnings
import zlib
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
import torch

try:  # hardware CRC-32C (SSE4.2 / ARMv8): ~5x zlib's crc32 on the same core
    import crc32c as _crc32c
except ImportError:  # optional; zlib's crc32 is the fallback
    _crc32c = None

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# wsum32: a position-weighted sum of the bytes' 16-bit words, computed by torch where the bytes lie (a GPU checks
# its own memory without a host copy); it detects any single changed word and any swap of two different words.
CHECKSUMS = ("crc32c", "crc32", "wsum32", "none")


def default_checksum() -> str:
    """The fastest checksum this host can verify: ``crc32c`` when the package is installed, else ``crc32``."""
    return "crc32c" if _crc32c is not None else "crc32"


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


def _wsum_words(t: torch.Tensor) -> torch.Tensor:
    """The 16-bit words (int16 [n / 2]) of the bytes of ``t``, zero-padded to an even length (a copy only then, or
    when they start at an odd address)."""
    b = t.reshape(-1).view(torch.uint8) if t.dtype != torch.uint8 else t.reshape(-1)
    if b.numel() % 2 or b.storage_offset() % 2:
        b = torch.cat([b, b.new_zeros(b.numel() % 2)])
    return b.view(torch.int16)


def wsum32_pending(t: torch.Tensor) -> torch.Tensor:
    """``wsum32`` of the bytes of ``t`` as an int64 scalar on ``t``'s device, not waited for
    (``colm.kv.nixl.read_pending`` reads several at once)."""
    from colm.kernels.wsum32 import wsum32_tensor

    return wsum32_tensor(_wsum_words(t))


def wsum32(t: torch.Tensor) -> int:
    """The ``wsum32`` checksum of the bytes of ``t`` (any dtype, any device), computed on its device (a Triton pass
    on CUDA: ``colm.kernels.wsum32``): the sum over its little-endian 16-bit words x_i (zero-padded to an even
    length) of x_i * (i mod 65521 + 1), mod 2^32."""
    return int(wsum32_pending(t))


def checksum(buf, kind: str = "crc32", value: int = 0) -> int:
    """``kind`` of ``buf``; ``value``: the checksum of the bytes before ``buf`` (to checksum pieces in turn; not for
    ``wsum32``, whose weights depend on where a word lies: checksum the pieces joined)."""
    if kind == "wsum32":
        if value:
            raise ValueError("checksum='wsum32' is not computed in pieces: pass the whole buffer")
        if not len(buf):
            return 0
        with warnings.catch_warnings():  # a read-only buffer: only read here
            warnings.simplefilter("ignore", UserWarning)
            return wsum32(torch.frombuffer(buf, dtype=torch.uint8))
    if kind == "crc32":
        return zlib.crc32(buf, value)
    if kind == "crc32c":
        if _crc32c is None:
            raise ValueError("checksum='crc32c' needs the crc32c package (pip install crc32c)")
        return _crc32c.crc32c(buf, value)
    if kind == "none":
        return 0
    raise ValueError(f"checksum={kind!r}: allowed are {CHECKSUMS}")


# ------------------------------------------------------------------ payload outside protobuf
_CHUNK_TAG = b"\x12"  # KVMessage.chunk: field 2, length-delimited
_DATA_TAG = b"\x42"   # KVChunk.data: field 8, length-delimited


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def encode_chunk_message(meta: bytes, payload) -> bytes:
    """Serialised ``KVMessage{chunk}``: ``meta`` is the serialised ``KVChunk`` without ``data``; the payload
    (a bytes-like object) is appended as its ``data`` field. One copy of the payload."""
    data_hdr = _DATA_TAG + _varint(len(payload))
    body = len(meta) + len(data_hdr) + len(payload)
    return b"".join((_CHUNK_TAG, _varint(body), meta, data_hdr, payload))


def split_chunk_message(raw) -> tuple[bytes, memoryview] | None:
    """For a serialised ``KVMessage`` holding only a chunk: (the chunk's other fields, serialised; a view of
    its ``data``), without copying the payload. None for anything else (header, end, odd encodings)."""
    mv = memoryview(raw)
    if len(mv) < 2 or mv[0] != _CHUNK_TAG[0]:
        return None
    body_len, i = _read_varint(mv, 1)
    if i + body_len != len(mv):
        return None  # more top-level fields: leave it to protobuf
    meta, data = [], None
    while i < len(mv):
        start = i
        key, i = _read_varint(mv, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _read_varint(mv, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, j = _read_varint(mv, i)
            i = j + n
            if field == 8:
                if data is not None:
                    return None  # repeated data field (protobuf would take the last): not ours
                data = mv[j:i]
                continue
        else:
            return None
        if i > len(mv):
            raise ValueError("truncated KV chunk message")
        meta.append(mv[start:i])
    if data is None:
        return None
    return b"".join(meta), data


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


_DONE = object()


def drain(q, end):
    """Yields the items put on ``q`` (a ``queue`` queue) until ``end``; raises an exception put there (a producer's
    failure, handed to the consumer)."""
    while True:
        item = q.get()
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def prefetch(iterable, depth: int = 2, name: str = "colm-kv-prefetch"):
    """Iterate ``iterable`` on a helper thread, up to ``depth`` items ahead: a KV stream's producer (encode,
    checksum) and consumer (gRPC send; or gRPC receive and the decode side's copy) overlap instead of
    taking turns. Exceptions of the producer are raised here, in order; closing this generator stops it."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for item in iterable:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    threading.Thread(target=pump, name=name, daemon=True).start()
    try:
        yield from drain(q, _DONE)
    finally:
        stop.set()


SHM_PREFIX = "colm-kv-"
_SHM_NAME = re.compile(re.escape(SHM_PREFIX) + r"[0-9a-f]{20}")  # what shm_name_for makes


def shm_name_for(request_id: str, nonce: str = "") -> str:
    return SHM_PREFIX + hashlib.sha1(f"{request_id}|{nonce}".encode()).hexdigest()[:20]


def create_segment(name: str, size: int) -> shared_memory.SharedMemory:
    return shared_memory.SharedMemory(name=name, create=True, size=max(size, 1))


class SenderSegment:
    """A segment this side created, unmapped only once no thread still views it.

    ``torch.frombuffer`` keeps no export of the mapping, so closing the segment while the stream's copy thread
    wrote into it unmapped the memory under the copy and crashed the process. Here the copy thread takes a
    ``view()``; ``release()`` (the request ended: finished, failed or cancelled) unlinks the name at once and
    leaves the unmapping to the last view's exit."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self._shm = create_segment(name, size)
        self._lock = threading.Lock()
        self._num_views = 0
        self._released = False

    @contextlib.contextmanager
    def view(self):
        """The whole segment as a uint8 tensor, valid inside the ``with`` only (ValueError once released)."""
        with self._lock:
            if self._released:
                raise ValueError(f"shared-memory segment {self.name!r} was released: its request ended")
            self._num_views += 1
        seg = torch.frombuffer(self._shm.buf, dtype=torch.uint8)
        try:
            yield seg
        finally:
            del seg
            with self._lock:
                self._num_views -= 1
                close_now = self._released and self._num_views == 0
            if close_now:
                self._shm.close()

    def release(self) -> None:
        """Unlink now; unmap now or when the last view ends. Idempotent."""
        with self._lock:
            if self._released:
                return
            self._released = True
            close_now = self._num_views == 0
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()
        if close_now:
            self._shm.close()


def open_segment(name: str) -> "AttachedSegment":
    """Attach to a segment the sender created; the sender owns (and unlinks) it. Only a name ``shm_name_for`` makes
    is opened (ValueError otherwise): a stream's header never maps another program's segment, nor a path."""
    if not _SHM_NAME.fullmatch(name):
        shown = repr(name[:64]) + ("..." if len(name) > 64 else "")
        raise ValueError(f"KVHeader.shm_name={shown}: not a KV segment name (allowed: {SHM_PREFIX!r} followed by 20 "
                         "lowercase hex digits, as shm_name_for makes)")
    try:
        return AttachedSegment(name)
    except FileNotFoundError:
        raise ValueError(f"shared-memory segment {name!r} does not exist on this host") from None


class AttachedSegment:
    """A sender's shared-memory segment mapped into this process, never registered with a resource tracker.

    ``SharedMemory(name)`` before Python 3.13 registers even a segment it only attaches to. Workers spawned by one
    parent share that parent's tracker, so the receiver's registration (and the unregistration that undid it)
    raced the sender's: the tracker printed a KeyError traceback per request, and a receiver that exited first had
    its tracker unlink a segment the sender still used. Same interface as far as the receiver needs it: ``name``,
    ``size``, ``buf``, ``close()``."""

    def __init__(self, name: str) -> None:
        self.name = name
        if sys.version_info >= (3, 13):
            self._shm = shared_memory.SharedMemory(name=name, create=False, track=False)
            self._mmap = None
            self.size, self.buf = self._shm.size, self._shm.buf
            return
        import _posixshmem  # what SharedMemory itself opens POSIX segments with

        self._shm = None
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        try:
            self.size = os.fstat(fd).st_size
            self._mmap = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            return
        if self.buf is not None:
            self.buf.release()
            self.buf = None
            self._mmap.close()
