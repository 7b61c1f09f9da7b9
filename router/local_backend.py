"""An in-process backend: one full model, one thread per request, no disaggregation.

It serves two purposes: the router's unit tests (a real model, real step times, no workers), and
the "colocated" baseline of the load test when no engines are available. Each request runs the
reference decoding loop (contiguous KV cache, prompt prefilled at the first token's scale) in a
worker thread; its scale is read before every step so ``set_scale`` acts mid-generation, exactly
like ``colm.generate`` with a scale schedule. Step times per scale are measured and reported.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import defaultdict, deque
from typing import AsyncIterator

import torch

from colm.kv_cache import ContiguousKVCache
from colm.logits_adjust import make_adjuster
from colm.router.backend import EngineRequest, EngineToken, WorkerInfo
from colm.router.policy import WorkerReport
from colm.sampling import sample_next, top_logprobs
from colm.stopping import StopChecker
from colm.scoring import prompt_logprobs

PREFILL_ID, DECODE_ID = "local-prefill-0", "local-decode-0"


class LocalBackend:
    def __init__(self, model, max_concurrency: int = 4, fixed_scale: int | None = None,
                 step_delay_s: dict[int, float] | None = None, tokenizer=None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer  # structured output compiles its grammar for it (None: refused)
        self.cfg = model.cfg
        self.fixed_scale = fixed_scale  # baseline: ignore the router's choice
        # Extra time per step by scale: simulates a slower device so tests see distinct latencies per scale.
        self.step_delay_s = dict(step_delay_s or {})
        self._sem = threading.Semaphore(max_concurrency)
        self._scales: dict[str, int] = {}
        self._aborted: set[str] = set()
        self._step_ms: dict[int, deque] = defaultdict(lambda: deque(maxlen=32))  # recent step times per scale
        self._running = 0
        self._prefill_tokens = 0
        self._prefill_s = 0.0
        self._lock = threading.Lock()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo(PREFILL_ID, "prefill"), WorkerInfo(DECODE_ID, "decode")]

    async def poll(self, worker_id: str) -> WorkerReport:
        with self._lock:
            if worker_id == PREFILL_ID:
                tps = self._prefill_tokens / self._prefill_s if self._prefill_s > 0 else None
                return WorkerReport(worker_id, "prefill", prefill_tokens_per_s=tps)
            # The median, like the decode engine reports: one slow first step must not skew the estimate.
            step_ms = {k: statistics.median(v) for k, v in self._step_ms.items() if v}
            return WorkerReport(worker_id, "decode", num_running=self._running, step_ms=step_ms,
                                free_blocks=10**6, total_blocks=10**6)

    def _run(self, req: EngineRequest, emit) -> None:
        device = self.model.inv_freq.device
        dtype = next(self.model.parameters()).dtype
        params = req.params
        gen = params.make_generator()
        adjust = make_adjuster(params, self.cfg.vocab_size, req.prompt_ids, req.eos_id, req.prior_output,
                               tokenizer=self.tokenizer)
        out: list[int] = []
        stopper = StopChecker(params, req.eos_id)  # stop strings are the router's (it sends none)
        cache = ContiguousKVCache(self.cfg, 1, len(req.prompt_ids) + params.max_new_tokens, device=device, dtype=dtype)
        x = torch.tensor([list(req.prompt_ids)], device=device)
        with self._sem, torch.no_grad():
            with self._lock:
                self._running += 1
            try:
                for i in range(params.max_new_tokens):
                    if req.request_id in self._aborted:
                        return
                    scale = self.fixed_scale or self._scales.get(req.request_id, req.scale)
                    t0 = time.perf_counter()
                    logits = self.model(x, scale=scale, cache=cache)[0, -1].float().cpu()  # [V]
                    if self.step_delay_s.get(scale):
                        time.sleep(self.step_delay_s[scale])
                    dt = time.perf_counter() - t0
                    with self._lock:
                        if i == 0:
                            self._prefill_tokens += x.shape[1]
                            self._prefill_s += dt
                        else:
                            self._step_ms[scale].append(dt * 1e3)
                    tok = sample_next(adjust(logits, out) if adjust is not None else logits, params, gen)
                    out.append(tok)
                    emit(EngineToken(tok, scale, float(torch.log_softmax(logits, -1)[tok]), False,
                                     top_logprobs(logits, params.top_logprobs)))
                    if stopper.add(tok):
                        return
                    x = torch.tensor([[tok]], device=device)
            finally:
                with self._lock:
                    self._running -= 1

    async def generate(self, req: EngineRequest, prefill_id: str, decode_id: str) -> AsyncIterator[EngineToken]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        done = object()
        self._scales[req.request_id] = req.scale

        def work():
            try:
                self._run(req, lambda t: loop.call_soon_threadsafe(q.put_nowait, t))
                loop.call_soon_threadsafe(q.put_nowait, done)
            except BaseException as e:  # surfaced to the router as this request's error
                loop.call_soon_threadsafe(q.put_nowait, e)

        fut = loop.run_in_executor(None, work)
        try:
            while True:
                item = await q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._aborted.add(req.request_id)
            await asyncio.shield(fut)
            self._aborted.discard(req.request_id)
            self._scales.pop(req.request_id, None)

    async def set_scale(self, decode_id: str, request_id: str, scale: int) -> None:
        if request_id in self._scales:
            self._scales[request_id] = scale

    async def reset_prefix_cache(self, decode_id: str) -> int:
        return 0  # the local model keeps no K/V between requests

    async def abort(self, decode_id: str, request_id: str) -> None:
        self._aborted.add(request_id)

    async def prompt_logprobs(self, decode_id: str, prompt_ids: list[int], scale: int):
        return await asyncio.get_running_loop().run_in_executor(None, prompt_logprobs, self.model, prompt_ids, scale)
