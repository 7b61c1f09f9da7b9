"""The one place that decides how attention is computed: flash-attn when importable, else torch SDPA.

Inputs follow SDPA's layout; heads must already be ordered so that query head h reads K/V head
``h // (Hq // Hkv)`` (grouped-query attention without materialising repeated K/V).

``COLM_SDPA_BACKENDS`` (e.g. ``cudnn,flash``) sets the order in which SDPA tries its CUDA backends
(names: cudnn, flash, efficient, math); unset, SDPA's own default order applies.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # pragma: no cover - flash-attn is not installed on CPU machines
    if os.environ.get("COLM_DISABLE_FLASH_ATTN"):
        raise ImportError
    from flash_attn import flash_attn_func as _flash_attn_func

    HAS_FLASH_ATTN = True
except ImportError:
    _flash_attn_func = None
    HAS_FLASH_ATTN = False

_BACKEND_NAMES = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "math": "MATH"}


def _sdpa_priority() -> list | None:
    names = [n.strip() for n in os.environ.get("COLM_SDPA_BACKENDS", "").split(",") if n.strip()]
    if not names:
        return None
    from torch.nn.attention import SDPBackend

    bad = [n for n in names if n not in _BACKEND_NAMES]
    if bad:
        raise ValueError(f"COLM_SDPA_BACKENDS: unknown backend(s) {bad}; allowed: {sorted(_BACKEND_NAMES)}")
    return [getattr(SDPBackend, _BACKEND_NAMES[n]) for n in names]


_SDPA_PRIORITY = _sdpa_priority()


def _sdpa(q, k, v, **kw):
    if _SDPA_PRIORITY is None or not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, **kw)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_SDPA_PRIORITY, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int = 0) -> torch.Tensor:
    """Causal attention of queries at positions q_start.. over keys at positions 0..

    q: [b, Hq, t, d]; k, v: [b, Hkv, T, d] with T = q_start + t. Returns [b, Hq, t, d].
    """
    t, T = q.shape[2], k.shape[2]
    if T != q_start + t:
        raise ValueError(f"attention: {T} keys but queries cover positions {q_start}..{q_start + t - 1}")
    if HAS_FLASH_ATTN and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        # flash-attn aligns the causal mask bottom-right, which is what a query offset needs.
        o = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return o.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if t == T:
        return _sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
    if t == 1:
        return _sdpa(q, k, v, enable_gqa=gqa)
    # Query i sits at position q_start + i and sees keys 0..q_start + i.
    mask = torch.ones(t, T, dtype=torch.bool, device=q.device).tril(diagonal=q_start)
    return _sdpa(q, k, v, attn_mask=mask, enable_gqa=gqa)
