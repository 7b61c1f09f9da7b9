"""CUDA graphs of the speculative verify forward: one captured scale-k forward over T = gamma + 1 positions per
(batch bucket, T, context bucket, scale).

Why: the eager verify of the 1B {16,16} Air model spent ~23 ms of host time launching kernels that ran for
~1.7 ms on an H200 (bench/results/speculative_h200_*.json), many times the graphed decode step. A replay
issues them in one launch.

The graph reads static buffers: tokens and positions [B, T], the new tokens' slots [B, T], and the attention's
inputs, built on the host and copied in: with ``attention="gather"`` the context's slots [B, L] and the mask
[B, T, L] (``PagedExtendCache``); with ``"paged"`` a block table [B * T, L / block_size] and a context length
[B * T] per query row (``PagedVerifyCache``). Batch and context width are rounded up to powers of two;
padding rows write nowhere (slot -1, which the K/V write skips) and attend to one position; padded context
positions are masked (gather) or past the row's length (paged). The output is the logits [B, T, V], copied out
before the lock is released. A failed capture turns these graphs off (logged);
the verify then runs eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colm.cuda_graphs import GraphSet, bucket, warm_and_capture

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.paged_cache import PagedExtendCache, PagedVerifyCache


@dataclass
class _Graph:
    tokens: torch.Tensor     # [B, T] int64
    cache: PagedExtendCache | PagedVerifyCache  # its static inputs, filled before each replay
    logits: torch.Tensor     # [B, T, V] float32: the output, overwritten by the next replay
    graph: torch.cuda.CUDAGraph


class VerifyGraphs(GraphSet):
    def __init__(self, model, pool, max_batch: int, max_context: int, warmup: int = 2,
                 attention: str = DecodeConfig.verify_attention) -> None:
        super().__init__(model.inv_freq.device, max_context)
        self.model, self.pool = model, pool
        self.max_batch = bucket(max_batch)
        self.warmup = warmup
        self.paged = attention == "paged"  # DecodeConfig.verify_attention

    @torch.no_grad()
    def logits(self, rows, tokens: torch.Tensor, scale: int) -> torch.Tensor | None:
        """Scale-``scale`` logits [B, T, V] (float32) of ``tokens`` [B, T] at each row's positions num_cached..
        (rows: blocks, num_cached); None when graphs do not apply (the caller runs eager)."""
        b, t = tokens.shape
        width = max(r.num_cached for r in rows) + t
        if not self.enabled or b > self.max_batch or width > self.max_tokens:
            return None
        B, L = bucket(b), bucket(width, 64)
        with self._lock:
            g = self._graph_for((B, t, L, scale), lambda: self._capture(B, t, L, scale),
                                f"the speculative verify (batch {B}, {t} tokens, context {L}, scale {scale})")
            if g is None:
                return None
            c = g.cache
            host = (self._fill_paged if self.paged else self._fill_gather)(c, rows, b, t, L)
            c.slot_mapping[:b].copy_(host.slot_mapping, non_blocking=True)
            c.slot_mapping[b:] = -1   # padding rows write nowhere
            c.positions[:b].copy_(host.positions, non_blocking=True)
            c.positions[b:].zero_()
            g.tokens[:b].copy_(tokens)
            g.tokens[b:].zero_()
            g.graph.replay()
            self.num_replays += 1
            return g.logits[:b].clone()

    def _fill_gather(self, c: PagedExtendCache, rows, b: int, t: int, L: int) -> PagedExtendCache:
        """Stage the gathered attention's inputs; the host-built cache (its slots and positions go in next)."""
        host = PagedExtendCache.build(self.pool, rows, t, "cpu", width=L)
        c.gather[:b].copy_(host.gather, non_blocking=True)
        c.gather[b:].zero_()
        c.valid[:b].copy_(host.valid, non_blocking=True)
        c.valid[b:] = False
        c.valid[b:, :, 0] = True  # padding rows attend to one position (a fully masked row would be NaN)
        return host

    def _fill_paged(self, c: PagedVerifyCache, rows, b: int, t: int, L: int) -> PagedVerifyCache:
        """Stage the paged attention's inputs; the host-built cache (its slots and positions go in next)."""
        host = PagedVerifyCache.build(self.pool, rows, t, "cpu", width=c.block_tables.shape[1])
        c.block_tables[: b * t].copy_(host.block_tables, non_blocking=True)
        c.block_tables[b * t:].zero_()
        c.context_lens[: b * t].copy_(host.context_lens, non_blocking=True)
        c.context_lens[b * t:] = 1  # padding rows attend to one position (block 0's first slot)
        return host

    def _capture(self, B: int, T: int, L: int, scale: int) -> _Graph:
        dev = self.device
        if self.paged:
            cache = PagedVerifyCache(self.pool, torch.zeros(B * T, -(-L // self.pool.block_size), dtype=torch.int32,
                                                            device=dev),
                                     torch.ones(B * T, dtype=torch.int32, device=dev),
                                     torch.full((B, T), -1, dtype=torch.int64, device=dev),
                                     torch.zeros(B, T, dtype=torch.int64, device=dev))
        else:
            cache = PagedExtendCache(self.pool, torch.zeros(B, L, dtype=torch.int64, device=dev),
                                     torch.zeros(B, T, L, dtype=torch.bool, device=dev),
                                     torch.full((B, T), -1, dtype=torch.int64, device=dev),
                                     torch.zeros(B, T, dtype=torch.int64, device=dev))
            cache.valid[:, :, 0] = True
        tokens = torch.zeros(B, T, dtype=torch.int64, device=dev)

        def forward():
            hidden = self.model.hidden(tokens, scale=scale, cache=cache, positions=cache.positions)  # [B, T, D_k]
            return self.model.logits(hidden, scale).float()

        graph, logits = warm_and_capture(forward, dev, self._pool, self.warmup)
        return _Graph(tokens, cache, logits, graph)
