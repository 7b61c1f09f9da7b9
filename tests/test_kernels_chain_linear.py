"""Chain-linear Triton kernels against a float64 reference: forward, input grad, weight grad, bias grad.

The CPU cases run the real kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by the
fixture below) at small shapes on CPU tensors; the CUDA cases compile them and skip without a GPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from _kernel_helpers import cuda, interp, run_interpreter_cases

triton = pytest.importorskip("triton")

cl = importlib.import_module("colm.kernels.chain_linear")  # the module (the package re-exports the function)
hop = importlib.import_module("colm.kernels.chain_linear_hopper")  # its persistent and TMA forward variants
clf = importlib.import_module("colm.kernels.chain_linear_fwd")  # the kernels' homes: spies go where launches look
clb = importlib.import_module("colm.kernels.chain_linear_bwd")

INTERP = cl.GemmConfig(16, 16, 16, 1, 1)




def test_interpreter_suite():
    run_interpreter_cases(__file__)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _poison_allocator(numel: int, device) -> None:
    """Leave NaN in the caching allocator's next blocks so an unwritten output element shows up."""
    if device == "cuda":
        for _ in range(4):
            torch.full((numel,), float("nan"), device=device, dtype=torch.float16)


def _make(ins, outs, tokens_shape, dtype, device, bias, frozen=()):
    prefix = [sum(ins[: i + 1]) for i in range(len(ins))]
    ws = [(torch.randn(o, p, device=device) / p**0.5).to(dtype) for o, p in zip(outs, prefix)]
    bs = [torch.randn(o, device=device).to(dtype) for o in outs] if bias else None
    for i, w in enumerate(ws):
        w.requires_grad_(i not in frozen)
    if bs:
        for b in bs:
            b.requires_grad_()
    x = torch.randn(*tokens_shape, prefix[-1], device=device).to(dtype).requires_grad_()
    return x, ws, bs


def _check(ins, outs, tokens_shape, dtype, device, bias, configs=None, frozen=(), tol=None):
    x, ws, bs = _make(ins, outs, tokens_shape, dtype, device, bias, frozen)
    _poison_allocator(x.shape[:-1].numel() * max(sum(outs), x.shape[-1]), device)
    y = cl.chain_linear_triton(x, ws, bs, configs)
    assert y.shape == (*tokens_shape, sum(outs)) and not torch.isnan(y).any()
    g = torch.randn_like(y)
    y.backward(g)

    xd = x.detach().double().requires_grad_()
    wd = [w.detach().double().requires_grad_() for w in ws]
    bd = [b.detach().double().requires_grad_() for b in bs] if bs else None
    yr = cl.chain_linear_ref(xd, wd, bd)
    yr.backward(g.double())

    tol = tol or (1e-2 if dtype == torch.bfloat16 else 2e-3)
    assert _rel(y, yr) < tol
    assert _rel(x.grad, xd.grad) < tol
    for i, (w, r) in enumerate(zip(ws, wd)):
        if i in frozen:
            assert w.grad is None
        else:
            assert w.grad.shape == w.shape and _rel(w.grad, r.grad) < tol, i
    if bs:
        for b, r in zip(bs, bd):
            assert _rel(b.grad, r.grad) < tol


# ---------------------------------------------------------------- CPU, Triton interpreter

INTERP_CASES = [
    # (in chains, out chains, token shape)
    ([16, 16], [16, 16], (2, 16)),  # every dimension a multiple of the block: the unmasked path
    ([16, 32, 24], [32, 16, 40], (37,)),  # unequal chains, ragged token count
    ([8, 24, 16, 8], [24, 8, 8, 16], (3, 5)),  # chains smaller than a block, 15 tokens
    ([20, 12], [12, 36], (1,)),  # one token, sizes not multiples of 8
]


@interp
@pytest.mark.parametrize("ins,outs,tokens", INTERP_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interpreter_matches_float64(ins, outs, tokens, dtype):
    torch.manual_seed(hash((tuple(ins), tuple(outs), str(dtype))) % 2**31)
    _check(ins, outs, tokens, dtype, "cpu", bias=len(ins) % 2 == 1, configs={"fwd": INTERP, "bwd_i": INTERP, "bwd_w": INTERP})


BWD_INPUT_VARIANTS = {"flat": INTERP, "nested": INTERP._replace(nested=True),
                      "persistent": INTERP._replace(persistent=True)}


@interp
@pytest.mark.parametrize("variant", list(BWD_INPUT_VARIANTS))
@pytest.mark.parametrize("ins,outs,tokens", [([16, 32, 16], [16, 48, 32], (21,)), ([8, 24, 16, 8], [24, 8, 8, 16], (3, 5)),
                                             ([20, 12], [12, 36], (1,))])
def test_interpreter_input_grad_loop_variants(variant, ins, outs, tokens, monkeypatch):
    """Every input-gradient loop (the persistent one with 3 programs, so each walks several tiles and their chain
    boundaries in one loop) against float64, at even and ragged shapes; the variant's own kernel ran."""
    torch.manual_seed(len(ins) + len(variant))
    cfg = BWD_INPUT_VARIANTS[variant]
    mod, name = (hop, "_chain_bwd_input_persistent_kernel") if cfg.persistent else (clb, "_chain_bwd_input_kernel")
    kernel, ran = getattr(mod, name), []

    class Spy:
        def __getitem__(self, grid):
            ran.append(grid)
            return kernel[grid]

    monkeypatch.setattr(mod, name, Spy())
    _check(ins, outs, tokens, torch.bfloat16, "cpu", bias=True, configs={"bwd_i": cfg, "fwd": INTERP, "bwd_w": INTERP})
    assert ran and (not cfg.persistent or ran[0][0] <= hop.INTERPRETER_NUM_PROGRAMS)


@interp
def test_interpreter_frozen_chains_get_no_grad():
    torch.manual_seed(3)
    _check([16, 16, 16], [16, 16, 32], (9,), torch.float16, "cpu", bias=False, frozen=(0, 1))


@interp
def test_interpreter_strided_rows_and_causality():
    """x as a column slice of a wider buffer (row stride != width); chain i's output ignores chains > i."""
    torch.manual_seed(4)
    ins, outs = [16, 16], [16, 32]
    _, ws, _ = _make(ins, outs, (5,), torch.float16, "cpu", bias=False)
    wide = torch.randn(13, 48).half()
    x = wide[:, :32]
    y = cl.chain_linear_triton(x, ws)
    assert _rel(y, cl.chain_linear_ref(x.double(), [w.detach().double() for w in ws])) < 2e-3
    x2 = x.clone()
    x2[:, 16:] = torch.randn(13, 16).half()
    y2 = cl.chain_linear_triton(x2, ws)
    assert torch.equal(y[:, :16], y2[:, :16])


# The forward's Hopper variants, forced through ``config=``: persistent flat K-step loop, TMA descriptors.
FWD_VARIANTS = {"persistent": INTERP._replace(persistent=True), "tma": INTERP._replace(tma=True),
                "persistent-tma": INTERP._replace(persistent=True, tma=True)}
FWD_KERNELS = {"_chain_fwd_kernel": clf, "_chain_fwd_persistent_kernel": hop, "_chain_fwd_tma_kernel": hop}


class _LaunchSpy:
    """Stands in for a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


def _forward_with_spies(monkeypatch, x, ws, bs, cfg):
    """chain_linear_forward with ``cfg`` on detached copies; returns (y, names of the kernels launched)."""
    spies = {name: _LaunchSpy(getattr(module, name)) for name, module in FWD_KERNELS.items()}
    for name, spy in spies.items():
        monkeypatch.setattr(FWD_KERNELS[name], name, spy)
    x2d = x.detach().reshape(-1, x.shape[-1])
    ws = [w.detach() for w in ws]
    y = cl.chain_linear_forward(x2d, ws, [b.detach() for b in bs] if bs else None, cl._layout(ws), cfg)
    return y, {name for name, spy in spies.items() if spy.calls}


@interp
@pytest.mark.parametrize("variant", list(FWD_VARIANTS))
@pytest.mark.parametrize("ins,outs,tokens", INTERP_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_interpreter_forward_variants_match_float64(variant, ins, outs, tokens, bias, monkeypatch):
    """Every case has ragged chain ends or tokens; the [20, 12] case is unaligned, so TMA falls back."""
    cfg = FWD_VARIANTS[variant]
    dtype = torch.float16 if bias else torch.bfloat16
    torch.manual_seed(hash((variant, tuple(ins), bias)) % 2**31)
    x, ws, bs = _make(ins, outs, tokens, dtype, "cpu", bias)
    y, launched = _forward_with_spies(monkeypatch, x, ws, bs, cfg)
    xd = x.detach().double().reshape(y.shape[0], -1)
    ref = cl.chain_linear_ref(xd, [w.detach().double() for w in ws], [b.detach().double() for b in bs] if bs else None)
    assert _rel(y, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    aligned = all(d % 8 == 0 for d in ins + outs)
    expected = ("_chain_fwd_tma_kernel" if cfg.tma and aligned else
                "_chain_fwd_persistent_kernel" if cfg.persistent else "_chain_fwd_kernel")
    assert launched == {expected}


@interp
@pytest.mark.parametrize("variant", ["plain"] + list(FWD_VARIANTS))
def test_interpreter_forward_never_reads_later_chains(variant, monkeypatch):
    """NaN inputs of chains 2-3 stay out of chain 1's outputs. Chain 1's prefix (24) ends inside a
    16-wide K block, so its last K step reaches chain 2's columns: masks, or a per-tile x descriptor
    clipped at the prefix, must keep them out."""
    cfg = FWD_VARIANTS.get(variant, INTERP)
    torch.manual_seed(11)
    x, ws, _ = _make([24, 16, 16], [16, 24, 16], (21,), torch.bfloat16, "cpu", bias=False)
    x = x.detach().clone()
    x[:, 24:] = float("nan")
    y, launched = _forward_with_spies(monkeypatch, x, ws, None, cfg)
    ref = cl.chain_linear_ref(x[:, :24].double(), [ws[0].detach().double()])
    assert not torch.isnan(y[:, :16]).any() and _rel(y[:, :16], ref) < 1e-2
    assert torch.isnan(y[:, 16:]).all()
    assert launched == {"_chain_fwd_tma_kernel"} if cfg.tma else len(launched) == 1


# The few-row (decode) kernel, forced through ``config=``: rows 1..8, ragged chains, bias or not.
GEMV_INTERP = [cl.GemmConfig(0, 8, 16, 1, 1, gemv=True), cl.GemmConfig(0, 4, 64, 2, 1, gemv=True)]
GEMV_CASES = [([16, 16], [16, 16], (8,)), ([16, 32, 24], [32, 16, 40], (5,)), ([8, 24, 16, 8], [24, 8, 8, 16], (3,)),
              ([20, 12], [12, 36], (1,))]


@interp
@pytest.mark.parametrize("cfg", GEMV_INTERP)
@pytest.mark.parametrize("ins,outs,tokens", GEMV_CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_interpreter_gemv_forward_matches_float64(cfg, ins, outs, tokens, bias):
    dtype = torch.float16 if bias else torch.bfloat16
    torch.manual_seed(hash((cfg, tuple(ins), bias)) % 2**31)
    x, ws, bs = _make(ins, outs, tokens, dtype, "cpu", bias)
    y = cl.chain_linear_forward(x.detach(), [w.detach() for w in ws], [b.detach() for b in bs] if bs else None,
                                cl._layout(ws), cfg)
    ref = cl.chain_linear_ref(x.detach().double(), [w.detach().double() for w in ws],
                              [b.detach().double() for b in bs] if bs else None)
    assert y.shape == ref.shape and _rel(y, ref) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


@interp
def test_interpreter_gemv_never_reads_later_chains_and_caps_rows():
    """Chain 1's prefix (24) ends inside a 16-wide K piece: NaN in chains 2-3 must not reach its outputs."""
    torch.manual_seed(12)
    x, ws, _ = _make([24, 16, 16], [16, 24, 16], (6,), torch.bfloat16, "cpu", bias=False)
    x = x.detach().clone()
    x[:, 24:] = float("nan")
    y = cl.chain_linear_forward(x, [w.detach() for w in ws], None, cl._layout(ws), GEMV_INTERP[0])
    ref = cl.chain_linear_ref(x[:, :24].double(), [ws[0].detach().double()])
    assert not torch.isnan(y[:, :16]).any() and _rel(y[:, :16], ref) < 1e-2
    assert torch.isnan(y[:, 16:]).all()
    x9 = torch.randn(9, 56, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="9 rows"):
        cl.chain_linear_forward(x9, [w.detach() for w in ws], None, cl._layout(ws), GEMV_INTERP[0])


def test_tma_variant_falls_back_where_not_allowed(monkeypatch):
    """Unaligned layouts, chips without TMA (here: the CPU, compiled) and Triton builds without
    device-side descriptors run the same blocks with pointer loads."""
    cfg = cl.FWD_CONFIGS[0]._replace(persistent=True, tma=True)
    plain = cfg._replace(tma=False)
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled, whatever the calling environment says
    assert hop.fwd_variant(cfg, False, cpu) == plain
    assert hop.fwd_variant(cfg, True, cpu) == plain
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs descriptors on the CPU...
    assert hop.fwd_variant(cfg, True, cpu) == cfg
    monkeypatch.setattr(hop, "HAS_TMA", False)  # ...unless this Triton has none
    assert hop.fwd_variant(cfg, True, cpu) == plain
    # the input-grad candidates are built from the first five forward configs, untouched by the variants
    assert cl.FWD_CONFIGS[:5] == [c._replace(nested=False) for c in cl.BWD_INPUT_CONFIGS[:10:2]]
    assert all(c.persistent and not c.nested for c in cl.BWD_INPUT_CONFIGS[10:])


def test_per_chain_cublas_candidate_matches_float64():
    """The tuner's non-Triton candidate (per-chain BLAS into the same buffers) computes the same function."""
    torch.manual_seed(9)
    per = cl.PER_CHAIN_CUBLAS
    _check([16, 32, 24], [32, 16, 40], (2, 11), torch.bfloat16, "cpu", bias=True, frozen=(1,),
           configs={"fwd": per, "bwd_i": per, "bwd_w": per})


def test_dispatcher_uses_reference_on_cpu():
    x, ws, bs = _make([8, 8], [8, 8], (4,), torch.float32, "cpu", bias=True)
    assert torch.equal(cl.chain_linear(x, ws, bs), cl.chain_linear_ref(x, ws, bs))


def test_bad_arguments_raise():
    x, ws, _ = _make([8, 8], [8, 8], (4,), torch.float32, "cpu", bias=False)
    with pytest.raises(ValueError, match="features"):
        cl.check_chain_linear_args(x[:, :8], ws, None)
    with pytest.raises(ValueError, match="weights\\[1\\]"):
        cl.check_chain_linear_args(x, [ws[0], ws[0]], None)


# ---------------------------------------------------------------- CUDA, compiled kernels

GPU_CASES = [
    ([512] * 4, [512] * 4, (2, 1024)),  # the 1B {8,8,8,8} attention shape
    ([512] * 4, [2048] * 4, (3000,)),  # FFN up, ragged tokens
    ([2048] * 4, [512] * 4, (777,)),  # FFN down
    ([1024, 1024], [1024, 1024], (4096,)),
    ([64, 192, 128, 384], [320, 64, 192, 128], (1000,)),  # unequal chains
    ([40, 88, 24], [72, 120, 56], (333,)),  # sizes off every block multiple
    ([1024] * 8, [1024] * 8, (257,)),
]


@cuda
@pytest.mark.parametrize("ins,outs,tokens", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_matches_float64(ins, outs, tokens, dtype):
    torch.manual_seed(sum(ins) + sum(outs) + tokens[-1])
    _check(ins, outs, tokens, dtype, "cuda", bias=len(ins) != 4, frozen=(0,) if len(ins) == 8 else ())


@cuda
@pytest.mark.parametrize("cfg", cl.BWD_INPUT_CONFIGS + cl.FWD_CONFIGS[5:])
def test_cuda_every_config(cfg):
    torch.manual_seed(7)
    w_cfg = cfg._replace(nested=False)
    _check([256, 128, 384], [128, 384, 256], (1500,), torch.bfloat16, "cuda", bias=True,
           configs={"fwd": w_cfg, "bwd_i": cfg, "bwd_w": w_cfg})


@cuda
@pytest.mark.parametrize("cfg", cl.FWD_SMALL_M_CONFIGS)
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_cuda_small_m_forward_configs(cfg, rows):
    """Decode-step shapes: few rows, unequal chains, bias; the forward against float64."""
    torch.manual_seed(rows)
    x, ws, bs = _make([256, 128, 384], [128, 384, 256], (rows,), torch.bfloat16, "cuda", True)
    y = cl.chain_linear_forward(x.detach(), [w.detach() for w in ws], [b.detach() for b in bs],
                                cl._layout(ws), cfg)
    ref = cl.chain_linear_ref(x.detach().double(), [w.detach().double() for w in ws], [b.detach().double() for b in bs])
    assert _rel(y, ref) < 1e-2


@cuda
@pytest.mark.parametrize("cfg", cl._gemv.GEMV_CONFIGS)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_cuda_gemv_forward_configs(cfg, rows):
    """The few-row kernel at decode shapes (unequal chains, bias; a {16,16} 1B FFN-down) against float64."""
    torch.manual_seed(rows + 100)
    for ins, outs in (([256, 128, 384], [128, 384, 256]), ([4096, 4096], [1024, 1024])):
        x, ws, bs = _make(ins, outs, (rows,), torch.bfloat16, "cuda", True)
        y = cl.chain_linear_forward(x.detach(), [w.detach() for w in ws], [b.detach() for b in bs],
                                    cl._layout(ws), cfg)
        ref = cl.chain_linear_ref(x.detach().double(), [w.detach().double() for w in ws],
                                  [b.detach().double() for b in bs])
        assert _rel(y, ref) < 1e-2


@interp
def test_interpreter_autocast_entry_casts_and_returns_fp32_grads():
    """What autocast training runs: fp32 input and master weights cast to bf16 for the kernel; the output is bf16,
    the weights' gradients fp32, both close to the float64 chain Linear."""
    torch.manual_seed(21)
    x, ws, bs = _make([16, 32], [24, 16], (3, 5), torch.float32, "cpu", bias=True)
    y = cl.chain_linear_autocast(x, ws, bs, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    ref_ws = [w.detach().double().requires_grad_() for w in ws]
    ref_x = x.detach().double().requires_grad_()
    ref = cl.chain_linear_ref(ref_x, ref_ws, [b.detach().double() for b in bs])
    assert _rel(y, ref.detach()) < 1e-2
    g = torch.randn(ref.shape, dtype=torch.float64)
    y.backward(g.to(torch.bfloat16))
    ref.backward(g)
    assert x.grad.dtype == torch.float32 and all(w.grad.dtype == torch.float32 for w in ws)
    assert _rel(x.grad, ref_x.grad) < 2e-2
    for w, rw in zip(ws, ref_ws):
        assert _rel(w.grad, rw.grad) < 2e-2


def _packed(shapes, dtype=torch.float32):
    """Weights of ``shapes`` as views of one new buffer, back to back (where a step's casts land)."""
    flat = torch.randn(sum(o * p for o, p in shapes), dtype=dtype)
    out, off = [], 0
    for o, p in shapes:
        out.append(flat[off:off + o * p].view(o, p))
        off += o * p
    return out


def test_tile_tables_are_keyed_by_layout_not_addresses():
    """A chain Linear's tile tables hold weight offsets from the first chain's weight, so weights at new addresses
    with the same offsets (autocast's casts or FSDP's gathers, every step) reuse the table; other offsets get
    their own, whose rows hold those offsets."""
    shapes = [(48, 32), (40, 64)]
    a, b = _packed(shapes), _packed(shapes)
    assert a[0].data_ptr() != b[0].data_ptr()
    lay = cl._layout(a)
    assert cl._fwd_table(lay, a, None, 16, "cpu") is cl._fwd_table(lay, b, None, 16, "cpu")
    assert cl._bwd_input_tables(lay, a, 16, 16, "cpu")[1] is cl._bwd_input_tables(lay, b, 16, 16, "cpu")[1]
    apart = [torch.randn(o, p) for o, p in shapes]  # separate allocations: other offsets
    t_apart = cl._fwd_table(lay, apart, None, 16, "cpu")
    assert t_apart is not cl._fwd_table(lay, a, None, 16, "cpu")
    for ws, tab in ((a, cl._fwd_table(lay, a, None, 16, "cpu")), (apart, t_apart)):
        assert tab.tolist() == cl.fwd_tile_rows(ws, lay.out_start, [0, 0], 16)


def test_autocast_pack_cast_is_one_buffer_and_casts_gradients_back():
    """What the autocast entry hands the kernel: the fp32 weights cast into one buffer, back to back (so their
    offsets, and the tile tables, are the same every step); the gradients reach each weight in its own dtype."""
    ws = [torch.randn(24, 16, requires_grad=True), torch.randn(16, 48, requires_grad=True)]
    outs = cl._PackCast.apply(torch.bfloat16, *ws)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    assert outs[0].untyped_storage().data_ptr() == outs[1].untyped_storage().data_ptr()
    assert cl._rel_offsets(list(outs)) == (0, 24 * 16)
    again = cl._PackCast.apply(torch.bfloat16, *ws)
    assert cl._rel_offsets(list(again)) == cl._rel_offsets(list(outs))
    for o, w in zip(outs, ws):
        assert torch.equal(o, w.detach().to(torch.bfloat16))
    gs = [torch.randn(o.shape).to(torch.bfloat16) for o in outs]
    torch.autograd.backward(outs, gs)
    for w, g in zip(ws, gs):
        assert w.grad.dtype == torch.float32 and torch.equal(w.grad, g.float())


@cuda
def test_cuda_autocast_training_takes_the_kernel(monkeypatch):
    """Under CUDA autocast (bf16) the dispatcher runs the Triton chain Linear on cast inputs, not the per-chain
    reference; gradients reach the fp32 weights, close to the reference path's under the same autocast."""
    x, ws, _ = _make([512, 512], [512, 512], (2, 64), torch.float32, "cuda", bias=False)
    seen = []
    real = cl.chain_linear_triton
    monkeypatch.setattr(cl, "chain_linear_triton", lambda *a, **k: seen.append(1) or real(*a, **k))
    g = torch.randn(2, 64, 1024, device="cuda")
    outs = {}
    for mode in ("kernel", "ref"):
        if mode == "ref":
            monkeypatch.setenv("COLM_CHAIN_LINEAR", "ref")
        for t in [x] + ws:
            t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = cl.chain_linear(x, ws)
        assert y.dtype == torch.bfloat16
        y.float().backward(g)
        outs[mode] = (y.detach().float(), x.grad.clone(), [w.grad.clone() for w in ws])
        assert (len(seen) > 0) == (mode == "kernel")
        seen.clear()
    (yk, xk, wk), (yr, xr, wr) = outs["kernel"], outs["ref"]
    assert _rel(yk, yr.double()) < 1e-2 and _rel(xk, xr.double()) < 2e-2
    assert all(a.dtype == torch.float32 and _rel(a, b.double()) < 2e-2 for a, b in zip(wk, wr))


@cuda
def test_cuda_dispatcher_takes_triton_and_ref_env(monkeypatch):
    x, ws, _ = _make([512, 512], [512, 512], (64,), torch.bfloat16, "cuda", bias=False)
    y = cl.chain_linear(x, ws)
    assert _rel(y, cl.chain_linear_ref(x.double(), [w.detach().double() for w in ws])) < 1e-2
    monkeypatch.setenv("COLM_CHAIN_LINEAR", "ref")
    assert torch.equal(cl.chain_linear(x, ws), cl.chain_linear_ref(x, ws))

