"""One optimizer step, shared by the training loop and the throughput benchmark.

``TrainModule`` wraps a CoLM so that one ``forward(inputs, targets)`` returns the loss and the
per-scale cross-entropies; FSDP2 wraps this module as its root, so the embedding, final norm and
head are gathered by FSDP's own hooks even though the loss calls ``hidden`` and ``logits``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import nn

from colm.train.losses import chain_losses


class TrainModule(nn.Module):
    def __init__(self, model: nn.Module, loss_kind: str = "final", weights: tuple[float, ...] | None = None,
                 hidden_grad: bool = True, log_all_scales: bool = True) -> None:
        super().__init__()
        self.model = model
        self.loss_kind = loss_kind
        self.weights = weights
        self.hidden_grad = hidden_grad
        self.log_all_scales = log_all_scales

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor):
        # inputs, targets [b, t] -> (loss [], per-scale CE [num_chains]; NaN where not computed)
        loss, per = chain_losses(self.model, inputs, targets, self.loss_kind, self.weights, self.hidden_grad,
                                 all_scales=self.log_all_scales)
        n = self.model.cfg.num_chains
        out = torch.full((n,), float("nan"), device=loss.device)
        for k, v in per.items():
            out[k - 1] = v
        return loss, out


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps, then cosine / linear decay to min_ratio*lr."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return base_lr * (min_ratio + (1 - min_ratio) * shape)


def build_optimizer(params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights and 1-D tensors are not decayed). ``capturable``:
    its step count kept on the GPU, so a CUDA graph can capture ``step()`` (``colm.train.graphed_step``)."""
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("optimizer: no trainable parameters (everything is frozen)")
    # on CUDA the fused AdamW: one pass over each parameter's state instead of a foreach launch per elementwise
    # op (the foreach step was about a quarter of a 1B model's training step's kernel time on an H100)
    fused = all(p.is_cuda for g in groups for p in g["params"])
    if capturable and not fused:
        raise ValueError("optimizer: a capturable AdamW (CUDA graphs) needs every parameter on a CUDA device")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None, capturable=capturable)


def train_step(module: nn.Module, optimizer: torch.optim.Optimizer, batches, grad_clip: float,
               autocast_bf16: bool = False, freezer=None, fsdp: bool = False) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Forward/backward over ``batches`` (a list of (inputs, targets) micro-batches), clip, step.

    Returns (mean loss, mean per-scale CE [n], grad norm before clipping) on this rank.
    """
    accum = len(batches)
    total_loss, total_per = None, None
    for i, (x, y) in enumerate(batches):
        if fsdp and accum > 1:
            module.set_requires_gradient_sync(i == accum - 1)  # reduce-scatter once, on the last micro-step
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast_bf16 else nullcontext()
        with ctx:
            loss, per = module(x, y)
        (loss / accum).backward()
        total_loss = loss.detach() if total_loss is None else total_loss + loss.detach()
        total_per = per.detach() if total_per is None else total_per + per.detach()
    norm = apply_gradients(optimizer, grad_clip, freezer)
    optimizer.zero_grad(set_to_none=True)
    return total_loss / accum, total_per / accum, float(norm)


def apply_gradients(optimizer: torch.optim.Optimizer, grad_clip: float, freezer=None) -> torch.Tensor:
    """After the backward: frozen regions' gradients masked, the norm taken (and clipped to ``grad_clip`` > 0), the
    optimizer's step, frozen regions restored. The gradient norm before clipping, a tensor (no host sync: a CUDA
    graph captures this too, ``colm.train.graphed_step``)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if freezer is not None:
        freezer.mask_grads()
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    optimizer.step()
    if freezer is not None:
        freezer.restore()
    return norm
