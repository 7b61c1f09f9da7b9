"""``PoolKVSink``: the cuda_pool hand-off. The prefill worker writes K/V straight into decode's blocks.

Path of one request: ``begin(layout)`` hands the stream to a pooled thread and returns at once (a
thread start costs the forward's host thread ~0.3 ms on a busy host); that thread opens
``DecodeWorker.WriteKV`` (header first), waits for decode's ``KVPoolGrant`` (the request's blocks and
a CUDA IPC handle of decode's whole pool), opens the pool (``colm.kv_ipc.StagingOpener.open_pool``: one mapping per decode
process, cached) and views it as a ``PagedKV`` -> the forward's first layer computes meanwhile ->
each ``put`` waits for the grant (normally long there), copies its K/V into the granted blocks' slots
on the current stream and records an event -> the stream's request generator (run by gRPC's own
thread for this call) waits for the event and sends a ``KVChunk`` naming the range, which decode only
marks as written -> once every (layer, token) cell has been put, ``KVEnd`` follows the last range at
once (not when the engine calls ``finish``, which comes after the batch's forward and a thread hop:
~0.5 ms later on an H100 host) -> ``finish`` waits for decode's ack.

Against the ``cuda_ipc`` path (``IpcKVSink``) this drops the staging tensor and decode's copy out of
it, and takes the stream's opening off the forward's path: there is no per-request handle to export
or open, and no round trip before the first layer computes.

Decode holds a request's blocks back if it ends while this stream is open (``DecodeEngine.grant_kv``).
``fail`` stops the writes (a later ``put`` raises) and cancels the stream; a decode-side failure
reaches ``put`` as the reply thread's error. A decode engine in this process (tests, CPU) is written
directly: its pool is registered, not opened.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from colm.decode_worker.block_pool import PagedKV
from colm.errors import TransferError
from colm.kv_ipc import StagingOpener
from colm.kv_wire import KVLayout
from colm.prefill_worker.kv_push import GrpcKVSink, _peer_error, _Stop, kv_header, kv_pb2
from colm.prefill_worker.sinks import copies_done_event

POOL_OPENER = StagingOpener(max_handles=64)  # one mapping per decode worker's pool, shared by every request
# One thread per open stream (it waits for the grant, then the ack); threads are made as needed and reused.
_STREAMS = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="colm-kv-pool")


class PoolKVSink(GrpcKVSink):
    def __init__(self, stub, request_id: str, cluster_token: str, timeout_s: float = 60.0,
                 opener: StagingOpener = POOL_OPENER) -> None:
        super().__init__(stub, request_id, cluster_token, checksum_kind="none", timeout_s=timeout_s)
        self.path = "cuda_pool"
        self.opener = opener
        self._granted = threading.Event()  # the grant arrived and the pool is open, or the stream failed
        self._done = threading.Event()     # the reply stream ended (ack or error)
        self._error: BaseException | None = None
        self._pages: PagedKV | None = None
        self._blocks: list[int] = []
        self._plans: dict[tuple[int, int], object] = {}
        self._ack = None
        self._call = None
        self._stopped = False
        self._lock = threading.Lock()  # orders the call's creation against fail()'s cancel
        self._cells_left = 0  # (layer, token) cells not put yet; at 0 the stream ends without waiting for finish

    def begin(self, layout: KVLayout) -> None:
        self._layout = layout
        self._cells_left = layout.num_layers * layout.num_tokens
        _STREAMS.submit(self._run_stream, kv_header(self.request_id, layout, "none"))

    def _run_stream(self, header) -> None:
        try:
            with self._lock:
                if self._stopped:
                    raise TransferError(f"request {self.request_id}: KV stream stopped before it opened")
                self._call = self.stub.WriteKV(self._messages(header), timeout=self.timeout_s, metadata=self.metadata)
            reply = next(self._call)
            if reply.WhichOneof("kind") != "grant":
                raise TransferError(f"request {self.request_id}: decode answered WriteKV without a grant")
            grant = reply.grant
            if len(grant.block_ids) * grant.block_size < self._layout.num_tokens:
                raise TransferError(f"request {self.request_id}: {len(grant.block_ids)} blocks of {grant.block_size} "
                                    f"granted, {self._layout.num_tokens} tokens to write")
            self._pages = PagedKV(self.opener.open_pool(grant, self._layout))
            self._blocks = list(grant.block_ids)
        except BaseException as e:  # noqa: BLE001 - handed to put / finish
            self._error = _as_error(self.request_id, e)
            self._granted.set()
            self._done.set()
            return
        self._granted.set()
        try:
            reply = next(self._call)
            if reply.WhichOneof("kind") != "ack":
                raise TransferError(f"request {self.request_id}: decode sent a second grant")
            self._ack = reply.ack
        except StopIteration:
            self._error = TransferError(f"request {self.request_id}: WriteKV ended without an ack")
        except BaseException as e:  # noqa: BLE001
            self._error = _as_error(self.request_id, e)
        finally:
            self._done.set()

    def put(self, layer_start, layer_end, token_start, token_end, kv) -> None:
        # kv [layers, tokens, 2, Hkv, hd] of layers/tokens [start, end)
        if not self._granted.is_set() and not self._granted.wait(self.timeout_s):
            raise TimeoutError(f"request {self.request_id}: no KV grant from decode in {self.timeout_s:.1f} s")
        if self._error is not None:
            raise self._error
        if self._stopped:
            raise TransferError(f"request {self.request_id}: K/V put after the stream was stopped")
        plan = self._plans.get((token_start, token_end))
        if plan is None:
            plan = self._plans[(token_start, token_end)] = self._pages.copy_plan(self._blocks, token_start, token_end)
        self._pages.write(plan, layer_start, layer_end, kv)
        self._q.put(((layer_start, layer_end, token_start, token_end), None, copies_done_event(kv)))
        self._cells_left -= (layer_end - layer_start) * (token_end - token_start)
        if self._cells_left <= 0:
            self._close_queue()  # KVEnd right after the last range's mark

    def _messages(self, header):
        yield kv_pb2.KVMessage(header=header)
        for (l0, l1, t0, t1), _ in self._staged():  # yields once the put's writes have finished
            yield self._range_message(l0, l1, t0, t1)
        yield self._end_message()

    def finish(self, timeout_s: float) -> int:
        if self._cells_left > 0 or self._layout.num_tokens == 0:
            self._close_queue()  # cells missing (decode will say which), or nothing to put
        if not self._done.wait(timeout_s):
            self._stop()
            raise TimeoutError(f"request {self.request_id}: KV writes not acknowledged in {timeout_s:.1f} s")
        if self._error is not None:
            raise self._error
        return self._checked(self._ack)

    def fail(self, exc: BaseException) -> None:
        """Stops the stream (decode fails the request). Safe from any thread: a ``put`` waiting for the grant wakes
        and raises ``exc`` (the prefill service calls this when its caller cancels, e.g. after a failed Reserve)."""
        if self._error is None:
            self._error = exc
        self._granted.set()
        self._close_queue(_Stop())
        self._stop()

    def _stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._call is not None:
                self._call.cancel()


def _as_error(request_id: str, e: BaseException) -> BaseException:
    if isinstance(e, grpc.RpcError):
        return _peer_error(request_id, e)
    if isinstance(e, StopIteration):
        return TransferError(f"request {request_id}: WriteKV ended before decode's grant")
    return e
