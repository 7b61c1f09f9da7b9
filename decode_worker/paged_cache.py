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


def _write_new(pool, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor):
    """Write the T new tokens' ``k``, ``v`` [B, Hkv, T, hd] of layer ``layer_idx`` into their ``slot_mapping`` [B, T]
    slots (-1: nowhere); returns the layer's pools (k, v)."""
    kp, vp = pool.k[layer_idx], pool.v[layer_idx]
    b, hkv, t, hd = k.shape
    write_kv_to_pool(k.transpose(1, 2).reshape(b * t, hkv, hd), v.transpose(1, 2).reshape(b * t, hkv, hd),
                     kp, vp, slot_mapping.reshape(-1))
    return kp, vp


class PagedExtendCache:
    """One forward of B sequences, T new tokens each, against a ``BlockPool`` (chain-1 self-speculative decoding
    verifies T = gamma + 1 positions at once). At each layer it writes the T tokens' k, v into their slots, then
    each query attends causally to its sequence's context: position ``start + t`` sees positions 0..start+t.

    Plain PyTorch: the context's K/V are gathered from the pool into [B, L, Hkv, hd] once per layer (``gather``
    [B, L] slot ids made once per forward) and attended with one masked SDPA. L is the longest context."""

    def __init__(self, pool, gather: torch.Tensor, valid: torch.Tensor, slot_mapping: torch.Tensor,
                 positions: torch.Tensor, length: int = 0) -> None:
        self.pool = pool
        self.gather = gather              # [B, L] int64: slot of context position j of each sequence (0 past its end)
        self.valid = valid                # [B, T, L] bool: query t of sequence b may attend position j
        self.slot_mapping = slot_mapping  # [B, T] int64: where the new tokens' K/V go
        self.positions = positions        # [B, T] int64: the new tokens' positions (the model's ``positions``)
        self.length = length              # only for the model's max_seq_len check (positions are explicit)

    @classmethod
    def build(cls, pool, rows, num_new: int, device, width: int | None = None) -> "PagedExtendCache":
        """``rows``: objects with ``blocks`` and ``num_cached`` (the first new token's position). ``width``: the
        context columns (default the longest context; more are masked padding)."""
        ends = [r.num_cached + num_new for r in rows]
        width = max(ends) if width is None else width
        gather = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, (r, e) in enumerate(zip(rows, ends)):
            gather[i, :e] = pool.slots(r.blocks, 0, e)
        starts = torch.tensor([r.num_cached for r in rows], dtype=torch.int64)
        pos = starts[:, None] + torch.arange(num_new)[None, :]  # [B, T]
        valid = torch.arange(width)[None, None, :] <= pos[:, :, None]  # [B, T, L]
        slots = torch.gather(gather, 1, pos)
        return cls(pool, gather.to(device), valid.to(device), slots.to(device), pos.to(device),
                   length=max(ends) - num_new)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [B, Hq, T, hd]; k, v [B, Hkv, T, hd] (RoPE applied) -> [B, Hq, T, hd]
        kp, vp = _write_new(self.pool, layer_idx, k, v, self.slot_mapping)
        hkv, hd = k.shape[1], k.shape[3]
        keys = kp.reshape(-1, hkv, hd)[self.gather].transpose(1, 2)  # [B, Hkv, L, hd]
        vals = vp.reshape(-1, hkv, hd)[self.gather].transpose(1, 2)
        group = q.shape[1] // hkv
        if group > 1:
            keys, vals = keys.repeat_interleave(group, dim=1), vals.repeat_interleave(group, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(q, keys.to(q.dtype), vals.to(q.dtype),
                                                                attn_mask=self.valid[:, None])

    def advance(self, num_tokens: int, kv_heads: int | None = None) -> None:
        """The engine tracks each sequence's length itself."""


class PagedVerifyCache:
    """``PagedExtendCache``'s forward through the paged decode kernel: query t of sequence b is a decode row of its
    own (b's blocks, context start_b + t + 1), so one launch per layer attends all B x T queries, nothing is
    gathered, and no mask is built (the causal limit is each row's context length). At each layer it first writes
    the T tokens' k, v into their slots, as ``PagedExtendCache`` does, so the rows read them from the pool."""

    takes_head_map = True  # attend() accepts CoLM-Air's query head order (the kernel reads heads in that order)

    def __init__(self, pool, block_tables: torch.Tensor, context_lens: torch.Tensor, slot_mapping: torch.Tensor,
                 positions: torch.Tensor, length: int = 0) -> None:
        self.pool = pool
        self.block_tables = block_tables  # [B * T, W] int32: row b * T + t holds sequence b's blocks
        self.context_lens = context_lens  # [B * T] int32: start_b + t + 1
        self.slot_mapping = slot_mapping  # [B, T] int64: where the new tokens' K/V go
        self.positions = positions        # [B, T] int64: the new tokens' positions (the model's ``positions``)
        self.length = length              # only for the model's max_seq_len check (positions are explicit)

    @classmethod
    def build(cls, pool, rows, num_new: int, device, width: int | None = None) -> "PagedVerifyCache":
        """``rows``: objects with ``blocks`` and ``num_cached`` (the first new token's position). ``width``: the
        block-table columns (default: the blocks of the longest context)."""
        bs = pool.block_size
        ends = [r.num_cached + num_new for r in rows]
        width = -(-max(ends) // bs) if width is None else width
        tables = torch.zeros(len(rows) * num_new, width, dtype=torch.int32)
        slots = torch.empty(len(rows), num_new, dtype=torch.int64)
        for i, (r, e) in enumerate(zip(rows, ends)):
            used = r.blocks[: -(-e // bs)]
            tables[i * num_new: (i + 1) * num_new, : len(used)] = torch.tensor(used, dtype=torch.int32)
            slots[i] = pool.slots(r.blocks, r.num_cached, e)
        starts = torch.tensor([r.num_cached for r in rows], dtype=torch.int64)
        pos = starts[:, None] + torch.arange(num_new)[None, :]  # [B, T]
        return cls(pool, tables.to(device), (pos + 1).reshape(-1).to(torch.int32).to(device), slots.to(device),
                   pos.to(device), length=max(ends) - num_new)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               head_map: torch.Tensor | None = None) -> torch.Tensor:
        # q [B, Hq, T, hd]; k, v [B, Hkv, T, hd] (RoPE applied) -> [B, Hq, T, hd]
        kp, vp = _write_new(self.pool, layer_idx, k, v, self.slot_mapping)
        b, hq, t, hd = q.shape
        rows = q.transpose(1, 2).reshape(b * t, hq, hd).contiguous()  # row b * T + t
        # every row's context ends in this round's T new tokens, all just written
        o = paged_decode_attention(rows, kp, vp, self.block_tables, self.context_lens, head_map=head_map,
                                   fresh_tokens=t)
        return o.reshape(b, t, hq, hd).transpose(1, 2)

    def advance(self, num_tokens: int, kv_heads: int | None = None) -> None:
        """The engine tracks each sequence's length itself."""
