"""Fused few-row Linears (``colm.kernels.fused_linear``) against a float64 per-segment reference.

CPU: the matrix-vector and GEMM kernels over segment tables in Triton's interpreter (child pytest),
with the segment lists the model builds (query chains + the chain-1 K/V weight, gate + up chains),
ragged sizes, a prefix that ends inside a K piece (nothing beyond it may be read), and a model whose
decode steps take the fused path against the same model unfused. CUDA: the tuned launch at the 1B
shapes, and a decode step's projections fused vs not.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from _kernel_helpers import cuda, interp, run_interpreter_cases

triton = pytest.importorskip("triton")
fl = importlib.import_module("colm.kernels.fused_linear")
cl = importlib.import_module("colm.kernels.chain_linear")

GEMV = [cl.GemmConfig(0, 8, 16, 1, 1, gemv=True), cl.GemmConfig(0, 4, 64, 2, 1, gemv=True)]
GEMM = cl.GemmConfig(16, 16, 16, 1, 1)


def test_interpreter_suite():
    run_interpreter_cases(__file__)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _segments(shapes, dtype, device, order=None):
    """Segments of [out, P] weights laid out left to right (``order``: the column order of the shapes)."""
    order = list(range(len(shapes))) if order is None else order
    ws = [(torch.randn(o, p, device=device) / p**0.5).to(dtype) for o, p in shapes]
    segs, col = [None] * len(shapes), 0
    for i in order:
        segs[i] = fl.Segment(ws[i], col)
        col += shapes[i][0]
    return segs


def _ref64(x, segs):
    return fl.fused_linear_ref(x.double(), [fl.Segment(w.double(), c) for w, c in segs])


# (segment shapes [out, P], input width): q chains + K/V of chain 1 (Air); gate + up chains; ragged ones
CASES = [
    ([(16, 16), (16, 32), (16, 16)], 32),
    ([(24, 16), (24, 32), (24, 16), (24, 32)], 32),
    ([(12, 20), (36, 32), (8, 20)], 32),
    ([(40, 24)], 24),
]


@interp
@pytest.mark.parametrize("shapes,width", CASES)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("cfg", GEMV)
def test_interpreter_gemv_segments_match_float64(shapes, width, rows, cfg):
    torch.manual_seed(hash((tuple(shapes), rows, cfg)) % 2**31)
    segs = _segments(shapes, torch.bfloat16, "cpu", order=list(reversed(range(len(shapes)))))
    x = torch.randn(rows, width).to(torch.bfloat16)
    y = fl.fused_linear_forward(x, segs, cfg)
    ref = _ref64(x, segs)
    assert y.shape == ref.shape and _rel(y, ref) < 1e-2


@interp
@pytest.mark.parametrize("shapes,width", CASES)
@pytest.mark.parametrize("rows", [1, 9, 20])
def test_interpreter_gemm_segments_match_float64(shapes, width, rows):
    torch.manual_seed(hash((tuple(shapes), rows)) % 2**31)
    segs = _segments(shapes, torch.float16, "cpu")
    x = torch.randn(rows, width).to(torch.float16)
    y = fl.fused_linear_forward(x, segs, GEMM)
    ref = _ref64(x, segs)
    assert y.shape == ref.shape and _rel(y, ref) < 2e-3


@interp
@pytest.mark.parametrize("cfg", GEMV + [GEMM])
def test_interpreter_segments_never_read_past_their_prefix(cfg):
    """A 20-feature segment's K pieces end inside the 32-wide input: NaN past column 20 must not reach it."""
    torch.manual_seed(3)
    segs = _segments([(16, 20), (16, 32)], torch.bfloat16, "cpu")
    x = torch.randn(4, 32).to(torch.bfloat16)
    x[:, 20:] = float("nan")
    y = fl.fused_linear_forward(x, segs, cfg)
    ref = fl.fused_linear_ref(x[:, :20].double(), [fl.Segment(segs[0].weight.double(), 0)])
    assert not torch.isnan(y[:, :16]).any() and _rel(y[:, :16], ref) < 1e-2
    assert torch.isnan(y[:, 16:]).all()


@interp
def test_interpreter_gemv_rejects_too_many_rows():
    segs = _segments([(16, 16)], torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="9 rows"):
        fl.fused_linear_forward(torch.randn(9, 16).to(torch.bfloat16), segs, GEMV[0])


@interp
@pytest.mark.parametrize("preset", ["tiny-air", "tiny", "tiny-1chain"])
def test_interpreter_model_decode_fused_matches_unfused(monkeypatch, preset):
    """A model's few-row forward through the fused launches (q+K+V, gate+up; forced on the CPU) equals the same
    model's separate projections, at every scale, with a KV cache: CoLM-Air (q with the chain-1 K/V weight), CoLM
    without KV sharing (every chain's K and V) and one chain (a dense Llama). Float32: the kernels' fp32 sums run
    in another order than the CPU's GEMMs, so close, not bit-equal."""
    from conftest import make_model

    from colm.kv_cache import ContiguousKVCache as KVCache

    torch.manual_seed(0)
    model = make_model(preset)
    calls = []
    real = fl.fused_linear_forward

    def forward(x2d, segs, config=None):
        calls.append(len(segs))
        return real(x2d, segs, GEMV[1] if x2d.shape[0] <= 8 else GEMM)

    tokens = torch.randint(0, model.cfg.vocab_size, (2, 5))
    with torch.no_grad():
        for scale in range(1, model.cfg.num_chains + 1):
            plain = KVCache(model.cfg, 2, 16)
            expect = [model(tokens[:, :3], scale=scale, cache=plain)]
            expect += [model(tokens[:, i:i + 1], scale=scale, cache=plain) for i in (3, 4)]
            fused = make_model(preset)
            fused.load_state_dict(model.state_dict())
            fused.fuse_projections()
            monkeypatch.setattr(fl, "fits", lambda x, segments=None: x.numel() // x.shape[-1] <= cl.SMALL_M)
            monkeypatch.setattr(fl, "fused_linear_forward", forward)
            cache = KVCache(model.cfg, 2, 16)
            got = [fused(tokens[:, :3], scale=scale, cache=cache)]
            got += [fused(tokens[:, i:i + 1], scale=scale, cache=cache) for i in (3, 4)]
            monkeypatch.undo()
            for g, e in zip(got, expect):
                assert _rel(g, e.double()) < 1e-5
                assert torch.equal(g.argmax(-1), e.argmax(-1))
    n_layers = model.cfg.n_layers
    assert len(calls) == 2 * n_layers * 3 * model.cfg.num_chains  # q|kv and gate|up, 3 forwards, every scale


def _glu_ref64(gu, f, segs):
    """The gate product rounded as silu_mul rounds it (bf16), then the segments' Linears in float64."""
    from colm.kernels.swiglu import silu_mul_ref

    return _ref64(silu_mul_ref(gu[:, :f], gu[:, f:]), segs)


# (down projection segments [out, P], gate width f): two chains of a 2-chain FFN; one chain; a ragged prefix
GLU_CASES = [
    ([(16, 32), (16, 64)], 64),
    ([(24, 48)], 48),
    ([(8, 20), (8, 40)], 40),
]


@interp
@pytest.mark.parametrize("shapes,f", GLU_CASES)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("cfg", GEMV)
def test_interpreter_gemv_forms_the_gate_product_as_it_loads(shapes, f, rows, cfg):
    """The down projection's launch with silu(gate) * up formed in its K pieces equals silu_mul's product (the same
    kernel math, rounded to bf16) through the same launch bit for bit, and a float64 reference within bf16."""
    from colm.kernels.swiglu import silu_mul_triton

    torch.manual_seed(hash((tuple(shapes), f, rows, cfg)) % 2**31)
    segs = _segments(shapes, torch.bfloat16, "cpu")
    gu = (torch.randn(rows, 2 * f) * 2).to(torch.bfloat16)
    y = fl.fused_linear_glu_forward(gu, f, segs, cfg)
    separate = fl.fused_linear_forward(silu_mul_triton(gu[:, :f], gu[:, f:]), segs, cfg)
    assert torch.equal(y, separate)
    assert _rel(y, _glu_ref64(gu, f, segs)) < 1e-2


@interp
def test_interpreter_gate_product_never_reads_past_a_prefix():
    """A 20-feature chain reads gate and up columns < 20 only: NaN in gate[20:] and up[20:] must not reach it."""
    torch.manual_seed(4)
    segs = _segments([(8, 20), (8, 40)], torch.bfloat16, "cpu")
    gu = torch.randn(2, 80).to(torch.bfloat16)
    gu[:, 20:40] = float("nan")
    gu[:, 60:] = float("nan")
    y = fl.fused_linear_glu_forward(gu, 40, segs, GEMV[1])
    ref = _glu_ref64(torch.cat([gu[:, :20], gu[:, 40:60]], 1), 20, [segs[0]])
    assert not torch.isnan(y[:, :8]).any() and _rel(y[:, :8], ref) < 1e-2
    assert torch.isnan(y[:, 8:]).all()


@interp
def test_interpreter_ffn_takes_the_gate_product_launch(monkeypatch):
    """A bf16 chain FFN with its fused launches forced on the CPU: a 3-row input takes gate|up, then one down
    launch with the gate product inside, at every scale, within bf16 of the FFN's separate ops."""
    from colm.ffn import ChainFFN
    from colm.presets import preset

    torch.manual_seed(5)
    cfg = preset("tiny-air")
    ffn = ChainFFN(cfg, dtype=torch.bfloat16)
    for lin in (ffn.w1, ffn.w2, ffn.w3):
        lin.reset_parameters(std=0.2)
    xs = {s: torch.randn(3, cfg.scale_dim(s)).to(torch.bfloat16) for s in range(1, cfg.num_chains + 1)}
    with torch.no_grad():
        want = {s: ffn(x, s) for s, x in xs.items()}  # not fused yet: the separate ops
    ffn.fuse_gate_up()
    real, real_glu, calls = fl.fused_linear_forward, fl.fused_linear_glu_forward, []
    monkeypatch.setattr(fl, "fits", lambda x, segments=None: True)
    monkeypatch.setattr(fl, "fused_linear_forward", lambda x2d, segs, config=None: real(x2d, segs, GEMV[1]))
    monkeypatch.setattr(fl, "fused_linear_glu_forward",
                        lambda gu, f, segs, config=None: calls.append(f) or real_glu(gu, f, segs, GEMV[1]))
    with torch.no_grad():
        for s, x in xs.items():
            assert _rel(ffn(x, s), want[s].double()) < 2e-2
    assert calls == [ffn.w1.out_prefix[s - 1] for s in xs]


def test_check_segments_names_the_bad_segment():
    x = torch.randn(2, 16)
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="segment 1 reads 32 features"):
        fl.check_segments(x, [fl.Segment(w, 0), fl.Segment(torch.randn(8, 32), 8)])
    with pytest.raises(ValueError, match="segments 0 and 1 both write"):
        fl.check_segments(x, [fl.Segment(w, 0), fl.Segment(w, 4)])
    with pytest.raises(ValueError, match="without gaps"):
        fl.check_segments(x, [fl.Segment(w, 0), fl.Segment(w, 12)])
    with pytest.raises(ValueError, match="no segments"):
        fl.check_segments(x, [])


def test_cpu_takes_the_reference():
    torch.manual_seed(1)
    segs = _segments([(8, 16), (4, 8)], torch.float32, "cpu")
    x = torch.randn(3, 16)
    assert not fl.fits(x, segs)
    y = fl.fused_linear(x, segs)
    assert torch.equal(y[:, :8], x @ segs[0].weight.t()) and torch.equal(y[:, 8:], x[:, :8] @ segs[1].weight.t())


@cuda
@pytest.mark.parametrize("rows", [1, 4, 8, 33])
@pytest.mark.parametrize("name", ["qkv", "gate_up"])
def test_cuda_1b_shapes_tuned(rows, name):
    torch.manual_seed(rows)
    shapes = {"qkv": [(1024, 1024), (1024, 2048), (1024, 1024)],
              "gate_up": [(4096, 1024), (4096, 2048), (4096, 1024), (4096, 2048)]}[name]
    segs = _segments(shapes, torch.bfloat16, "cuda")
    x = torch.randn(rows, 2048, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        assert fl.fits(x, segs)
        y = fl.fused_linear(x, segs)
    assert _rel(y, _ref64(x, segs)) < 1e-2


@cuda
@pytest.mark.parametrize("rows", [1, 4, 8])
def test_cuda_gate_product_launch_equals_the_separate_ops(rows):
    """At the 1B {16,16} down projection (chains of 4096 and 8192 inputs, 1024 outputs each): every matrix-vector
    configuration gives bit for bit what silu_mul's product gives through the same launch, and the tuned launch is
    within bf16 of float64."""
    from colm.kernels.swiglu import silu_mul

    torch.manual_seed(rows)
    segs = _segments([(1024, 4096), (1024, 8192)], torch.bfloat16, "cuda")
    gu = (torch.randn(rows, 2 * 8192, device="cuda") * 2).to(torch.bfloat16)
    x = silu_mul(gu[:, :8192], gu[:, 8192:])
    with torch.no_grad():
        for cfg in (fl._gemv.GEMV_CONFIGS_M1 if rows == 1 else fl._gemv.GEMV_CONFIGS):
            assert torch.equal(fl.fused_linear_glu_forward(gu, 8192, segs, cfg), fl.fused_linear_forward(x, segs, cfg))
        assert fl.glu_fits(gu, segs)
        y = fl.fused_linear_glu(gu, 8192, segs)
    assert _rel(y, _glu_ref64(gu, 8192, segs)) < 1e-2


@cuda
def test_cuda_decode_step_fused_close_to_unfused(monkeypatch):
    """A bf16 CoLM-Air decode step (3 rows, a 6-token context) with the fused launches equals the separate
    projections (COLM_DECODE_FUSION=0) within bf16 rounding, at both scales, and really took them."""
    from conftest import make_model

    from colm.kv_cache import ContiguousKVCache

    torch.manual_seed(0)
    model = make_model("tiny-air", std=0.05).to("cuda", torch.bfloat16).fuse_projections()
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 7), device="cuda")
    calls = []
    real = fl.fused_linear_forward
    monkeypatch.setattr(fl, "fused_linear_forward", lambda x2d, segs, config=None: calls.append(1) or real(x2d, segs, config))
    for scale in (1, 2):
        outs = {}
        for fusion in ("1", "0"):
            monkeypatch.setenv("COLM_DECODE_FUSION", fusion)
            cache = ContiguousKVCache(model.cfg, 3, 16, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                model.hidden(tokens[:, :6], scale=scale, cache=cache)
                n = len(calls)
                outs[fusion] = model.hidden(tokens[:, 6:], scale=scale, cache=cache).float()
            assert (len(calls) > n) == (fusion == "1")
        torch.testing.assert_close(outs["1"], outs["0"], atol=3e-2, rtol=3e-2)


@cuda
def test_cuda_one_chain_few_rows_takes_the_kernel(monkeypatch):
    """A one-chain Linear at decode's rows runs the tuned kernel (not cuBLAS' GEMV) unless fusion is off or
    autograd needs it."""
    torch.manual_seed(2)
    w = (torch.randn(1024, 1024, device="cuda") / 32).to(torch.bfloat16)
    x = torch.randn(1, 1024, device="cuda").to(torch.bfloat16)
    seen = []
    real = cl.chain_linear_triton
    monkeypatch.setattr(cl, "chain_linear_triton", lambda *a, **k: seen.append(1) or real(*a, **k))
    with torch.no_grad():
        y = cl.chain_linear(x, [w])
    assert seen and _rel(y, x.double() @ w.double().t()) < 1e-2
    seen.clear()
    monkeypatch.setenv("COLM_DECODE_FUSION", "0")
    with torch.no_grad():
        cl.chain_linear(x, [w])
    monkeypatch.delenv("COLM_DECODE_FUSION")
    cl.chain_linear(x, [w.requires_grad_()])
    assert not seen


@cuda
def test_cuda_cold_graph_timing_reads_the_weights_from_memory():
    """The tuner's cold timing takes the L2 flush off and leaves the weight read: a 32 MB weight that a warm
    replay finds in L2 takes longer cold, and the flush alone does not count (it is many times the call)."""
    from colm.kernels._tuning import graph_time_ms

    w = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)  # 32 MB: fits the H100/H200 L2 warm
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    fn = lambda: torch.nn.functional.linear(x, w)  # noqa: E731
    warm = graph_time_ms(fn, replays=30)
    cold = graph_time_ms(fn, replays=30, cold=True)
    props = torch.cuda.get_device_properties(0)
    flush_ms = 2 * props.L2_cache_size / 1e9  # at >= 1 TB/s: a bound on the flush's own time, ms
    assert 0 < cold < 10 * warm + flush_ms
    if props.L2_cache_size >= 40 << 20:
        assert cold > warm


def test_pdl_is_off_where_it_cannot_or_should_not_apply(monkeypatch):
    """No PDL on the CPU, under the interpreter, past MAX_ROWS rows, or with COLM_PDL=0; no launch keyword then."""
    from colm.kernels import _pdl

    cpu = torch.empty(1)
    assert not _pdl.use(cpu, 1) and _pdl.launch_options(False) == {}
    assert _pdl.launch_options(True) == {"launch_pdl": True}
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        gpu = torch.empty(1, device="cuda")
        assert _pdl.use(gpu, _pdl.MAX_ROWS) and not _pdl.use(gpu, _pdl.MAX_ROWS + 1)
        monkeypatch.setenv("COLM_PDL", "0")
        assert not _pdl.use(gpu, 1)
