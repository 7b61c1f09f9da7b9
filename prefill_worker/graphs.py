"""CUDA graphs of short prefills: one captured ``prefill_chunk`` per (rows, padded length).

Why: a short prefill is bound by the host, not the GPU. On an H100 (bench/results/
prefill_profile_h100_2026-11-23.json) the chain-1 forward of a 2K-token prompt issued ~220 kernels in
14-18 ms of Python while its kernels ran for 1.4-2.8 ms; TTFT at serving lengths is mostly that host
time. A replayed graph issues them all in one launch.

What is captured: a batch that fits in one chunk (no earlier chunks' K/V to attend to) of ``rows``
right-padded prompts of ``length`` tokens, rows rounded up to a power of two (padding rows read token 0
and their outputs are never read) and ``rows * length <= max_tokens``. Prompt lengths already come in
``PrefillConfig.length_bucket`` steps, so few graphs serve all short prompts. The graph's outputs are
every layer's K/V ([rows, Hkv, length, hd] each); they live in a memory pool shared by all these
graphs and are overwritten by the next replay, so the engine copies what it hands to sinks
(``PrefillEngine._emit`` stacks each layer into a fresh tensor) before it replays again. Streaming K/V
layer by layer while later layers compute is given up for these short prompts: their whole forward
is a few milliseconds.

Capture: warm-up runs on a side stream first (compiles and tunes the kernels for these shapes, which
must not happen inside a capture), then the capture, holding ``DEVICE_WIDE_LOCK`` and in thread-local
mode, as the decode engine's graphs do (a decode engine in the same process may capture meanwhile). A
failed capture turns graphs off for good; the engine runs eager.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from colm.kernels._tuning import DEVICE_WIDE_LOCK, capture_without_gc
from colm.model import CoLM

from colm.prefill_worker.forward import prefill_chunk

log = logging.getLogger("colm.prefill.graphs")


def graph_rows(rows: int) -> int:
    """Rows a graph for ``rows`` prompts has: the next power of two."""
    if rows < 1:
        raise ValueError(f"rows={rows}: must be >= 1")
    return 1 << (rows - 1).bit_length()


@dataclass
class _Graph:
    tokens: torch.Tensor  # [rows, length] int64, the graph's input
    keys: list[torch.Tensor]  # per layer [rows, Hkv, length, hd], the graph's outputs
    values: list[torch.Tensor]
    graph: torch.cuda.CUDAGraph


class PrefillGraphs:
    def __init__(self, model: CoLM, max_tokens: int, warmup: int = 2) -> None:
        self.model = model
        self.device = model.inv_freq.device
        self.max_tokens = max_tokens
        self.warmup = warmup
        self.enabled = self.device.type == "cuda" and max_tokens > 0
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self._lock = threading.Lock()

    @property
    def num_captured(self) -> int:
        return len(self._graphs)

    def fits(self, rows: int, length: int) -> bool:
        return self.enabled and graph_rows(rows) * length <= self.max_tokens

    def run(self, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Replay the graph for ``tokens`` [rows, length] (host or device, int64): every layer's (keys,
        values), rows ``0..rows-1`` of them valid until the next ``run``. None when the capture failed."""
        rows, length = tokens.shape
        g = self._graph(graph_rows(rows), length)
        if g is None:
            return None
        g.tokens[:rows].copy_(tokens, non_blocking=True)
        g.tokens[rows:].zero_()
        g.graph.replay()
        return g.keys, g.values

    def _graph(self, rows: int, length: int) -> _Graph | None:
        key = (rows, length)
        with self._lock:
            g = self._graphs.get(key)
            if g is None and self.enabled:
                try:
                    with DEVICE_WIDE_LOCK:
                        g = self._capture(rows, length)
                except Exception as e:  # noqa: BLE001 - fall back to eager for good
                    log.warning("prefill CUDA graph capture failed for %d rows x %d tokens (%s): prefill runs eager",
                                rows, length, e)
                    self.enabled = False
                    torch.cuda.synchronize(self.device)
                    return None
                self._graphs[key] = g
            return g

    def _capture(self, rows: int, length: int) -> _Graph:
        tokens = torch.zeros(rows, length, dtype=torch.long, device=self.device)

        def forward():
            keys, values = [], []

            def store(li, k, v):
                keys.append(k)
                values.append(v)
                return k, v

            prefill_chunk(self.model, tokens, 0, store)
            return keys, values

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with capture_without_gc(graph, pool=self._pool):
            keys, values = forward()
        return _Graph(tokens, keys, values, graph)
