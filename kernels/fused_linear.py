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
per segment, the unfused baseline. ``fused_linear_ref`` is the per-segment loop and the path everywhere
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

_cl = importlib.import_module("colm.kernels.chain_linear")
_gemv = importlib.import_module("colm.kernels.chain_linear_gemv")

PER_SEGMENT_CUBLAS = _cl.PER_CHAIN_CUBLAS  # the tuner's unfused candidate: one F.linear per segment


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


def fused_linear_forward(x2d: torch.Tensor, segments: Sequence[Segment], config=None) -> torch.Tensor:
    """y [M, width] from x2d [M, K] (unit column stride), ``config`` pinned or tuned per shape."""
    m = x2d.shape[0]
    width = out_width(segments)
    y = torch.empty((m, width), device=x2d.device, dtype=x2d.dtype)
    if m == 0:
        return y
    weights = [s.weight for s in segments]
    dims = [d for w in weights for d in w.shape] + [s.col for s in segments]
    aligned = (all(d % 8 == 0 for d in dims) and all(t.data_ptr() % 16 == 0 for t in weights + [x2d, y])
               and x2d.stride(0) % 8 == 0)
    outs, prefixes = [w.shape[0] for w in weights], [w.shape[1] for w in weights]

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
        _cl._chain_fwd_kernel[(num_m * num_n,)](
            x2d, weights[0], x2d, y, tab, m, x2d.stride(0), y.stride(0), num_m, num_n,
            HAS_BIAS=False, EVEN_N=all(o % cfg.block_n == 0 for o in outs),
            EVEN_K=all(p % cfg.block_k == 0 for p in prefixes), ALIGNED=aligned, UPCAST=_cl._upcast(x2d),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP=_cl.GROUP_N,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if config is None:
        if _tuning.interpreting():
            config = _cl.INTERPRETER_CONFIG
        else:
            key = ("segs", x2d.dtype, x2d.device, tuple(zip(outs, prefixes)), _gemv.block_m(m), aligned)
            config = _tuning.pick(key, _candidates(m), launch, graph=x2d.is_cuda)
    launch(config)
    return y
