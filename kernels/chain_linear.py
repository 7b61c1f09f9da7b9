"""Chain Linear: y_i = W_i x_{<=i} + b_i for output chain i (paper eq. 1), reference and Triton kernels.

Parameter layout (shared by the model, the checkpoint format and the Triton kernel):
a chain Linear over n chains holds n separate weight tensors, one per *output* chain,

    W_i : [out_i, in_1 + ... + in_i]      (row-major, contiguous)
    b_i : [out_i]                          (optional)

so the block lower-triangular matrix is never stored densely, chain i's parameters are one tensor
(freezing chain i = freezing W_i, b_i), and a scale-k forward simply uses W_1..W_k.

Activations at scale k are sized for the scale: x is ``[..., in_1 + ... + in_k]`` and the result is
``[..., out_1 + ... + out_k]``; nothing of chains > k is computed.

GPU path (``chain_linear_triton``, an autograd Function) does only the nonzero blocks' work, one
launch per pass:

* forward  y[:, O_i + n] = x[:, :P_i] @ W_i[n, :]ᵀ      a tile of output chain i runs its K-loop to P_i
* input grad dx[:, c]   = Σ_{i ≥ j} dy_i @ W_i[:, c]   a tile of input chain j loops over chains ≥ j
* weight grad dW_i      = dy_iᵀ @ x[:, :P_i]            only tiles inside each W_i exist

The separate W_i are reached through element offsets from W_1's address, stored in small int64 tile
tables built on the host (cached); tiles are ordered longest-K-loop first (the staircase's tall end)
so the block scheduler packs the short tiles into the tail. Block sizes are tuned per shape
(``colm.kernels._tuning``); the forward's candidates also hold two Hopper variants, which live in
``chain_linear_hopper`` (a persistent kernel, one program per SM whose tiles' K steps form one flat loop,
and one with TMA descriptor loads and stores, aligned layouts on sm_90+ only), and for at most 8 rows
the CUDA-core matrix-vector kernel of ``chain_linear_gemv``. ``COLM_CHAIN_LINEAR=ref`` forces the
reference everywhere (the naive per-chain baseline).

This module holds the entry points: ``chain_linear`` (the dispatcher), ``chain_linear_ref``, the checking
wrapper ``chain_linear_triton`` and the autocast path. The rest lives beside it and is re-exported here:
``chain_linear_tables`` (configs, tile tables, launch helpers), ``chain_linear_jit`` (shared jit helpers),
``chain_linear_fwd`` / ``chain_linear_bwd`` (the kernels and their launchers), ``chain_linear_autograd``
(the autograd Functions). Patch a kernel or launcher where it lives: its callers look it up there.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from colm.kernels import chain_linear_gemv as _gemv
from colm.kernels.chain_linear_autograd import ChainLinearFunction, _as_rows, _PackCast
from colm.kernels.chain_linear_bwd import chain_linear_backward_input, chain_linear_backward_weight
from colm.kernels.chain_linear_fwd import chain_linear_forward
from colm.kernels.chain_linear_jit import HAS_TRITON
from colm.kernels.chain_linear_tables import (BWD_INPUT_CONFIGS, BWD_WEIGHT_CONFIGS, FWD_CONFIGS, FWD_SMALL_M_CONFIGS,
                                              GROUP_N, INTERPRETER_CONFIG, PER_CHAIN_CUBLAS, SMALL_M, _TABLES,
                                              GemmConfig, _aligned, _bwd_input_tables, _bwd_weight_table,
                                              _elem_offset, _fwd_table, _Layout, _layout, _pick, _rel_offsets,
                                              _shape_key, _table, _upcast, fwd_flags, fwd_tile_rows)

# Every name this module held before it was split stays importable from here (tests, benchmarks and
# ``fused_linear`` reach some of the private ones); the objects are the ones their home modules use.
__all__ = [
    "chain_linear", "chain_linear_ref", "chain_linear_triton", "chain_linear_autocast", "check_chain_linear_args",
    "needs_grad", "HAS_TRITON", "_use_triton", "_few_rows_inference", "_autocast_dtype",
    "GemmConfig", "FWD_CONFIGS", "FWD_SMALL_M_CONFIGS", "SMALL_M", "BWD_INPUT_CONFIGS", "BWD_WEIGHT_CONFIGS",
    "INTERPRETER_CONFIG", "PER_CHAIN_CUBLAS", "_TABLES", "GROUP_N", "_table", "_rel_offsets", "_elem_offset",
    "_Layout", "_layout", "_aligned", "fwd_tile_rows", "_fwd_table", "_bwd_input_tables", "_bwd_weight_table",
    "_shape_key", "_upcast", "_pick", "fwd_flags",
    "chain_linear_forward", "chain_linear_backward_input", "chain_linear_backward_weight",
    "ChainLinearFunction", "_PackCast", "_as_rows", "_gemv",
]

if HAS_TRITON:
    from colm.kernels.chain_linear_bwd import _chain_bwd_input_kernel, _chain_bwd_weight_kernel
    from colm.kernels.chain_linear_fwd import _chain_fwd_kernel
    from colm.kernels.chain_linear_jit import (_chunk_dot, _fwd_tile_row, _grouped_tile, _load_dot, _store_tile,
                                               _with_bias)

    __all__ += ["_grouped_tile", "_load_dot", "_fwd_tile_row", "_with_bias", "_store_tile", "_chunk_dot",
                "_chain_fwd_kernel", "_chain_bwd_input_kernel", "_chain_bwd_weight_kernel"]


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
    if biases is not None and len(biases) != len(weights):
        raise ValueError(f"chain_linear: {len(biases)} biases for {len(weights)} weights")
    if x.shape[-1] != prev:
        raise ValueError(f"chain_linear: input has {x.shape[-1]} features, the active chains read {prev}")


def _use_triton(x: torch.Tensor, weights, biases) -> bool:
    if not (HAS_TRITON and x.is_cuda) or os.environ.get("COLM_CHAIN_LINEAR", "") == "ref":
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled():
        return False
    tensors = list(weights) + (list(biases) if biases is not None else [])
    return all(t.dtype == x.dtype and t.device == x.device for t in tensors)


def needs_grad(x: torch.Tensor, weights) -> bool:
    """Whether autograd records a Linear of ``x`` by ``weights`` here."""
    return torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))


def _few_rows_inference(x: torch.Tensor, weights) -> bool:
    return x.numel() <= _gemv.MAX_ROWS * x.shape[-1] and _fused.enabled() and not needs_grad(x, weights)


def chain_linear(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """Chain Linear with the fastest available implementation (Triton on CUDA, else the reference).

    One chain is a plain Linear (cuBLAS through the reference) except at decode's few rows without
    autograd, where the tuner weighs the matrix-vector kernel against cuBLAS (cuBLAS' one-row GEMV ran at
    a tenth of the copy rate on 2 MB weights). Under CUDA autocast to a half type the kernel runs on the
    inputs cast as autocast would cast them for a Linear (``chain_linear_autocast``): the per-chain reference
    there paid its input gradient as a zero-filled full-width tensor per chain, summed (1.7x the kernel's time
    on the 1B attention shape, bench/results/chain_linear_h100_2026-11-23.json). fp32 inputs without autocast
    and mixed dtypes take the reference.
    """
    if (len(weights) > 1 or _few_rows_inference(x, weights)) and _use_triton(x, weights, biases):
        return chain_linear_triton(x, weights, biases)
    dtype = _autocast_dtype(x)
    if dtype is not None and len(weights) > 1 and all(t.is_cuda for t in weights):
        return chain_linear_autocast(x, weights, biases, dtype)
    return chain_linear_ref(x, weights, biases)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The half dtype CUDA autocast runs a Linear of ``x`` in, or None (no autocast, no kernel, or forced ref)."""
    if not (HAS_TRITON and x.is_cuda and torch.is_autocast_enabled("cuda")):
        return None
    if os.environ.get("COLM_CHAIN_LINEAR", "") == "ref":
        return None
    dtype = torch.get_autocast_dtype("cuda")
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def chain_linear_autocast(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None,
                          dtype: torch.dtype) -> torch.Tensor:
    """The Triton chain Linear as autocast runs a Linear: ``x``, weights and biases cast to ``dtype`` (casts that
    autograd differentiates, so fp32 master weights get fp32 gradients), the kernel with autocast off."""
    def cast(t):
        return t if t.dtype == dtype else t.to(dtype)

    with torch.autocast(x.device.type, enabled=False):
        if any(w.dtype != dtype for w in weights):
            weights = _PackCast.apply(dtype, *weights)
        return chain_linear_triton(cast(x), list(weights), None if biases is None else [cast(b) for b in biases])


def chain_linear_triton(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None,
    configs: dict[str, GemmConfig] | None = None,
) -> torch.Tensor:
    """Triton chain Linear (autograd-aware). ``configs`` may pin {"fwd","bwd_i","bwd_w"} block configs."""
    if not HAS_TRITON:
        raise RuntimeError("chain_linear_triton needs triton")
    check_chain_linear_args(x, weights, biases)
    for i, w in enumerate(weights):
        if not w.is_contiguous():
            raise ValueError(f"chain_linear: weights[{i}] must be contiguous, got strides {w.stride()}")
        if w.dtype != x.dtype:
            raise ValueError(f"chain_linear: weights[{i}] is {w.dtype}, input is {x.dtype}")
    if biases is not None and not all(b.is_contiguous() and b.dtype == x.dtype for b in biases):
        raise ValueError("chain_linear: biases must be contiguous and of the input's dtype")
    params = list(weights) + (list(biases) if biases is not None else [])
    return ChainLinearFunction.apply(x, len(weights), biases is not None, configs or {}, *params)


# At the end: the fused launches' module reads this one's names when it is imported.
from colm.kernels import fused_linear as _fused  # noqa: E402
