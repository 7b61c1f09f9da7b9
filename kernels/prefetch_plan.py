"""Which weights a decode step's matrix-vector launch asks into L2 for the launches after it.

At a handful of rows a decode step alternates weight reads (the projections) with phases that read almost
nothing from memory: RoPE, attention over a short context, its split merge, the norms. Those phases are bound by
latency, so memory sits idle while they run, and the next projection then starts its own read cold. A *plan*
names, for a launch (its first weight and how many weights it reads), the weights of a later projection; where
``COLM_PREFETCH=2`` and the launch uses PDL, each of its programs, after storing its tile, issues a bulk L2
prefetch of its share of them (``chain_linear_gemv``), and those bytes stream in while the latency-bound phase
runs. ``CoLM.plan_prefetch`` builds the plan of every layer and scale: q|K/V prefetches the output projection
(across RoPE and attention), the down projection the next layer's q|K/V (across the residual add and norm).

A plan entry keeps its weights referenced, so no address in its table is freed while the plan holds it. The table
is a device tensor made once, so a captured graph keeps pointing at live data.
"""

from __future__ import annotations

import torch

_PLANS: dict[tuple[int, int], tuple[torch.Tensor, int, list]] = {}
MAX_RANGES = 8  # a launch's kernel loops over its ranges at compile time


def key(w0: torch.Tensor, count: int) -> tuple[int, int]:
    return (w0.data_ptr(), count)


def add(launch_weights: list[torch.Tensor], later: list[torch.Tensor]) -> None:
    """After a launch reading ``launch_weights`` (in its segment order), prefetch the tensors of ``later``. A
    prefetch is only a hint, so a tensor a bulk prefetch cannot take (not contiguous, not 16-byte aligned or
    not a multiple of 16 bytes) is left out, and so is any beyond the first ``MAX_RANGES``."""
    later = [w for w in later if w.numel() and w.is_contiguous() and w.data_ptr() % 16 == 0
             and (w.numel() * w.element_size()) % 16 == 0][:MAX_RANGES]
    if not launch_weights or not later:
        return
    table = torch.tensor([[w.data_ptr(), w.numel() * w.element_size()] for w in later], dtype=torch.int64,
                         device=later[0].device)  # [R, 2]: address, bytes
    _PLANS[key(launch_weights[0], len(launch_weights))] = (table, len(later), list(later))


def lookup(w0: torch.Tensor, count: int):
    """(table [R, 2] int64 on the device, R) planned after a launch whose first weight is ``w0`` and which reads
    ``count`` weights, or None."""
    hit = _PLANS.get(key(w0, count))
    return None if hit is None else hit[:2]


def clear() -> None:
    _PLANS.clear()
