"""SwiGLU feed-forward network built from chain Linears (paper Algorithm 5); the gate product is
``colm.kernels.swiglu.silu_mul`` (one Triton launch on CUDA at inference, the eager ops elsewhere)."""

from __future__ import annotations

import torch
from torch import nn

from colm.chain_linear import ChainLinear
from colm.config import ModelConfig
from colm.kernels import fused_linear as _fused
from colm.kernels.swiglu import silu_mul


class ChainFFN(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        dims, hidden = cfg.chain_dims, cfg.ffn_dims
        self.w1 = ChainLinear(dims, hidden, device=device, dtype=dtype)  # gate
        self.w3 = ChainLinear(dims, hidden, device=device, dtype=dtype)  # up
        self.w2 = ChainLinear(hidden, dims, device=device, dtype=dtype)  # down
        self.ffn_widths = list(hidden)  # per chain (w1 may be wrapped, e.g. by LoRA)

    def fuse_gate_up(self) -> None:
        """Inference engines: at decode's few rows, the gate and up chains in one launch
        (``colm.kernels.fused_linear``), and at up to 8 bf16 rows the gate product inside the down projection's
        launch (``fused_linear_glu``); the weights stay as they are."""
        self.__dict__["_fused"] = True  # a plain attribute: not part of the module's state

    def forward(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        # x [b, t, D_k] -> [b, t, F_k] -> [b, t, D_k]
        if self.__dict__.get("_fused") and _fused.fits(x):
            f = self.w1.out_prefix[scale - 1]
            gu = _fused.fused_linear(x, self.w1.segments(scale) + self.w3.segments(scale, col=f))  # [b, t, 2*F_k]
            if _fused.glu_fits(gu):  # the down projection forms silu(gate) * up as it reads its input: one launch
                return _fused.fused_linear_glu(gu, f, self.w2.segments(scale))
            return self.w2(silu_mul(gu[..., :f], gu[..., f:]), scale)
        return self.w2(self._gate_product(self.w1(x, scale), self.w3(x, scale), scale), scale)

    def _gate_product(self, g: torch.Tensor, u: torch.Tensor, scale: int) -> torch.Tensor:
        """silu(g) * u [b, t, F_k]: one launch on CUDA. On the CPU one per chain, each over a contiguous tensor of
        the same shape at every scale: the CPU's elementwise kernels round an element by where it falls (a
        vectorised body, then a scalar tail, per thread's range), so over the whole width chain 1's products
        would depend on how many chains run, and CoLM-Air's K/V on the scale (chain widths times tokens not a
        multiple of the vector width)."""
        widths = self.ffn_widths[:scale]
        if g.is_cuda or len(widths) == 1:
            return silu_mul(g, u)
        return torch.cat([silu_mul(a.contiguous(), b.contiguous())
                          for a, b in zip(g.split(widths, dim=-1), u.split(widths, dim=-1))], dim=-1)
