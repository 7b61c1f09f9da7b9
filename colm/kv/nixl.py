"""The ``nixl`` transport: K/V bytes through NIXL (UCX: TCP, shared memory, RDMA, NVLink) straight into decode's
KV pool, control through gRPC.

Decode registers its pool tensor ``kv [2, layers, num_blocks, block_size, kv_heads, head_dim]`` with its NIXL agent
once per process (``pool_grant_fields``: DRAM on a CPU pool, VRAM on a CUDA pool: the same call). Prefill registers
one host send buffer once (``NixlEndpoint``'s arena, ``PrefillConfig.nixl_arena_bytes``) and gives each request a
region of it (``RegionArena``).

Path of one request (``DecodeWorker.WriteKV``, header with ``transport="nixl"``; the router sends Reserve and
Prefill at once, as decode's grant waits for the reservation):
prefill ``NixlKVSink.begin`` takes a send region and opens the stream on a helper thread (the forward starts
meanwhile) -> decode ``DecodeEngine.grant_kv`` (the cuda_pool grant: the request's blocks, held from now on while
the sender may write) and replies ``KVPoolGrant`` with ``block_ids`` / ``block_size`` / ``num_blocks`` / ``dtype``
plus its agent's name and metadata and the pool's registered address (``nixl_addr``, ``nixl_bytes``, ``nixl_mem``,
``nixl_device``) -> the sender adds that agent (cached per agent name and metadata: one UCX connection per peer
process) -> each ``put`` (layers [l0, l1) x tokens [t0, t1), ``kv [nl, nt, 2, Hkv, hd]``) is copied once into the
send region in pool order (``[2, nl, nt, Hkv, hd]``: K then V, per layer the tokens in order), so that every run of
consecutive slots of the granted blocks is one contiguous piece of it (``put_segments``: 2 x nl x runs segments; a
fresh pool's blocks are one run) -> one NIXL WRITE of the descriptor lists of the puts whose bytes are ready (a
graphed forward's puts come at once: one WRITE), their checksums (``PrefillConfig.nixl_checksum``: ``wsum32`` of a
device send buffer, all of a WRITE's puts in one launch and one read) computed meanwhile; writes are pipelined
(several in flight) and each is polled until ``check_xfer_state`` says DONE, then one ``KVMarks`` message names its
puts (a ``KVChunk`` each: the ranges, crc32 = checksum of the put's bytes in pool order) -> decode marks each range
written (``mark_kv``: nothing copied) and checks its checksum by reading those slots of its pool (a device pool:
noted per chunk, all summed at ``KVEnd`` in one launch, before the K/V count as complete) -> ``KVEnd`` ->
``finish_kv`` and the ack. No NIXL notification: the ordered gRPC marks already say what landed, with a checksum
each.

Copies per byte: prefill one copy (the put into the registered send region, reordered on the way): on the host,
or on CUDA straight into the region, which lies in VRAM by default (``PrefillConfig.nixl_send_memory``; UCX then
moves VRAM -> VRAM through cuda_ipc on one host) or in pinned DRAM. Decode none. Checksums of device bytes run on a
side stream (``side_stream``), not behind the forward or the decode step.

Faults: a peer that dies makes NIXL fail the write (``NIXL_ERR_REMOTE_DISCONNECT``, seen over UCX's TCP transport
within milliseconds) or the gRPC stream break; a write still PROC at the request's deadline fails it. Decode's blocks
follow the cuda_pool rules: a request that ends while its stream is open keeps them out of the free list; decode
then cancels the stream (the grant's ``WriterLease.stop_writer``) and frees them after ``DecodeConfig.external_write_grace_s``
(a sender that lives on may still have writes in flight), at once after a clean end. The sender frees its region
likewise (at once when clean, after its grace otherwise).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from colm.errors import PeerUnavailableError, TransferError
from colm.kv.arena import RegionArena
from colm.kernels.wsum32 import wsum32_segments
from colm.kv_wire import KVLayout, checksum, parse_dtype, tensor_bytes, wsum32, wsum32_pending

log = logging.getLogger("colm.kv.nixl")

# UCX transports when the environment does not choose: tcp (any two hosts, and it notices a dead peer: its
# connection closes), sm (same host: shared memory, cma), self (loopback inside one process); where CUDA is,
# also cuda_copy (host <-> device staging) and cuda_ipc (device -> device between processes of one host).
DEFAULT_UCX_TLS = "tcp,sm,self"
DEFAULT_UCX_TLS_CUDA = "tcp,sm,self,cuda_copy,cuda_ipc"
MAX_IN_FLIGHT = 4  # writes posted and not yet DONE, per request
MAX_BATCH = 64     # puts whose bytes are ready at once go out as one WRITE (one descriptor list), at most this many
# The agent's progress thread sleeps this long (microseconds) between rounds. NIXL's Python API starts it with no
# pause, and it then spins a whole core per process for as long as the agent lives, idle or not (measured: 1.00 core
# at 0 us, 0.01 at 100 us). Our own polling of a write's state makes progress meanwhile. COLM_NIXL_PROGRESS_DELAY_US.
PROGRESS_DELAY_US = 100
_CONFIG_LOCK = threading.Lock()


def _make_agent(name: str, delay_us: int):
    """A NIXL agent (UCX, strict thread sync) whose progress thread pauses ``delay_us`` between rounds. The Python
    API fixes that pause at 0, so the binding's config class is swapped for one that keeps ours while the agent is
    made (under a lock; a binding without the field gets the API's default)."""
    from nixl import _api
    from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

    conf = nixl_agent_config(backends=["UCX"], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    base = getattr(getattr(_api, "nixlBind", None), "nixlAgentConfig", None)
    if base is None or not hasattr(base(), "pthrDelay"):
        return nixl_agent(name, conf)

    class _Config(base):
        def __setattr__(self, key, value):
            base.__setattr__(self, key, delay_us if key == "pthrDelay" else value)

    with _CONFIG_LOCK:
        _api.nixlBind.nixlAgentConfig = _Config
        try:
            return nixl_agent(name, conf)
        finally:
            _api.nixlBind.nixlAgentConfig = base


# ------------------------------------------------------------------------------- where a put's bytes land
@dataclass(frozen=True)
class PoolGeometry:
    """The layout of a pool ``kv [2, num_layers, num_blocks, block_size, kv_heads, head_dim]`` (contiguous) of
    elements of ``itemsize`` bytes: what a sender needs to address its slots."""
    num_layers: int
    num_blocks: int
    block_size: int
    kv_heads: int
    head_dim: int
    itemsize: int

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K (or V) of one layer: one slot."""
        return self.kv_heads * self.head_dim * self.itemsize

    @property
    def num_bytes(self) -> int:
        return 2 * self.num_layers * self.num_blocks * self.block_size * self.token_bytes


def token_runs(blocks, block_size: int, t0: int, t1: int) -> np.ndarray:
    """Token positions [t0, t1) (t0 < t1) of a sequence holding ``blocks`` as maximal runs of consecutive slots:
    int64 [runs, 3] rows (token_a, token_b, first_slot)."""
    first, last = t0 // block_size, (t1 - 1) // block_size
    if t0 < 0 or t1 <= t0 or last >= len(blocks):
        raise ValueError(f"tokens [{t0}, {t1}) do not lie in the {len(blocks)} blocks of {block_size}")
    ids = np.asarray(blocks[first : last + 1], dtype=np.int64)
    heads = np.concatenate(([0], np.flatnonzero(ids[1:] != ids[:-1] + 1) + 1)).astype(np.int64)
    ends = np.append(heads[1:], len(ids))
    a = np.maximum(t0, (first + heads) * block_size)
    b = np.minimum(t1, (first + ends) * block_size)
    return np.stack([a, b, ids[heads] * block_size + a - (first + heads) * block_size], axis=1)


def put_segments(geo: PoolGeometry, l0: int, l1: int, t0: int, t1: int, runs: np.ndarray) -> np.ndarray:
    """The byte segments of a put of layers [l0, l1) x tokens [t0, t1) (``runs``: ``token_runs`` of [t0, t1)):
    int64 [2 * (l1 - l0) * runs, 3] rows (source offset, pool offset, length). The source is the put laid out in
    pool order, ``[2, l1 - l0, t1 - t0, kv_heads, head_dim]`` contiguous; rows run in its order (K then V, layers,
    runs), so they cover it from 0 to its end without gaps, and the checksum of the rows' pool bytes in row order is
    the checksum of the source."""
    return batch_segments(geo, np.array([[l0, l1, 0]], dtype=np.int64), t0, t1, runs)


def batch_segments(geo: PoolGeometry, puts: np.ndarray, t0: int, t1: int, runs: np.ndarray) -> np.ndarray:
    """The segments of several puts of tokens [t0, t1) at once: ``puts`` int64 [P, 3] rows (l0, l1, offset of the
    put's source in a common buffer). int64 [sum 2 x (l1 - l0) x runs, 3] rows (source offset, pool offset,
    length): each put's rows in ``put_segments``' order, shifted by its offset, the puts in order."""
    l0, l1, off = puts[:, 0], puts[:, 1], puts[:, 2]
    nl, nt, tb = l1 - l0, t1 - t0, geo.token_bytes
    per = 2 * nl                                                       # [P] (K/V, layer) pairs of each put
    put = np.repeat(np.arange(len(puts)), per)                         # [Q] the put of each pair
    k = np.arange(len(put)) - np.repeat(np.cumsum(per) - per, per)     # [Q] c * nl + layer - l0, inside its put
    c, layer = k // nl[put], l0[put] + k % nl[put]
    src = off[put] + k * nt * tb                                       # [Q] the pair's first byte in the source
    dst = (c * geo.num_layers + layer) * (geo.num_blocks * geo.block_size) * tb  # [Q] the pair's slot 0 in the pool
    a, b, slot = runs[:, 0], runs[:, 1], runs[:, 2]                    # [R]
    rows = np.stack([(src[:, None] + (a - t0)[None, :] * tb).reshape(-1),
                     (dst[:, None] + slot[None, :] * tb).reshape(-1),
                     np.broadcast_to((b - a)[None, :] * tb, (len(put), len(runs))).reshape(-1)], axis=1)
    return rows


def ranges_segments(geo: PoolGeometry, ranges, offsets, runs_of) -> tuple[np.ndarray, np.ndarray]:
    """The segments of the puts ``ranges`` [(l0, l1, t0, t1)] whose sources start at ``offsets`` in a common buffer,
    the puts of one token range laid out together (``batch_segments``; ``runs_of(t0, t1)``: that range's
    ``token_runs``). Returns (int64 [rows, 3] segments, int64 [rows] the index in ``ranges`` of each row's put)."""
    by_tokens: dict[tuple[int, int], list] = {}
    for i, ((l0, l1, t0, t1), off) in enumerate(zip(ranges, offsets)):
        by_tokens.setdefault((t0, t1), []).append((i, l0, l1, off))
    segs, index = [], []
    for (t0, t1), items in by_tokens.items():
        runs = runs_of(t0, t1)
        puts = np.array([(l0, l1, off) for _, l0, l1, off in items], dtype=np.int64)  # [P, 3]
        segs.append(batch_segments(geo, puts, t0, t1, runs))
        index.append(np.repeat(np.array([i for i, *_ in items], dtype=np.int64), 2 * (puts[:, 1] - puts[:, 0]) * len(runs)))
    if not segs:
        return np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(segs), np.concatenate(index)


def to_pool_order(kv: torch.Tensor) -> torch.Tensor:
    """A put's ``kv [nl, nt, 2, Hkv, hd]`` as the view ``[2, nl, nt, Hkv, hd]`` whose contiguous copy is the source
    of ``put_segments``."""
    return kv.permute(2, 0, 1, 3, 4)


def pool_checksum(pool: torch.Tensor, segments: np.ndarray, kind: str):
    """Checksum of the pool's bytes at ``segments`` (``put_segments`` rows), in row order. A CPU pool is read in
    place; a device pool's segments are gathered on the device (``wsum32`` is computed there; a CRC copies them to
    host first)."""
    if kind == "wsum32":
        flat = pool.view(-1).view(torch.uint8)
        with side_stream(pool.device):  # not behind the engine's steps on its stream: the slots read are written
            return wsum32(torch.cat([flat[off : off + n] for _, off, n in segments.tolist()]))
    if pool.device.type == "cpu":
        buf = tensor_bytes(pool)  # [pool bytes] memoryview, no copy
        value = 0
        for _, off, n in segments.tolist():
            value = checksum(buf[off : off + n], kind, value)
        return value
    flat = pool.view(-1).view(torch.uint8)
    host = torch.cat([flat[off : off + n] for _, off, n in segments.tolist()]).cpu()
    return checksum(tensor_bytes(host), kind)


_SIDE_STREAMS: dict = {}


def read_pending(values: list) -> list[int]:
    """Ints of checksums some of which are scalars not yet read (``wsum32_pending`` on ``side_stream``; one sink's or
    pool's, so one device): those read together, on that stream."""
    scalars = [v for v in values if isinstance(v, torch.Tensor)]
    if not scalars:
        return [int(v) for v in values]
    with side_stream(scalars[0].device):
        read = iter(torch.stack(scalars).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else int(v) for v in values]


def side_stream(device: torch.device):
    """A context that runs the checksum of bytes already in place on a stream of its own (CUDA; a no-op
    elsewhere), so its host read does not wait for the forward or the decode step queued on the current one."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    return torch.cuda.stream(stream)


# ------------------------------------------------------------------------------------------- the endpoint
class NixlEndpoint:
    """This process's NIXL agent for one role, its registered memory and the peers it writes to. Made once per role
    (``endpoint``). ``arena_bytes`` > 0: one buffer registered now and handed out in regions (the sender's send
    buffer): on ``arena_device`` "cpu", host memory (pinned when CUDA is there, so a device put's copy into it is
    asynchronous); on a CUDA device, device memory (a device put is copied device -> device and WRITten VRAM ->
    VRAM)."""

    def __init__(self, role: str, arena_bytes: int = 0, arena_device: str = "cpu") -> None:
        cuda = torch.cuda.is_available()
        # read by UCX when the agent's backend starts
        os.environ.setdefault("UCX_TLS", DEFAULT_UCX_TLS_CUDA if cuda else DEFAULT_UCX_TLS)
        self.name = f"colm-{role}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        # STRICT: every handler thread of the worker uses the one agent
        self.agent = _make_agent(self.name, int(os.environ.get("COLM_NIXL_PROGRESS_DELAY_US", PROGRESS_DELAY_US)))
        if "UCX" not in self.agent.backends:
            raise RuntimeError("nixl: the UCX backend plugin did not load")
        self._lock = threading.Lock()
        self._peers: dict[str, tuple[str, bytes]] = {}  # agent name -> (add_remote_agent's name, its metadata)
        self._regs: dict[tuple[int, int], tuple] = {}  # (address, bytes) -> (registration, mem, device)
        self.buf = None
        self.arena = None
        self.base = 0
        self.arena_mem, self.arena_dev = "DRAM", 0
        if arena_bytes > 0:
            dev = torch.device(arena_device)
            if dev.type == "cuda":
                self.buf = torch.empty(arena_bytes, dtype=torch.uint8, device=dev)  # [arena_bytes]
            else:
                self.buf = torch.empty(arena_bytes, dtype=torch.uint8, pin_memory=cuda)  # [arena_bytes]
            _, _, self.arena_mem, self.arena_dev = self.register(self.buf)
            self.arena = RegionArena(arena_bytes)
            self.base = self.buf.data_ptr()
        self.metadata = self.agent.get_agent_metadata()

    def register(self, t: torch.Tensor) -> tuple[int, int, str, int]:
        """Register contiguous ``t`` (host: DRAM, CUDA: VRAM) once: (address, bytes, mem, device). The registration
        goes when ``t`` does; the agent's metadata (what a peer adds) then names it."""
        if not t.is_contiguous():
            raise ValueError("nixl: only a contiguous tensor can be registered")
        key = (t.data_ptr(), t.numel() * t.element_size())
        with self._lock:
            got = self._regs.get(key)
            if got is None:
                mem = "VRAM" if t.is_cuda else "DRAM"
                device = t.get_device() if t.is_cuda else 0
                reg = self.agent.register_memory(t)
                if reg is None:
                    raise RuntimeError(f"nixl: registering {key[1]} bytes of {mem} failed")
                got = self._regs[key] = (reg, mem, device)
                self.metadata = self.agent.get_agent_metadata()
                weakref.finalize(t, self._deregister, key)
            return key[0], key[1], got[1], got[2]

    def close(self) -> None:
        """Forget every peer and registration and drop the agent (its progress thread ends with it)."""
        with self._lock:
            for name in list(self._peers):
                self._remove(name)
            keys = list(self._regs)
        for key in keys:
            self._deregister(key)
        self.agent = None

    def _deregister(self, key) -> None:
        with self._lock:
            got = self._regs.pop(key, None)
        if got is not None:
            try:
                self.agent.deregister_memory(got[0])
            except Exception as e:  # noqa: BLE001 - at interpreter exit
                log.debug("nixl: deregistering failed: %s", e)

    def peer(self, name: str, metadata: bytes) -> str:
        """The remote agent ``name``, added from ``metadata`` on first use (cached per agent; added again when its
        metadata changed: it registered more memory)."""
        with self._lock:
            got = self._peers.get(name)
            if got is not None and got[1] != metadata:
                self._remove(name)
                got = None
            if got is None:
                got = self._peers[name] = (self.agent.add_remote_agent(metadata), metadata)
            return got[0]

    def forget(self, name: str) -> None:
        """Drop a peer whose connection failed (a restarted worker comes back under a new name anyway)."""
        with self._lock:
            if name in self._peers:
                self._remove(name)

    def _remove(self, name: str) -> None:
        remote, _ = self._peers.pop(name)
        try:
            self.agent.remove_remote_agent(remote)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def post_write(self, local: np.ndarray, remote: np.ndarray, peer: str, mem: str = "DRAM", local_mem: str = "DRAM"):
        """Post one WRITE of the segments ``local`` (this process's ``local_mem``) -> ``remote`` (``peer``'s ``mem``):
        uint64 [n, 3] rows (address, length, device), pairwise of equal length. The handle."""
        handle = None
        try:
            handle = self.agent.initialize_xfer("WRITE", self.agent.get_xfer_descs(local, local_mem),
                                                self.agent.get_xfer_descs(remote, mem), peer)
            state, why = self.agent.transfer(handle), ""
        except Exception as e:  # noqa: BLE001 - NIXL raises its own errors (NIXL_ERR_REMOTE_DISCONNECT: the peer died)
            state, why = "ERR", f" ({type(e).__name__}: {e})"
        if state == "ERR":
            if handle is not None:
                self.release(handle)
            name = peer.decode(errors="replace") if isinstance(peer, bytes) else peer
            raise PeerUnavailableError(f"nixl: WRITE to {name} failed when posted{why}")
        return handle

    def state(self, handle) -> str:
        """The WRITE's state: "DONE", "PROC", or "ERR" (also when NIXL raises: a peer that died mid-write)."""
        try:
            return self.agent.check_xfer_state(handle)
        except Exception as e:  # noqa: BLE001 - NIXL's own errors
            log.debug("nixl: checking a transfer failed: %s", e)
            return "ERR"

    def release(self, handle) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception as e:  # noqa: BLE001 - a handle of a dead peer
            log.debug("nixl: releasing a transfer handle failed: %s", e)


_ENDPOINTS: dict[str, NixlEndpoint] = {}
_ENDPOINTS_LOCK = threading.Lock()


def endpoint(role: str, arena_bytes: int = 0, arena_device: str = "cpu") -> NixlEndpoint:
    """This process's endpoint of ``role`` ("prefill": with a send arena of ``arena_bytes`` on ``arena_device`` |
    "decode": none), made on first use (a later call's arena arguments are not looked at)."""
    with _ENDPOINTS_LOCK:
        ep = _ENDPOINTS.get(role)
        if ep is None:
            ep = _ENDPOINTS[role] = NixlEndpoint(role, arena_bytes, arena_device)
        return ep


def close_endpoints() -> None:
    """Drop this process's endpoints (their agents' UCX progress threads poll while they live). The next
    ``endpoint`` call makes a new one; memory registered with the old agents is forgotten with them."""
    with _ENDPOINTS_LOCK:
        eps = list(_ENDPOINTS.values())
        _ENDPOINTS.clear()
    for ep in eps:
        ep.close()


def arena_free_bytes(role: str) -> tuple[int, int] | None:
    """(free bytes, size) of this process's send arena of ``role``; None when it was never made (or has none)."""
    ep = _ENDPOINTS.get(role)
    return None if ep is None or ep.arena is None else (ep.arena.num_free_bytes, ep.arena.size)


# ------------------------------------------------------------------------------------------- decode side
def pool_grant_fields(engine) -> dict:
    """The ``KVPoolGrant.nixl_*`` fields of ``engine``'s pool: registered with this process's decode agent on first
    use (DRAM or VRAM, as the pool lies)."""
    ep = endpoint("decode")
    addr, nbytes, mem, device = ep.register(engine.pool.kv)
    return dict(nixl_agent=ep.name, nixl_metadata=ep.metadata, nixl_addr=addr, nixl_bytes=nbytes, nixl_mem=mem,
                nixl_device=device)


def geometry_of(pool) -> PoolGeometry:
    """``PoolGeometry`` of a ``PagedKV`` / ``BlockPool``."""
    _, layers, blocks, bs, heads, hd = pool.kv.shape
    return PoolGeometry(layers, blocks, bs, heads, hd, pool.kv.element_size())


def verify_range(pool, blocks, layout: KVLayout, chunk, kind: str, request_id: str = "", pending: bool = False):
    """Decode: the checksum of the chunk's cells as they lie in the pool equals the sender's; TransferError if not
    (or if its ranges lie outside the stream's). ``pending`` (a device pool, ``wsum32``): only the ranges are
    checked now; returns them, (l0, l1, t0, t1), for ``check_pending``, which sums a stream's chunks at its end
    (their pool segments laid out in one numpy pass, summed in one launch, read once). Otherwise None."""
    l0, l1, t0, t1 = chunk.layer_start, chunk.layer_end, chunk.token_start, chunk.token_end
    if not (0 <= l0 < l1 <= layout.num_layers and 0 <= t0 < t1 <= layout.num_tokens):
        raise TransferError(f"request {request_id}: chunk layers [{l0},{l1}) tokens [{t0},{t1}) outside {layout.num_layers} layers x "
                            f"{layout.num_tokens} tokens")
    geo = geometry_of(pool)
    if pending and kind == "wsum32" and pool.kv.is_cuda and geo.token_bytes % 2 == 0:  # whole 16-bit words
        return l0, l1, t0, t1
    segs = put_segments(geo, l0, l1, t0, t1, token_runs(blocks, geo.block_size, t0, t1))
    _check(pool_checksum(pool.kv, segs, kind), chunk, request_id)
    return None


def _check(got: int, chunk, request_id: str) -> None:
    if got != chunk.crc32:
        raise TransferError(f"request {request_id}: checksum mismatch in chunk {chunk.seq} (layers [{chunk.layer_start},"
                            f"{chunk.layer_end}) tokens [{chunk.token_start},{chunk.token_end}) as written into the pool)")


def pending_segments(geo: PoolGeometry, blocks, ranges: list) -> np.ndarray:
    """The pool words of the chunks ``ranges`` [(l0, l1, t0, t1)] in the blocks ``blocks``: int64 [rows, 3] (first
    word, words, index of the chunk in ``ranges``), each chunk's rows in ``put_segments`` order; the chunks of one
    token range laid out together (``ranges_segments``). ``geo.token_bytes`` is even."""
    seg, chunk = ranges_segments(geo, ranges, [0] * len(ranges),
                                 lambda t0, t1: token_runs(blocks, geo.block_size, t0, t1))
    return np.stack([seg[:, 1] // 2, seg[:, 2] // 2, chunk], axis=1)


def check_pending(pool, blocks, pending: list, request_id: str = "") -> None:
    """Decode, at a stream's end: the chunks whose checks ``verify_range(pending=True)`` left pending, [(chunk, its
    ranges)], summed in one launch (``wsum32_segments``) and compared with one host read; TransferError at the first
    mismatch."""
    if not pending:
        return
    segs = pending_segments(geometry_of(pool), blocks, [r for _, r in pending])  # [rows, 3] first word, words, chunk
    words = pool.kv.view(-1).view(torch.uint8).view(torch.int16)  # the pool's 16-bit words
    with side_stream(pool.kv.device):
        sums = wsum32_segments(words, segs, len(pending)).tolist()
    for (chunk, _), got in zip(pending, sums):
        _check(int(got), chunk, request_id)


# ------------------------------------------------------------------------------------------- prefill side
from colm.prefill_worker.kv_push import GrpcKVSink, _peer_error, _Stop, kv_header, kv_pb2  # noqa: E402
from colm.prefill_worker.sinks import copies_done_event, ready_batches  # noqa: E402

_REPLIES = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="colm-kv-nixl")
# Host puts are copied into the send region (and checksummed) here, so the copy of one put runs while the stream's
# thread WRITEs the one before (a UCX shared-memory WRITE runs inside ``transfer``: copy and write would alternate).
_COPIES = ThreadPoolExecutor(max_workers=4, thread_name_prefix="colm-kv-nixl-copy")


class NixlKVSink(GrpcKVSink):
    """Prefill's half (see the module docstring). ``arena_bytes``: this process's send arena, made on first use."""

    copies_at_put = True  # a device put is copied into the send region on the current stream before put returns

    def __init__(self, stub, request_id: str, cluster_token: str, checksum_kind: str = "crc32",
                 timeout_s: float = 60.0, arena_bytes: int = 256 << 20, grace_s: float = 2.0,
                 arena_device: str = "cpu") -> None:
        super().__init__(stub, request_id, cluster_token, checksum_kind=checksum_kind, timeout_s=timeout_s)
        self.path = "nixl"
        self.ep = endpoint("prefill", arena_bytes, arena_device)
        self.grace_s = grace_s
        self.granted = threading.Event()
        self._done = threading.Event()
        self._grant = None
        self._geo: PoolGeometry | None = None
        self._blocks: list[int] = []
        self._runs: dict[tuple[int, int], np.ndarray] = {}  # (t0, t1) -> token_runs
        self._peer = ""
        self._region: int | None = None  # the send region's offset in the arena until it is freed
        self._start = 0  # the same, kept (writes of a failed stream may still read it: it is freed after the grace)
        self._put_offset = 0  # where the next put goes in the region
        self._error: BaseException | None = None
        self._ack = None
        self._call = None
        self._stopped = False  # fail() / a timed-out finish came: a stream not yet opened is not opened
        self._clean = False
        self._deadline = 0.0
        self._lock = threading.Lock()

    def begin(self, layout: KVLayout) -> None:
        self._layout = layout
        self._deadline = time.monotonic() + self.timeout_s
        if layout.num_bytes:
            self._region = self._start = self.ep.arena.allocate(layout.num_bytes)  # CapacityError: this request alone
        # the stream opens on a helper thread: opening a gRPC stream takes a while, and the forward runs meanwhile
        _REPLIES.submit(self._read_replies, kv_header(self.request_id, layout, self.checksum_kind, transport="nixl"))

    def _read_replies(self, header) -> None:
        try:
            with self._lock:
                if self._stopped:
                    raise TransferError(f"request {self.request_id}: KV stream stopped before it opened")
                self._call = self.stub.WriteKV(self._messages(header), timeout=self.timeout_s, metadata=self.metadata)
            reply = next(self._call)
            if reply.WhichOneof("kind") != "grant" or not reply.grant.nixl_agent:
                raise TransferError(f"request {self.request_id}: decode answered WriteKV without a NIXL grant")
            g, lay = reply.grant, self._layout
            if g.dtype != lay.dtype:
                raise TransferError(f"request {self.request_id}: decode's pool holds {g.dtype}, the K/V are {lay.dtype}")
            if len(g.block_ids) * g.block_size < lay.num_tokens:
                raise TransferError(f"request {self.request_id}: {len(g.block_ids)} blocks of {g.block_size} granted, "
                                    f"{lay.num_tokens} tokens to write")
            geo = PoolGeometry(lay.num_layers, g.num_blocks, g.block_size, lay.num_kv_heads, lay.head_dim,
                               parse_dtype(lay.dtype).itemsize)
            if g.nixl_bytes != geo.num_bytes or any(b >= g.num_blocks for b in g.block_ids):
                raise TransferError(f"request {self.request_id}: a pool of {g.nixl_bytes} bytes granted, its layout "
                                    f"needs {geo.num_bytes} (or a block id lies outside it)")
            self._peer = self.ep.peer(g.nixl_agent, g.nixl_metadata) if lay.num_bytes else ""
            self._geo, self._blocks, self._grant = geo, list(g.block_ids), g
            self.granted.set()
            reply = next(self._call)
            if reply.WhichOneof("kind") != "ack":
                raise TransferError(f"request {self.request_id}: decode sent a second grant")
            self._ack = reply.ack
        except StopIteration:
            self._set_error(TransferError(f"request {self.request_id}: WriteKV ended without "
                                          f"{'an ack' if self._grant is not None else 'a grant'}"))
        except BaseException as e:  # noqa: BLE001 - handed to finish
            self._set_error(_as_error(self.request_id, e))
        finally:
            self.granted.set()
            self._done.set()

    def _set_error(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc

    def _region_view(self, offset: int, shape, dtype: torch.dtype) -> torch.Tensor:
        """``shape`` of ``dtype`` at ``offset`` of this request's send region (a view of registered memory)."""
        n = int(np.prod(shape)) * parse_dtype(self._layout.dtype).itemsize
        start = self._start + offset
        return self.ep.buf[start : start + n].view(dtype).view(shape)

    def put(self, layer_start, layer_end, token_start, token_end, kv) -> None:
        # kv [layers, tokens, 2, Hkv, hd]; its bytes go into the send region in pool order (the put's one copy)
        if self._error is not None:  # the stream failed: the region goes (after the grace) even if finish never comes
            self._release()
            raise self._error
        n = kv.numel() * kv.element_size()
        offset, self._put_offset = self._put_offset, self._put_offset + n
        if self._region is None or self._put_offset > self._layout.num_bytes:
            raise TransferError(f"request {self.request_id}: puts of more than the header's {self._layout.num_bytes} "
                                "bytes")
        ranges = (layer_start, layer_end, token_start, token_end)
        if kv.is_cuda:  # the copy lands in the region itself (pinned host or device memory), asynchronously
            pooled = to_pool_order(kv)
            self._region_view(offset, pooled.shape, kv.dtype).copy_(pooled, non_blocking=True)
            self._q.put((ranges, None, copies_done_event(kv), offset))
        else:  # copied off the forward's thread (torch's copy and crc32c run off the GIL)
            self._q.put((ranges, _COPIES.submit(self._fill, offset, kv), None, offset))

    def _fill(self, offset: int, kv: torch.Tensor) -> int:
        """Copy a host put into its place of the send region in pool order; the checksum of those bytes."""
        pooled = to_pool_order(kv)
        dst = self._region_view(offset, pooled.shape, kv.dtype)
        dst.copy_(pooled)
        return self._region_checksum(offset, dst.numel() * dst.element_size())

    def _region_checksum(self, offset: int, nbytes: int):
        """The checksum of ``nbytes`` of the send region at ``offset``: ``wsum32`` computed where they lie, a scalar
        not yet read (``read_pending``); a CRC (of device memory: copied to host first) as an int."""
        if self.checksum_kind == "none":
            return 0
        start = self._start + offset
        data = self.ep.buf[start : start + nbytes]  # [nbytes] uint8
        if self.checksum_kind == "wsum32":
            with side_stream(data.device):  # the put's copy is done (its event was waited for)
                return wsum32_pending(data)
        return checksum(tensor_bytes(data.cpu() if data.is_cuda else data), self.checksum_kind)

    def _ready(self, item) -> tuple:
        """((l0, l1, t0, t1), offset, checksum) of a queued put once its bytes are in the send region. A device
        ``wsum32`` of an even range comes as its words ``(first word, words)`` of the send buffer, for
        ``_device_checksums``; another device one as a scalar not yet read (``read_pending``)."""
        ranges, copied, event, offset = item
        if copied is not None:  # a host put: its copy's future
            return ranges, offset, copied.result()
        event.synchronize()  # a device put: its copy into the region was queued on the device
        l0, l1, t0, t1 = ranges
        nbytes = (l1 - l0) * (t1 - t0) * self._layout.bytes_per_token_layer
        start = self._start + offset
        if self.checksum_kind == "wsum32" and self.ep.buf.is_cuda and start % 2 == 0 and nbytes % 2 == 0:
            return ranges, offset, (start // 2, nbytes // 2)
        return ranges, offset, self._region_checksum(offset, nbytes)

    def _device_checksums(self, values: list) -> list[int]:
        """Ints of ``_ready``'s checksums: the word ranges summed in one launch (``wsum32_segments``), the device
        scalars read with them (one host read)."""
        ranged = [i for i, v in enumerate(values) if isinstance(v, tuple)]
        out = list(values)
        if ranged:
            segs = np.array([[*values[i], g] for g, i in enumerate(ranged)], dtype=np.int64)  # [n, 3]
            buf = self.ep.buf
            with side_stream(buf.device):
                sums = wsum32_segments(buf.view(torch.int16), segs, len(ranged)).tolist()
            for i, v in zip(ranged, sums):
                out[i] = v
        return read_pending(out)

    @staticmethod
    def _copied(item) -> bool:
        _, copied, event, _ = item
        return copied.done() if copied is not None else event.query()

    @staticmethod
    def _wait_copied(item) -> None:
        _, copied, event, _ = item
        if copied is not None:
            copied.result()
        else:
            event.synchronize()

    def _batches(self):
        """Yields (list, last) of ``_ready`` puts (their checksums not yet summed: ``_device_checksums``; last: the
        stream ends right behind them), in put order, until ``finish``/``fail`` ends the stream: the next put (waited
        for), then those queued behind it whose bytes are already in the send region (a graphed forward's puts all
        come at once: one WRITE for them, not one each)."""
        for items, last in ready_batches(self._q, self._copied, self._wait_copied, MAX_BATCH):
            yield [self._ready(item) for item in items], last

    def _messages(self, header):
        yield kv_pb2.KVMessage(header=header)
        if not self.granted.wait(max(0.0, self._deadline - time.monotonic())) or self._grant is None:
            return  # no grant (an error, or the deadline): the stream ends without KVEnd
        inflight: collections.deque = collections.deque()  # (handle, its puts' marks), posting order
        g = self._grant
        local_base = self.ep.base + self._start
        ended = False
        try:
            for batch, last in self._batches():
                local, remote = self._descriptors(batch, local_base)
                try:
                    handle = self.ep.post_write(local, remote, self._peer, g.nixl_mem or "DRAM", self.ep.arena_mem)
                except PeerUnavailableError as e:
                    self.ep.forget(g.nixl_agent)  # a dead peer: a restarted worker comes back under a new name
                    raise PeerUnavailableError(f"request {self.request_id}: {e}") from None
                marks = [ranges for ranges, _, _ in batch]
                inflight.append((handle, marks))
                # the checksums are summed (one launch, one read) while the WRITE runs: both only read the region
                crcs = self._device_checksums([crc for _, _, crc in batch])
                marks[:] = [(*m, crc) for m, crc in zip(marks, crcs)]
                # post more while puts are queued; else (or at the cap, or at the end) finish the oldest write and
                # send its marks; the last write's carry KVEnd
                while inflight and (last or self._q.empty() or len(inflight) >= MAX_IN_FLIGHT):
                    ended = yield from self._send_oldest(inflight, last)
            while inflight:  # the end came after the last batch
                ended = yield from self._send_oldest(inflight, True)
        except Exception as e:  # noqa: BLE001 - a failed write or put: finish raises it, the stream ends without KVEnd
            self._set_error(e)  # (raising it here would only turn into gRPC's UNKNOWN "Exception iterating requests")
            return
        finally:
            for handle, _ in inflight:  # a failed stream: drop what is still posted (the region's free waits)
                self.ep.release(handle)
        if not ended:
            yield self._end_message()

    def _send_oldest(self, inflight: collections.deque, last: bool):
        """Waits for the oldest write of ``inflight`` and yields the message marking its puts, with the stream's
        KVEnd when it was the last (``last`` and nothing else in flight); returns whether it was."""
        handle, marks = inflight.popleft()
        self._wait(handle)
        end = last and not inflight
        yield self._marks_message(marks, end=end)
        return end

    def _descriptors(self, batch, local_base: int) -> tuple[np.ndarray, np.ndarray]:
        """The WRITE of ``batch`` [((l0, l1, t0, t1), region offset, checksum)]: uint64 [n, 3] rows (address, length,
        device) of this side and of decode's pool, pairwise. The puts of one token range are laid out in one numpy
        pass (``ranges_segments``): per put 2 x layers x runs segments."""
        g, geo = self._grant, self._geo

        def runs_of(t0: int, t1: int) -> np.ndarray:
            runs = self._runs.get((t0, t1))
            if runs is None:
                runs = self._runs[(t0, t1)] = token_runs(self._blocks, geo.block_size, t0, t1)
            return runs

        seg, _ = ranges_segments(geo, [r for r, _, _ in batch], [off for _, off, _ in batch], runs_of)
        seg = seg.astype(np.uint64)  # [n, 3] source offset in the region, pool offset, length
        n = len(seg)
        local = np.stack([seg[:, 0] + np.uint64(local_base), seg[:, 2], np.full(n, self.ep.arena_dev, np.uint64)], 1)
        remote = np.stack([seg[:, 1] + np.uint64(g.nixl_addr), seg[:, 2], np.full(n, g.nixl_device, np.uint64)], 1)
        return local, remote

    def _wait(self, handle) -> None:
        """Returns once the write is DONE; raises on ERR or at the deadline."""
        spins = 0
        try:
            while True:
                state = self.ep.state(handle)
                if state == "DONE":
                    return
                if state == "ERR":
                    self.ep.forget(self._grant.nixl_agent)
                    raise PeerUnavailableError(f"request {self.request_id}: NIXL write to {self._grant.nixl_agent} failed")
                if time.monotonic() > self._deadline:
                    raise TimeoutError(f"request {self.request_id}: NIXL write not done by the deadline")
                spins += 1
                if spins > 200:  # a short spin, then poll without burning a shared core
                    time.sleep(0.0002)
        except Exception as e:
            self._set_error(e)
            raise
        finally:
            self.ep.release(handle)

    def finish(self, timeout_s: float) -> int:
        self._close_queue()
        try:
            if not self._done.wait(timeout_s):
                self._stop()
                raise TimeoutError(f"request {self.request_id}: NIXL KV transfer not acknowledged in {timeout_s:.1f} s")
            if self._error is not None:
                raise self._error
            n = self._checked(self._ack)
            self._clean = True
            return n
        finally:
            self._release()

    def fail(self, exc: BaseException) -> None:
        self._set_error(exc)
        self._close_queue(_Stop())
        self._stop()
        self._release()

    def _stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._call is not None:
                self._call.cancel()

    def _release(self) -> None:
        with self._lock:
            region, self._region = self._region, None
        if region is not None:  # a failed stream may have writes in flight that read the region: free it later
            self.ep.arena.free(region, 0.0 if self._clean else self.grace_s)


def _as_error(request_id: str, e: BaseException) -> BaseException:
    import grpc

    if isinstance(e, grpc.RpcError):
        return _peer_error(request_id, e)
    return e
