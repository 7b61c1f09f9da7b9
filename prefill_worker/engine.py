"""``PrefillEngine``: chain-1-only prefill of CoLM-Air prompts (plain class: no gRPC, no Ray).

It holds only the scale-1 sub-model (``checkpoint.load(dir, scale=1)``): with KV sharing every
layer's K/V come from chain 1, so the chain-1 forward yields exactly the full model's K/V.

Path of a request: ``submit(request_id, token_ids, sink)`` queues it -> the loop thread takes a batch
(FIFO, up to ``max_batch_tokens`` padded tokens; a prompt longer than ``chunk_size`` runs alone) ->
``_forward`` runs the batch chunk by chunk (activations of one chunk at a time, K/V of earlier chunks
kept for attention; ``forward.prefill_chunk``); after each layer's K/V projection it hands each
request's slice to its sink (``put``), so the transfer overlaps the remaining layers. On CUDA a batch
of at most ``PrefillConfig.cuda_graph_tokens`` in one chunk replays a CUDA graph instead
(``graphs.PrefillGraphs``: short prefills are host-bound) and hands each request all its layers in one put ->
``sink.finish`` waits for delivery on a completion thread while the next batch computes -> the
request's future resolves to a ``PrefillResult``. K/V of all prompt tokens but the last are produced: decode runs the last token.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from colm import checkpoint
from colm.config import ModelConfig, servable
from colm.errors import CapacityError, DeadlineError
from colm.host_identity import host_id as current_host_id
from colm.kv_wire import KVLayout, dtype_name
from colm.model import CoLM
from colm.timeline import Timeline

from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.forward import prefill_chunk
from colm.prefill_worker.graphs import PrefillGraphs
from colm.loop_thread import LoopOwner, LoopThread

log = logging.getLogger("colm.prefill")


@dataclass(frozen=True)
class PrefillResult:
    request_id: str
    num_tokens: int    # tokens of K/V produced (prompt length - 1)
    num_bytes: int
    queue_ms: float
    compute_ms: float  # the batch's forward (shared by its requests)
    total_ms: float    # submit -> delivered
    path: str
    timeline_ms: dict[str, float] = field(default_factory=dict)  # milestone -> ms after submit (``_Job.timeline``)
    monotonic_s: float = 0.0  # submit, on the monotonic clock


@dataclass(eq=False)
class _Job:
    request_id: str
    tokens: np.ndarray  # [n] int64: prompt[:-1]
    sink: object
    deadline: float
    future: Future = field(default_factory=Future)
    failed: BaseException | None = None
    # received (the service's call, if given), submitted, batch_start, kv_begin, first_put, last_put, computed,
    # delivered
    timeline: Timeline = field(default_factory=Timeline)


@dataclass
class PrefillStats:
    host_id: str
    num_queued: int
    num_queued_tokens: int
    num_done: int
    num_failed: int
    tokens_per_s: float
    num_params: int
    stall_s: float = 0.0     # the loop has made no progress for this long while holding prompts
    stall_requests: int = 0  # ... that many, queued or in its batch (both 0 while it waits for work)


def check_air(cfg: ModelConfig) -> None:
    """The chain-1 prefill yields the full model's K/V: CoLM-Air, or one chain (``colm.config.servable``)."""
    reason = servable(cfg)
    if reason is not None:
        raise ValueError(f"PrefillEngine: {reason}")


class PrefillEngine(LoopOwner):
    loop_owner = "prefill engine"  # EngineDeadError's messages name it

    def __init__(self, model: CoLM, full_cfg: ModelConfig, config: PrefillConfig | None = None,
                 host_id: str | None = None) -> None:
        check_air(full_cfg)
        if model.cfg.num_chains != 1:
            raise ValueError(f"PrefillEngine holds the chain-1 sub-model; got a model of {model.cfg.num_chains} chains "
                             "(load it with checkpoint.load(dir, scale=1))")
        self.model = model.eval()
        self.full_cfg = full_cfg
        self.config = config or PrefillConfig()
        self.host_id = host_id or current_host_id()
        self.device = model.inv_freq.device
        if self.device.type == "cuda":
            model.fuse_projections()  # fewer launches per layer (CPU keeps the separate ones: bit-stable tests)
        self.dtype = next(model.parameters()).dtype
        self.graphs = (PrefillGraphs(model, self.config.cuda_graph_tokens)
                       if self.device.type == "cuda" and self.config.cuda_graph_tokens > 0 else None)
        self._queue: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._runner = LoopThread(self._loop, "colm-prefill-loop", self._cv, join_timeout_s=30)
        self._runner.on_error.append(self._loop_died)
        self._finisher = ThreadPoolExecutor(max_workers=8, thread_name_prefix="colm-prefill-finish")
        self._finishing: dict[Future, _Job] = {}  # deliveries handed to the finisher and not ended yet
        self._num_done = self._num_failed = 0
        self._num_computing = 0  # prompts of the batch the loop runs now (out of the queue)
        self._recent: collections.deque = collections.deque(maxlen=32)  # (tokens, seconds)

    @classmethod
    def from_checkpoint(cls, path, config: PrefillConfig | None = None, device="cpu", dtype=None,
                        host_id: str | None = None) -> "PrefillEngine":
        full = checkpoint.load_config(path)
        check_air(full)  # before reading any weight
        return cls(checkpoint.load(path, scale=1, device=device, dtype=dtype), full, config, host_id)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    # ---------------------------------------------------------------- queue
    def start(self) -> "PrefillEngine":
        if self.graphs is not None and self.config.warmup_graphs:
            c = self.config
            n = self.graphs.warm_up(c.length_bucket, c.chunk_size, c.max_batch_size)  # chunk_size <= max_batch_tokens
            log.info("prefill: %d CUDA graphs captured at start", n)
        self._runner.start()
        return self

    def stop(self) -> None:
        """End the loop and the delivery threads: queued prompts fail, a delivery under way finishes on its thread
        (within its request's deadline) and one not started yet fails; nothing waits here for a delivery."""
        self._runner.stop()
        stopped = RuntimeError("prefill engine stopped")
        with self._cv:
            while self._queue:
                self._fail(self._queue.popleft(), stopped)
        handed = list(self._finishing.items())  # a cancelled delivery leaves the map as it is cancelled
        self._finisher.shutdown(wait=False, cancel_futures=True)
        for fin, job in handed:
            if fin.cancelled():
                self._fail(job, stopped)

    def alive(self) -> bool:
        """The loop thread runs (started, not stopped, and not ended with an error)."""
        return self._runner.started and self._runner.error is None

    def _loop_died(self, exc: BaseException) -> None:
        """Every queued prompt fails now with EngineDeadError (the router retries it elsewhere)."""
        err = self._runner.dead(self.loop_owner)
        with self._cv:
            while self._queue:
                self._fail(self._queue.popleft(), err)

    def submit(self, request_id: str, token_ids, sink, timeout_s: float | None = None,
               received_s: float | None = None) -> Future:
        """Queue a prompt; ``received_s``: when its call reached this worker (time.monotonic(); the timeline's
        ``received`` milestone, before ``submitted``)."""
        self.check_alive()
        if not request_id:
            raise ValueError("request_id is empty")
        # numpy, not a list of ints: an 8K-token prompt cost ~2 ms of host time per request as Python ints
        # (conversion, min/max, torch.tensor of the list) ahead of its forward
        try:
            ids = np.asarray(token_ids, dtype=np.int64)  # [n]; a list or a protobuf repeated field
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"request {request_id}: token_ids must be integers ({e})") from None
        if ids.ndim != 1:
            raise ValueError(f"request {request_id}: token_ids must be a flat sequence, got shape {list(ids.shape)}")
        if not len(ids):
            raise ValueError(f"request {request_id}: token_ids is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= self.full_cfg.vocab_size:
            raise ValueError(f"request {request_id}: token ids must be in 0..{self.full_cfg.vocab_size - 1}")
        if len(ids) > self.full_cfg.max_seq_len:
            raise ValueError(f"request {request_id}: {len(ids)} tokens exceed max_seq_len={self.full_cfg.max_seq_len}")
        now = time.monotonic()
        job = _Job(request_id, ids[:-1], sink, now + (timeout_s or self.config.default_timeout_s))
        if received_s is not None:
            job.timeline.mark("received", now=received_s)
        job.timeline.mark("submitted", now=now)
        with self._cv:
            self.check_alive()  # under the lock the dead loop's drain takes: nothing is queued after it
            if len(self._queue) >= self.config.max_queue:
                raise CapacityError(f"prefill queue full ({len(self._queue)} prompts)")
            self._queue.append(job)
            self._cv.notify()
        return job.future

    def cancel(self, future: Future, exc: BaseException) -> bool:
        """Drop a prompt still queued whose caller is gone (``future``: what ``submit`` returned): it fails with
        ``exc`` and its sink is failed, without computing it. False where it is no longer queued (in a batch already,
        or done): that one runs on, and its sink ends however its transfer does."""
        if future.done():  # the usual case: the call's callback after its prompt ran
            return False
        with self._cv:
            job = next((j for j in self._queue if j.future is future), None)
            if job is None:
                return False
            self._queue.remove(job)
        self._fail(job, exc)
        return True

    def prefill(self, request_id: str, token_ids, sink, timeout_s: float | None = None) -> PrefillResult:
        """Submit and wait; runs the batch inline when the loop thread is not started."""
        fut = self.submit(request_id, token_ids, sink, timeout_s)
        if not self._runner.started:
            while not fut.done() and self.run_once():
                pass
        return fut.result(timeout=timeout_s or self.config.default_timeout_s)

    def _take_batch(self) -> list[_Job]:
        now = time.monotonic()
        while self._queue and self._queue[0].deadline < now:
            self._fail(self._queue.popleft(), DeadlineError("prefill deadline passed while queued"))
        if not self._queue:
            return []
        first = self._queue.popleft()
        batch = [first]
        if len(first.tokens) > self.config.chunk_size:
            return batch
        longest = max(len(first.tokens), 1)
        while self._queue and len(batch) < self.config.max_batch_size:
            n = len(self._queue[0].tokens)
            if n > self.config.chunk_size or (len(batch) + 1) * max(longest, n) > self.config.max_batch_tokens:
                break
            batch.append(self._queue.popleft())
            longest = max(longest, n)
        return batch

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._runner.stopping:
                    self._runner.idle_wait()
                if self._runner.stopping:
                    return
            self.run_once()
            self._runner.beat()  # a batch ran: progress (stats' stall_s counts from here)

    def run_once(self) -> bool:
        """Take one batch from the queue and run it; False when the queue was empty."""
        with self._cv:
            batch = self._take_batch()
            self._num_computing = len(batch)
        if not batch:
            return False
        try:
            self._run(batch)
        finally:
            self._num_computing = 0
        return True

    # ---------------------------------------------------------------- compute
    def _fail(self, job: _Job, exc: BaseException) -> None:
        if job.future.done():
            return
        job.failed = job.failed or exc
        try:
            job.sink.fail(exc)
        finally:
            self._num_failed += 1
            job.future.set_exception(exc)

    def _run(self, batch: list[_Job]) -> None:
        t0 = time.monotonic()
        cfg = self.model.cfg
        for job in batch:
            job.timeline.mark("batch_start", now=t0)
            try:
                job.sink.begin(KVLayout(cfg.n_layers, len(job.tokens), cfg.n_kv_heads, cfg.head_dim, dtype_name(self.dtype)))
            except Exception as e:  # noqa: BLE001 - one bad peer must not sink the batch
                self._fail(job, e)
            job.timeline.mark("kv_begin")
        live = [j for j in batch if not j.future.done() and len(j.tokens)]
        try:
            if live:
                self._forward(live)
                if self.device.type == "cuda":
                    # wait for this thread's stream only: a device-wide sync fails (and breaks the capture)
                    # while a decode engine in the same process captures a CUDA graph
                    done = torch.cuda.Event()
                    done.record()
                    done.synchronize()
        except Exception as e:  # noqa: BLE001
            for job in live:
                self._fail(job, e)
            return
        done = time.monotonic()
        compute_ms = (done - t0) * 1000.0
        for job in batch:
            job.timeline.mark("computed", now=done)
        self._recent.append((sum(len(j.tokens) + 1 for j in batch), compute_ms / 1000.0))
        for job in batch:
            if not job.future.done():
                self._finish(job, compute_ms)

    def _finish(self, job: _Job, compute_ms: float) -> None:
        """Hand a computed prompt's delivery to a finisher thread (the loop goes on to the next batch)."""
        try:
            fin = self._finisher.submit(self._complete, job, compute_ms)
        except RuntimeError:  # the engine stopped while this batch ran
            self._fail(job, RuntimeError("prefill engine stopped"))
            return
        self._finishing[fin] = job
        fin.add_done_callback(lambda f: self._finishing.pop(f, None))

    def _complete(self, job: _Job, compute_ms: float) -> None:
        try:
            num_bytes = job.sink.finish(max(0.1, job.deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001
            self._fail(job, e)
            return
        self._num_done += 1
        t = job.timeline
        t.mark("delivered")
        timeline, submitted = t.relative_ms("submitted")
        job.future.set_result(PrefillResult(job.request_id, len(job.tokens), num_bytes, t.span_ms("submitted", "batch_start"),
                                            compute_ms, t.span_ms("submitted", "delivered"), job.sink.path, timeline,
                                            submitted))

    def _emit(self, jobs: list[_Job], layer: int, c0: int, c1: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [b, Hkv, t, hd] of positions c0..c1-1 -> each request's real tokens as [1, t_r, 2, Hkv, hd]
        live = [(row, job, min(c1, len(job.tokens))) for row, job in enumerate(jobs)
                if min(c1, len(job.tokens)) > c0 and not job.future.done()]
        if not live:
            return
        # One fresh tensor for the batch, in the sinks' layout: one stack (two copies at most) per layer, however
        # many requests (this runs on the prefill's launch path). Each sink gets a contiguous row view, which the
        # engine never writes again.
        kv = torch.stack((k.transpose(1, 2), v.transpose(1, 2)), dim=2)  # [b, t, 2, Hkv, hd]
        for row, job, end in live:
            self._put(job, layer, layer + 1, c0, end, kv[row : row + 1, : end - c0])

    def _emit_all(self, jobs: list[_Job], kv: torch.Tensor) -> None:
        # kv [rows, L, T, 2, Hkv, hd] (a view of a graph's static buffer) -> each request's real tokens, every layer in
        # one put: one copy per request (the next replay overwrites the buffer) and one mark on the wire, not L. A sink
        # whose put copies on the stream itself (``copies_at_put``) gets the view: that copy is the only one
        n_layers = kv.shape[1]
        for row, job in enumerate(jobs):
            end = len(job.tokens)
            if not end or job.future.done():
                continue
            view = kv[row, :, :end]  # [L, t, 2, Hkv, hd]
            if getattr(job.sink, "copies_at_put", False):  # its put queues its own copy before the next replay
                self._put(job, 0, n_layers, 0, end, view)
                continue
            # clone, not contiguous(): a view that happens to be contiguous (1 layer, 1 K/V head, 1 token) would
            # hand the sink the buffer itself
            self._put(job, 0, n_layers, 0, end, view.clone(memory_format=torch.contiguous_format))

    def _put(self, job: _Job, l0: int, l1: int, t0: int, t1: int, kv: torch.Tensor) -> None:
        try:
            job.sink.put(l0, l1, t0, t1, kv)
            job.timeline.mark("first_put")
            job.timeline.mark("last_put", again=True)
        except Exception as e:  # noqa: BLE001 - the peer of this request failed; the rest go on
            self._fail(job, e)

    @torch.no_grad()
    def _forward(self, jobs: list[_Job]) -> None:
        cfg = self.model.cfg
        T = padded_length(max(len(j.tokens) for j in jobs), self.config.length_bucket, self.device)
        rows = np.zeros((len(jobs), T), dtype=np.int64)
        for row, job in enumerate(jobs):  # right padding: causal attention keeps real tokens exact
            rows[row, : len(job.tokens)] = job.tokens
        tokens = torch.from_numpy(rows)  # [b, T]
        if self.graphs is not None and T <= self.config.chunk_size and self.graphs.fits(len(jobs), T):
            kv = self.graphs.run(tokens)
            if kv is not None:  # every layer's K/V at once (the graph's buffer: _emit_all copies before the next run)
                self._emit_all(jobs, kv)
                return
        tokens = tokens.to(self.device)
        if T <= self.config.chunk_size:
            # One chunk: attention reads this layer's own K/V, so no full-length buffers (two copies per layer
            # fewer; at 32K tokens of {8,8,8,8} those were ~128 MB of writes per layer)
            def store_one(li, k, v):
                self._emit(jobs, li, 0, T, k, v)
                return k, v

            prefill_chunk(self.model, tokens, 0, store_one)
            return
        shape = (len(jobs), cfg.n_kv_heads, T, cfg.head_dim)
        keys = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layers)]
        values = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in range(cfg.n_layers)]
        for c0 in range(0, T, self.config.chunk_size):
            c1 = min(T, c0 + self.config.chunk_size)

            def store(li, k, v, c0=c0, c1=c1):  # keep for later chunks' attention, stream to the sinks now
                keys[li][:, :, c0:c1] = k
                values[li][:, :, c0:c1] = v
                self._emit(jobs, li, c0, c1, k, v)
                return keys[li][:, :, :c1], values[li][:, :, :c1]

            prefill_chunk(self.model, tokens[:, c0:c1], c0, store)
            self._runner.beat()  # a chunk of a long prompt is progress

    def stats(self) -> PrefillStats:
        with self._cv:
            queued = list(self._queue)
            stall_s, stall_requests = self.stall(len(queued) + self._num_computing)
        toks = sum(n for n, _ in self._recent)
        secs = sum(s for _, s in self._recent)
        return PrefillStats(self.host_id, len(queued), sum(len(j.tokens) + 1 for j in queued), self._num_done,
                            self._num_failed, toks / secs if secs > 0 else 0.0, self.num_params, stall_s, stall_requests)


def padded_length(n: int, bucket: int, device: torch.device) -> int:
    """``n`` rounded up to a multiple of ``bucket`` on CUDA (bounded attention shapes), ``n`` elsewhere."""
    if device.type != "cuda":
        return n
    return -(-n // bucket) * bucket
