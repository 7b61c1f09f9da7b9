"""LoRA on the trainable chains' chain Linears, and merging it back into a plain checkpoint.

``LoRAChainLinear`` wraps a ``ChainLinear``: the base weights stay frozen, and each adapted output
chain i gets ``B_i A_i`` (A_i [r, in_1+..+in_i], B_i [out_i, r], B zero-initialised so training
starts from the base model) added to W_i with scale alpha/r. Chains below ``first_chain`` get no
adapter, so their outputs (and, for CoLM-Air, every K/V, which chain 1 computes) are untouched.

``apply_lora`` swaps the wrappers into a CoLM in place and freezes every other parameter, except,
with ``train_head``, the LM head (the training loop's choice). The head must train: a chain added by
``colm expand`` starts with zero head columns, so no gradient reaches its adapters through a frozen
head (B starts at zero too, so nothing would ever move). The loop's ``ChainFreezer`` keeps the frozen
chains' head columns fixed, so only the trainable chains' columns change. ``merge_lora`` folds
``W_i += (alpha/r) B_i A_i`` and puts the plain ``ChainLinear`` back, so the result saves as an
ordinary colm checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from colm.chain_linear import ChainLinear


class LoRAChainLinear(nn.Module):
    def __init__(self, base: ChainLinear, first_chain: int, rank: int, alpha: float) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"lora rank={rank}: must be > 0")
        self.base = base
        self.first_chain = first_chain
        self.rank = rank
        self.scaling = alpha / rank
        for p in base.parameters():
            p.requires_grad_(False)
        ref = base.weights[0]
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        for i in range(first_chain, base.num_chains):
            out_i, in_i = base.weights[i].shape
            a = torch.empty(rank, in_i, device=ref.device, dtype=ref.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_a[str(i)] = nn.Parameter(a)
            self.lora_b[str(i)] = nn.Parameter(torch.zeros(out_i, rank, device=ref.device, dtype=ref.dtype))

    @property
    def num_chains(self) -> int:
        return self.base.num_chains

    @property
    def weights(self):
        return self.base.weights

    def forward(self, x: torch.Tensor, scale: int | None = None) -> torch.Tensor:
        y = self.base(x, scale)  # [..., out_1 + .. + out_k]
        k = self.base.num_chains if scale is None else scale
        if k <= self.first_chain:
            return y
        deltas = []
        for i in range(self.first_chain, k):
            a, b = self.lora_a[str(i)], self.lora_b[str(i)]
            deltas.append(torch.nn.functional.linear(torch.nn.functional.linear(x[..., : a.shape[1]], a), b))
        lead = self.base.out_prefix[self.first_chain - 1] if self.first_chain else 0
        delta = torch.cat(deltas, dim=-1) * self.scaling  # [..., out_{first+1} + .. + out_k]
        return torch.cat([y[..., :lead], y[..., lead:] + delta], dim=-1)

    def merged(self) -> ChainLinear:
        with torch.no_grad():
            for key, a in self.lora_a.items():
                w = self.base.weights[int(key)]
                w.add_((self.lora_b[key].float() @ a.float() * self.scaling).to(w.dtype))
        for p in self.base.parameters():
            p.requires_grad_(True)
        return self.base


def apply_lora(model: nn.Module, first_chain: int, rank: int, alpha: float,
               targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3"), train_head: bool = False) -> int:
    """Wrap the targeted chain Linears of ``model``; freeze all else (but the LM head with ``train_head``: the
    embedding when tied; the caller keeps the first chains' columns fixed). Returns the number of wrapped layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    if train_head:
        model.head_weight.requires_grad_(True)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, ChainLinear) and child.num_chains > first_chain:
                setattr(module, name, LoRAChainLinear(child, first_chain, rank, alpha))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"lora: no chain Linear named {list(targets)} has chains beyond the first {first_chain}")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and restore plain ``ChainLinear`` modules."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRAChainLinear):
                setattr(module, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (what a LoRA run needs to save besides the base checkpoint)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_a." in k or ".lora_b." in k}
