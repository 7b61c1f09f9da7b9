"""Chain RMSNorm and RoPE Triton kernels against their plain-PyTorch references.

CPU: the kernels run in Triton's interpreter inside a child pytest (small shapes, bf16 and fp16, equal
and unequal chains, odd row counts, strided q/k). CUDA: 1B shapes and a CUDA-graph capture; skipped
without a GPU. Offline: the kernels compile for sm_90 without spills, with 16-byte loads/stores and no
FMA contraction (which would skip one of the reference's roundings); skipped without Triton's tools.
RoPE has no reduction, so it must match bit for bit; RMSNorm may differ by one ulp where its sum of
squares, reduced in another order, moves rstd by one fp32 bit (the share of exact elements is printed).
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch

from _kernel_helpers import cuda, interp, run_interpreter_cases, sm90

triton = pytest.importorskip("triton")

rn = importlib.import_module("colm.kernels.rmsnorm")
rp = importlib.import_module("colm.kernels.rope")
off = importlib.import_module("colm.kernels._offline")


def test_interpreter_suite():
    run_interpreter_cases(__file__)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of a 16-bit float dtype (0 where equal, incl. +0 / -0)."""
    diff = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
    return torch.where(a == b, 0, diff)


def _check_norm(rows, chain_dims, width, dtype, device, row_stride=None, weight_dtype=None, scale=3.0):
    """rows: leading shape; width: the active prefix of chain_dims; row_stride: rows of a wider tensor."""
    dims, total = [], 0
    for d in chain_dims:
        if total < width:
            dims.append(d)
            total += d
    assert total == width
    lead = (rows,) if isinstance(rows, int) else tuple(rows)
    base = torch.randn(*lead, row_stride or width) * scale
    x = base[..., :width].to(dtype).to(device)  # a strided view when row_stride > width
    w = (1 + 0.5 * torch.randn(sum(chain_dims))).to(weight_dtype or dtype).to(device)
    out = rn.chain_rmsnorm_triton(x, w, dims, 1e-5)
    ref = rn.chain_rmsnorm_ref(x, w, dims, 1e-5)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not torch.isnan(out).any()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)
        return 1.0
    ulps = _ulps(out, ref)
    exact = (ulps == 0).float().mean().item()
    print(f"rmsnorm {lead} dims {dims} {dtype}: {exact:.5f} exact, max {ulps.max().item()} ulp")
    # The fp32 reductions run in another order, so a normalised value may round to the neighbouring
    # bf16 (1 ulp); the weight multiply can turn that into 2 ulp of the product across a binade edge
    # (seen on an H100: 2 ulp at 8193 rows, 99.999% of elements equal).
    assert ulps.max().item() <= 2, ulps.max()
    assert exact >= 0.99, exact
    return exact


def _rope_case(b, hq, hkv, t, hd, dtype, device, cos_batch=None, pos0=0):
    inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2).float() / hd))
    positions = torch.arange(pos0, pos0 + t).expand(cos_batch or b, t) + torch.arange(cos_batch or b)[:, None] * 7
    cos, sin = importlib.import_module("colm.rope").rope_cos_sin(inv, positions.to(device), dtype)
    # as ChainAttention.project_qkv makes them: [b, t, H*hd] viewed and transposed to [b, H, t, hd]
    q = (torch.randn(b, t, hq * hd) * 2).to(dtype).to(device).view(b, t, hq, hd).transpose(1, 2)
    k = (torch.randn(b, t, hkv * hd) * 2).to(dtype).to(device).view(b, t, hkv, hd).transpose(1, 2)
    return q, k, cos, sin


def _check_rope(b, hq, hkv, t, hd, dtype, device, cos_batch=None, pos0=0):
    q, k, cos, sin = _rope_case(b, hq, hkv, t, hd, dtype, device, cos_batch, pos0)
    qo, ko = rp.rope_qk_triton(q, k, cos, sin)
    rq, rk = rp.apply_rope_ref(q, cos, sin), rp.apply_rope_ref(k, cos, sin)
    for o, r in ((qo, rq), (ko, rk)):  # the reference's layout (strides of size-1 dims are arbitrary)
        assert [s for s, n in zip(o.stride(), o.shape) if n > 1] == [s for s, n in zip(r.stride(), r.shape) if n > 1]
    assert torch.equal(qo, rq), _ulps(qo, rq).max()
    assert torch.equal(ko, rk), _ulps(ko, rk).max()
    q_only, none = rp.rope_qk_triton(q, None, cos, sin)
    assert none is None and torch.equal(q_only, rq)
    sub = q[:, 1::2]  # a head-strided view that is not dense
    assert torch.equal(rp.rope_qk_triton(sub, None, cos, sin)[0], rp.apply_rope_ref(sub, cos, sin))


def _check_rope_to_pool(b, hq, hkv, hd, dtype, device, cos_batch=None):
    """rope_qk_to_pool_triton against apply_rope_ref + write_kv_to_pool_ref: q out and both pools bit-equal.
    k and v are views of one fused K/V projection (as the engines' fused wkv gives them)."""
    pa = importlib.import_module("colm.kernels.paged_attention")
    q, _, cos, sin = _rope_case(b, hq, hkv, 1, hd, dtype, device, cos_batch, pos0=500)
    kv = (torch.randn(b, 1, 2 * hkv * hd) * 2).to(dtype).to(device)
    k, v = (t.view(b, 1, hkv, hd).transpose(1, 2) for t in kv.chunk(2, dim=-1))  # strided views
    bs = 4
    blocks = b // bs + 2  # room for every row's slot
    kp = torch.randn(blocks, bs, hkv, hd).to(dtype).to(device)
    vp = torch.randn(blocks, bs, hkv, hd).to(dtype).to(device)
    slots = torch.randperm(blocks * bs)[:b].to(torch.int64)
    slots[1::3] = -1  # padding rows: no write
    slots = slots.to(device)
    kp_ref, vp_ref = kp.clone(), vp.clone()
    assert rp.rope_to_pool_fits(q, k, v, cos, sin, kp, vp, slots)
    qo = rp.rope_qk_to_pool_triton(q, k, v, cos, sin, kp, vp, slots)
    rk = rp.apply_rope_ref(k, cos, sin)
    pa.write_kv_to_pool_ref(rk[:, :, 0], v[:, :, 0], kp_ref, vp_ref, slots)
    assert torch.equal(qo, rp.apply_rope_ref(q, cos, sin))
    assert torch.equal(kp, kp_ref) and torch.equal(vp, vp_ref)
    assert not rp.rope_to_pool_fits(q, k, v, cos, sin, kp, vp, slots.int())  # int32 slots: not this kernel


# ---------------------------------------------------------------- CPU, Triton interpreter


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreter_rope_to_pool_matches_rope_then_write(dtype):
    torch.manual_seed(7)
    _check_rope_to_pool(5, 4, 2, 16, dtype, "cpu")
    _check_rope_to_pool(3, 6, 3, 24, dtype, "cpu", cos_batch=1)  # non-power-of-2 heads / half dim


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chain_dims,width", [([32, 32], 64), ([16, 16, 16, 16], 64), ([16, 16, 16, 16], 32),
                                              ([24, 24, 24], 72), ([16, 48, 8], 72), ([16, 48, 8], 64), ([40], 40)])
def test_interpreter_rmsnorm_matches_reference(dtype, chain_dims, width):
    torch.manual_seed(width + len(chain_dims))
    _check_norm(7, chain_dims, width, dtype, "cpu")


@interp
def test_interpreter_rmsnorm_leading_dims_strided_rows_and_fp32_weight():
    torch.manual_seed(1)
    _check_norm((3, 5), [32, 32], 64, torch.bfloat16, "cpu")
    _check_norm(1, [16, 48, 8], 72, torch.float16, "cpu", row_stride=100)
    _check_norm(9, [16, 16, 16, 16], 48, torch.bfloat16, "cpu", row_stride=80)
    _check_norm(3, [32, 32], 64, torch.bfloat16, "cpu", weight_dtype=torch.float32)  # out fp32, as torch promotes
    x = torch.zeros(0, 64, dtype=torch.bfloat16)
    assert rn.chain_rmsnorm_triton(x, torch.ones(64, dtype=torch.bfloat16), [32, 32], 1e-5).shape == (0, 64)


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chain_dims,width", [([32, 32], 64), ([16, 48, 8], 72), ([16, 16, 16, 16], 48)])
def test_interpreter_add_rmsnorm_matches_add_then_norm(dtype, chain_dims, width):
    """The fused residual add: h bit-equal to x + r, norm(h) equal to the unfused kernel's (same code after
    the add), and within the norm's tolerance of the reference."""
    torch.manual_seed(width + 7)
    dims = [d for i, d in enumerate(chain_dims) if sum(chain_dims[: i + 1]) <= width]
    x = (torch.randn(5, 3, width) * 3).to(dtype)
    r = (torch.randn(5, 3, width) * 3).to(dtype)
    w = (1 + 0.5 * torch.randn(sum(chain_dims))).to(dtype)
    h, out = rn.chain_rmsnorm_triton(x, w, dims, 1e-5, residual=r)
    assert torch.equal(h, x + r)
    assert torch.equal(out, rn.chain_rmsnorm_triton(x + r, w, dims, 1e-5))
    assert _ulps(out, rn.chain_rmsnorm_ref(x + r, w, dims, 1e-5)).max() <= 1
    with pytest.raises(ValueError, match="residual"):
        rn.chain_rmsnorm_triton(x, w, dims, 1e-5, residual=r[:, :2])


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreter_rope_matches_reference_bitwise(dtype):
    torch.manual_seed(2)
    _check_rope(2, 4, 2, 5, 16, dtype, "cpu")
    _check_rope(3, 6, 3, 1, 24, dtype, "cpu", cos_batch=1, pos0=1000)  # decode, non-power-of-2 heads / half dim


# ---------------------------------------------------------------- CPU dispatch (reference path)


def test_cpu_dispatch_is_the_reference():
    torch.manual_seed(3)
    from colm.norm import ChainRMSNorm
    from colm.rope import apply_rope, apply_rope_qk

    norm = ChainRMSNorm([16, 48, 8], dtype=torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    assert torch.equal(norm(x), rn.chain_rmsnorm_ref(x, norm.weight, [16, 48], norm.eps))
    with pytest.raises(ValueError, match="not a chain boundary"):
        norm(torch.randn(2, 40))
    q, k, cos, sin = _rope_case(2, 4, 2, 5, 16, torch.bfloat16, "cpu")
    assert torch.equal(apply_rope(q, cos, sin), rp.apply_rope_ref(q, cos, sin))
    qo, ko = apply_rope_qk(q, k, cos, sin)
    assert torch.equal(qo, rp.apply_rope_ref(q, cos, sin)) and torch.equal(ko, rp.apply_rope_ref(k, cos, sin))


# ---------------------------------------------------------------- CUDA


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chain_dims,width", [([1024, 1024], 2048), ([512] * 4, 2048), ([512] * 4, 1024),
                                              ([512, 1536], 2048), ([768, 768, 512], 2048), ([2048], 2048)])
def test_cuda_rmsnorm_1b_shapes(dtype, chain_dims, width):
    torch.manual_seed(width + len(chain_dims))
    for rows in (1, 64, 8193):
        _check_norm(rows, chain_dims, width, dtype, "cuda")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chain_dims", [[1024, 1024], [512, 1536]])
def test_cuda_add_rmsnorm_1b_shapes(dtype, chain_dims):
    """Fused residual add: h == x + r bit for bit, norm(h) == the plain kernel on x + r; the dispatcher
    takes it without autograd and the eager pair with it."""
    torch.manual_seed(len(chain_dims))
    for rows in (1, 64, 4097):
        x = (torch.randn(rows, 2048, device="cuda") * 3).to(dtype)
        r = (torch.randn(rows, 2048, device="cuda") * 3).to(dtype)
        w = (1 + 0.5 * torch.randn(2048, device="cuda")).to(dtype)
        with torch.no_grad():
            h, out = rn.chain_add_rmsnorm(x, r, w, chain_dims, 1e-5)
        assert torch.equal(h, x + r) and torch.equal(out, rn.chain_rmsnorm_triton(x + r, w, chain_dims, 1e-5))
    xg = x.clone().requires_grad_()
    h, out = rn.chain_add_rmsnorm(xg, r, w, chain_dims, 1e-5)
    assert h.grad_fn is not None and out.grad_fn is not None


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_rope_to_pool_1b_shapes(dtype):
    torch.manual_seed(5)
    _check_rope_to_pool(64, 32, 8, 64, dtype, "cuda")
    _check_rope_to_pool(3, 32, 8, 64, dtype, "cuda")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_rope_1b_shapes(dtype):
    torch.manual_seed(4)
    _check_rope(1, 32, 8, 4097, 64, dtype, "cuda")  # prefill
    _check_rope(64, 32, 8, 1, 64, dtype, "cuda", pos0=3000)  # decode, per-sequence positions
    _check_rope(2, 16, 8, 33, 128, dtype, "cuda", cos_batch=1)


@cuda
def test_cuda_dispatch_and_graph_capture():
    """The module entry points pick Triton under no_grad, the reference under autograd; both kernels
    replay from a CUDA graph on new inputs."""
    torch.manual_seed(5)
    from colm.norm import ChainRMSNorm
    from colm.rope import apply_rope_qk

    norm = ChainRMSNorm([512] * 4, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    x = torch.randn(64, 1, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(norm(x), rn.chain_rmsnorm_triton(x, norm.weight, [512] * 4, norm.eps))
    y = norm(x.requires_grad_())
    assert y.grad_fn is not None
    y.float().sum().backward()
    assert norm.weight.grad is not None

    q, k, cos, sin = _rope_case(64, 32, 8, 1, 64, torch.bfloat16, "cuda")
    xs = x.detach().clone()
    with torch.no_grad():
        apply_rope_qk(q, k, cos, sin), norm(xs)  # compile outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            gq, gk = apply_rope_qk(q, k, cos, sin)
            gn = norm(xs)
        for _ in range(2):
            q.copy_(torch.randn_like(q))
            k.copy_(torch.randn_like(k))
            xs.copy_(torch.randn_like(xs))
            g.replay()
            assert torch.equal(gq, rp.apply_rope_ref(q, cos, sin)) and torch.equal(gk, rp.apply_rope_ref(k, cos, sin))
            assert _ulps(gn, rn.chain_rmsnorm_ref(xs, norm.weight, [512] * 4, norm.eps)).max() <= 1


# ---------------------------------------------------------------- offline sm_90 code generation

_NORM_SIG = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "stride_x": "i32", "stride_o": "i32", "eps": "fp32",
             "r_ptr": "*bf16", "h_ptr": "*bf16", "stride_r": "i32", "stride_h": "i32"}
_NORM_DIV = ("x_ptr", "w_ptr", "out_ptr", "stride_x", "stride_o", "r_ptr", "h_ptr", "stride_r", "stride_h")


def _assert_clean(kernel, vector_io=True):
    ptx = kernel.asm["ptx"]
    use = off.resource_usage(kernel)
    assert use["LOCAL"] == 0 and use["STACK"] == 0, use
    assert not re.search(r"\bfma\.", ptx), "a multiply-add was contracted into an FMA (skips a rounding)"
    if vector_io:
        assert "ld.global.v4" in ptx and "st.global.v4" in ptx, "loads/stores are not 16-byte vectors"
    return ptx


@sm90
@pytest.mark.parametrize("chains", [2, 4])
@pytest.mark.parametrize("residual", [False, True])
def test_sm90_rmsnorm_equal_chains_compiles_clean(chains, residual):
    c = 2048 // chains
    k = off.compile_kernel(rn._rmsnorm_equal_kernel, _NORM_SIG,
                           dict(NUM_CHAINS=chains, CHAIN=c, NC_PAD=chains, C_PAD=c, EMULATE=(False, False),
                                HAS_RES=residual),
                           rn._num_warps(2048), 1, _NORM_DIV, enable_fp_fusion=False)
    ptx = _assert_clean(k)
    assert "rsqrt.approx" in ptx


@sm90
def test_sm90_rmsnorm_unequal_chains_compiles_clean():
    k = off.compile_kernel(rn._rmsnorm_general_kernel, _NORM_SIG,
                           dict(BOUNDS=(0, 512, 1536, 2048), NUM_CHAINS=3, WIDTH=2048, BLOCK=2048, EMULATE=(False, False),
                                HAS_RES=True),
                           rn._num_warps(2048), 1, _NORM_DIV, enable_fp_fusion=False)
    _assert_clean(k)


@sm90
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_sm90_rope_compiles_clean(dtype):
    ptrs = ("q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "cos_ptr", "sin_ptr")
    ints = ("sq_b", "sq_h", "sq_t", "sk_b", "sk_h", "sk_t", "sqo_b", "sqo_h", "sqo_t", "sko_b", "sko_h", "sko_t", "sc_b", "sc_t")
    sig = {**{p: f"*{dtype}" for p in ptrs}, "T": "i32", **{i: "i32" for i in ints}}
    k = off.compile_kernel(rp._rope_qk_kernel, sig,
                           dict(HQ=32, HK=8, HQ_PAD=32, HK_PAD=8, HALF=32, HALF_PAD=32, HAS_K=True, EMULATE_BF16=False),
                           4, 1, ptrs + ints, enable_fp_fusion=False)
    ptx = _assert_clean(k, vector_io=False)
    assert re.search(r"st\.global\.v[24]", ptx), "stores are not vectorised"
    ptrs = ("q_ptr", "k_ptr", "v_ptr", "qo_ptr", "k_pool_ptr", "v_pool_ptr", "slot_ptr", "cos_ptr", "sin_ptr")
    ints = ("sq_b", "sq_h", "sqo_b", "sqo_h", "sk_b", "sk_h", "sv_b", "sv_h", "sc_b")
    sig = {**{p: ("*i64" if p == "slot_ptr" else f"*{dtype}") for p in ptrs}, **{i: "i32" for i in ints}}
    k = off.compile_kernel(rp._rope_qk_to_pool_kernel, sig,
                           dict(HQ=32, HK=8, HQ_PAD=32, HK_PAD=8, HALF=32, HALF_PAD=32, EMULATE_BF16=False),
                           4, 1, ptrs + ints, enable_fp_fusion=False)
    _assert_clean(k, vector_io=False)
