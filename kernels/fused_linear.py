"""Several Linears that read one input, in one launch: ``y[:, col_s : col_s + out_s] = x[:, :P_s] @ W_sᵀ``.

A decode step at a handful of rows is a weight read, and every launch pays a ramp and a drain of a
few microseconds on top of its bytes (on an H200 a 2 MB K/V projection through cuBLAS took 7.4 us, a
tenth of the copy rate). Where several projections read the same input -- CoLM-Air's query chains with
the chain-1 K/V weight, the FFN's gate chains with its up chains -- one launch over all their output
tiles reads the same bytes behind one ramp.

Each weight is a *segment*: ``W_s [out_s, P_s]`` row-major, reading the input's first ``P_s`` features
and writing columns ``col_s ..`` of y. Segments need not form a chain Linear (``P_s`` need not grow
and two segments may read the same prefix); they are never copied: the tile table (the chain-linear
forward table, rows ``[w_off, P_s, y_col, n_valid, 0]``, longest K first) holds element offsets from
the first segment's address. So every kernel that walks that table runs a segment list unchanged:

* up to ``chain_linear_gemv.MAX_ROWS`` rows: the CUDA-core matrix-vector kernel;
* up to ``chain_linear.SMALL_M`` rows: the chain-linear GEMM kernel;

each weighed by the tuner (graph replays with the weights cold, as decode runs) against one cuBLAS call
per segment, the unfused baseline.

``fused_linear_glu`` is the FFN's down projection at up to ``chain_linear_gemv.MAX_ROWS`` rows (bf16): its input
is the gate product silu(gate) * up of the fused gate|up result, which the matrix-vector kernel computes as it loads
each K piece (rounded as ``swiglu.silu_mul`` rounds), so the product is never written and its launch is gone. The
tuner weighs it against the two launches it replaces (``SEPARATE_GLU``: ``silu_mul``, then the down projection as
tuned alone). ``COLM_DECODE_GLU=0`` turns only this off (the decode-step benchmark's side-by-side variant). ``fused_linear_ref`` is the per-segment loop and the path everywhere
else (CPU, more rows, autograd, mixed dtypes). ``COLM_DECODE_FUSION=0`` turns the fused launches off
(``fits`` is False, so the model runs its separate projections) and with them the one-chain
matrix-vector routing of ``chain_linear``: the decode step as it was before fusion, for side-by-side
benchmarks.
"""

from __future__ import annotations

import importlib
import os
from typing import NamedTuple, Sequence

import torch

from colm.kernels import _tuning
from colm.kernels.swiglu import silu_mul

_cl = importlib.import_module("colm.kernels.chain_linear")
_clf = importlib.import_module("colm.kernels.chain_linear_fwd")  # the GEMM kernel's home (where a spy patches it)
_gemv = importlib.import_module("colm.kernels.chain_linear_gemv")

PER_SEGMENT_CUBLAS = _cl.PER_CHAIN_CUBLAS  # the tuner's unfused candidate: one F.linear per segment
SEPARATE_GLU = _cl.GemmConfig(0, 0, 0, 0, 1)  # fused_linear_glu's unfused candidate: silu_mul, then fused_linear


class Segment(NamedTuple):
    """One weight of a fused launch: ``y[..., col : col + out] = x[..., :P] @ weightᵀ``."""

    weight: torch.Tensor  # [out, P], contiguous
    col: int  # first output column


def out_width(segments: Sequence[Segment]) -> int:
    return max(s.col + s.weight.shape[0] for s in segments)


def check_segments(x: torch.Tensor, segments: Sequence[Segment]) -> None:
    """Raise ValueError naming the segment that does not fit ``x`` or overlaps another's columns."""
    if not segments:
        raise ValueError("fused_linear: no segments")
    spans = []
    for i, (w, col) in enumerate(segments):
        if w.dim() != 2:
            raise ValueError(f"fused_linear: segment {i} weight must be 2-D [out, P], got {tuple(w.shape)}")
        if w.shape[1] > x.shape[-1]:
            raise ValueError(f"fused_linear: segment {i} reads {w.shape[1]} features, the input has {x.shape[-1]}")
        if col < 0:
            raise ValueError(f"fused_linear: segment {i} starts at column {col}")
        spans.append((col, col + w.shape[0], i))
    spans.sort()
    for (a0, a1, i), (b0, _, j) in zip(spans, spans[1:]):
        if b0 < a1:
            raise ValueError(f"fused_linear: segments {i} and {j} both write columns {b0}..{min(a1, b0 + 1)}")
    if spans[0][0] != 0 or any(b0 != a1 for (_, a1, _), (b0, _, _) in zip(spans, spans[1:])):
        raise ValueError("fused_linear: the segments' columns must tile 0..width without gaps")


def fused_linear_ref(x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
    """The per-segment loop: y [..., width] with each segment's columns from its own Linear."""
    y = x.new_empty(*x.shape[:-1], out_width(segments))
    for w, col in segments:
        y[..., col:col + w.shape[0]] = torch.nn.functional.linear(x[..., : w.shape[1]], w)
    return y


def enabled() -> bool:
    return os.environ.get("COLM_DECODE_FUSION", "1") not in ("", "0")


def fits(x: torch.Tensor, segments: Sequence[Segment] = ()) -> bool:
    """Whether ``fused_linear`` runs a kernel for ``x`` (CUDA bf16/fp16, <= SMALL_M rows, no autograd)."""
    weights = [s.weight for s in segments]
    if not enabled() or x.numel() > _cl.SMALL_M * x.shape[-1] or x.stride(-1) != 1 or _cl.needs_grad(x, weights):
        return False
    return _cl._use_triton(x, weights, None) and all(w.is_contiguous() for w in weights)


def fused_linear(x: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
    """y [..., width] = every segment's Linear of ``x``: one launch where ``fits``, else the reference."""
    check_segments(x, segments)
    if not fits(x, segments):
        return fused_linear_ref(x, segments)
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y = fused_linear_forward(x2d, segments)
    return y.view(*x.shape[:-1], y.shape[-1])


def _segments_table(segments, bn, device):
    """Forward-table rows [w_off, P, y_col, n_valid, 0] per tile of ``bn`` columns, longest K first."""
    key = ("segs", tuple((w.data_ptr(), tuple(w.shape), col) for w, col in segments), bn, device)
    if key in _cl._TABLES:
        return _cl._TABLES[key]
    weights = [s.weight for s in segments]
    return _cl._table(key, _cl.fwd_tile_rows(weights, [s.col for s in segments], [0] * len(segments), bn), device)


def _candidates(m: int) -> list:
    if m == 1:  # the one-row configurations measured fastest with cold weights (see chain_linear_gemv)
        return list(_gemv.GEMV_CONFIGS_M1)
    small = list(_cl.FWD_SMALL_M_CONFIGS) + [PER_SEGMENT_CUBLAS]
    return (list(_gemv.GEMV_CONFIGS) + small) if m <= _gemv.MAX_ROWS else small


def _layout(x2d: torch.Tensor, segments: Sequence[Segment], more_dims=()) -> tuple[list, list, list, bool]:
    """(weights, their rows, their input features, aligned) of a launch over ``segments`` reading ``x2d``: aligned
    when every size and column (and ``more_dims``) is a multiple of 8 and the weights, x2d and its rows start on
    16 bytes (the caller adds its output's pointer)."""
    weights = [s.weight for s in segments]
    dims = [d for w in weights for d in w.shape] + [s.col for s in segments] + list(more_dims)
    aligned = (all(d % 8 == 0 for d in dims) and all(t.data_ptr() % 16 == 0 for t in weights + [x2d])
               and x2d.stride(0) % 8 == 0)
    return weights, [w.shape[0] for w in weights], [w.shape[1] for w in weights], aligned


def fused_linear_forward(x2d: torch.Tensor, segments: Sequence[Segment], config=None) -> torch.Tensor:
    """y [M, width] from x2d [M, K] (unit column stride), ``config`` pinned or tuned per shape."""
    m = x2d.shape[0]
    y = torch.empty((m, out_width(segments)), device=x2d.device, dtype=x2d.dtype)
    if m == 0:
        return y
    weights, outs, prefixes, aligned = _layout(x2d, segments)
    aligned = aligned and y.data_ptr() % 16 == 0

    def launch(cfg):
        if cfg == PER_SEGMENT_CUBLAS:
            for w, col in segments:
                y[:, col:col + w.shape[0]] = torch.nn.functional.linear(x2d[:, : w.shape[1]], w)
            return
        if cfg.gemv:
            if m > _gemv.MAX_ROWS:
                raise ValueError(f"fused_linear: {m} rows for the matrix-vector kernel, at most {_gemv.MAX_ROWS}")
            tab = _segments_table(segments, cfg.block_n, x2d.device)
            _gemv.launch_table(x2d, weights[0], None, y, tab, outs, prefixes, cfg, aligned)
            return
        tab = _segments_table(segments, cfg.block_n, x2d.device)
        num_m, num_n = -(-m // cfg.block_m), tab.shape[0]
        _clf._chain_fwd_kernel[(num_m * num_n,)](
            x2d, weights[0], x2d, y, tab, m, x2d.stride(0), y.stride(0), num_m, num_n, ALIGNED=aligned,
            **_cl.fwd_flags(x2d, cfg, outs, prefixes, False))

    if config is None:
        if _tuning.interpreting():
            config = _cl.INTERPRETER_CONFIG
        else:
            key = ("segs", x2d.dtype, x2d.device, tuple(zip(outs, prefixes)), _gemv.block_m(m), aligned)
            config = _tuning.pick(key, _candidates(m), launch, graph=x2d.is_cuda)
    launch(config)
    return y


def glu_fits(gu: torch.Tensor, segments: Sequence[Segment] = ()) -> bool:
    """Whether ``fused_linear_glu`` runs the kernel for ``gu`` (CUDA bf16, <= MAX_ROWS rows, no autograd)."""
    rows = gu.numel() // max(gu.shape[-1], 1)
    if os.environ.get("COLM_DECODE_GLU", "1") in ("", "0"):
        return False
    return gu.dtype == torch.bfloat16 and rows <= _gemv.MAX_ROWS and fits(gu, segments)


def fused_linear_glu(gu: torch.Tensor, f: int, segments: Sequence[Segment]) -> torch.Tensor:
    """y [..., width] = every segment's Linear of silu(gu[..., :f]) * gu[..., f:2f]: one launch where ``glu_fits``
    (the gate product formed as the weights stream), else ``silu_mul`` and ``fused_linear``."""
    if gu.shape[-1] != 2 * f:
        raise ValueError(f"fused_linear_glu: the gate|up input is {gu.shape[-1]} wide, expected 2 x {f}")
    if not glu_fits(gu, segments):
        return fused_linear(silu_mul(gu[..., :f], gu[..., f:]), segments)
    check_segments(gu[..., :f], segments)
    g2d = gu.reshape(-1, gu.shape[-1])
    y = fused_linear_glu_forward(g2d, f, segments)
    return y.view(*gu.shape[:-1], y.shape[-1])


def fused_linear_glu_forward(gu2d: torch.Tensor, f: int, segments: Sequence[Segment], config=None) -> torch.Tensor:
    """y [M, width] from gu2d [M, 2f] (unit column stride, M <= MAX_ROWS), ``config`` pinned or tuned per shape."""
    m = gu2d.shape[0]
    if m > _gemv.MAX_ROWS:
        raise ValueError(f"fused_linear_glu: {m} rows, at most {_gemv.MAX_ROWS}")
    width = out_width(segments)
    weights, outs, prefixes, aligned = _layout(gu2d, segments, (f,))
    out: list[torch.Tensor] = []

    def separate() -> torch.Tensor:
        return fused_linear_forward(silu_mul(gu2d[:, :f], gu2d[:, f:]), segments)

    def launch(cfg):
        out.clear()
        if cfg == SEPARATE_GLU:
            out.append(separate())
            return
        y = torch.empty((m, width), device=gu2d.device, dtype=gu2d.dtype)
        tab = _segments_table(segments, cfg.block_n, gu2d.device)
        _gemv.launch_table(gu2d, weights[0], None, y, tab, outs, prefixes, cfg, aligned and y.data_ptr() % 16 == 0,
                           glu_off=f)
        out.append(y)

    if m == 0:
        return torch.empty((0, width), device=gu2d.device, dtype=gu2d.dtype)
    if config is None:
        if _tuning.interpreting():
            config = _cl.INTERPRETER_CONFIG
        else:
            key = ("glu", gu2d.dtype, gu2d.device, tuple(zip(outs, prefixes)), f, _gemv.block_m(m), aligned)
            if key not in _tuning._BEST:
                separate()  # the separate path's own tuning settles first, outside this one's timed captures
            gemv = _gemv.GEMV_CONFIGS_M1 if m == 1 else _gemv.GEMV_CONFIGS
            config = _tuning.pick(key, list(gemv) + [SEPARATE_GLU], launch, graph=gu2d.is_cuda)
    launch(config)
    return out[0]
