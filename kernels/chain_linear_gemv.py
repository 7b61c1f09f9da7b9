"""Few-row chain Linear forward (decode steps): a matrix-vector kernel over the same tile table.

A decode step multiplies a handful of rows (the running sequences) by every weight of the layer, so
it is a pure weight read: the time is bytes / bandwidth once enough loads are in flight. The GEMM
kernels of ``colm.kernels.chain_linear_fwd`` pad the rows to a 16-row MMA tile and need 32+ output
columns per program, which leaves a 2048-wide output with 64 programs: too few to keep HBM busy
(measured 1.2 TB/s on an H100 at batch 1). This kernel has no MMA shape limits: a program owns
``BLOCK_N`` (4-16) output columns of one chain, streams that slab of ``W_i`` in ``BLOCK_K``-long
coalesced row pieces, multiplies by all M <= ``BLOCK_M`` rows on the CUDA cores in fp32 and reduces
over K once at the end, so a 2048-wide output gives 128-512 programs.

Same layout and table as the GEMM forward (rows ``[w_off, P_i, y_col, n_valid, b_off]`` per tile of
``BLOCK_N`` columns, longest K first), same masking rules (no read of input columns >= P_i), same
fp32 accumulation. It is one more candidate of the forward tuner for M <= ``MAX_ROWS``, timed as a
graph replay like the other few-row candidates, so it runs only where it is measured fastest.
"""

from __future__ import annotations

import importlib

import torch

from colm.kernels import _pdl, _tuning
from colm.kernels import chain_linear_jit as _jit
from colm.kernels import chain_linear_tables as _tab

MAX_ROWS = 8  # rows per launch: the [BLOCK_M, BLOCK_N, BLOCK_K] fp32 partials live in registers
PARTIALS_PER_THREAD = 64  # fp32 registers per thread for them; BLOCK_K shrinks with the rows to keep it

# (block_m is set per launch from M; block_n, block_k, num_warps, num_stages)
GEMV_CONFIGS = [
    _tab.GemmConfig(0, 8, 512, 4, 3, gemv=True),
    _tab.GemmConfig(0, 4, 512, 4, 3, gemv=True),
    _tab.GemmConfig(0, 16, 256, 4, 3, gemv=True),
    _tab.GemmConfig(0, 8, 1024, 8, 2, gemv=True),
    _tab.GemmConfig(0, 16, 512, 8, 2, gemv=True),
]

# One row (a batch-1 decode step): the configurations fastest with the weights cold in L2, as a decode
# step reads them (bench/gemv_sweep.py: on an H100, bench/results/gemv_sweep_m1_h100_2026-11-23.json, 2
# columns per program with 1024-long K pieces led for all three 1B layer shapes; on an H200,
# gemv_sweep_m1_h200.json, 8 columns led for the wide gate/up launches, by 15 % for the fused one). The
# tuner picks among these only at one row (2-8 rows: ``GEMV_CONFIGS`` and the GEMM candidates), timing
# them cold (``_tuning.pick(graph=True)``), so its choice holds for a real step on either GPU. The 2048-long K
# pieces (not in either sweep) are for the down projection's long rows, which ran at 62 % of the copy rate with
# 1024-long pieces (4-8 dependent loads per program); the cold tuner keeps them only where they win.
GEMV_CONFIGS_M1 = [
    _tab.GemmConfig(0, 2, 1024, 4, 1, gemv=True),
    _tab.GemmConfig(0, 2, 1024, 2, 3, gemv=True),
    _tab.GemmConfig(0, 4, 1024, 2, 3, gemv=True),
    _tab.GemmConfig(0, 4, 1024, 2, 1, gemv=True),
    _tab.GemmConfig(0, 8, 1024, 2, 1, gemv=True),
    _tab.GemmConfig(0, 8, 512, 4, 3, gemv=True),
    _tab.GemmConfig(0, 8, 256, 2, 3, gemv=True),
    _tab.GemmConfig(0, 2, 2048, 4, 1, gemv=True),
    _tab.GemmConfig(0, 2, 2048, 8, 1, gemv=True),
    _tab.GemmConfig(0, 4, 2048, 8, 1, gemv=True),
]


if _jit.HAS_TRITON:
    import triton
    import triton.language as tl

    _gate_product = importlib.import_module("colm.kernels.swiglu").gate_product

    @triton.jit
    def _k_piece(ptrs, rk, k_left, EVEN_K: tl.constexpr):
        """One K piece [R, BLOCK_K] at ``ptrs``; columns at or past ``k_left`` read as 0 unless EVEN_K (never an input
        column >= P_i, i.e. of a later chain)."""
        if EVEN_K:
            piece = tl.load(ptrs)
        else:
            piece = tl.load(ptrs, mask=(rk < k_left)[None, :], other=0.0)
        return piece

    @triton.jit
    def _x_piece(ptrs, rk, k_left, glu_off, EVEN_K: tl.constexpr, GLU: tl.constexpr, EMULATE: tl.constexpr):
        """The input's K piece [R, BLOCK_K] at ``ptrs``; with GLU, silu(g) * u of the gate piece there and the up piece
        ``glu_off`` elements on, rounded as ``swiglu.silu_mul`` rounds (its ``gate_product``)."""
        if GLU:
            g = _k_piece(ptrs, rk, k_left, EVEN_K)
            u = _k_piece(ptrs + glu_off, rk, k_left, EVEN_K)
            piece = _gate_product(g, u, EMULATE).to(u.dtype)
        else:
            piece = _k_piece(ptrs, rk, k_left, EVEN_K)
        return piece

    @triton.jit
    def _chain_gemv_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, tab_ptr,  # x [M, P_k] (GLU: [M, glu_off + P_k], gate | up), W_1, b_1, y [M, ΣO]
        M, stride_xm, stride_ym, glu_off,
        HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False,
        GLU: tl.constexpr = False, EMULATE: tl.constexpr = False,
    ):
        """y[:, tile columns] = x[:, :P_i] @ W_i[tile rows]ᵀ for table row ``program_id`` (all M rows); with GLU the
        input is silu(x[:, :P_i]) * x[:, glu_off : glu_off + P_i] (the FFN's gate product, never written out).

        The first K piece of the tile's weights is read before the PDL wait (no kernel writes weights or
        the table), so with PDL it is in flight while the previous kernel finishes."""
        row, w_off, K, y_col, n_valid = _jit._fwd_tile_row(tab_ptr, tl.program_id(0), ALIGNED)
        rm = tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rm_ld = (rm % M).to(tl.int64)  # padding rows re-read row 0..M-1; the store drops them
        rn_ld = rn if EVEN_N else rn % n_valid
        x_ptrs = x_ptr + rm_ld[:, None] * stride_xm + rk[None, :]  # [BM, BK]
        w_ptrs = w_ptr + w_off + rn_ld[:, None].to(tl.int64) * K + rk[None, :]  # [BN, BK]: rows of W_i
        w = _k_piece(w_ptrs, rk, K, EVEN_K)
        _pdl.wait(USE_PDL)
        x = _x_piece(x_ptrs, rk, K, glu_off, EVEN_K, GLU, EMULATE)
        part = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]  # [BM, BN, BK]
        for k in range(1, tl.cdiv(K, BLOCK_K)):
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            w = _k_piece(w_ptrs, rk, K - k * BLOCK_K, EVEN_K)
            x = _x_piece(x_ptrs, rk, K - k * BLOCK_K, glu_off, EVEN_K, GLU, EMULATE)
            part += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        acc = tl.sum(part, axis=2)  # [BM, BN]
        if HAS_BIAS:
            acc = _jit._with_bias(acc, b_ptr, row, rn, n_valid, EVEN_N)
        _jit._store_tile(y_ptr, acc, rm, rn, stride_ym, y_col, M, n_valid, EVEN_N)


def block_m(m: int) -> int:
    """Rows of the register tile for ``m`` rows: the next power of two (Triton block shapes)."""
    return 1 << max(m - 1, 0).bit_length()


def launch_blocks(m: int, cfg) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) a launch for ``m`` rows uses: more rows, shorter K pieces, so the fp32 partials
    [BLOCK_M, BLOCK_N, BLOCK_K] stay within PARTIALS_PER_THREAD registers per thread."""
    bm, bk = block_m(m), cfg.block_k
    while bm * cfg.block_n * bk > PARTIALS_PER_THREAD * 32 * cfg.num_warps and bk > 32:
        bk //= 2
    return bm, bk


def gemv_forward(x2d: torch.Tensor, weights, biases, lay, y: torch.Tensor, cfg, aligned: bool) -> None:
    """y [M, ΣO] = chain Linear of x2d [M, P_k] with ``cfg`` (a ``GEMV_CONFIGS`` entry), M <= MAX_ROWS."""
    m = x2d.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"gemv_forward: {m} rows, at most {MAX_ROWS}")
    tab = _tab._fwd_table(lay, weights, biases, cfg.block_n, x2d.device)
    launch_table(x2d, weights[0], biases[0] if biases else None, y, tab, lay.outs, lay.prefix, cfg, aligned)


def launch_table(x2d, w0, b0, y, tab, outs, prefixes, cfg, aligned: bool, glu_off: int = 0) -> None:
    """One matrix-vector launch over a forward tile table whose weights are reached from ``w0`` (and
    biases from ``b0``, or none); ``outs``/``prefixes``: every weight's rows and input features. ``glu_off`` > 0:
    x2d holds the FFN's gate | up halves, the up half ``glu_off`` columns on, and the input is silu(gate) * up."""
    m = x2d.shape[0]
    bm, bk = launch_blocks(m, cfg)
    _chain_gemv_kernel[(tab.shape[0],)](
        x2d, w0, x2d if b0 is None else b0, y, tab, m, x2d.stride(0), y.stride(0), glu_off,
        HAS_BIAS=b0 is not None, EVEN_N=all(o % cfg.block_n == 0 for o in outs),
        EVEN_K=all(p % bk == 0 for p in prefixes), ALIGNED=aligned,
        BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=bk, GLU=glu_off > 0,
        EMULATE=glu_off > 0 and _tuning.interpreting() and x2d.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_pdl.kernel_kwargs(x2d, m),
    )
