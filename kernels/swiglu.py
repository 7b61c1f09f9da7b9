"""SwiGLU's gate product ``silu(a) * b`` as one Triton kernel, beside its plain-PyTorch reference.

The FFN (paper Algorithm 5) computes ``w2(silu(w1 x) * w3 x)``. Eagerly that is two elementwise
kernels (SiLU, then the product) with an intermediate tensor; this is one launch that reads ``a`` and
``b`` once and writes the product. Rounding follows torch for bf16/fp16: SiLU in fp32 rounded to the
input dtype, then the product in fp32 rounded once. ``tl.exp`` and torch's ``expf`` may differ in the
last fp32 bit, so an output element can, rarely, differ by one ulp. FP fusion is off for the launch.

``silu_mul`` runs Triton for contiguous same-shape CUDA bf16 tensors when no gradient is needed and
``silu_mul_ref`` otherwise (fp16 included: see ``_use_triton``).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from colm.kernels import _tuning

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

BLOCK = 1024  # elements per program: 8 warps x 32 threads x 4 (8-byte bf16 vectors; 2048-wide rows in 2 programs)


def silu_mul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b, as the FFN computes it eagerly."""
    return F.silu(a) * b


if HAS_TRITON:
    _round_bf16 = importlib.import_module("colm.kernels.rmsnorm")._round_bf16

    @triton.jit
    def _silu_mul_kernel(a_ptr, b_ptr, o_ptr, n, BLOCK: tl.constexpr, EMULATE: tl.constexpr):
        """o[i] = silu(a[i]) * b[i] over a flat range; EMULATE (interpreter, bf16): round by hand."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        a = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        s = a / (1.0 + tl.exp(-a))
        if EMULATE:
            s = _round_bf16(s)
        s = s.to(o_ptr.dtype.element_ty).to(tl.float32)  # SiLU's result in the input dtype, as torch keeps it
        o = s * b
        if EMULATE:
            o = _round_bf16(o)
        tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=ok)


def silu_mul_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Triton ``silu(a) * b`` of two contiguous tensors of one shape and dtype."""
    if a.shape != b.shape or a.dtype != b.dtype or not (a.is_contiguous() and b.is_contiguous()):
        raise ValueError(f"silu_mul: a {tuple(a.shape)} {a.dtype} and b {tuple(b.shape)} {b.dtype} must be "
                         "contiguous tensors of one shape and dtype")
    out = torch.empty_like(a)
    n = a.numel()
    if n == 0:
        return out
    emulate = _tuning.interpreting() and a.dtype == torch.bfloat16
    _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](a, b, out, n, BLOCK=BLOCK, EMULATE=emulate, num_warps=8,
                                                enable_fp_fusion=False)
    return out


def _use_triton(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bf16 only: on an H100 the fp16 kernel was 2 ulps off torch for some inputs (e.g. a = -4.921875,
    # where SiLU rounds to the fp16 below torch's); cause not found, so fp16 takes the reference
    return (HAS_TRITON and a.is_cuda and a.dtype == torch.bfloat16 and a.dtype == b.dtype
            and a.shape == b.shape and a.is_contiguous() and b.is_contiguous()
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)))


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b: one Triton launch on CUDA bf16 without autograd, else the reference."""
    if _use_triton(a, b):
        return silu_mul_triton(a, b)
    return silu_mul_ref(a, b)
