"""``GraphedForward``: the full model's forward over one short prompt, replayed from CUDA graphs.

Why: a short full-model forward is bound by the host, not the GPU. On an H100 the eager {16,16} forward of a
2K-token prompt issued ~270 kernels in ~39 ms of Python while they ran for ~7 ms
(bench/results/prefill_profile_h100_2026-11-23.json), slower than HF's LlamaModel of the same shape. A replayed
graph issues them in one launch. Users: the decode worker's ``Score`` (``DecodeConfig.score_graph_tokens``,
via ``colm.scoring.prompt_logprobs``) and ``bench/engines.py``'s prefill section.

What is captured: ``model.hidden(tokens, scale)`` for one row of ``length`` tokens, per (length, scale), the
length rounded up to a power of two from ``least`` (right padding with token 0: causal attention keeps the
real positions' outputs those of the unpadded prompt, up to the kernels' float rounding at another length).
All graphs share one memory pool; a replay's output is copied out before the lock is released. Off CUDA,
for more than one row, or beyond ``max_tokens``, the call runs eager. A failed capture turns graphs off for
good (logged); calls then run eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from colm.cuda_graphs import GraphSet, bucket, warm_and_capture
from colm.model import CoLM


@dataclass
class _Graph:
    tokens: torch.Tensor  # [1, length] int64: the graph's input
    hidden: torch.Tensor  # [1, length, D_k]: its output (overwritten by the next replay)
    graph: torch.cuda.CUDAGraph


class GraphedForward(GraphSet):
    def __init__(self, model: CoLM, max_tokens: int, least: int = 256, warmup: int = 2) -> None:
        if max_tokens < 0 or least < 1:
            raise ValueError(f"max_tokens={max_tokens}, least={least}: need max_tokens >= 0 and least >= 1")
        super().__init__(model.inv_freq.device, max_tokens)
        self.model = model  # graphs: (length, scale) -> _Graph
        self.least = least
        self.warmup = warmup

    def fits(self, rows: int, length: int) -> bool:
        return self.enabled and rows == 1 and bucket(length, self.least) <= self.max_tokens

    @torch.no_grad()
    def hidden(self, tokens: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """tokens [b, t] -> the final normed hidden states [b, t, D_k], as ``model.hidden(tokens, scale)``."""
        scale = self.model.cfg.check_scale(scale)
        b, t = tokens.shape
        if not self.fits(b, t):
            return self.model.hidden(tokens, scale)
        length = bucket(t, self.least)
        with self._lock:
            g = self._graph_for((length, scale), lambda: self._capture(length, scale),
                                f"the {length}-token full forward at scale {scale}")
            if g is None:
                return self.model.hidden(tokens, scale)
            g.tokens[:, :t].copy_(tokens)
            g.tokens[:, t:].zero_()
            g.graph.replay()
            self.num_replays += 1
            return g.hidden[:, :t].clone()  # [1, t, D_k]; the next replay overwrites the graph's output

    def _capture(self, length: int, scale: int) -> _Graph:
        tokens = torch.zeros((1, length), dtype=torch.long, device=self.device)
        graph, hidden = warm_and_capture(lambda: self.model.hidden(tokens, scale), self.device, self._pool,
                                         self.warmup)
        return _Graph(tokens, hidden, graph)
