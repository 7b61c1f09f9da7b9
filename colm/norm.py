"""Chain RMSNorm (paper §3.2.3): RMSNorm applied to each chain's features separately.

With one chain it is exactly Llama's RMSNorm (computed in float32, scaled in the input dtype).
"""

from __future__ import annotations

import torch
from torch import nn


class ChainRMSNorm(nn.Module):
    def __init__(self, chain_dims: list[int], eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.chain_dims = list(chain_dims)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(sum(chain_dims), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., d_1 + ... + d_k] for the active scale k
        width = x.shape[-1]
        dims, total = [], 0
        for d in self.chain_dims:
            if total >= width:
                break
            dims.append(d)
            total += d
        if total != width:
            raise ValueError(f"ChainRMSNorm: input width {width} is not a chain boundary of {self.chain_dims}")
        dtype = x.dtype
        h = x.float()
        if len(set(dims)) == 1:
            g = h.unflatten(-1, (len(dims), dims[0]))  # [..., k, d]
            g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
            h = g.flatten(-2)
        else:
            h = torch.cat([p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + self.eps) for p in h.split(dims, -1)], -1)
        return self.weight[:width] * h.to(dtype)
