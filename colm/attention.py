"""Chain attention (paper §3.2.1) and its KV-sharing variant CoLM-Air (§3.3).

Each chain owns ``chains[i]`` query heads. Without KV sharing it also owns its K/V heads (GQA within
the chain); with KV sharing all K/V heads are computed from chain 1's features and every chain's
query heads read them, chain-locally grouped (local query head j of chain i reads K/V head
``j // (chains[i] / n_kv_heads)``), which for one chain is exactly Llama's GQA.

Path of one call: chain Linears give q (active chains) and k, v (their K/V heads); RoPE; heads are
reordered so one GQA attention call serves all chains; the cache (if any) stores k, v and attends;
the output chain Linear maps back.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from colm.attention_backend import attention
from colm.chain_linear import ChainLinear
from colm.config import ModelConfig
from colm.kernels import fused_linear as _fused
from colm.rope import apply_rope_qk


@lru_cache(maxsize=None)
def _air_order(chains: tuple[int, ...], n_kv: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    order = []
    starts = [sum(chains[:i]) for i in range(len(chains))]
    for g in range(n_kv):
        for start, c in zip(starts, chains):
            r = c // n_kv
            order.extend(range(start + g * r, start + (g + 1) * r))
    inverse = [0] * len(order)
    for pos, h in enumerate(order):
        inverse[h] = pos
    return tuple(order), tuple(inverse)


def query_head_order(cfg: ModelConfig, scale: int) -> tuple[list[int], list[int]] | None:
    """Permutation putting query heads in GQA order (head h reads K/V head h // group), and its inverse.

    None when the natural order already is (no KV sharing, or a single active chain).
    """
    if not cfg.kv_sharing or scale == 1:
        return None
    order, inverse = _air_order(cfg.chains[:scale], cfg.n_kv_heads)
    return list(order), list(inverse)


def default_attend(q, k, v, q_start: int):
    return attention(q, k, v, q_start=q_start)


class ChainAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, device=None, dtype=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        hd = cfg.head_dim
        dims = cfg.chain_dims
        self.wq = ChainLinear(dims, dims, device=device, dtype=dtype)
        if cfg.kv_sharing:
            # K/V read chain 1 only: a one-chain Linear [n_kv*hd, d_1].
            kv_in, kv_out = [dims[0]], [cfg.n_kv_heads * hd]
        else:
            kv_in, kv_out = dims, [h * hd for h in cfg.kv_heads_per_chain]
        self.wk = ChainLinear(kv_in, kv_out, device=device, dtype=dtype)
        self.wv = ChainLinear(kv_in, kv_out, device=device, dtype=dtype)
        self.wo = ChainLinear(dims, dims, device=device, dtype=dtype)

    def fuse_kv(self) -> None:
        """CoLM-Air inference: K and V from one [2*Hkv*hd, d_1] weight (one GEMM instead of two per layer).

        ``wk``/``wv`` keep their parameters, as views of the fused tensor (same values, same state_dict
        keys); a no-op without KV sharing or when fused already. For engines, not for training."""
        if not self.cfg.kv_sharing or self.__dict__.get("_wkv") is not None:
            return
        wk, wv = self.wk.weights[0], self.wv.weights[0]  # [Hkv*hd, d_1] each
        fused = torch.cat([wk.detach(), wv.detach()])  # [2*Hkv*hd, d_1]
        wk.data, wv.data = fused[: wk.shape[0]], fused[wk.shape[0]:]
        self.__dict__["_wkv"] = fused  # a plain attribute: not a parameter or buffer of the module

    def fuse_projections(self) -> None:
        """Inference engines: ``fuse_kv`` (CoLM-Air), and at decode's few rows q, K and V from one launch
        (``colm.kernels.fused_linear``: q's chains with the chain-1 K/V weight, or, without KV sharing, with
        every chain's K and V weights); the weights stay as they are."""
        self.fuse_kv()
        self.__dict__["_fused"] = True  # a plain attribute: not part of the module's state

    def _qkv_segments(self, scale: int) -> list:
        """The fused launch's segments: y [..., Dq_k + 2 * Dkv_k] = [q | k | v] at scale ``scale``."""
        dq = self.wq.out_prefix[scale - 1]
        if self.cfg.kv_sharing:
            return self.wq.segments(scale) + [_fused.Segment(self.__dict__["_wkv"], dq)]
        dk = self.wk.out_prefix[scale - 1]
        return self.wq.segments(scale) + self.wk.segments(scale, col=dq) + self.wv.segments(scale, col=dq + dk)

    def project_qkv(self, x: torch.Tensor, scale: int, cos: torch.Tensor, sin: torch.Tensor, rope: bool = True):
        """x [b, t, D_k] -> q [b, Hq_k, t, hd], k, v [b, Hkv_k, t, hd] with RoPE applied (``rope``: else not)."""
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        if self.__dict__.get("_fused") and _fused.fits(x):  # few rows (decode): q, K and V in one launch
            dq = self.wq.out_prefix[scale - 1]
            y = _fused.fused_linear(x, self._qkv_segments(scale))  # [b, t, Dq_k + 2 * Dkv_k]
            q, (k, v) = y[..., :dq], y[..., dq:].chunk(2, dim=-1)
        else:
            q = self.wq(x, scale)
            if self.cfg.kv_sharing:
                x1 = x[..., : self.cfg.chain_dims[0]]
                wkv = self.__dict__.get("_wkv")
                if wkv is not None:
                    k, v = F.linear(x1, wkv).chunk(2, dim=-1)  # views of one [b, t, 2*Hkv*hd] result
                else:
                    k, v = self.wk(x1), self.wv(x1)
            else:
                k, v = self.wk(x, scale), self.wv(x, scale)
        q, k, v = (z.view(b, t, -1, hd).transpose(1, 2) for z in (q, k, v))
        if rope:
            q, k = apply_rope_qk(q, k, cos, sin)  # one launch for both on CUDA
        return q, k, v

    def _head_order(self, scale: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        # query_head_order as index tensors on the device, made once: a Python-list index is copied to
        # the GPU with a host sync on every call, which also cannot run inside a CUDA graph capture.
        # (order, inverse, order as int32 for caches that take a head map)
        cache = self.__dict__.setdefault("_order_cache", {})
        key = (scale, device)
        if key not in cache:
            order = query_head_order(self.cfg, scale)
            cache[key] = None if order is None else (
                torch.tensor(order[0], device=device), torch.tensor(order[1], device=device),
                torch.tensor(order[0], device=device, dtype=torch.int32))
        return cache[key]

    def forward(self, x: torch.Tensor, scale: int, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                q_start: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        fused = getattr(cache, "ropes_and_writes_kv", False)  # the cache applies RoPE as it stores k (decode)
        q, k, v = self.project_qkv(x, scale, cos, sin, rope=not fused)
        order = self._head_order(scale, q.device)
        if fused:
            o = cache.attend_unroped(self.layer_idx, q, k, v, cos, sin, head_map=None if order is None else order[2])
        elif order is not None and getattr(cache, "takes_head_map", False):
            # the cache's kernel reads q and writes o in the heads' own order: no gathers
            o = cache.attend(self.layer_idx, q, k, v, head_map=order[2])  # [b, Hq_k, t, hd]
        else:
            if order is not None:
                q = q[:, order[0]]
            if cache is None:
                o = default_attend(q, k, v, q_start)
            else:
                o = cache.attend(self.layer_idx, q, k, v)  # [b, Hq_k, t, hd]
            if order is not None:
                o = o[:, order[1]]
        return self.wo(o.transpose(1, 2).reshape(b, t, -1), scale)
