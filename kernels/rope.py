"""Rotary position embeddings (rotate-half) as one Triton kernel for q and k, beside the reference.

``apply_rope_ref(x, cos, sin) = x * cos + rotate_half(x) * sin`` on ``x [b, heads, t, head_dim]`` with
``cos, sin [b or 1, 1, t, head_dim]`` (``colm.rope.rope_cos_sin``). Eagerly that is 5 kernels per
tensor (mul, neg, cat, mul, add); ``rope_qk_triton`` rotates q and k in one launch: one program per
(batch, token) loads that token's cos/sin once and rotates every query and key head.

q/k may be any strided views with a unit last-dim stride, e.g. ``.view(b, t, H, hd).transpose(1, 2)``
as ``ChainAttention.project_qkv`` makes them; outputs are ``empty_like`` the inputs (same strides as
the reference's result). Rounding matches the reference in the input dtype: ``x*cos`` and
``rotate_half(x)*sin`` are each an fp32 product rounded to the dtype, their sum an fp32 add rounded
again. The launch disables FP fusion: with it, the compiler turns a product and the add into one
bf16x2 FMA that skips a rounding (the offline sm_90 test checks the PTX has no FMA). The launch
allocates only the outputs and never syncs with the host, so it can be captured in a CUDA graph.

``apply_rope`` / ``apply_rope_qk`` run Triton for CUDA bf16/fp16 inputs (cos/sin of the same dtype)
when no gradient is needed, and the reference otherwise. For decode steps, ``rope_qk_to_pool_triton``
also writes the rotated k and the v of each sequence's token into the paged KV pools (one launch instead
of two; ``decode_worker.paged_cache`` uses it where ``rope_to_pool_fits``).
"""

from __future__ import annotations

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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, t, head_dim]."""
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _round(v, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
        """fp32 -> the nearest DTYPE value, as fp32 (by hand under the interpreter, which truncates bf16)."""
        if EMULATE_BF16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        return v.to(DTYPE).to(tl.float32)

    @triton.jit
    def _cos_sin(cos_ptr, sin_ptr, cs, d_ok, HALF: tl.constexpr):
        """One token's cos/sin halves as fp32 rows [1, HALF]: (cos first, cos second, sin first, sin second)."""
        c1 = tl.load(cos_ptr + cs, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + cs + HALF, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + cs, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + cs + HALF, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        return c1, c2, s1, s2

    @triton.jit
    def _rope_heads(src, dst, stride_h, stride_oh, c1, c2, s1, s2, d, d_ok,
                    HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr, EMULATE_BF16: tl.constexpr):
        """Rotate HEADS heads of one token: src/dst point at head 0, element 0."""
        h = tl.arange(0, H_PAD)[:, None]
        ok = (h < HEADS) & d_ok[None, :]
        p1 = src + h * stride_h + d[None, :]  # [H, HALF]: first halves; second halves at + HALF
        x1 = tl.load(p1, mask=ok, other=0.0)
        x2 = tl.load(p1 + HALF, mask=ok, other=0.0)
        dt = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        # out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each op rounded to dt
        o1 = _round(_round(x1 * c1, dt, EMULATE_BF16) + _round(-x2 * s1, dt, EMULATE_BF16), dt, EMULATE_BF16)
        o2 = _round(_round(x2 * c2, dt, EMULATE_BF16) + _round(x1 * s2, dt, EMULATE_BF16), dt, EMULATE_BF16)
        q1 = dst + h * stride_oh + d[None, :]
        tl.store(q1, o1.to(dt), mask=ok)
        tl.store(q1 + HALF, o2.to(dt), mask=ok)

    @triton.jit
    def _rope_qk_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t, sc_b, sc_t,
        HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
        HALF: tl.constexpr, HALF_PAD: tl.constexpr, HAS_K: tl.constexpr, EMULATE_BF16: tl.constexpr,
        USE_PDL: tl.constexpr = False,
    ):
        _pdl.wait(USE_PDL)
        pid = tl.program_id(0).to(tl.int64)  # b * T + t
        b = pid // T
        t = pid % T
        d = tl.arange(0, HALF_PAD)
        d_ok = d < HALF
        c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, b * sc_b + t * sc_t + d, d_ok, HALF)
        _rope_heads(q_ptr + b * sq_b + t * sq_t, qo_ptr + b * sqo_b + t * sqo_t, sq_h, sqo_h,
                    c1, c2, s1, s2, d, d_ok, HQ, HQ_PAD, HALF, EMULATE_BF16)
        if HAS_K:
            _rope_heads(k_ptr + b * sk_b + t * sk_t, ko_ptr + b * sko_b + t * sko_t, sk_h, sko_h,
                        c1, c2, s1, s2, d, d_ok, HK, HK_PAD, HALF, EMULATE_BF16)

    @triton.jit
    def _rope_qk_to_pool_kernel(
        q_ptr, k_ptr, v_ptr, qo_ptr, k_pool_ptr, v_pool_ptr, slot_ptr, cos_ptr, sin_ptr,
        sq_b, sq_h, sqo_b, sqo_h, sk_b, sk_h, sv_b, sv_h, sc_b,
        HQ: tl.constexpr, HK: tl.constexpr, HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr,
        HALF: tl.constexpr, HALF_PAD: tl.constexpr, EMULATE_BF16: tl.constexpr, USE_PDL: tl.constexpr = False,
    ):
        """One decode token per program (sequence b): rope(q) -> qo; rope(k) and v -> the pools' row
        ``slot[b]`` (skipped when negative). Pools: [slots, HK, 2 * HALF] contiguous."""
        _pdl.wait(USE_PDL)
        b = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, HALF_PAD)
        d_ok = d < HALF
        c1, c2, s1, s2 = _cos_sin(cos_ptr, sin_ptr, b * sc_b + d, d_ok, HALF)
        _rope_heads(q_ptr + b * sq_b, qo_ptr + b * sqo_b, sq_h, sqo_h, c1, c2, s1, s2, d, d_ok,
                    HQ, HQ_PAD, HALF, EMULATE_BF16)
        slot = tl.load(slot_ptr + b)
        if slot >= 0:
            row = slot * (HK * 2 * HALF)
            _rope_heads(k_ptr + b * sk_b, k_pool_ptr + row, sk_h, 2 * HALF, c1, c2, s1, s2, d, d_ok,
                        HK, HK_PAD, HALF, EMULATE_BF16)
            h = tl.arange(0, HK_PAD)[:, None]
            ok = (h < HK) & d_ok[None, :]
            src = v_ptr + b * sv_b + h * sv_h + d[None, :]
            dst = v_pool_ptr + row + h * (2 * HALF) + d[None, :]
            tl.store(dst, tl.load(src, mask=ok, other=0.0), mask=ok)
            tl.store(dst + HALF, tl.load(src + HALF, mask=ok, other=0.0), mask=ok)


# --------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------


def rope_to_pool_fits(q, k, v, cos, sin, k_pool, v_pool, slots) -> bool:
    """Whether ``rope_qk_to_pool_triton`` takes these: one token per sequence, q/k/v [B, H, 1, hd] of the
    pools' dtype (CUDA bf16/fp16, or the interpreter), pools [N, bs, Hkv, hd] contiguous, slots int64 [B]."""
    if not (q.dim() == k.dim() == v.dim() == 4 and q.shape[2] == 1 and k.shape == v.shape and _fits(q, cos, sin)
            and _fits(k, cos, sin) and k.shape[0] == q.shape[0]):
        return False
    return (k_pool.is_contiguous() and v_pool.is_contiguous() and k_pool.shape == v_pool.shape
            and tuple(k_pool.shape[2:]) == tuple(k.shape[1:2]) + tuple(k.shape[3:])
            and k_pool.dtype == v_pool.dtype == q.dtype == k.dtype == v.dtype
            and q.dtype in (torch.bfloat16, torch.float16)
            and slots.dtype == torch.int64 and tuple(slots.shape) == (q.shape[0],)
            and HAS_TRITON and (q.is_cuda or _tuning.interpreting())
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def rope_qk_to_pool_triton(q, k, v, cos, sin, k_pool, v_pool, slots) -> torch.Tensor:
    """A decode step's RoPE and KV write in one launch: returns rope(q); rope(k) and v go into the pools at
    ``slots`` (negative = skip), as ``apply_rope_qk`` then ``write_kv_to_pool`` would (same roundings)."""
    if not rope_to_pool_fits(q, k, v, cos, sin, k_pool, v_pool, slots):
        raise ValueError(f"rope_qk_to_pool: unsupported q {tuple(q.shape)} {q.dtype}, k/v {tuple(k.shape)}, "
                         f"pools {tuple(k_pool.shape)} {k_pool.dtype}, slots {slots.dtype} {tuple(slots.shape)}")
    q, k, v, cos, sin = (_unit_last(x) for x in (q, k, v, cos, sin))
    bsz, hq, _, hd = q.shape
    qo = torch.empty_like(q)
    if bsz:
        half = hd // 2
        emulate = _tuning.interpreting() and q.dtype == torch.bfloat16
        _rope_qk_to_pool_kernel[(bsz,)](
            q, k, v, qo, k_pool, v_pool, slots, cos, sin,
            q.stride(0), q.stride(1), qo.stride(0), qo.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos.stride(0) if cos.shape[0] > 1 else 0,
            HQ=hq, HK=k.shape[1], HQ_PAD=triton.next_power_of_2(hq), HK_PAD=triton.next_power_of_2(k.shape[1]),
            HALF=half, HALF_PAD=triton.next_power_of_2(half), EMULATE_BF16=emulate, num_warps=4,
            enable_fp_fusion=False, **_pdl.kernel_kwargs(q, bsz),
        )
    return qo


def _fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The layouts the kernel handles: x [b, H, t, hd] (hd even), cos/sin [b or 1, 1, t, hd] of x's dtype."""
    if x.dim() != 4 or cos.dim() != 4 or cos.shape != sin.shape or cos.stride() != sin.stride():
        return False
    b, _, t, hd = x.shape
    return (hd % 2 == 0 and cos.shape[0] in (1, b) and cos.shape[1] == 1 and tuple(cos.shape[2:]) == (t, hd)
            and cos.dtype == x.dtype == sin.dtype and cos.device == x.device)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_qk_triton(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                   num_warps: int | None = None):
    """(rope(q), rope(k)) in one launch (k may be None: then only q); see module docstring for layouts."""
    if not _fits(q, cos, sin) or (k is not None and (not _fits(k, cos, sin) or k.shape[0] != q.shape[0]
                                                     or k.shape[2:] != q.shape[2:])):
        raise ValueError(f"rope: unsupported shapes/dtypes q {tuple(q.shape)} {q.dtype}, "
                         f"k {None if k is None else (tuple(k.shape), k.dtype)}, cos {tuple(cos.shape)} {cos.dtype}")
    q, cos, sin = _unit_last(q), _unit_last(cos), _unit_last(sin)
    b, hq, t, hd = q.shape
    qo = torch.empty_like(q)
    kk = q if k is None else _unit_last(k)
    ko = qo if k is None else torch.empty_like(kk)
    if q.numel() and kk.numel():
        half = hd // 2
        sc_b = cos.stride(0) if cos.shape[0] > 1 else 0
        emulate = _tuning.interpreting() and q.dtype == torch.bfloat16
        _rope_qk_kernel[(b * t,)](
            q, kk, qo, ko, cos, sin, t,
            q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
            qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2), sc_b, cos.stride(2),
            HQ=hq, HK=kk.shape[1], HQ_PAD=triton.next_power_of_2(hq), HK_PAD=triton.next_power_of_2(kk.shape[1]),
            HALF=half, HALF_PAD=triton.next_power_of_2(half), HAS_K=k is not None, EMULATE_BF16=emulate,
            num_warps=num_warps or 4, enable_fp_fusion=False,
        )
    return qo, (None if k is None else ko)


def _use_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return (HAS_TRITON and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _fits(x, cos, sin)
            and not (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad)))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, t, head_dim] -> RoPE(x) (Triton on CUDA bf16/fp16 without autograd, else the reference)."""
    if _use_triton(x, cos, sin):
        return rope_qk_triton(x, None, cos, sin)[0]
    return apply_rope_ref(x, cos, sin)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(RoPE(q), RoPE(k)) for q [b, Hq, t, hd], k [b, Hkv, t, hd]: one launch where Triton applies."""
    if _use_triton(q, cos, sin) and _use_triton(k, cos, sin) and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:]:
        return rope_qk_triton(q, k, cos, sin)
    if compiled.wants(q, k, cos, sin):  # CUDA training: both rotations fused, forward and backward
        return compiled.run("rope_qk", apply_rope_qk_ref, q, k, cos, sin)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def apply_rope_qk_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(apply_rope_ref(q), apply_rope_ref(k))."""
    return apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin)
