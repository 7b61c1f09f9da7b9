"""The colocated baseline's prefill: the FULL model over the prompt, feeding the same decode engine.

A server without CoLM's tricks prefills every prompt with the whole model on the GPU that also
decodes, and never chooses a scale. ``FullPrefillEngine`` stands in for ``PrefillEngine`` with the
same ``submit / start / stop / stats`` surface: one background thread takes prompts in order, runs
``model.hidden`` at full scale with a contiguous cache (the K/V are captured there), and writes
them into the decode engine through the same ``KVSink`` interface. Used only by the load-test
baseline (``bench/serve_goodput.py``).
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from colm.kv_cache import ContiguousKVCache
from colm.kv_wire import KVLayout, dtype_name
from colm.loop_thread import LoopThread
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.engine import padded_length


@dataclass
class FullPrefillStats:
    num_queued: int
    num_queued_tokens: int
    tokens_per_s: float


class FullPrefillEngine:
    def __init__(self, model) -> None:
        self.model = model.eval()  # the decode engine's own full model: weights shared, nothing copied
        self.cfg = model.cfg
        self._queue: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._runner = LoopThread(self._loop, "colm-full-prefill", self._cv, join_timeout_s=30)
        self._recent: collections.deque = collections.deque(maxlen=32)  # (tokens, seconds)

    def start(self) -> "FullPrefillEngine":
        self._runner.start()
        return self

    def stop(self) -> None:
        self._runner.stop()

    def alive(self) -> bool:
        """The loop thread runs (started and not stopped)."""
        return self._runner.started

    def submit(self, request_id: str, token_ids, sink, timeout_s: float | None = None) -> Future:
        fut: Future = Future()
        with self._cv:
            self._queue.append((request_id, [int(t) for t in token_ids][:-1], sink, fut))
            self._cv.notify()
        return fut

    def stats(self) -> FullPrefillStats:
        with self._cv:
            queued = sum(len(j[1]) for j in self._queue)
            n = len(self._queue)
        tok = sum(t for t, _ in self._recent)
        sec = sum(s for _, s in self._recent)
        return FullPrefillStats(n, queued, tok / sec if sec > 0 else 0.0)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._runner.stopping:
                    self._cv.wait(0.1)
                if self._runner.stopping:
                    return
                job = self._queue.popleft()
            self._run(*job)

    @torch.no_grad()
    def _run(self, request_id, ids, sink, fut: Future) -> None:
        try:
            t0 = time.perf_counter()
            cfg, device = self.cfg, self.model.inv_freq.device
            dtype = next(self.model.parameters()).dtype
            # right-padded to the prefill worker's length bucket on CUDA, as PrefillEngine pads (same shapes)
            n = padded_length(max(1, len(ids)), PrefillConfig.length_bucket, device)
            cache = ContiguousKVCache(cfg, 1, n, device=device, dtype=dtype)
            padded = list(ids) + [0] * (n - len(ids))
            self.model.hidden(torch.tensor([padded], device=device), scale=cfg.num_chains, cache=cache)  # full width
            sink.begin(KVLayout(cfg.n_layers, len(ids), cfg.n_kv_heads, cfg.head_dim, dtype_name(dtype)))
            # [layers, tokens, 2, kv_heads, head_dim]
            kv = torch.stack([torch.stack(cache.layer_kv(layer), dim=0)[:, 0, :, : len(ids)].permute(2, 0, 1, 3)
                              for layer in range(cfg.n_layers)])
            sink.put(0, cfg.n_layers, 0, len(ids), kv)
            sink.finish(30.0)
            if device.type == "cuda":  # this stream only: the decode engine may be capturing a CUDA graph
                done = torch.cuda.Event()
                done.record()
                done.synchronize()
            self._recent.append((len(ids), time.perf_counter() - t0))
            fut.set_result(len(ids))
        except BaseException as e:  # the request fails, the loop goes on
            sink.fail(e)
            fut.set_exception(e)
