"""Chain-1 prefill forwards: embedding, RoPE and every layer's K/V, eager or inside a CUDA graph.

``chain1_layers(model, x, cos, sin, attend)`` is the layer loop every chain-1 prefill shares: after each
layer's K/V projection it calls ``attend(layer, q, k, v, last)``, which keeps the K/V where its caller
needs them and returns the attention output (None on the last layer: its attention and FFN feed
nothing a prefill needs, so they are skipped). ``model`` may be the chain-1 sub-model (the prefill
worker) or the full model (the decode engine's colocated prefill): only chain 1 is read either way.

``prefill_chunk(model, tokens, c0, store)`` runs positions ``c0 .. c0+t-1`` of a right-padded batch
(tokens [b, t]). ``store(layer, k, v)`` (k, v [b, Hkv, t, hd]) returns the keys and values of
positions ``0 .. c0+t-1`` (the engine's chunked path keeps earlier chunks' K/V in full-length buffers
and streams each chunk to the sinks; the graphed path keeps this chunk's K/V as the graph's outputs).

``scale_layers(model, tokens, positions, scale, attend)`` runs a wider sub-model's blocks instead (the colocated
baseline's full-model prefill: the same K/V in CoLM-Air, at a dense model's cost).
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
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, bool], "torch.Tensor | None"]


def chain1_embed(model: CoLM, tokens: torch.Tensor, positions: torch.Tensor):
    """x [b, t, D_1] and RoPE's cos, sin for tokens [b, t] at positions [b, t]."""
    x = F.embedding(tokens, model.embed.weight[:, : model.cfg.scale_dim(1)])
    cos, sin = rope_cos_sin(model.inv_freq, positions, x.dtype)
    return x, cos, sin


def chain1_layers(model: CoLM, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> None:
    b, t, _ = x.shape
    last = model.cfg.n_layers - 1
    for li, layer in enumerate(model.layers):
        q, k, v = layer.attn.project_qkv(layer.attn_norm(x), 1, cos, sin)  # [b, H, t, hd]
        o = attend(li, q, k, v, li == last)  # [b, Hq, t, hd]
        if o is None:
            return
        x, h = layer.ffn_norm.add_forward(x, layer.attn.wo(o.transpose(1, 2).reshape(b, t, -1), 1))
        x = x + layer.ffn(h, 1)


def scale_layers(model: CoLM, tokens: torch.Tensor, positions: torch.Tensor, scale: int,
                 attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """The scale-``scale`` sub-model's blocks over tokens [b, t] at positions [b, t], each layer's attention done by
    ``attend(layer, q, k, v)`` (q in the blocks' own query head order; k, v with RoPE): a prefill at a wider scale than
    chain 1 (the same K/V in CoLM-Air, at a dense model's cost). Nothing is skipped."""
    x = F.embedding(tokens, model.embed.weight[:, : model.cfg.scale_dim(scale)])  # [b, t, D_k]
    cos, sin = rope_cos_sin(model.inv_freq, positions, x.dtype)
    cache, pending = _AttendCache(attend), None
    for layer in model.layers:
        x, pending = layer(x, scale, cos, sin, cache, 0, pending)


class _AttendCache:
    """The model's cache protocol over an ``attend`` function; positions are explicit, nothing to track."""

    length = 0

    def __init__(self, attend) -> None:
        self.attend = attend

    def advance(self, num_tokens: int, kv_heads: int | None = None) -> None:
        """Nothing to track."""


def prefill_chunk(model: CoLM, tokens: torch.Tensor, c0: int, store: Store) -> None:
    b, t = tokens.shape
    positions = torch.arange(c0, c0 + t, device=tokens.device).expand(b, t)
    x, cos, sin = chain1_embed(model, tokens, positions)

    def attend(li, q, k, v, last):
        keys, values = store(li, k, v)  # [b, Hkv, c0 + t, hd]
        return None if last else chunk_attention(q, keys, values, c0, q.shape[1] // k.shape[1])

    chain1_layers(model, x, cos, sin, attend)


def chunk_attention(q, k, v, q_start: int, group: int) -> torch.Tensor:
    """Causal attention of a chunk's queries (positions q_start..) over keys 0..; q [b, Hq, t, hd], k/v [b, Hkv, T, hd]."""
    if q_start == 0:
        return attention(q, k, v, q_start=0)
    # Lower-right causal bias keeps SDPA on its fused kernels (no [t, T] mask tensor); K/V heads are
    # expanded because the fused paths do not all take grouped queries.
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))
