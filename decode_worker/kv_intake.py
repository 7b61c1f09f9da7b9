"""The decode engine's KV target: what a transport's receiving half calls to fill a reserved request's blocks.

``KVIntake`` is a part of ``DecodeEngine`` (a mixin over its state: the lock, the requests, the pool). The narrow
interface a transport receiver uses:
  * bytes sent by the prefill side (grpc, shm, cuda_ipc): ``begin_kv`` (the stream's layout) -> ``write_kv`` per
    chunk (layers x tokens, each (layer, token) cell exactly once) -> ``finish_kv`` | ``fail_kv``;
  * a sender that writes into the blocks itself (cuda_pool, nixl): ``grant_kv`` with the transport's
    ``colm.kv.lease.WriterLease`` (and ``pool_export``: the pool's CUDA IPC handle) -> ``mark_kv`` per finished range
    -> ``finish_kv`` (optionally with a ready event the loop polls) -> ``end_external_writes`` once the sender's stream
    is over. A request that ends while its lease holds keeps its blocks out of the free list (``_hold``) until the
    lease says the sender can no longer write them (``_release_due``): the rules are the lease's, not the engine's.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import torch

from colm.errors import TransferError
from colm.kernels._tuning import DEVICE_WIDE_LOCK
from colm.kv.lease import WriterLease, ready_state
from colm.kv_wire import KVLayout

from colm.decode_worker.block_pool import CopyPlan
from colm.decode_worker.request import DecodeRequest, KVGrant

log = logging.getLogger("colm.decode")

MAX_COPY_PLANS = 64  # copy plans kept per request (one per token range its chunks use)


class KVIntake:
    def begin_kv(self, request_id: str, layout: KVLayout) -> None:
        with self._lock:
            self._begin(self._get(request_id), layout)

    def _begin(self, req: DecodeRequest, layout: KVLayout) -> None:
        try:
            if req.layout is not None or req.prompt_tokens is not None or (req.kv_done and req.prompt_len > 1):
                raise TransferError(f"request {req.request_id}: a KV stream was already received")
            want = (self.cfg.n_layers, req.prompt_len - 1, self.cfg.n_kv_heads, self.cfg.head_dim)
            got = (layout.num_layers, layout.num_tokens, layout.num_kv_heads, layout.head_dim)
            if got != want:
                raise TransferError(f"request {req.request_id}: KV stream of (layers, tokens, kv_heads, head_dim)={got}, "
                                    f"the reservation needs {want}")
            req.layout = layout
            req.written = np.zeros((layout.num_layers, layout.num_tokens), dtype=bool)
            req.timeline.mark("kv_header")
        except TransferError as e:
            self._fail(req, e)
            raise

    def grant_kv(self, request_id: str, layout: KVLayout, wait_s: float = 0.0,
                 lease: WriterLease | None = None) -> KVGrant:
        """cuda_pool, nixl: ``begin_kv`` for a sender that writes into the request's blocks itself, under ``lease``
        (the transport's; default: the config's grace and ready timeout, no stop_writer): the blocks stay out of the
        free list until ``end_external_writes`` and the lease let them go, even if the request ends first.
        ``wait_s``: how long to wait for a reservation that has not arrived yet (the router sends Reserve and Prefill
        at once on this path)."""
        with self._wake:
            end = time.monotonic() + wait_s
            while request_id not in self._requests and time.monotonic() < end and not self._runner.stopping:
                self._wake.wait(max(0.0, end - time.monotonic()))
            req = self._get(request_id)
            if layout.dtype != self.kv_dtype():
                exc = TransferError(f"request {request_id}: K/V of dtype {layout.dtype}, this pool holds {self.kv_dtype()}")
                self._fail(req, exc)
                raise exc
            self._begin(req, layout)
            req.lease = lease or WriterLease(self.config.external_write_grace_s, self.config.kv_timeout_s)
            return KVGrant(tuple(req.blocks), req)

    def pool_export(self):
        """The pool's ``colm.kv_ipc.StagingExport`` (made once; CUDA IPC handle on CUDA, this process only on CPU)."""
        from colm.kv_ipc import export_pool

        if self._pool_export is not None:  # every grant asks: no lock (nor a wait behind a capture) once made
            return self._pool_export
        with DEVICE_WIDE_LOCK, self._lock:  # sharing an allocation is a driver call: not during a capture
            if self._pool_export is None:
                self._pool_export = export_pool(self.pool.kv)
            return self._pool_export

    def accepts_ready_events(self) -> bool:
        """cuda_pool grants say a sender in another process may end its stream before its writes have run."""
        return self.device.type == "cuda" and self.config.kv_ready_wait != "sender"

    def open_ready_event(self, handle: bytes):
        """The sender's ready event (``KVEnd.ready_event_ipc``) as a CUDA event of this process."""
        if not self.accepts_ready_events():
            raise TransferError("a KV ready event was sent, but this decode worker did not accept one "
                                f"(device {self.device.type}, kv_ready_wait={self.config.kv_ready_wait!r})")
        with DEVICE_WIDE_LOCK:  # a driver call: not during a graph capture of the step loop
            try:
                return torch.cuda.Event.from_ipc_handle(self.device, handle)
            except RuntimeError as e:
                raise TransferError(f"the KV ready event could not be opened ({e})") from None

    def end_external_writes(self, grant: KVGrant, clean: bool) -> None:
        """The grant's stream ended: ``clean`` (the sender sent KVEnd after its writes had been queued, and either
        had finished or gave their ready event to ``finish_kv``) or not (broken, failed: writes may still be queued
        on the sender's device). Held blocks go back now, once the ready event is done, or after the grace."""
        with self._lock:
            req = grant.request
            # False: ended already (WriteKV's finally and its RPC-end callback both call this)
            if req.lease is not None and req.lease.stream_ended(clean) and req in self._held:
                self._release_due()  # DecodeRequest compares by identity

    def _hold(self, req: DecodeRequest) -> None:
        """Keep an ended request's blocks out of the free list while its lease holds them; the lease's stop_writer
        (if any) is called on a thread of its own (not under this lock: it may call back in)."""
        stop = req.lease.request_ended()
        self._held.append(req)
        if stop is not None:
            threading.Thread(target=stop, name="colm-kv-stop-writer", daemon=True).start()

    def _release_due(self) -> None:
        """Free the held blocks whose lease lets them go."""
        now = time.monotonic()
        for req in [h for h in self._held if h.lease.releasable(now)]:
            self._held.remove(req)
            self.pool.free(req.blocks)
            req.blocks = []

    def write_kv(self, request_id: str, layer_start: int, layer_end: int, token_start: int, token_end: int,
                 kv: torch.Tensor, seq: int | None = None, sync: bool = False) -> None:
        """kv [layers, tokens, 2, kv_heads, head_dim] for layers/tokens [start, end). ``sync``: wait for the
        device copies before returning (and before the lock is released): the cuda_ipc path reads another
        process's memory, which its owner frees after the ack, and blocks must not be freed under a copy.
        The device work holds ``DEVICE_WIDE_LOCK`` (taken before the engine's lock, always in that order):
        it must not meet a CUDA graph capture or a kernel tuning of the step loop."""
        with DEVICE_WIDE_LOCK, self._lock:
            req = self._get(request_id)
            try:
                cells = self._check_chunk(req, layer_start, layer_end, token_start, token_end, seq, tuple(kv.shape))
                if req.lease is not None and req.lease.open:
                    raise TransferError(f"request {request_id}: K/V bytes sent on a cuda_pool stream")
                kv = kv.to(self.device, self.dtype, non_blocking=True)
                self.pool.write(self._copy_plan(req, token_start, token_end), layer_start, layer_end, kv)
                if sync and self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
                self._accept_chunk(req, cells)
            except TransferError as e:
                self._fail(req, e)
                raise

    def mark_kv(self, request_id: str, layer_start: int, layer_end: int, token_start: int, token_end: int,
                seq: int | None = None) -> None:
        """cuda_pool: the granted sender has written these cells into the request's blocks, and its writes have
        finished. The same checks as ``write_kv``; nothing is copied."""
        with self._lock:
            req = self._get(request_id)
            try:
                if req.lease is None or not req.lease.open:
                    raise TransferError(f"request {request_id}: K/V marked as written without a cuda_pool grant")
                cells = self._check_chunk(req, layer_start, layer_end, token_start, token_end, seq)
                self._accept_chunk(req, cells)
            except TransferError as e:
                self._fail(req, e)
                raise

    def _check_chunk(self, req: DecodeRequest, layer_start: int, layer_end: int, token_start: int, token_end: int,
                     seq: int | None, shape: tuple | None = None) -> np.ndarray:
        """The chunk's cells of ``req.written`` (a view), once its order, ranges and shape are checked."""
        rid, lay = req.request_id, req.layout
        if lay is None:
            raise TransferError(f"request {rid}: KV chunk before the stream header")
        if seq is not None and seq != req.next_chunk_seq:
            raise TransferError(f"request {rid}: chunk seq {seq}, expected {req.next_chunk_seq}")
        if not (0 <= layer_start < layer_end <= lay.num_layers and 0 <= token_start < token_end <= lay.num_tokens):
            raise TransferError(f"request {rid}: chunk layers [{layer_start},{layer_end}) tokens "
                                f"[{token_start},{token_end}) outside {lay.num_layers} layers x {lay.num_tokens} tokens")
        want = (layer_end - layer_start, token_end - token_start, 2, lay.num_kv_heads, lay.head_dim)
        if shape is not None and shape != want:
            raise TransferError(f"request {rid}: chunk shape {list(shape)}, its ranges need {list(want)}")
        cells = req.written[layer_start:layer_end, token_start:token_end]
        if cells.any():
            raise TransferError(f"request {rid}: chunk overlaps K/V already received")
        return cells

    @staticmethod
    def _accept_chunk(req: DecodeRequest, cells: np.ndarray) -> None:
        cells[:] = True
        req.next_chunk_seq += 1
        req.timeline.mark("kv_first_chunk")
        req.timeline.mark("kv_last_chunk", again=True)

    def _copy_plan(self, req: DecodeRequest, token_start: int, token_end: int) -> CopyPlan:
        """Where tokens [token_start, token_end) of ``req`` land: made by the first chunk of that range and kept on the
        request (freed with it), so the chunks of the range's other layers skip the per-block walk and the slot
        upload. A request's blocks never change while it holds them, so a kept plan cannot go stale."""
        key = (token_start, token_end)
        plan = req.copy_plans.get(key)
        if plan is None:
            if len(req.copy_plans) >= MAX_COPY_PLANS:  # senders reuse a few ranges; bound odd ones
                req.copy_plans.clear()
            plan = req.copy_plans[key] = self.pool.copy_plan(req.blocks, token_start, token_end)
        return plan

    def finish_kv(self, request_id: str, num_tokens: int | None = None, ready=None) -> None:
        """The KV stream ended. ``ready``: the sender's writes are queued, not necessarily run; this event
        (``open_ready_event``) completes after them, and the request is admitted only then."""
        with self._wake:
            req = self._get(request_id)
            if req.prompt_len == 1 and req.layout is None:
                req.kv_done = True
                return
            try:
                if req.layout is None:
                    raise TransferError(f"request {request_id}: KV stream ended before its header")
                if num_tokens is not None and num_tokens != req.layout.num_tokens:
                    raise TransferError(f"request {request_id}: stream says {num_tokens} tokens, header {req.layout.num_tokens}")
                missing = int((~req.written).sum())
                if missing:
                    raise TransferError(f"request {request_id}: KV stream ended with {missing} (layer, token) cells missing")
            except TransferError as e:
                self._fail(req, e)
                raise
            req.kv_ready = ready
            if ready is not None:  # blocks of a request ending before the event completes wait for it
                if req.lease is None:  # a sender's writes queued without a grant's stream: a lease that only waits
                    req.lease = WriterLease(self.config.external_write_grace_s, self.config.kv_timeout_s, open=False)
                req.lease.ready = ready
            req.kv_done = True
            req.timeline.mark("kv_done")
            self._wake.notify_all()

    def fail_kv(self, request_id: str, exc: BaseException) -> None:
        """The KV stream broke (truncated, dead peer): the request fails and its blocks are freed."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is not None and not req.kv_done:
                self._fail(req, exc)

    def _writes_ran(self, req: DecodeRequest) -> bool:
        """A request whose sender's writes were queued when its KV stream ended: have they run (its ready event
        is done)? Polled by the loop, never waited for on the GPU (a killed sender would leave that wait pending)."""
        state = ready_state(req.kv_ready)
        if state == "failed":
            self._finalize(req, TransferError(f"request {req.request_id}: the KV sender's ready event failed "
                                              "(its process or device is gone)"))
            return False
        if state == "done":
            req.kv_ready = None
            req.timeline.mark("kv_ready")
            return True
        self._ready_polling = True
        return False

