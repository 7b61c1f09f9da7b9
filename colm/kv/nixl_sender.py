"""Prefill's half of the ``nixl`` transport: ``NixlKVSink`` (the request's path: ``colm.kv.nixl``).

A request takes a region of this process's registered send arena; each put is copied into it once, in pool order;
the puts whose bytes are ready go out as one NIXL WRITE of descriptor lists (at most ``MAX_BATCH``), several writes
in flight (``MAX_IN_FLIGHT``), their checksums summed while they run; each write, once DONE, is named to decode by
one ``KVMarks`` message on the gRPC stream, the last with ``KVEnd``. The region is freed at once after a clean end,
after ``grace_s`` otherwise (writes of a failed stream may still read it).
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from colm.errors import PeerUnavailableError, TransferError
from colm.kernels.wsum32 import wsum32_segments
from colm.kv.nixl_agent import endpoint
from colm.kv.nixl_checksums import read_pending, side_stream
from colm.kv.nixl_segments import PoolGeometry, ranges_segments, to_pool_order, token_runs
from colm.kv_wire import KVLayout, checksum, parse_dtype, tensor_bytes, wsum32_pending
from colm.prefill_worker.kv_push import GrpcKVSink, _peer_error, _Stop, kv_header, kv_pb2
from colm.prefill_worker.sinks import copies_done_event, ready_batches

MAX_IN_FLIGHT = 4  # writes posted and not yet DONE, per request
MAX_BATCH = 64     # puts whose bytes are ready at once go out as one WRITE (one descriptor list), at most this many

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
