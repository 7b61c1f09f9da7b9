"""One chunk of a chain-1 prefill: embedding, RoPE and every layer's K/V, eager or inside a CUDA graph.

``prefill_chunk(model, tokens, c0, store)`` runs positions ``c0 .. c0+t-1`` of a right-padded batch
(tokens [b, t]). After each layer's K/V projection it calls ``store(layer, k, v)`` (k, v [b, Hkv, t, hd])
and attends over what ``store`` returns: the keys and values of positions ``0 .. c0+t-1`` (the engine's
chunked path keeps earlier chunks' K/V in full-length buffers and streams each chunk to the sinks; the
graphed path keeps this chunk's K/V as the graph's outputs). The last layer's attention and FFN are
skipped: its output feeds nothing a prefill needs.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from colm.attention_backend import attention
from colm.model import CoLM
from colm.rope import rope_cos_sin

Store = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def prefill_chunk(model: CoLM, tokens: torch.Tensor, c0: int, store: Store) -> None:
    cfg = model.cfg
    b, t = tokens.shape
    group = cfg.n_heads // cfg.n_kv_heads
    x = F.embedding(tokens, model.embed.weight)  # [b, t, D_1]
    positions = torch.arange(c0, c0 + t, device=tokens.device).expand(b, t)
    cos, sin = rope_cos_sin(model.inv_freq, positions, x.dtype)
    last = cfg.n_layers - 1
    for li, layer in enumerate(model.layers):
        q, k, v = layer.attn.project_qkv(layer.attn_norm(x), 1, cos, sin)  # [b, H, t, hd]
        keys, values = store(li, k, v)  # [b, Hkv, c0 + t, hd]
        if li == last:
            break
        o = chunk_attention(q, keys, values, c0, group)
        x, h = layer.ffn_norm.add_forward(x, layer.attn.wo(o.transpose(1, 2).reshape(b, t, -1), 1))
        x = x + layer.ffn(h, 1)


def chunk_attention(q, k, v, q_start: int, group: int) -> torch.Tensor:
    """Causal attention of a chunk's queries (positions q_start..) over keys 0..; q [b, Hq, t, hd], k/v [b, Hkv, T, hd]."""
    if q_start == 0:
        return attention(q, k, v, q_start=0)
    # Lower-right causal bias keeps SDPA on its fused kernels (no [t, T] mask tensor); K/V heads are
    # expanded because the fused paths do not all take grouped queries.
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))
