"""Freezing chains (expansion training, chain tuning) and the backbone (stage 2 of the recipe).

A chain's own Linear weights (``...weights.{i}``, and LoRA adapters ``...lora_a.{i}``/``lora_b.{i}``) are
whole tensors: a frozen chain's get ``requires_grad=False`` and are left out of the optimizer, so they
carry no gradient and no optimizer state (a LoRA run's base weights are frozen already). The embedding,
the norms and the LM head are single tensors shared by all chains; a frozen chain owns a column
slice of them (rows of the 1-D norm weights). For those, ``ChainFreezer`` zeroes the slice of the
gradient before clipping and restores the slice after each optimizer step from a snapshot, so the
frozen parts are bit-identical whatever the optimizer does (weight decay included).

Works on plain tensors and on FSDP2 DTensors (sharded on dim 0): slices are mapped onto the local
shard.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_CHAIN_WEIGHT = re.compile(r"\.(?:weights|lora_a|lora_b)\.(\d+)$")


def chain_of_parameter(name: str) -> int | None:
    """0-based chain of a chain Linear weight (``...weights.{i}``) or LoRA adapter (``...lora_a.{i}``), else None."""
    m = _CHAIN_WEIGHT.search(name)
    return int(m.group(1)) if m else None


def _local(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Local tensor and its global offset (FSDP2 shards are DTensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        DTensor = ()
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t._local_tensor, tuple(offset)
    return t, (0,) * t.dim()


def _frozen_region(t: torch.Tensor, width: int) -> torch.Tensor | None:
    """View of the local part of columns [0, width) (last dim) of a shared tensor, or None if empty."""
    local, offset = _local(t)
    if local.dim() == 1:  # norm weight [D], maybe sharded: global rows [offset, offset + n)
        lo, hi = offset[0], offset[0] + local.shape[0]
        end = min(width, hi) - lo
        return local[:end] if end > 0 else None
    return local[..., :width]  # embed/head [V, D] are sharded on V, columns are whole


class ChainFreezer:
    """Freeze the first ``num_frozen`` chains of a CoLM (``freeze_backbone`` for the heads stage)."""

    def __init__(self, model: nn.Module, num_frozen: int = 0, freeze_backbone: bool = False) -> None:
        cfg = model.cfg
        if not 0 <= num_frozen <= cfg.num_chains:
            raise ValueError(f"freeze_chains={num_frozen}: must be in 0..{cfg.num_chains}")
        if num_frozen == cfg.num_chains:
            raise ValueError(f"freeze_chains={num_frozen}: freezing every chain leaves nothing to train")
        self.model = model
        self.num_frozen = num_frozen
        self.width = cfg.scale_dim(num_frozen) if num_frozen else 0
        self.shared: list[tuple[str, nn.Parameter]] = []
        head_name = "embed.weight" if cfg.tie_embeddings else "head.weight"
        for name, p in model.named_parameters():
            chain = chain_of_parameter(name)
            if freeze_backbone and name != head_name:
                p.requires_grad_(False)
            elif chain is not None:
                if chain < num_frozen:
                    p.requires_grad_(False)
            elif num_frozen and p.requires_grad:
                self.shared.append((name, p))
        self._snapshot: list[torch.Tensor | None] = []

    def snapshot(self) -> None:
        """Remember the frozen slices (call once the parameters are in their final placement).

        FSDP2 replaces parameters by sharded ones, so they are looked up again by name here.
        """
        current = dict(self.model.named_parameters())
        self.shared = [(name, current[name]) for name, _ in self.shared]
        with torch.no_grad():
            self._snapshot = [None if (r := _frozen_region(p, self.width)) is None else r.clone() for _, p in self.shared]

    def mask_grads(self) -> None:
        with torch.no_grad():
            for _, p in self.shared:
                if p.grad is not None and (r := _frozen_region(p.grad, self.width)) is not None:
                    r.zero_()

    def restore(self) -> None:
        with torch.no_grad():
            for (_, p), saved in zip(self.shared, self._snapshot):
                if saved is not None:
                    _frozen_region(p, self.width).copy_(saved)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
