"""The cache object one decode step hands to the model: K/V of the new tokens go into the paged pool.

``PagedStepCache`` speaks the model's cache protocol (``attend``, ``advance``, ``length``): at each
layer it writes the step's k, v (one token per sequence) into the slots the engine reserved, then
runs paged decode attention of the step's queries over each sequence's blocks. The kernels issue's
``colm.kernels.paged_attention`` is used when present (Triton on CUDA, its reference on CPU); this
module's own plain-PyTorch reference stands in otherwise.
"""

from __future__ import annotations

import torch

# The kernels' entry points run Triton on CUDA and their plain-PyTorch references elsewhere.
from colm.kernels.paged_attention import paged_decode_attention, write_kv_to_pool
from colm.kernels.rope import rope_qk_to_pool_triton, rope_to_pool_fits
from colm.rope import apply_rope_qk


class PagedStepCache:
    """One decode step of B sequences (one new token each) against a ``BlockPool``."""

    takes_head_map = True  # attend() accepts CoLM-Air's query head order (no gathers around the kernel)
    ropes_and_writes_kv = True  # attend_unroped(): RoPE, the KV write and attention in two launches on CUDA

    def __init__(self, pool, block_tables: torch.Tensor, context_lens: torch.Tensor, slot_mapping: torch.Tensor,
                 length: int = 0) -> None:
        self.pool = pool
        self.block_tables = block_tables  # [B, max_blocks] int32: each sequence's blocks
        self.context_lens = context_lens  # [B] int32: tokens attended, the new one included
        self.slot_mapping = slot_mapping  # [B] int64: where the new token's K/V go
        self.length = length              # only for the model's max_seq_len check (positions are explicit)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               head_map: torch.Tensor | None = None) -> torch.Tensor:
        # q [B, Hq, 1, hd]; k, v [B, Hkv, 1, hd]; head_map [Hq] int32: query head head_map[j] reads KV head j // group
        if q.shape[2] != 1:
            raise ValueError(f"PagedStepCache: one token per sequence per step, got {q.shape[2]}")
        kp, vp = self.pool.k[layer_idx], self.pool.v[layer_idx]
        write_kv_to_pool(k[:, :, 0], v[:, :, 0], kp, vp, self.slot_mapping)  # any strides (fused K/V are views)
        return self._attend_written(layer_idx, q, head_map)

    def attend_unroped(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, head_map: torch.Tensor | None = None) -> torch.Tensor:
        """``attend`` for q, k before RoPE: on CUDA one kernel rotates q and k and writes k, v into the pool."""
        kp, vp = self.pool.k[layer_idx], self.pool.v[layer_idx]
        if q.shape[2] == 1 and rope_to_pool_fits(q, k, v, cos, sin, kp, vp, self.slot_mapping):
            return self._attend_written(layer_idx, rope_qk_to_pool_triton(q, k, v, cos, sin, kp, vp, self.slot_mapping),
                                        head_map)
        q, k = apply_rope_qk(q, k, cos, sin)
        return self.attend(layer_idx, q, k, v, head_map=head_map)

    def _attend_written(self, layer_idx: int, q: torch.Tensor, head_map: torch.Tensor | None) -> torch.Tensor:
        """Paged attention of q [B, Hq, 1, hd] once this step's K/V are in the pool -> [B, Hq, 1, hd]."""
        o = paged_decode_attention(q[:, :, 0].contiguous(), self.pool.k[layer_idx], self.pool.v[layer_idx],
                                   self.block_tables, self.context_lens, head_map=head_map)
        return o[:, :, None]

    def advance(self, num_tokens: int, kv_heads: int | None = None) -> None:
        """The engine tracks each sequence's length itself."""
