"""Chain RMSNorm (paper §3.2.3) as one Triton kernel, beside its plain-PyTorch reference.

``x [..., width]`` with ``width = d_1 + ... + d_k`` (the active scale's chain boundary): each chain's
features are normalised separately in float32, the result is cast to the input dtype, then multiplied
by ``weight[:width]`` in the input dtype (an fp32 multiply rounded once, as torch does for bf16/fp16).
The eager reference is ~8 kernels (float, pow, mean, add, rsqrt, mul, to, mul; 5 per chain plus a
cat for unequal chains); the Triton path is one launch, one program per row.

Rounding: the kernel reproduces every rounding of the reference; only the sum of squares is reduced
in another order, so rstd can differ in its last fp32 bit and an output element, rarely, by one ulp.
FP fusion is off for the launch, so no multiply-add is contracted into an FMA that skips a rounding.
Equal chains load the row as ``[chains, chain_dim]`` and reduce along the second axis; unequal chains
load it flat and reduce each chain under a mask (chain boundaries are compile-time constants).

``chain_rmsnorm`` runs Triton for CUDA bf16/fp16 tensors when no gradient is needed (the kernel has
no backward) and ``chain_rmsnorm_ref`` otherwise.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Sequence

import torch

from colm.kernels import _pdl, _tuning, compiled

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def chain_rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, chain_dims: Sequence[int], eps: float) -> torch.Tensor:
    """x [..., sum(chain_dims)]: RMSNorm of each chain's features in float32, scaled in x's dtype."""
    dims = list(chain_dims)
    width = x.shape[-1]
    dtype = x.dtype
    h = x.float()
    if len(set(dims)) == 1:
        g = h.unflatten(-1, (len(dims), dims[0]))  # [..., k, d]
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
        h = g.flatten(-2)
    else:
        h = torch.cat([p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + eps) for p in h.split(dims, -1)], -1)
    return weight[:width] * h.to(dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _round_bf16(v):
        """fp32 -> nearest-even bf16 value, still fp32 (the interpreter truncates on a bf16 cast)."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _scale_store(xf, rstd, w_ptrs, o_ptrs, ok, X_DTYPE: tl.constexpr, EMULATE: tl.constexpr):
        """out = weight * (x * rstd).to(x dtype), the product in fp32 rounded once to the out dtype.

        EMULATE (interpreter only) = (x is bf16, out is bf16): round to bf16 by hand before those casts.
        """
        y = xf * rstd
        if EMULATE[0]:
            y = _round_bf16(y)
        y = y.to(X_DTYPE).to(tl.float32)
        o = tl.load(w_ptrs, mask=ok, other=0.0).to(tl.float32) * y
        if EMULATE[1]:
            o = _round_bf16(o)
        tl.store(o_ptrs, o.to(o_ptrs.dtype.element_ty), mask=ok)

    @triton.jit
    def _residual_in(x_ptr, r_ptr, h_ptr, row, stride_x, stride_r, stride_h, col, ok,
                     HAS_RES: tl.constexpr, EMULATE: tl.constexpr):
        """The row to normalise, as fp32: x, or h = x + r rounded to x's dtype (stored to h) when HAS_RES."""
        x = tl.load(x_ptr + row * stride_x + col, mask=ok, other=0.0)
        xf = x.to(tl.float32)
        if HAS_RES:
            xf = xf + tl.load(r_ptr + row * stride_r + col, mask=ok, other=0.0).to(tl.float32)
            if EMULATE[0]:
                xf = _round_bf16(xf)
            xf = xf.to(x.dtype).to(tl.float32)  # the sum in x's dtype, as torch's add keeps it
            tl.store(h_ptr + row * stride_h + col, xf.to(h_ptr.dtype.element_ty), mask=ok)
        return xf, x

    @triton.jit
    def _rmsnorm_equal_kernel(
        x_ptr, w_ptr, out_ptr, stride_x, stride_o, eps,
        r_ptr, h_ptr, stride_r, stride_h,  # residual in, sum out (HAS_RES only)
        NUM_CHAINS: tl.constexpr, CHAIN: tl.constexpr, NC_PAD: tl.constexpr, C_PAD: tl.constexpr,
        EMULATE: tl.constexpr, HAS_RES: tl.constexpr = False, USE_PDL: tl.constexpr = False,
    ):
        _pdl.wait(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, NC_PAD)[:, None]  # chain
        j = tl.arange(0, C_PAD)[None, :]  # feature within the chain
        ok = (c < NUM_CHAINS) & (j < CHAIN)
        col = c * CHAIN + j  # [NC, C]
        xf, x = _residual_in(x_ptr, r_ptr, h_ptr, row, stride_x, stride_r, stride_h, col, ok, HAS_RES, EMULATE)
        ss = tl.sum(xf * xf, 1)  # [NC]
        rstd = tl.rsqrt(ss * (1.0 / CHAIN) + eps)
        _scale_store(xf, rstd[:, None], w_ptr + col, out_ptr + row * stride_o + col, ok, x.dtype, EMULATE)

    @triton.jit
    def _rmsnorm_general_kernel(
        x_ptr, w_ptr, out_ptr, stride_x, stride_o, eps,
        r_ptr, h_ptr, stride_r, stride_h,  # residual in, sum out (HAS_RES only)
        BOUNDS: tl.constexpr, NUM_CHAINS: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
        EMULATE: tl.constexpr, HAS_RES: tl.constexpr = False, USE_PDL: tl.constexpr = False,
    ):
        _pdl.wait(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        col = tl.arange(0, BLOCK)
        ok = col < WIDTH
        xf, x = _residual_in(x_ptr, r_ptr, h_ptr, row, stride_x, stride_r, stride_h, col, ok, HAS_RES, EMULATE)
        sq = xf * xf
        rstd = tl.zeros((BLOCK,), tl.float32)
        for i in tl.static_range(NUM_CHAINS):  # BOUNDS = (0, d_1, d_1 + d_2, ..., width)
            mine = (col >= BOUNDS[i]) & (col < BOUNDS[i + 1])
            ss = tl.sum(tl.where(mine, sq, 0.0), 0)
            rstd = tl.where(mine, tl.rsqrt(ss * (1.0 / (BOUNDS[i + 1] - BOUNDS[i])) + eps), rstd)
        _scale_store(xf, rstd, w_ptr + col, out_ptr + row * stride_o + col, ok, x.dtype, EMULATE)


# --------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------


def _num_warps(block: int) -> int:
    """About 8 elements (16 bytes of bf16) per thread: 2048 features -> 8 warps."""
    return max(1, min(16, block // 256))


def chain_rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, chain_dims: Sequence[int], eps: float,
                         num_warps: int | None = None, residual: torch.Tensor | None = None):
    """The Triton chain RMSNorm of ``x [..., sum(chain_dims)]`` (any float dtype; see module docstring).

    With ``residual`` (x's shape and dtype) it normalises h = x + residual in the same launch and
    returns ``(h, norm(h))``; h is rounded to x's dtype exactly as ``x + residual`` is."""
    dims = [int(d) for d in chain_dims]
    width = x.shape[-1]
    if not dims or min(dims) <= 0 or sum(dims) != width:
        raise ValueError(f"chain_rmsnorm: chain dims {dims} do not sum to the input width {width}")
    if weight.dim() != 1 or weight.shape[0] < width or weight.stride(0) != 1:
        raise ValueError(f"chain_rmsnorm: weight must be a contiguous vector of >= {width}, got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"chain_rmsnorm: residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    x2 = _rows(x, width)
    rows = x2.shape[0]
    out = torch.empty((rows, width), device=x.device, dtype=torch.result_type(weight, x))
    r2 = _rows(residual, width) if residual is not None else x2
    h = torch.empty((rows, width), device=x.device, dtype=x.dtype) if residual is not None else out
    if rows:
        interp = _tuning.interpreting()
        emulate = (interp and x.dtype == torch.bfloat16, interp and out.dtype == torch.bfloat16)
        res_args = (r2, h, r2.stride(0), h.stride(0))
        pdl = _pdl.kernel_kwargs(x2, rows)
        if len(set(dims)) == 1:
            nc, c = len(dims), dims[0]
            block = triton.next_power_of_2(nc) * triton.next_power_of_2(c)
            _rmsnorm_equal_kernel[(rows,)](
                x2, weight, out, x2.stride(0), out.stride(0), eps, *res_args,
                NUM_CHAINS=nc, CHAIN=c, NC_PAD=triton.next_power_of_2(nc), C_PAD=triton.next_power_of_2(c),
                EMULATE=emulate, HAS_RES=residual is not None, num_warps=num_warps or _num_warps(block),
                enable_fp_fusion=False, **pdl,
            )
        else:
            block = triton.next_power_of_2(width)
            _rmsnorm_general_kernel[(rows,)](
                x2, weight, out, x2.stride(0), out.stride(0), eps, *res_args,
                BOUNDS=tuple([0] + list(accumulate(dims))), NUM_CHAINS=len(dims), WIDTH=width, BLOCK=block,
                EMULATE=emulate, HAS_RES=residual is not None, num_warps=num_warps or _num_warps(block),
                enable_fp_fusion=False, **pdl,
            )
    if residual is None:
        return out.view(x.shape)
    return h.view(x.shape), out.view(x.shape)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """[..., width] -> [rows, width] with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _use_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (HAS_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def chain_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, chain_dims: Sequence[int],
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, chain_rmsnorm_ref(h)) for h = x + residual."""
    h = x + residual
    return h, chain_rmsnorm_ref(h, weight, chain_dims, eps)


def chain_rmsnorm(x: torch.Tensor, weight: torch.Tensor, chain_dims: Sequence[int], eps: float) -> torch.Tensor:
    """x [..., sum(chain_dims)] -> same shape: Triton on CUDA bf16/fp16 without autograd, the compiled reference
    in CUDA training (``colm.kernels.compiled``), else the reference."""
    if _use_triton(x, weight):
        return chain_rmsnorm_triton(x, weight, chain_dims, eps)
    if compiled.wants(x, weight):
        return compiled.run("chain_rmsnorm", chain_rmsnorm_ref, x, weight, tuple(chain_dims), eps)
    return chain_rmsnorm_ref(x, weight, chain_dims, eps)


def chain_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, chain_dims: Sequence[int],
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, norm(h)) for h = x + residual: one Triton launch on CUDA bf16/fp16 without autograd, the compiled
    reference in CUDA training, else the reference add and norm (the same roundings)."""
    if _use_triton(x, weight) and _use_triton(residual, weight) and residual.shape == x.shape:
        return chain_rmsnorm_triton(x, weight, chain_dims, eps, residual=residual)
    if compiled.wants(x, residual, weight):
        return compiled.run("chain_add_rmsnorm", chain_add_rmsnorm_ref, x, residual, weight, tuple(chain_dims), eps)
    return chain_add_rmsnorm_ref(x, residual, weight, chain_dims, eps)
