"""Chain RMSNorm (paper §3.2.3): RMSNorm applied to each chain's features separately.

With one chain it is exactly Llama's RMSNorm (computed in float32, scaled in the input dtype). The
math lives in ``colm.kernels.rmsnorm``: one Triton kernel on CUDA bf16/fp16 at inference, the
plain-PyTorch reference elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from colm.kernels.rmsnorm import chain_add_rmsnorm, chain_rmsnorm


class ChainRMSNorm(nn.Module):
    def __init__(self, chain_dims: list[int], eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.chain_dims = list(chain_dims)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(sum(chain_dims), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., d_1 + ... + d_k] for the active scale k
        return chain_rmsnorm(x, self.weight, self._active_dims(x.shape[-1]), self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm(h)) for h = x + residual, in one launch on CUDA at inference."""
        return chain_add_rmsnorm(x, residual, self.weight, self._active_dims(x.shape[-1]), self.eps)

    def _active_dims(self, width: int) -> list[int]:
        dims, total = [], 0
        for d in self.chain_dims:
            if total >= width:
                break
            dims.append(d)
            total += d
        if total != width:
            raise ValueError(f"ChainRMSNorm: input width {width} is not a chain boundary of {self.chain_dims}")
        return dims
