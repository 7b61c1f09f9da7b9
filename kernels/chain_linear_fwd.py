"""Chain Linear forward: y[:, O_i + n] = x[:, :P_i] @ W_i[n, :]ᵀ, one launch over the output tiles of every chain.

``_chain_fwd_kernel`` runs one program per output tile of BLOCK_N columns of one chain, whose K-loop stops at that
chain's input prefix P_i (forward table rows of ``chain_linear_tables``). ``chain_linear_forward`` weighs it, per
shape, against the Hopper variants of ``chain_linear_hopper`` (persistent, TMA), the few-row matrix-vector kernel of
``chain_linear_gemv`` and the per-chain cuBLAS loop (``PER_CHAIN_CUBLAS``).
"""

from __future__ import annotations

import torch

from colm.kernels import _tuning
from colm.kernels import chain_linear_gemv as _gemv
from colm.kernels import chain_linear_hopper as _hopper
from colm.kernels.chain_linear_jit import HAS_TRITON
from colm.kernels.chain_linear_tables import (FWD_CONFIGS, FWD_SMALL_M_CONFIGS, PER_CHAIN_CUBLAS, SMALL_M, GemmConfig,
                                              _aligned, _fwd_table, _pick, _shape_key, fwd_flags)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from colm.kernels.chain_linear_jit import _fwd_tile_row, _grouped_tile, _load_dot, _store_tile, _with_bias

    @triton.jit
    def _chain_fwd_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, tab_ptr,  # x [M, P_k], W_1 (base of all W_i), b_1, y [M, ΣO], table
        M, stride_xm, stride_ym, num_m_tiles, num_n_tiles,
        HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    ):
        pid_m, pid_n = _grouped_tile(tl.program_id(0), num_m_tiles, num_n_tiles, GROUP)
        row, w_off, K, y_col, n_valid = _fwd_tile_row(tab_ptr, pid_n, ALIGNED)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rm_ld = (rm % M).to(tl.int64)  # clamp instead of masking; the store masks
        rn_ld = rn if EVEN_N else rn % n_valid
        a_ptrs = x_ptr + rm_ld[:, None] * stride_xm + rk[None, :]  # [BM, BK]
        b_ptrs = w_ptr + w_off + rn_ld[None, :].to(tl.int64) * K + rk[:, None]  # [BK, BN] = W_i tileᵀ
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            acc = _load_dot(acc, a_ptrs, b_ptrs, rk, K - k * BLOCK_K, EVEN_K, UPCAST)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if HAS_BIAS:
            acc = _with_bias(acc, b_ptr, row, rn, n_valid, EVEN_N)
        _store_tile(y_ptr, acc, rm, rn, stride_ym, y_col, M, n_valid, EVEN_N)


def chain_linear_forward(x2d, weights, biases, lay, config: GemmConfig | None = None) -> torch.Tensor:
    """y [M, ΣO] from x2d [M, P_k] (row stride free, unit column stride)."""
    m = x2d.shape[0]
    y = torch.empty((m, sum(lay.outs)), device=x2d.device, dtype=x2d.dtype)
    if m == 0:
        return y
    aligned = _aligned(lay, list(weights) + ([x2d, y] + (list(biases) if biases else []))) and x2d.stride(0) % 8 == 0

    def launch(cfg):
        if cfg == PER_CHAIN_CUBLAS:
            for i, w in enumerate(weights):
                s = lay.out_start[i]
                y[:, s:s + lay.outs[i]] = torch.nn.functional.linear(x2d[:, :lay.prefix[i]], w, biases[i] if biases else None)
            return
        if cfg.gemv:
            _gemv.gemv_forward(x2d, weights, biases, lay, y, cfg, aligned)
            return
        cfg = _hopper.fwd_variant(cfg, aligned, x2d.device)
        tab = _fwd_table(lay, weights, biases, cfg.block_n, x2d.device)
        num_m, num_n = triton.cdiv(m, cfg.block_m), tab.shape[0]
        args = (x2d, weights[0], biases[0] if biases else x2d, y, tab)
        flags = fwd_flags(x2d, cfg, lay.outs, lay.prefix, biases is not None)
        if cfg.tma or cfg.persistent:
            _hopper.launch_forward(cfg, args, flags, x2d, y, num_m, num_n, aligned)
        else:
            _chain_fwd_kernel[(num_m * num_n,)](*args, m, x2d.stride(0), y.stride(0), num_m, num_n, ALIGNED=aligned,
                                                **flags)

    key = _shape_key("fwd", x2d, lay, (biases is not None, aligned))
    cfg = config or _tuning._BEST.get(key)  # the tuned config: no per-call candidate list
    if cfg is None:
        if m == 1:  # only the configurations measured fastest with the weights cold (see chain_linear_gemv)
            candidates = _gemv.GEMV_CONFIGS_M1
        else:
            candidates = [c for c in FWD_CONFIGS if _hopper.fwd_variant(c, aligned, x2d.device) == c]  # no TMA duplicates
            if m <= SMALL_M:
                candidates = FWD_SMALL_M_CONFIGS + candidates
            if m <= _gemv.MAX_ROWS:
                candidates = _gemv.GEMV_CONFIGS + candidates
            candidates = candidates + [PER_CHAIN_CUBLAS]
        # few rows: decode steps, replayed from CUDA graphs, so timed as graph replays
        cfg = _pick("fwd", key, candidates, launch, config, graph=m <= SMALL_M and x2d.is_cuda)
    launch(cfg)
    return y
