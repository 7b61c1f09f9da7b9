"""SwiGLU gate product kernel (``colm.kernels.swiglu``) against ``F.silu(a) * b``.

CPU: the kernel in Triton's interpreter (child pytest), bf16 and fp16, ragged sizes; CUDA: 1B FFN
shapes and the dispatcher; offline: it compiles for sm_90 without spills or FMA contraction.
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch

from _kernel_helpers import cuda, interp, run_interpreter_cases, sm90

triton = pytest.importorskip("triton")
sw = importlib.import_module("colm.kernels.swiglu")
off = importlib.import_module("colm.kernels._offline")


def test_interpreter_suite():
    run_interpreter_cases(__file__)


def _check(shape, dtype, device):
    a = (torch.randn(shape, device=device) * 3).to(dtype)
    b = torch.randn(shape, device=device).to(dtype)
    out = sw.silu_mul_triton(a, b)
    ref = sw.silu_mul_ref(a, b)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    diff = (out.float() - ref.float()).abs()
    ulp = ref.float().abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10) + 1e-6
    bad = diff > ulp
    assert not bad.any(), (int(bad.sum()), a[bad][:4].tolist(), b[bad][:4].tolist(), out[bad][:4].tolist(),
                           ref[bad][:4].tolist())  # at most one ulp anywhere
    assert (out == ref).float().mean() > 0.99, (out == ref).float().mean()  # and almost everywhere bit-equal


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 1000), (1, 2048), (2, 5, 77), (1,)])
def test_interpreter_silu_mul_matches_reference(dtype, shape):
    torch.manual_seed(sum(shape))
    _check(shape, dtype, "cpu")


@interp
@pytest.mark.parametrize("shape", [(1, 1, 40), (3, 2, 40), (5, 1000)])
def test_interpreter_silu_mul_of_fused_halves(shape):
    """The two halves of one gate|up result (row-strided views) give the reference's product, contiguous."""
    torch.manual_seed(shape[-1] + shape[0])
    gu = (torch.randn(*shape[:-1], 2 * shape[-1]) * 3).to(torch.bfloat16)
    a, b = gu[..., : shape[-1]], gu[..., shape[-1]:]
    out = sw.silu_mul_triton(a, b)
    ref = sw.silu_mul_ref(a, b)
    assert out.is_contiguous() and out.shape == ref.shape
    assert (out.float() - ref.float()).abs().le(ref.float().abs() * 2.0 ** -7 + 1e-6).all()
    assert (out == ref).float().mean() > 0.99


@interp
def test_interpreter_silu_mul_rejects_mismatched_inputs():
    a = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one shape and dtype"):
        sw.silu_mul_triton(a, a[:, :4])
    with pytest.raises(ValueError, match="unit column stride"):
        sw.silu_mul_triton(a.t(), a.t())
    assert sw.silu_mul_triton(a[:0], a[:0]).shape == (0, 8)


def test_cpu_dispatch_is_the_reference_and_ffn_unchanged():
    from colm.ffn import ChainFFN
    from conftest import make_model

    a, b = torch.randn(3, 16), torch.randn(3, 16)
    assert torch.equal(sw.silu_mul(a, b), torch.nn.functional.silu(a) * b)
    model = make_model("tiny-air")
    ffn: ChainFFN = model.layers[0].ffn
    x = torch.randn(2, 3, model.cfg.dim)
    expect = ffn.w2(torch.nn.functional.silu(ffn.w1(x, 2)) * ffn.w3(x, 2), 2)
    assert torch.equal(ffn(x, 2), expect)


@cuda
@pytest.mark.parametrize("shape", [(1, 1, 8192), (64, 1, 8192), (2048, 4096)])
def test_cuda_silu_mul_1b_shapes(shape):
    torch.manual_seed(0)
    _check(shape, torch.bfloat16, "cuda")
    a = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert sw._use_triton(a, a)
        assert not sw._use_triton(a.half(), a.half())  # fp16: the reference (see _use_triton)
    assert not sw._use_triton(a.requires_grad_(), a)  # autograd: the reference


@sm90
def test_sm90_silu_mul_compiles_clean():
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "o_ptr": "*bf16", "n": "i32", "cols": "i32", "stride_a": "i32",
           "stride_b": "i32"}
    k = off.compile_kernel(sw._silu_mul_kernel, sig, dict(BLOCK=sw.BLOCK, FLAT=True, EMULATE=False), 8, 1,
                           ("a_ptr", "b_ptr", "o_ptr", "n"), enable_fp_fusion=False)  # n % 16 == 0, as launches specialise it
    ptx = k.asm["ptx"]
    use = off.resource_usage(k)
    assert use["LOCAL"] == 0 and use["STACK"] == 0, use
    assert not re.search(r"\bfma\.", ptx), "a multiply-add was contracted into an FMA"
    assert re.search(r"ld\.global(\.\w+)*\.v2", ptx), "inputs are not read in vectors"
