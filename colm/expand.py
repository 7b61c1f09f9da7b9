"""Chain expansion (paper §4.2): a trained model becomes chain 1..n of a wider model with a new chain.

Every tensor of the old model is a leading slice of the same-named tensor of the new one (chain
Linear weights of old chains unchanged, embedding/head/norm columns of old chains), so expansion
copies each old tensor into the leading corner and initialises the rest: new chain weights and new
embedding columns ~ N(0, std), new norm weights 1, and the new chain's LM-head columns 0 so the
full-scale logits start equal to the original model's. A tied model is untied (the head becomes a
copy of the embedding), as in the paper's 1.93B expanded Llama-3.2-1B.

The new chain has at most as many heads as the whole source (the paper adds 8 to Llama-3.2-1B's 32), so one
expansion at most doubles the width and a larger model comes from expanding again; a mistyped head count is refused
instead of asking the allocator for terabytes.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from colm.config import ModelConfig
from colm.model import CoLM


def expanded_config(cfg: ModelConfig, add_heads: int, kv_sharing: bool | None = None) -> ModelConfig:
    """Config after adding a chain of ``add_heads`` heads (ffn and K/V heads grow in proportion)."""
    if isinstance(add_heads, bool) or not isinstance(add_heads, int) or add_heads <= 0:
        raise ValueError(f"add_chain={add_heads!r}: must be a positive head count")
    if add_heads > cfg.n_heads:
        raise ValueError(f"add_chain={add_heads}: at most the source's n_heads={cfg.n_heads}, so that an expansion "
                         "at most doubles the model's width (expand again to grow further)")
    air = cfg.kv_sharing if kv_sharing is None else kv_sharing
    if cfg.num_chains > 1 and air != cfg.kv_sharing:
        raise ValueError(
            f"kv_sharing={air} differs from the source's kv_sharing={cfg.kv_sharing}: only a one-chain model "
            "can change K/V mode on expansion (chains 2.. of the source would lose or gain their K/V)")
    if (cfg.ffn_hidden * add_heads) % cfg.n_heads:
        raise ValueError(f"add_chain={add_heads}: ffn_hidden={cfg.ffn_hidden} x {add_heads} / n_heads={cfg.n_heads} "
                         "is not a whole number of hidden units")
    if air:
        n_kv = cfg.n_kv_heads
    else:
        if (cfg.n_kv_heads * add_heads) % cfg.n_heads:
            raise ValueError(f"add_chain={add_heads}: with n_kv_heads={cfg.n_kv_heads} and n_heads={cfg.n_heads} "
                             "the new chain would own a fractional number of K/V heads")
        n_kv = cfg.n_kv_heads * (cfg.n_heads + add_heads) // cfg.n_heads
    return dataclasses.replace(
        cfg, chains=cfg.chains + (add_heads,), n_heads=cfg.n_heads + add_heads, n_kv_heads=n_kv,
        dim=cfg.dim + add_heads * cfg.head_dim, ffn_hidden=cfg.ffn_hidden + cfg.ffn_hidden * add_heads // cfg.n_heads,
        kv_sharing=air, tie_embeddings=False,
    )


def check_std(std: float) -> None:
    """ValueError unless ``std`` (the new chain's init std) is a finite number >= 0: NaN or inf would be written
    into every new weight, and the full-scale model would emit garbage."""
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise ValueError(f"std={std!r}: the new chain's init std must be a finite number >= 0")


@torch.no_grad()
def expand(model: CoLM, add_heads: int, kv_sharing: bool | None = None, std: float = 0.02,
           seed: int = 0) -> CoLM:
    """Return a new model: ``model`` as the first chains plus one new chain of ``add_heads`` heads."""
    check_std(std)
    new_cfg = expanded_config(model.cfg, add_heads, kv_sharing)
    dtype = next(model.parameters()).dtype
    new = CoLM(new_cfg, dtype=dtype)
    old_state = dict(model.state_dict())
    if model.cfg.tie_embeddings:
        old_state["head.weight"] = old_state["embed.weight"]
    gen = torch.Generator().manual_seed(seed)
    for name, t in new.state_dict().items():
        if name.endswith("norm.weight"):
            t.fill_(1.0)
        elif name == "head.weight":
            t.zero_()
        else:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std)
        old = old_state.get(name)
        if old is not None:
            if old.dim() != t.dim() or any(o > n for o, n in zip(old.shape, t.shape)):
                raise ValueError(f"expand: {name} of shape {tuple(old.shape)} does not fit {tuple(t.shape)}")
            t[tuple(slice(0, s) for s in old.shape)] = old
    return new
