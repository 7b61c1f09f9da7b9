"""``PoolKVSink``: the cuda_pool hand-off. The prefill worker writes K/V straight into decode's blocks.

Path of one request: ``begin(layout)`` hands the stream to a pooled thread and returns at once (a
thread start costs the forward's host thread ~0.3 ms on a busy host); that thread opens
``DecodeWorker.WriteKV`` (header first), waits for decode's ``KVPoolGrant`` (the request's blocks and
a CUDA IPC handle of decode's whole pool), opens the pool (``colm.kv_ipc.StagingOpener.open_pool``: one mapping per decode
process, cached) and views it as a ``PagedKV`` -> the forward computes meanwhile and never waits for
the grant: a ``put`` before it keeps its K/V tensor (the sink's to keep) with the stream it was made on,
and the stream's thread writes that backlog on that stream as soon as the grant is in (on an H100 host
the grant came 3-5 ms after the batch started: waiting in the first ``put`` stretched the 8K forward by
as much) -> a ``put`` after the grant copies its K/V into the granted blocks' slots on the current
stream -> each write records an event; the stream's request generator (run by gRPC's own thread for
this call) waits for it and sends a ``KVChunk`` naming the range, which decode only marks as written ->
once every (layer, token) cell has been written, ``KVEnd`` follows the last range at once (not when
the engine calls ``finish``, which comes after the batch's forward and a thread hop: ~0.5 ms later on
an H100 host) -> ``finish`` waits for decode's ack.

When the grant accepts a ready event (decode in another process on CUDA, ``DecodeConfig.kv_ready_wait``),
nothing waits on this host: each range's mark goes at once, and ``KVEnd`` leaves as soon as the last write
is queued, carrying the CUDA IPC handle of an event recorded after every write; decode waits for that
event instead (on the H100, the sender's wait and message after the GPU finished took ~1 ms of the
8K hand-off). The graphed prefill queues its whole forward in well under a millisecond, so KVEnd then
reaches decode while the forward still runs.

Against the ``cuda_ipc`` path (``IpcKVSink``) this drops the staging tensor and decode's copy out of
it, and takes the stream's opening off the forward's path: there is no per-request handle to export
or open, and no round trip before the first layer computes.

Decode holds a request's blocks back if it ends while this stream is open (``DecodeEngine.grant_kv``).
``fail`` stops the writes (a later ``put`` raises, the backlog is dropped) and cancels the stream; a
decode-side failure reaches ``put`` and ``finish`` as the reply thread's error. A decode engine in this
process (tests, CPU) is written directly: its pool is registered, not opened.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from colm.decode_worker.block_pool import PagedKV
from colm.errors import TransferError
from colm.kv_ipc import StagingOpener, process_id
from colm.kv_wire import KVLayout
from colm.prefill_worker.kv_push import GrpcKVSink, _peer_error, _Stop, kv_header, kv_pb2
from colm.prefill_worker.sinks import copies_done_event, ready_batches

POOL_OPENER = StagingOpener(max_handles=64)  # one mapping per decode worker's pool, shared by every request
# One thread per open stream (it waits for the grant, then the ack); threads are made as needed and reused.
_STREAMS = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="colm-kv-pool")


class PoolKVSink(GrpcKVSink):
    def __init__(self, stub, request_id: str, cluster_token: str, timeout_s: float = 60.0,
                 opener: StagingOpener = POOL_OPENER) -> None:
        super().__init__(stub, request_id, cluster_token, checksum_kind="none", timeout_s=timeout_s)
        self.path = "cuda_pool"
        self.opener = opener
        self.granted = threading.Event()  # the grant came and the backlog is written (or the stream failed)
        self._done = threading.Event()     # the reply stream ended (ack or error)
        self._error: BaseException | None = None
        self._pages: PagedKV | None = None
        self._blocks: list[int] = []
        self._plans: dict[tuple[int, int], object] = {}
        self._ack = None
        self._call = None
        self._stopped = False
        # orders the call's creation against fail()'s cancel, the grant against put's check, and the cell counts
        # (two writers: the forward's puts and the stream thread's backlog)
        self._lock = threading.Lock()
        self._backlog: list[tuple] = []  # puts before the grant: (ranges, kv, the CUDA stream kv was made on)
        self._cells_unput = 0  # (layer, token) cells not put yet (finish: are any missing?)
        self._cells_left = 0  # cells not written yet; at 0 the stream ends without waiting for finish
        self._ready_end = False  # the grant accepts a ready event: marks and KVEnd go without waiting for writes
        self._write_events: list = []  # ready_end: one CUDA event per write, joined by the ready event
        # ready_end: the interprocess event after every write, its IPC handle sent in KVEnd. Kept until the sink
        # goes (after decode's ack, so after decode opened its own handle); a destroyed CUDA event whose work is
        # still queued completes with that work.
        self._ready_event = None

    def begin(self, layout: KVLayout) -> None:
        self._layout = layout
        self._cells_unput = self._cells_left = layout.num_layers * layout.num_tokens
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
            pages = PagedKV(self.opener.open_pool(grant, self._layout))
            self._blocks = list(grant.block_ids)
            # a decode worker in this process reads the registered pool on no other stream: no event to share
            ready_end = grant.accepts_ready_event and grant.ipc_process != process_id() and pages.kv.is_cuda
            with self._lock:
                self._ready_end = ready_end
                self._pages = pages
                backlog, self._backlog = self._backlog, []
            for ranges, kv, stream in backlog:  # on the stream each was made on: ordered after its producer
                if self._stopped:
                    break
                with torch.cuda.stream(stream):  # None (a CPU tensor): no stream to enter
                    self._write(ranges, kv)
        except BaseException as e:  # noqa: BLE001 - handed to put / finish
            self._set_error(_as_error(self.request_id, e))
            with self._lock:
                self._backlog = []
            self.granted.set()
            self._done.set()
            return
        self.granted.set()
        try:
            reply = next(self._call)
            if reply.WhichOneof("kind") != "ack":
                raise TransferError(f"request {self.request_id}: decode sent a second grant")
            self._ack = reply.ack
        except StopIteration:
            self._set_error(TransferError(f"request {self.request_id}: WriteKV ended without an ack"))
        except BaseException as e:  # noqa: BLE001
            self._set_error(_as_error(self.request_id, e))
        finally:
            self._done.set()

    def _set_error(self, exc: BaseException) -> None:
        if self._error is None:  # the first cause wins: a fail() reason over the cancelled stream's error
            self._error = exc

    def put(self, layer_start, layer_end, token_start, token_end, kv) -> None:
        # kv [layers, tokens, 2, Hkv, hd] of layers/tokens [start, end)
        if self._error is not None:
            raise self._error
        if self._stopped:
            raise TransferError(f"request {self.request_id}: K/V put after the stream was stopped")
        ranges = (layer_start, layer_end, token_start, token_end)
        with self._lock:
            self._cells_unput -= (layer_end - layer_start) * (token_end - token_start)
            if self._pages is None:  # no grant yet: the stream's thread writes it when the grant comes
                self._backlog.append((ranges, kv, torch.cuda.current_stream(kv.device) if kv.is_cuda else None))
                return
        self._write(ranges, kv)

    def _write(self, ranges, kv) -> None:
        """Copy ``kv`` into its granted slots on the current stream and queue its mark (after an event)."""
        l0, l1, t0, t1 = ranges
        plan = self._plans.get((t0, t1))
        if plan is None:
            plan = self._plans[(t0, t1)] = self._pages.copy_plan(self._blocks, t0, t1)
        self._pages.write(plan, l0, l1, kv)
        event = copies_done_event(kv)
        if self._ready_end:  # the mark goes at once; decode waits for the ready event instead
            self._write_events.append(event)
            event = None
        self._q.put((ranges, None, event))
        with self._lock:
            self._cells_left -= (l1 - l0) * (t1 - t0)
            last = self._cells_left <= 0
        if last:
            if self._ready_end:
                self._record_ready(kv.device)
            self._close_queue()  # KVEnd right after the last range's mark

    def _record_ready(self, device) -> None:
        """The ready event: on the current stream, after every write (writes before the grant ran on their own
        put's stream)."""
        stream = torch.cuda.current_stream(device)
        for e in self._write_events:
            stream.wait_event(e)
        ready = torch.cuda.Event(interprocess=True)
        ready.record(stream)
        self._ready_event = ready

    def _end_message(self):
        msg = super()._end_message()
        if self._ready_event is not None:
            msg.end.ready_event_ipc = self._ready_event.ipc_handle()
        return msg

    def _messages(self, header):
        yield kv_pb2.KVMessage(header=header)
        # once a put's writes have finished (or at once, with a ready event); the puts whose writes are done together
        # are marked in one message, the last of them with KVEnd
        for batch, last in ready_batches(self._q, _written, _wait_written):
            yield self._marks_message([(*ranges, 0) for ranges, _, _ in batch], end=last)
            if last:
                return
        yield self._end_message()

    def finish(self, timeout_s: float) -> int:
        if self._cells_unput > 0 or self._layout.num_tokens == 0:
            self._close_queue()  # cells never put (decode will say which), or nothing to put
        if not self._done.wait(timeout_s):
            self._stop()
            raise TimeoutError(f"request {self.request_id}: KV writes not acknowledged in {timeout_s:.1f} s")
        if self._error is not None:
            raise self._error
        return self._checked(self._ack)

    def fail(self, exc: BaseException) -> None:
        """Stops the stream (decode fails the request) and drops the backlog; later ``put`` calls raise ``exc``. Safe
        from any thread (the prefill service calls this when its caller cancels, e.g. after a failed Reserve)."""
        self._set_error(exc)
        with self._lock:
            self._backlog = []
        self._close_queue(_Stop())
        self._stop()

    def _stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._call is not None:
                self._call.cancel()


def _written(item) -> bool:
    """A queued mark ``(ranges, None, event)`` whose writes are done (no event: at once)."""
    return item[2] is None or item[2].query()


def _wait_written(item) -> None:
    if item[2] is not None:
        item[2].synchronize()


def _as_error(request_id: str, e: BaseException) -> BaseException:
    if isinstance(e, grpc.RpcError):
        return _peer_error(request_id, e)
    if isinstance(e, StopIteration):
        return TransferError(f"request {request_id}: WriteKV ended before decode's grant")
    return e
