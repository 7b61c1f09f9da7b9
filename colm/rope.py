"""Rotary position embeddings (Llama convention: rotate-half), with Llama-3 and linear scaling.

``apply_rope`` / ``apply_rope_qk`` come from ``colm.kernels.rope``: one Triton launch for q and k on
CUDA bf16/fp16 at inference, the plain-PyTorch reference (``apply_rope_ref``) elsewhere.
"""

from __future__ import annotations

import math

import torch

from colm.config import ModelConfig
from colm.kernels.rope import apply_rope, apply_rope_qk, apply_rope_ref, rotate_half

__all__ = ["apply_rope", "apply_rope_qk", "apply_rope_ref", "rope_cos_sin", "rope_inv_freq", "rotate_half"]


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in float32, scaled as ``cfg.rope_scaling`` says."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return inv / s.factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for ``positions`` [b, t] -> each [b, 1, t, head_dim] (broadcast over heads)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)[None, None, :]  # [b, t, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
