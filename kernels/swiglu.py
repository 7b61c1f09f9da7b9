"""SwiGLU's gate product ``silu(a) * b`` as one Triton kernel, beside its plain-PyTorch reference.

The FFN (paper Algorithm 5) computes ``w2(silu(w1 x) * w3 x)``. Eagerly that is two elementwise
kernels (SiLU, then the product) with an intermediate tensor; this is one launch that reads ``a`` and
``b`` once and writes the product. Rounding follows torch for bf16/fp16: SiLU in fp32 rounded to the
input dtype, then the product in fp32 rounded once. ``tl.exp`` and torch's ``expf`` may differ in the
last fp32 bit, so an output element can, rarely, differ by one ulp. FP fusion is off for the launch.

``silu_mul`` runs Triton for same-shape CUDA bf16 tensors (contiguous, or rows of unit column stride:
the halves of a fused gate|up result) when no gradient is needed and ``silu_mul_ref`` otherwise
(fp16 included: see ``_use_triton``).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from colm.kernels import _pdl, _tuning, compiled

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
    def gate_product(a, b, EMULATE: tl.constexpr):
        """silu(a) * b of loaded pieces of one half dtype, as torch rounds it: SiLU in fp32 rounded to that dtype,
        then the product in fp32 (fp32 returned; the caller's cast to the dtype is the product's one rounding).
        EMULATE (interpreter, bf16): round by hand, since the interpreter truncates on a bf16 cast. Also the
        matrix-vector kernel's input when it forms the FFN's gate product itself (``chain_linear_gemv``)."""
        af = a.to(tl.float32)
        s = af / (1.0 + tl.exp(-af))
        if EMULATE:
            s = _round_bf16(s)
        o = s.to(b.dtype).to(tl.float32) * b.to(tl.float32)  # SiLU's result in the input dtype, as torch keeps it
        if EMULATE:
            o = _round_bf16(o)
        return o

    @triton.jit
    def _silu_mul_kernel(a_ptr, b_ptr, o_ptr, n, cols, stride_a, stride_b,
                         BLOCK: tl.constexpr, FLAT: tl.constexpr, EMULATE: tl.constexpr, USE_PDL: tl.constexpr = False):
        """o[r, c] = silu(a[r, c]) * b[r, c] over rows of ``cols`` (o contiguous; a, b row-strided unless
        FLAT); EMULATE (interpreter, bf16): round by hand."""
        _pdl.wait(USE_PDL)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        if FLAT:
            a_offs = offs
            b_offs = offs
        else:
            r = offs // cols
            c = offs - r * cols
            a_offs = r * stride_a + c
            b_offs = r * stride_b + c
        a = tl.load(a_ptr + a_offs, mask=ok, other=0.0)
        b = tl.load(b_ptr + b_offs, mask=ok, other=0.0)
        tl.store(o_ptr + offs, gate_product(a, b, EMULATE).to(o_ptr.dtype.element_ty), mask=ok)


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as [rows, last dim] without a copy (unit column stride), or None."""
    if t.dim() == 0 or t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # rows not evenly strided
        return None


def silu_mul_triton(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Triton ``silu(a) * b`` of two tensors of one shape and dtype, each contiguous or row-strided
    (unit column stride, e.g. the two halves of a fused gate|up result); the result is contiguous."""
    a2, b2 = _rows(a), _rows(b)
    if a.shape != b.shape or a.dtype != b.dtype or a2 is None or b2 is None:
        raise ValueError(f"silu_mul: a {tuple(a.shape)} {a.dtype} and b {tuple(b.shape)} {b.dtype} must be "
                         "tensors of one shape and dtype with rows of unit column stride")
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    n = a.numel()
    if n == 0:
        return out
    emulate = _tuning.interpreting() and a.dtype == torch.bfloat16
    flat = a.is_contiguous() and b.is_contiguous()
    _silu_mul_kernel[(triton.cdiv(n, BLOCK),)](a2, b2, out, n, a2.shape[1], a2.stride(0), b2.stride(0),
                                                BLOCK=BLOCK, FLAT=flat, EMULATE=emulate, num_warps=8,
                                                enable_fp_fusion=False, **_pdl.kernel_kwargs(a, a2.shape[0]))
    return out


def _use_triton(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bf16 only: on an H100 the fp16 kernel was 2 ulps off torch for some inputs (e.g. a = -4.921875,
    # where SiLU rounds to the fp16 below torch's); cause not found, so fp16 takes the reference
    return (HAS_TRITON and a.is_cuda and a.dtype == torch.bfloat16 and a.dtype == b.dtype
            and a.shape == b.shape and _rows(a) is not None and _rows(b) is not None
            and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)))


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b: one Triton launch on CUDA bf16 without autograd, the compiled reference in CUDA training
    (``colm.kernels.compiled``), else the reference."""
    if _use_triton(a, b):
        return silu_mul_triton(a, b)
    if compiled.wants(a, b):  # CUDA training: one fused kernel forward, one backward
        return compiled.run("silu_mul", silu_mul_ref, a, b)
    return silu_mul_ref(a, b)
