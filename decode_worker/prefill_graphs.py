"""CUDA graphs of the colocated engine's prompt chunks: chain-1 prefill of packed segments straight into the pool.

Why: a prompt chunk's forward is bound by the host when launched eagerly. On an H200 (bench/colocated_profile.py)
a decode iteration of 64 rows took 2.3 ms, and 14 ms with an eager 2K-token chunk beside it, while the chunk's
kernels ran for about 4 ms: the rest was Python launching a few hundred kernels. A replayed graph launches them at
once.

What is captured: ``chunked_prefill.forward`` over a fixed ``ChunkLayout`` per token count (``token_sizes``:
64, 128, 256, 512, then steps of 512 up to ``max_tokens``) with up to ``max_segments`` segments and enough pages
for the longest prompts. Any mix of segments (whole prompts, a long prompt's first or later chunk) whose layout
fits replays the smallest such graph: its index array is packed on the host, padded (tokens past the last
segment have slot -1 and belong to no attention tile) and uploaded into the graph's static buffer in one copy.
``warm_up`` captures every size at start (the decode engine's ``warmup_context``), so no request meets a capture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colm.cuda_graphs import GraphSet, warm_and_capture
from colm.kernels.prefill_attention import BLOCK_M, max_tiles

from colm.decode_worker import chunked_prefill
from colm.decode_worker.block_pool import blocks_for
from colm.decode_worker.chunked_prefill import ChunkInputs, ChunkLayout


def token_sizes(max_tokens: int) -> list[int]:
    """The token counts graphs are captured for: 64, 128, 256, 512, 1024, 1536, ... up to ``max_tokens`` (rounded
    up to a multiple of 64 below 512, of 512 above); padding stays under half the chunk."""
    sizes, n = [], 64
    while n < min(max_tokens, 512):
        sizes.append(n)
        n *= 2
    n = min(n, 512)
    while n < max_tokens:
        sizes.append(n)
        n += 512
    sizes.append(-(-max_tokens // 64) * 64 if max_tokens <= 512 else n)
    return sorted(set(sizes))


@dataclass
class _Graph:
    buf: torch.Tensor  # [layout.size] int64: the graph's static indices
    graph: object


class PackedPrefillGraphs(GraphSet):
    def __init__(self, model, pool, max_tokens: int, max_segments: int, max_context: int, warmup: int = 2,
                 scale: int = 1) -> None:
        super().__init__(model.inv_freq.device, max_tokens)
        self.model, self.pool, self.scale, self.warmup = model, pool, scale, warmup
        self.max_segments = max_segments
        bs = pool.block_size
        # pages: a continuation or two of the longest prompts plus whole prompts filling the chunk; never more than
        # the pool has (segments are distinct requests: their blocks are distinct)
        self.max_pages = min(pool.num_blocks, 2 * blocks_for(max_context, bs) + blocks_for(max_tokens, bs) + max_segments)
        self.sizes = token_sizes(max_tokens)

    def layout(self, tokens: int) -> ChunkLayout:
        return ChunkLayout(tokens, self.max_segments, max_tiles(tokens, self.max_segments, BLOCK_M), self.max_pages)

    def size_for(self, segments) -> int | None:
        """The token count of the graph that takes ``segments``, None when none does."""
        n = sum(s.num_tokens for s in segments)
        for size in self.sizes:
            if n <= size:
                return size if self.layout(size).fits(segments, self.pool.block_size) else None
        return None

    def run(self, segments) -> bool:
        """Replay the graph for ``segments``; False (nothing ran) when graphs are off or none takes them."""
        if not self.enabled:
            return False
        size = self.size_for(segments)
        if size is None:
            return False
        host = chunked_prefill.pack(self.pool, segments, self.layout(size))
        with self._lock:
            g = self._graph(size)
            if g is None:
                return False
            chunked_prefill.upload(host, self.device, g.buf)
            g.graph.replay()
            self.num_replays += 1
        return True

    def warm_up(self) -> int:
        """Capture every size now; how many were captured."""
        before = self.num_captures
        for size in self.sizes:
            with self._lock:
                if self._graph(size) is None:
                    break  # a capture failed: graphs are off, the chunks run eagerly
        return self.num_captures - before

    def _graph(self, size: int) -> _Graph | None:
        """The graph of ``size`` tokens, captured on first use (call under ``self._lock``)."""
        return self._graph_for(size, lambda: self._capture(size), f"the colocated prefill of a {size}-token chunk")

    @torch.no_grad()
    def _capture(self, size: int) -> _Graph:
        layout = self.layout(size)
        buf = torch.from_numpy(chunked_prefill.pack(self.pool, [], layout)).to(self.device)  # empty: no write, no tile
        inputs = ChunkInputs.of(buf, layout)
        graph, _ = warm_and_capture(lambda: chunked_prefill.forward(self.model, self.pool, inputs, self.scale),
                                    self.device, self._pool, self.warmup)
        return _Graph(buf, graph)
