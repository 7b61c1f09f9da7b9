"""A whole training step (forward, loss, backward, clipping, AdamW) captured in one CUDA graph and replayed.

A chain model's step issues its operations more slowly than the GPU runs them: on an H100 the 1B {16,16} step
took 166-222 ms for 107 ms of kernels, while the dense model's was GPU-bound (docs/results.md, Training). Captured
once, every later step is a copy of the batch into the graph's input tensors, a learning-rate fill and one replay:
no Python per operation.

Conditions (``graphable`` says which one fails): CUDA, one process (no FSDP: its hooks gather and free parameters
around every layer), one micro-batch per step, the same batch shape every step, and the optimizer built with
``capturable=True`` (``build_optimizer(..., capturable=True)``: the fused AdamW keeping its step count on the GPU).
The learning rate lives in a GPU tensor per parameter group, which ``set_lr`` fills before each replay.

The first ``warmup`` calls run the plain step (``train_step``) on a side stream, as CUDA graph capture wants (lazy
initialisation, cuBLAS workspaces, the chain Linear's tuner and tile tables, Triton's compilation all happen
there); the next call captures the step and replays it for its batch; every call after replays.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from colm.train.step import apply_gradients, train_step


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group's learning rate: filled in place where it is a tensor (a captured step reads that tensor)."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def graphable(optimizer: torch.optim.Optimizer, micro_batches: int, fsdp: bool) -> str | None:
    """Why this step cannot be captured, or None."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not torch.cuda.is_available() or not params or not all(p.is_cuda for p in params):
        return "the parameters are not on a CUDA device"
    if fsdp:
        return "FSDP gathers and frees parameters around each layer"
    if micro_batches != 1:
        return f"{micro_batches} micro-batches per step (gradient accumulation); one is captured"
    if not optimizer.defaults.get("capturable"):
        return "the optimizer was not built capturable (build_optimizer(..., capturable=True))"
    return None


class GraphedTrainStep:
    """``step(batches, grad_clip)`` -> (loss [], per-scale CE [n], grad norm) like ``train_step``, replayed from a
    CUDA graph after ``warmup`` plain steps. ``autocast_bf16`` and ``freezer`` as ``train_step`` takes them."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, autocast_bf16: bool = True,
                 freezer=None, warmup: int = 3) -> None:
        if warmup < 1:
            raise ValueError(f"GraphedTrainStep: warmup={warmup}: at least one plain step must run before capture")
        self.module, self.optimizer, self.freezer = module, optimizer, freezer
        self.autocast_bf16, self.warmup = autocast_bf16, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self._side = torch.cuda.Stream()
        self._x = self._y = self._loss = self._per = self._norm = None
        self._shape = None
        self._clip = None
        device = next(p for g in optimizer.param_groups for p in g["params"]).device
        for g in optimizer.param_groups:  # a tensor the captured step reads, on the parameters' device
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)

    def __call__(self, batches, grad_clip: float):
        self.calls += 1
        if self.calls <= self.warmup:
            self._side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._side):
                out = train_step(self.module, self.optimizer, batches, grad_clip, autocast_bf16=self.autocast_bf16,
                                 freezer=self.freezer)
            torch.cuda.current_stream().wait_stream(self._side)
            return out
        (x, y), = batches
        if self.graph is None:
            self._capture(x, y, grad_clip)
        elif (tuple(x.shape), tuple(y.shape)) != self._shape or grad_clip != self._clip:
            raise ValueError(f"GraphedTrainStep: the step was captured for batches of {list(self._shape[0])} tokens "
                             f"and grad_clip={self._clip}; got {list(x.shape)} and grad_clip={grad_clip}")
        self._x.copy_(x, non_blocking=True)
        self._y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self._loss.clone(), self._per.clone(), float(self._norm)

    def _capture(self, x: torch.Tensor, y: torch.Tensor, grad_clip: float) -> None:
        self._shape, self._clip = (tuple(x.shape), tuple(y.shape)), grad_clip
        self._x, self._y = torch.empty_like(x), torch.empty_like(y)
        # gradients allocated inside the capture (from its pool): every replay writes the same tensors, and
        # nothing may set them to None from here on
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # no autocast cast cache in a capture: the casts are made (and recorded) where each Linear runs
        ctx = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if self.autocast_bf16
               else nullcontext())
        with torch.cuda.graph(graph):
            with ctx:
                loss, per = self.module(self._x, self._y)
            loss.backward()
            norm = apply_gradients(self.optimizer, grad_clip, self.freezer)
        self.graph = graph
        self._loss, self._per, self._norm = loss.detach(), per.detach(), norm.detach()
