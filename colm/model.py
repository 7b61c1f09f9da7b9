"""The CoLM / CoLM-Air causal language model (Llama architecture with chains).

``model(tokens, scale=k)`` runs the scale-k sub-model: the embedding's first k chains' columns, every
chain Linear with its first k weights, per-chain norms of the first k chains and the LM head's first
k chains' columns. Nothing of chains > k is read or computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from colm.attention import ChainAttention
from colm.config import ModelConfig
from colm.ffn import ChainFFN
from colm.norm import ChainRMSNorm
from colm.rope import rope_cos_sin, rope_inv_freq


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, device=None, dtype=None) -> None:
        super().__init__()
        self.attn_norm = ChainRMSNorm(cfg.chain_dims, cfg.norm_eps, device=device, dtype=dtype)
        self.attn = ChainAttention(cfg, layer_idx, device=device, dtype=dtype)
        self.ffn_norm = ChainRMSNorm(cfg.chain_dims, cfg.norm_eps, device=device, dtype=dtype)
        self.ffn = ChainFFN(cfg, device=device, dtype=dtype)

    def forward(self, x, scale, cos, sin, cache=None, q_start=0, pending=None):
        """x [b, t, D_k]: the residual stream; ``pending``: the previous block's FFN output, not yet added
        (None for the first block). Returns (stream, this block's FFN output): each residual add runs in
        one kernel with the norm after it on CUDA (the same roundings as add, then norm)."""
        if pending is None:
            a = self.attn_norm(x)
        else:
            x, a = self.attn_norm.add_forward(x, pending)
        x, h = self.ffn_norm.add_forward(x, self.attn(a, scale, cos, sin, cache, q_start))
        return x, self.ffn(h, scale)


class CoLM(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, i, device=device, dtype=dtype) for i in range(cfg.n_layers))
        self.norm = ChainRMSNorm(cfg.chain_dims, cfg.norm_eps, device=device, dtype=dtype)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(device=device), persistent=False)
        self.gradient_checkpointing = False

    def reset_parameters(self, std: float = 0.02, seed: int | None = None) -> "CoLM":
        """Llama-style init: normal(0, std) weights, unit norms. Deterministic when ``seed`` is given."""
        gen_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    nn.init.ones_(p)
                else:
                    nn.init.normal_(p, std=std)
        finally:
            if seed is not None:
                torch.random.set_rng_state(gen_state)
        self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return self

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight  # [V, D]

    def hidden(self, tokens: torch.Tensor, scale: int | None = None, cache=None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [b, t, D_k] of the scale-k sub-model."""
        scale = self.cfg.check_scale(scale)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        b, t = tokens.shape
        q_start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(q_start, q_start + t, device=tokens.device).expand(b, t)
        if q_start + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {q_start + t} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        d = self.cfg.scale_dim(scale)
        x = F.embedding(tokens, self.embed.weight[:, :d])  # [b, t, D_k]
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        pending = None  # the last block's FFN output: added to the stream by the next norm's kernel
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x, pending = torch.utils.checkpoint.checkpoint(layer, x, scale, cos, sin, None, q_start, pending,
                                                               use_reentrant=False)
            else:
                x, pending = layer(x, scale, cos, sin, cache, q_start, pending)
        if cache is not None:
            cache.advance(t, self.cfg.scale_kv_heads(scale))
        return self.norm(x) if pending is None else self.norm.add_forward(x, pending)[1]

    def fuse_kv_projections(self) -> "CoLM":
        """Inference engines: every layer's K and V projections as one GEMM (CoLM-Air; see ChainAttention.fuse_kv)."""
        for layer in self.layers:
            layer.attn.fuse_kv()
        return self

    def fuse_projections(self) -> "CoLM":
        """Inference engines: the K/V fusion above (CoLM-Air), plus, at decode's few rows, q with K and V and the
        FFN's gate with its up as one launch each (``colm.kernels.fused_linear``). Weights are not copied."""
        for layer in self.layers:
            layer.attn.fuse_projections()
            layer.ffn.fuse_gate_up()
        return self

    def logits(self, hidden: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """Scale-k logits from hidden states of any scale >= k: the head's first k chains' columns."""
        scale = self.cfg.check_scale(scale)
        d = self.cfg.scale_dim(scale)
        return F.linear(hidden[..., :d], self.head_weight[:, :d])  # [b, t, V]

    def forward(self, tokens: torch.Tensor, scale: int | None = None, cache=None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden(tokens, scale, cache, positions), scale)
