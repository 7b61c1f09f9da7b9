"""Chain Linear: y_i = W_i x_{<=i} + b_i for output chain i (paper eq. 1).

Parameter layout (shared by the model, the checkpoint format and the Triton kernel):
a chain Linear over n chains holds n separate weight tensors, one per *output* chain,

    W_i : [out_i, in_1 + ... + in_i]      (row-major, contiguous)
    b_i : [out_i]                          (optional)

so the block lower-triangular matrix is never stored densely, chain i's parameters are one tensor
(freezing chain i = freezing W_i, b_i), and a scale-k forward simply uses W_1..W_k.

Activations at scale k are sized for the scale: x is ``[..., in_1 + ... + in_k]`` and the result is
``[..., out_1 + ... + out_k]``; nothing of chains > k is computed.
"""

from __future__ import annotations

from typing import Sequence

import torch


def chain_linear_ref(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """Plain PyTorch chain Linear: one GEMM per output chain on the input prefix it may read."""
    outs = []
    for i, w in enumerate(weights):
        # w: [out_i, in_prefix_i]; x[..., :in_prefix_i] is the part chain i may see.
        y = torch.nn.functional.linear(x[..., : w.shape[1]], w, None if biases is None else biases[i])
        outs.append(y)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def check_chain_linear_args(x: torch.Tensor, weights: Sequence[torch.Tensor], biases) -> None:
    """Validate the layout above; raise ValueError naming the offending tensor."""
    if not weights:
        raise ValueError("chain_linear: weights is empty (need at least one chain)")
    prev = 0
    for i, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"chain_linear: weights[{i}] must be 2-D [out_i, in_prefix_i], got {tuple(w.shape)}")
        if w.shape[1] <= prev:
            raise ValueError(
                f"chain_linear: weights[{i}] reads {w.shape[1]} input features, which must exceed "
                f"weights[{i - 1}]'s {prev} (input prefixes grow with the chain)"
            )
        prev = w.shape[1]
        if biases is not None and tuple(biases[i].shape) != (w.shape[0],):
            raise ValueError(f"chain_linear: biases[{i}] has shape {tuple(biases[i].shape)}, expected ({w.shape[0]},)")
    if x.shape[-1] != prev:
        raise ValueError(f"chain_linear: input has {x.shape[-1]} features, the active chains read {prev}")


def _triton_available(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    try:
        from colm.kernels import chain_linear_triton  # noqa: F401
    except ImportError:
        return False
    return True


def chain_linear(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """Chain Linear with the fastest available implementation (Triton on CUDA, else the reference)."""
    if len(weights) > 1 and _triton_available(x):
        from colm.kernels.chain_linear_triton import chain_linear_triton

        return chain_linear_triton(x, weights, biases)
    return chain_linear_ref(x, weights, biases)
