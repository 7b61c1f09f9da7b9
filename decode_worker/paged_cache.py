"""The cache object one decode step hands to the model: K/V of the new tokens go into the paged pool.

``PagedStepCache`` speaks the model's cache protocol (``attend``, ``advance``, ``length``): at each
layer it writes the step's k, v (one token per sequence) into the slots the engine reserved, then
runs paged decode attention of the step's queries over each sequence's blocks. The kernels issue's
``colm.kernels.paged_attention`` is used when present (Triton on CUDA, its reference on CPU); this
module's own plain-PyTorch reference stands in otherwise.
"""

from __future__ import annotations

import math

import torch

try:
    from colm.kernels.paged_attention import paged_decode_attention, write_kv_to_pool

    HAS_KERNEL = True
except ImportError:  # the kernels issue has not landed in this checkout
    HAS_KERNEL = False


def paged_decode_attention_ref(q, k_pool, v_pool, block_tables, context_lens, sm_scale=None):
    """q [B, Hq, D] over pools [N, bs, Hkv, D] -> [B, Hq, D]; padded gather + masked softmax in float32."""
    b, hq, d = q.shape
    bs, hkv = k_pool.shape[1], k_pool.shape[2]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    tables = block_tables.long()
    k = k_pool[tables].flatten(1, 2).float()  # [B, T_max, Hkv, D]
    v = v_pool[tables].flatten(1, 2).float()
    qg = q.float().view(b, hkv, hq // hkv, d)  # query head h reads kv head h // group
    s = torch.einsum("bkgd,btkd->bkgt", qg, k) * scale  # [B, Hkv, g, T_max]
    valid = torch.arange(k.shape[1], device=q.device)[None, :] < context_lens.long()[:, None]  # [B, T_max]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    o = torch.einsum("bkgt,btkd->bkgd", s.softmax(-1), v)
    return o.reshape(b, hq, d).to(q.dtype)


def write_kv_to_pool_ref(k, v, k_pool, v_pool, slot_mapping):
    hkv, d = k_pool.shape[2], k_pool.shape[3]
    k_pool.view(-1, hkv, d)[slot_mapping] = k.to(k_pool.dtype)
    v_pool.view(-1, hkv, d)[slot_mapping] = v.to(v_pool.dtype)


if not HAS_KERNEL:
    paged_decode_attention = paged_decode_attention_ref
    write_kv_to_pool = write_kv_to_pool_ref


class PagedStepCache:
    """One decode step of B sequences (one new token each) against a ``BlockPool``."""

    def __init__(self, pool, block_tables: torch.Tensor, context_lens: torch.Tensor, slot_mapping: torch.Tensor,
                 length: int = 0) -> None:
        self.pool = pool
        self.block_tables = block_tables  # [B, max_blocks] int32: each sequence's blocks
        self.context_lens = context_lens  # [B] int32: tokens attended, the new one included
        self.slot_mapping = slot_mapping  # [B] int64: where the new token's K/V go
        self.length = length              # only for the model's max_seq_len check (positions are explicit)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [B, Hq, 1, hd]; k, v [B, Hkv, 1, hd]
        if q.shape[2] != 1:
            raise ValueError(f"PagedStepCache: one token per sequence per step, got {q.shape[2]}")
        kp, vp = self.pool.k[layer_idx], self.pool.v[layer_idx]
        write_kv_to_pool(k[:, :, 0].contiguous(), v[:, :, 0].contiguous(), kp, vp, self.slot_mapping)
        o = paged_decode_attention(q[:, :, 0].contiguous(), kp, vp, self.block_tables, self.context_lens)
        return o[:, :, None]  # [B, Hq, 1, hd]

    def advance(self, num_tokens: int, kv_heads: int | None = None) -> None:
        """The engine tracks each sequence's length itself."""
