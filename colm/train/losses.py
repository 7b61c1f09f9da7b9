"""Training losses from one forward: final-scale cross-entropy and the paper's multi-chain loss.

The multi-chain loss (paper §3.4) is ``sum_k w_k * CE(W^k x_{<=k})``: the scale-k logits use the
first k chains of the final hidden state and the first k chains' columns of the head. By chain
causality the first k chains of the full model's hidden state equal the scale-k sub-model's, so
every scale's loss comes from the same backbone forward; only the head products are repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # logits [b, t, V] (any dtype) -> mean CE in float32 over all b*t tokens
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def resolve_weights(num_scales: int, weights: tuple[float, ...] | None) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * num_scales
    if len(weights) != num_scales:
        raise ValueError(f"loss.weights has {len(weights)} entries, the model has {num_scales} scales")
    return tuple(weights)


def chain_losses(model, inputs: torch.Tensor, targets: torch.Tensor, kind: str = "final",
                 weights: tuple[float, ...] | None = None, hidden_grad: bool = True, all_scales: bool = True):
    """Return (loss to backpropagate, {scale: CE float tensor}) for every scale of ``model``.

    ``kind='final'``: the loss is the full scale's CE; the smaller scales' CE are computed without
    gradient, for logging. ``kind='multi_chain'``: weighted sum over scales. ``hidden_grad=False``
    (stage 2 of the two-stage recipe) runs the backbone without autograd so only the head trains.
    ``all_scales=False`` skips the logging-only CE of the smaller scales in ``final`` mode.
    """
    n = model.cfg.num_chains
    if hidden_grad:
        hidden = model.hidden(inputs)  # [b, t, D]
    else:
        with torch.no_grad():
            hidden = model.hidden(inputs)
    per_scale: dict[int, torch.Tensor] = {}
    if kind == "final":
        loss = cross_entropy(model.logits(hidden, n), targets)
        per_scale[n] = loss.detach()
        with torch.no_grad():
            for k in range(1, n if all_scales else 1):
                per_scale[k] = cross_entropy(model.logits(hidden.detach(), k), targets)
        return loss, dict(sorted(per_scale.items()))
    if kind != "multi_chain":
        raise ValueError(f"loss kind={kind!r}: allowed are 'final' and 'multi_chain'")
    w = resolve_weights(n, weights)
    loss = hidden.new_zeros((), dtype=torch.float32)
    for k in range(1, n + 1):
        if w[k - 1] == 0:
            with torch.no_grad():
                per_scale[k] = cross_entropy(model.logits(hidden.detach(), k), targets)
            continue
        ce = cross_entropy(model.logits(hidden, k), targets)
        per_scale[k] = ce.detach()
        loss = loss + w[k - 1] * ce
    return loss, per_scale
