"""CUDA graphs of the colocated engine's whole-prompt chunks: chain-1 prefill straight into the paged pool.

Why: a prompt chunk's chain-1 forward is bound by the host. On an H200 (bench/colocated_profile.py) a decode
iteration of 64 rows took 2.3 ms, and 14 ms with an eager 2K-token chunk beside it, while the chunk's kernels ran
for about 4 ms: the rest was Python launching ~300 kernels. A replayed graph launches them at once.

What is captured: ``rows`` whole prompts (chunks that start a prompt and end it), right-padded to ``length`` tokens
(a multiple of ``length_bucket``), rows rounded up to a power of two and ``rows * length <= max_tokens``. Each
layer's K and V go into the pool at a static slot mapping (``forward_to_pool``); padding (rows and tokens past a
prompt's end) has slot -1, which the pool write skips, and right padding leaves the real tokens' causal attention
exact. Inputs are the graph's static token and slot tensors, filled by one upload per replay. Continuations of long
prompts and prompts that fit no graph run eagerly (``chunked_prefill``). ``warm_up`` captures every shape at start
(the decode engine's ``warmup_context``), so no request meets a capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from colm.attention_backend import attention
from colm.cuda_graphs import GraphSet, bucket, buckets, warm_and_capture
from colm.kernels.paged_attention import write_kv_to_pool
from colm.prefill_worker.forward import prefill_chunk, scale_layers


def forward_to_pool(model, pool, tokens: torch.Tensor, slots: torch.Tensor, scale: int = 1) -> None:
    """What a graph captures: the scale-``scale`` prefill (1: chain 1, its last layer's attention and FFN skipped)
    of ``tokens`` [rows, length] from position 0, each layer's K/V written into ``pool`` at ``slots``
    [rows * length] (row-major; -1 = padding, not written)."""
    rows, length = tokens.shape

    def store(li, k, v):
        # k, v [rows, Hkv, length, hd] -> [rows * length, Hkv, hd] in the slots' order
        hkv, hd = k.shape[1], k.shape[3]
        write_kv_to_pool(k.transpose(1, 2).reshape(rows * length, hkv, hd),
                         v.transpose(1, 2).reshape(rows * length, hkv, hd), pool.k[li], pool.v[li], slots)
        return k, v

    if scale == 1:
        prefill_chunk(model, tokens, 0, store)
        return
    positions = torch.arange(length, device=tokens.device).expand(rows, length)
    scale_layers(model, tokens, positions, scale,
                 lambda li, q, k, v: attention(q, *store(li, k, v), q_start=0))  # [rows, Hq, length, hd]


@dataclass
class _Graph:
    tokens: torch.Tensor  # [rows, length] int64
    slots: torch.Tensor   # [rows * length] int64
    graph: object


class PoolPrefillGraphs(GraphSet):
    def __init__(self, model, pool, max_tokens: int, length_bucket: int = 64, warmup: int = 2,
                 scale: int = 1) -> None:
        super().__init__(model.inv_freq.device, max_tokens)
        self.model, self.pool, self.scale = model, pool, scale
        self.length_bucket = length_bucket
        self.warmup = warmup

    def padded(self, n: int) -> int:
        return -(-n // self.length_bucket) * self.length_bucket

    def fits(self, rows: int, longest: int) -> bool:
        return self.enabled and bucket(rows) * self.padded(longest) <= self.max_tokens

    def groups(self, segments) -> tuple[list[list], list]:
        """``segments`` split into batches a graph takes (whole prompts, in order, as many per batch as fit) and the
        rest (continuations, partial first chunks, prompts longer than any graph)."""
        batches, rest, cur, longest = [], [], [], 0
        for s in segments:
            whole = s.start == 0 and s.end == len(s.request.prompt_tokens)
            if not whole or not self.fits(1, s.num_tokens):
                rest.append(s)
                continue
            if cur and not self.fits(len(cur) + 1, max(longest, s.num_tokens)):
                batches.append(cur)
                cur, longest = [], 0
            cur.append(s)
            longest = max(longest, s.num_tokens)
        if cur:
            batches.append(cur)
        return batches, rest

    def run(self, batch) -> bool:
        """Replay the graph for ``batch`` (whole-prompt segments that ``fits``); False when graphs are off."""
        rows, length = bucket(len(batch)), self.padded(max(s.num_tokens for s in batch))
        host = np.zeros((2, rows, length), dtype=np.int64)  # [tokens | slots]
        host[1] = -1
        for r, s in enumerate(batch):
            host[0, r, : s.num_tokens] = s.request.prompt_tokens[: s.num_tokens]
            host[1, r, : s.num_tokens] = self.pool.slots(s.request.blocks, 0, s.num_tokens).numpy()
        src = torch.from_numpy(host)
        if self.device.type == "cuda":
            src = src.pin_memory()
        with self._lock:
            g = self._graph_for((rows, length), lambda: self._capture(rows, length), self._what(rows, length))
            if g is None:
                return False
            g.tokens.copy_(src[0], non_blocking=True)
            g.slots.copy_(src[1].reshape(-1), non_blocking=True)
            g.graph.replay()
            self.num_replays += 1
        return True

    def shapes(self) -> list[tuple[int, int]]:
        return [(rows, t) for rows in buckets(self.max_tokens) for t in range(self.length_bucket, self.max_tokens + 1,
                                                                               self.length_bucket)
                if rows * t <= self.max_tokens]

    def warm_up(self) -> int:
        """Capture every shape now; how many were captured."""
        before = self.num_captures
        for rows, length in self.shapes():
            if self._graph(rows, length) is None:
                break  # a capture failed: graphs are off, the chunks run eagerly
        return self.num_captures - before

    def _graph(self, rows: int, length: int) -> _Graph | None:
        with self._lock:
            return self._graph_for((rows, length), lambda: self._capture(rows, length), self._what(rows, length))

    @staticmethod
    def _what(rows: int, length: int) -> str:
        return f"the colocated prefill of {rows} rows x {length} tokens"

    @torch.no_grad()
    def _capture(self, rows: int, length: int) -> _Graph:
        tokens = torch.zeros(rows, length, dtype=torch.long, device=self.device)
        slots = torch.full((rows * length,), -1, dtype=torch.long, device=self.device)
        graph, _ = warm_and_capture(lambda: forward_to_pool(self.model, self.pool, tokens, slots, self.scale),
                                    self.device, self._pool, self.warmup)
        return _Graph(tokens, slots, graph)
