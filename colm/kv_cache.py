"""KV caches for incremental decoding.

The model talks to a cache through one method, ``attend(layer_idx, q, k, v) -> o``: the cache
stores the new keys/values of that layer and runs attention of ``q`` over everything it holds for
the sequence. After a forward the model calls ``advance(num_tokens)``. Any object with these two
methods and a ``length`` attribute can stand in (the decode engine's paged pool does).

``ContiguousKVCache`` is the simple per-batch cache used by reference generation and chunked
prefill. For CoLM-Air the cached K/V do not depend on the scale, so the scale may change between
any two steps. Without KV sharing a scale-k step stores only the first k chains' K/V heads (chain
causality makes them the same at every scale >= k), so later steps may use a scale <= every scale
used so far; raising it would need K/V the cache never computed, which is refused.
"""

from __future__ import annotations

import torch

from colm.attention_backend import attention
from colm.config import ModelConfig


class ContiguousKVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> None:
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
        self.cfg = cfg
        self.max_len = max_len
        self.length = 0
        self.valid_kv_heads = cfg.n_kv_heads
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)  # [b, Hkv, T_max, hd]
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [b, Hq, t, hd]; k, v [b, Hkv_k, t, hd] for the positions length..length+t-1
        t, heads = k.shape[2], k.shape[1]
        if heads > self.valid_kv_heads:
            raise ValueError(
                f"this cache holds K/V of {self.valid_kv_heads} heads for earlier positions, a step needs {heads}: "
                "without kv_sharing the scale cannot grow above one used before (re-prefill at the larger scale)"
            )
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"cache overflow: {end} positions > max_len={self.max_len}")
        self.k[layer_idx][:, :heads, self.length:end] = k
        self.v[layer_idx][:, :heads, self.length:end] = v
        keys = self.k[layer_idx][:, :heads, :end]
        values = self.v[layer_idx][:, :heads, :end]
        return attention(q, keys, values, q_start=self.length)

    def advance(self, num_tokens: int, kv_heads: int | None = None) -> None:
        self.length += num_tokens
        if kv_heads is not None:
            self.valid_kv_heads = min(self.valid_kv_heads, kv_heads)

    def layer_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part of one layer: k, v [b, Hkv_valid, length, hd]."""
        h = self.valid_kv_heads
        return self.k[layer_idx][:, :h, : self.length], self.v[layer_idx][:, :h, : self.length]
