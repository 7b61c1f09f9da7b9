"""``ChainLinear``: the Chain-of-Linear layer (paper §3.1) as an ``nn.Module``.

It owns one weight per output chain (layout in ``colm.kernels.chain_linear``) and calls the kernel
entry point, so CUDA runs use the Triton block-sparse kernel and the CPU the per-chain reference.
"""

from __future__ import annotations

from itertools import accumulate

import torch
from torch import nn

from colm.kernels import chain_linear
from colm.kernels.fused_linear import Segment


class ChainLinear(nn.Module):
    """y_i = W_i x_{<=i} (+ b_i). ``in_splits``/``out_splits`` are the per-chain feature counts."""

    def __init__(self, in_splits: list[int], out_splits: list[int], bias: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        if len(in_splits) != len(out_splits):
            raise ValueError(f"in_splits {in_splits} and out_splits {out_splits} differ in chain count")
        self.in_splits = list(in_splits)
        self.out_splits = list(out_splits)
        self.in_prefix = list(accumulate(self.in_splits))
        self.out_prefix = list(accumulate(self.out_splits))
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(o, p, device=device, dtype=dtype)) for o, p in zip(self.out_splits, self.in_prefix)
        )
        self.biases = (
            nn.ParameterList(nn.Parameter(torch.zeros(o, device=device, dtype=dtype)) for o in self.out_splits)
            if bias else None
        )

    @property
    def num_chains(self) -> int:
        return len(self.in_splits)

    def reset_parameters(self, std: float = 0.02) -> None:
        for w in self.weights:
            nn.init.normal_(w, std=std)
        if self.biases is not None:
            for b in self.biases:
                nn.init.zeros_(b)

    def forward(self, x: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        # x: [..., in_prefix[scale-1]] -> [..., out_prefix[scale-1]]
        k = self.num_chains if scale is None else scale
        # index, not slice: slicing a ParameterList builds a new Module per call (a third of a small decode step)
        weights = [self.weights[i] for i in range(k)]
        biases = None if self.biases is None else [self.biases[i] for i in range(k)]
        return chain_linear(x, weights, biases)

    def segments(self, scale: int, col: int = 0) -> list[Segment]:
        """The first ``scale`` chains' weights as ``fused_linear`` segments whose outputs start at ``col``
        (the chain Linear's own output layout, shifted); no bias (the fused launch has none)."""
        if self.biases is not None:
            raise ValueError("ChainLinear.segments: a chain Linear with biases cannot join a fused launch")
        return [Segment(self.weights[i], col + self.out_prefix[i] - self.out_splits[i]) for i in range(scale)]

    def extra_repr(self) -> str:
        return f"in_splits={self.in_splits}, out_splits={self.out_splits}, bias={self.biases is not None}"
