"""CUDA graphs of short prefills: one captured ``prefill_chunk`` per (rows, padded length).

Why: a short prefill is bound by the host, not the GPU. On an H100 (bench/results/
prefill_profile_h100_2026-11-23.json) the chain-1 forward of a 2K-token prompt issued ~220 kernels in
14-18 ms of Python while its kernels ran for 1.4-2.8 ms; TTFT at serving lengths is mostly that host
time. A replayed graph issues them all in one launch.

What is captured: a batch that fits in one chunk (no earlier chunks' K/V to attend to) of ``rows``
right-padded prompts of ``length`` tokens, rows rounded up to a power of two (padding rows read token 0
and their outputs are never read) and ``rows * length <= max_tokens``. Prompt lengths already come in
``PrefillConfig.length_bucket`` steps, so few graphs serve all short prompts. Every graph writes each
layer's K/V into views of one static buffer of ``max_tokens`` tokens per layer (``forward_into``), so the
graphs' outputs cost that buffer once, not once per graph (the activations live in a memory pool all
the graphs share). The next replay overwrites them, so the engine copies what it hands to sinks
(``PrefillEngine._emit_all``: one copy per request of every layer at once, in the sinks' order) before it
replays again, and hands each request all its layers in one ``put``. Streaming K/V layer by layer while
later layers compute is given up for these prompts: the whole forward is queued at once, and a sink
sends one mark, not one per layer (on an H100 host, 16 marks took ~2.5 ms of an 8K cuda_pool hand-off). ``warm_up`` captures every shape up front (``PrefillConfig.warmup_graphs``), so
no request meets a capture.

Capture: ``colm.cuda_graphs.warm_and_capture``, as the decode engine's graphs do (a decode engine in the
same process may capture meanwhile). A failed capture turns graphs off for good; the engine runs eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colm.cuda_graphs import GraphSet, bucket, buckets, warm_and_capture
from colm.model import CoLM

from colm.prefill_worker.forward import prefill_chunk


def graph_rows(rows: int) -> int:
    """Rows a graph for ``rows`` prompts has: the next power of two."""
    if rows < 1:
        raise ValueError(f"rows={rows}: must be >= 1")
    return bucket(rows)


def forward_into(model: CoLM, tokens: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """The captured forward: ``prefill_chunk`` of ``tokens`` [rows, length] from position 0, each layer's K/V
    written into ``keys[l]`` / ``values[l]`` ([rows, Hkv, length, hd]) and attended from there."""

    def store(li, k, v):
        keys[li].copy_(k)
        values[li].copy_(v)
        return keys[li], values[li]

    prefill_chunk(model, tokens, 0, store)


@dataclass
class _Graph:
    tokens: torch.Tensor  # [rows, length] int64, the graph's input
    kv: torch.Tensor  # [rows, layers, length, 2, Hkv, hd]: a permuted view of PrefillGraphs' static K/V buffer
    graph: torch.cuda.CUDAGraph


class PrefillGraphs(GraphSet):
    def __init__(self, model: CoLM, max_tokens: int, warmup: int = 2) -> None:
        super().__init__(model.inv_freq.device, max_tokens)
        self.model = model  # graphs: (rows, length) -> _Graph
        self.warmup = warmup
        self._kv: torch.Tensor | None = None  # [layers, 2, max_tokens * Hkv * hd], allocated at the first capture

    def fits(self, rows: int, length: int) -> bool:
        return self.enabled and graph_rows(rows) * length <= self.max_tokens

    def shapes(self, length_bucket: int, max_length: int, max_rows: int) -> list[tuple[int, int]]:
        """Every (graph rows, length) a batch of at most ``max_rows`` prompts, padded to multiples of
        ``length_bucket`` up to ``max_length`` tokens, can need."""
        return [(rows, t) for rows in buckets(max_rows) for t in range(length_bucket, max_length + 1, length_bucket)
                if rows * t <= self.max_tokens]

    def warm_up(self, length_bucket: int, max_length: int, max_rows: int) -> int:
        """Capture every graph of ``shapes(...)`` now; returns how many were captured."""
        before = self.num_captures
        for rows, length in self.shapes(length_bucket, max_length, max_rows):
            if self._graph(rows, length) is None:
                break  # a capture failed: graphs are off
        return self.num_captures - before

    def run(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Replay the graph for ``tokens`` [rows, length] (host or device, int64): every layer's K/V as a view
        ``[graph rows, layers, length, 2, Hkv, hd]`` of the static buffer, rows ``0..rows-1`` of it valid until
        the next ``run``. None when the capture failed."""
        rows, length = tokens.shape
        g = self._graph(graph_rows(rows), length)
        if g is None:
            return None
        g.tokens[:rows].copy_(tokens, non_blocking=True)
        g.tokens[rows:].zero_()
        g.graph.replay()
        self.num_replays += 1
        return g.kv

    def _graph(self, rows: int, length: int) -> _Graph | None:
        with self._lock:
            return self._graph_for((rows, length), lambda: self._capture(rows, length),
                                   f"the prefill of {rows} rows x {length} tokens")

    def _views(self, rows: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        cfg = self.model.cfg
        if self._kv is None:
            self._kv = torch.empty(cfg.n_layers, 2, self.max_tokens * cfg.n_kv_heads * cfg.head_dim,
                                   dtype=self.model.embed.weight.dtype, device=self.device)
        n = rows * length * cfg.n_kv_heads * cfg.head_dim
        shape = (rows, cfg.n_kv_heads, length, cfg.head_dim)
        every = self._kv[:, :, :n].view(cfg.n_layers, 2, *shape)  # [L, 2, rows, Hkv, length, hd]
        return list(every[:, 0]), list(every[:, 1]), every.permute(2, 0, 4, 1, 3, 5)

    @torch.no_grad()  # warm_up runs outside the engine's no_grad forward
    def _capture(self, rows: int, length: int) -> _Graph:
        tokens = torch.zeros(rows, length, dtype=torch.long, device=self.device)
        keys, values, kv = self._views(rows, length)
        graph, _ = warm_and_capture(lambda: forward_into(self.model, tokens, keys, values), self.device, self._pool,
                                    self.warmup)
        return _Graph(tokens, kv, graph)
