"""Chain Linear backward, one launch per pass: the input gradient and the weight gradients.

* input grad ``dx[:, c] = Σ_{i ≥ j} dy_i @ W_i[:, c]``: a tile of input chain j loops over the output chains >= j,
  either chain by chain (``nested``) or over the flat chunk table (``BLOCK_K`` rows of one W_i per row); the
  ``persistent`` configs run ``chain_linear_hopper``'s kernel instead;
* weight grad ``dW_i = dy_iᵀ @ x[:, :P_i]``: only tiles inside each needed W_i exist, written into one flat buffer.

Both weigh their kernels, per shape, against the per-chain cuBLAS loop (``PER_CHAIN_CUBLAS``).
"""

from __future__ import annotations

from itertools import accumulate
from typing import Sequence

import torch

from colm.kernels import chain_linear_hopper as _hopper
from colm.kernels.chain_linear_jit import HAS_TRITON
from colm.kernels.chain_linear_tables import (BWD_INPUT_CONFIGS, BWD_WEIGHT_CONFIGS, GROUP_N, PER_CHAIN_CUBLAS,
                                              GemmConfig, _aligned, _bwd_input_tables, _bwd_weight_table, _pick,
                                              _shape_key, _upcast)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from colm.kernels.chain_linear_jit import _chunk_dot, _grouped_tile, _load_dot, _store_tile

    @triton.jit
    def _chain_bwd_input_kernel(
        dy_ptr, w_ptr, dx_ptr, tile_ptr, chunk_ptr, chain_ptr,  # dy [M, ΣO], W_1, dx [M, P_k], tables
        M, stride_dym, stride_dxm, num_m_tiles, num_n_tiles, num_chunks, num_chains,
        NESTED: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    ):
        pid_m, pid_n = _grouped_tile(tl.program_id(0), num_m_tiles, num_n_tiles, GROUP)
        tile = tile_ptr + pid_n * 4
        x_col = tl.load(tile)
        n_valid = tl.load(tile + 1).to(tl.int32)
        if ALIGNED:
            x_col = tl.multiple_of(x_col, 8)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        rm_ld = (rm % M).to(tl.int64)
        rn_ld = rn if EVEN_N else rn % n_valid
        a_base = dy_ptr + rm_ld[:, None] * stride_dym + rk[None, :]  # [BM, BK] at dy column 0
        b_cols = x_col + rn_ld[None, :]  # [1, BN] columns of dx = columns of every W_i
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if NESTED:
            for c in range(tl.load(tile + 3).to(tl.int32), num_chains):
                info = chain_ptr + c * 4
                w_off = tl.load(info)
                P = tl.load(info + 1)
                dy_col = tl.load(info + 2)
                n_out = tl.load(info + 3).to(tl.int32)
                if ALIGNED:
                    w_off = tl.multiple_of(w_off, 8)
                    P = tl.multiple_of(P, 8)
                    dy_col = tl.multiple_of(dy_col, 8)
                a_ptrs = a_base + dy_col
                b_ptrs = w_ptr + w_off + rk[:, None] * P + b_cols  # [BK, BN]
                for kk in range(0, tl.cdiv(n_out, BLOCK_K)):
                    acc = _load_dot(acc, a_ptrs, b_ptrs, rk, n_out - kk * BLOCK_K, EVEN_K, UPCAST)
                    a_ptrs += BLOCK_K
                    b_ptrs += BLOCK_K * P
        else:
            for g in range(tl.load(tile + 2).to(tl.int32), num_chunks):
                acc = _chunk_dot(acc, chunk_ptr, g, a_base, w_ptr, b_cols, rk, ALIGNED, EVEN_K, UPCAST)
        _store_tile(dx_ptr, acc, rm, rn, stride_dxm, x_col, M, n_valid, EVEN_N)

    @triton.jit
    def _chain_bwd_weight_kernel(
        dy_ptr, x_ptr, dw_ptr, tab_ptr,  # dy [M, ΣO], x [M, P_k], flat dW buffer, tile table
        M, stride_dym, stride_xm,
        EVEN_M: tl.constexpr, EVEN_N: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        row = tab_ptr + tl.program_id(0) * 6
        dw_off = tl.load(row)
        P = tl.load(row + 1)
        dy_col = tl.load(row + 2)
        x_col = tl.load(row + 3)
        m_valid = tl.load(row + 4).to(tl.int32)
        n_valid = tl.load(row + 5).to(tl.int32)
        if ALIGNED:
            dw_off = tl.multiple_of(dw_off, 8)
            P = tl.multiple_of(P, 8)
            dy_col = tl.multiple_of(dy_col, 8)
            x_col = tl.multiple_of(x_col, 8)
        rm = tl.arange(0, BLOCK_M)  # rows of dW_i = dy columns
        rn = tl.arange(0, BLOCK_N)  # columns of dW_i = x columns
        rk = tl.arange(0, BLOCK_K)  # tokens: the reduction
        rm_ld = rm if EVEN_M else rm % m_valid
        rn_ld = rn if EVEN_N else rn % n_valid
        a_ptrs = dy_ptr + rk[None, :].to(tl.int64) * stride_dym + dy_col + rm_ld[:, None]  # [BM, BK] = dyᵀ
        b_ptrs = x_ptr + rk[:, None].to(tl.int64) * stride_xm + x_col + rn_ld[None, :]  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, M // BLOCK_K):
            acc = _load_dot(acc, a_ptrs, b_ptrs, rk, BLOCK_K, True, UPCAST)
            a_ptrs += BLOCK_K * stride_dym
            b_ptrs += BLOCK_K * stride_xm
        tail = M % BLOCK_K
        if tail != 0:
            acc = _load_dot(acc, a_ptrs, b_ptrs, rk, tail, False, UPCAST)
        dw_ptrs = dw_ptr + dw_off + rm[:, None] * P + rn[None, :]
        if EVEN_M and EVEN_N:
            tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty))
        else:
            tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=(rm < m_valid)[:, None] & (rn < n_valid)[None, :])


def chain_linear_backward_input(dy, weights, lay, config: GemmConfig | None = None) -> torch.Tensor:
    """dx [M, P_k] = Σ_i dy_i @ W_i (each W_i padded with zeros to P_k columns)."""
    m = dy.shape[0]
    dx = torch.empty((m, lay.prefix[-1]), device=dy.device, dtype=dy.dtype)
    if m == 0:
        return dx
    aligned = _aligned(lay, list(weights) + [dy, dx]) and dy.stride(0) % 8 == 0

    def launch(cfg):
        if cfg == PER_CHAIN_CUBLAS:
            n = len(weights)
            torch.mm(dy[:, lay.out_start[-1]:], weights[-1], out=dx)
            for i in range(n - 1):
                s = lay.out_start[i]
                dx[:, :lay.prefix[i]].addmm_(dy[:, s:s + lay.outs[i]], weights[i])
            return
        tiles, chunks, chains, num_n, num_chunks = _bwd_input_tables(lay, weights, cfg.block_n, cfg.block_k, dy.device)
        num_m = triton.cdiv(m, cfg.block_m)
        if cfg.persistent:
            _hopper.launch_backward_input(cfg, dy, weights[0], dx, tiles, chunks, num_m, num_n, num_chunks,
                                          even_n=all(s % cfg.block_n == 0 for s in lay.in_sizes),
                                          even_k=all(o % cfg.block_k == 0 for o in lay.outs), aligned=aligned,
                                          upcast=_upcast(dy))
            return
        _chain_bwd_input_kernel[(num_m * num_n,)](
            dy, weights[0], dx, tiles, chunks, chains,
            m, dy.stride(0), dx.stride(0), num_m, num_n, num_chunks, len(weights),
            NESTED=cfg.nested, EVEN_N=all(s % cfg.block_n == 0 for s in lay.in_sizes),
            EVEN_K=all(o % cfg.block_k == 0 for o in lay.outs), ALIGNED=aligned, UPCAST=_upcast(dy),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP=GROUP_N,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    cfg = _pick("bwd_i", _shape_key("bwd_i", dy, lay), BWD_INPUT_CONFIGS + [PER_CHAIN_CUBLAS], launch, config)
    launch(cfg)
    return dx


def chain_linear_backward_weight(dy, x2d, lay, need: Sequence[int], config: GemmConfig | None = None):
    """dW_i = dy_iᵀ @ x[:, :P_i] for the chains in ``need``, as views of one flat buffer."""
    m = x2d.shape[0]
    sizes = [lay.outs[i] * lay.prefix[i] for i in need]
    flat = torch.empty(sum(sizes), device=x2d.device, dtype=x2d.dtype)
    offs = [0] + list(accumulate(sizes))
    grads = {i: flat[offs[j]:offs[j + 1]].view(lay.outs[i], lay.prefix[i]) for j, i in enumerate(need)}
    if not need:
        return grads
    if m == 0:
        flat.zero_()
        return grads
    aligned = _aligned(lay, [dy, x2d, flat]) and dy.stride(0) % 8 == 0 and x2d.stride(0) % 8 == 0

    def launch(cfg):
        if cfg == PER_CHAIN_CUBLAS:
            for i in need:
                s = lay.out_start[i]
                torch.mm(dy[:, s:s + lay.outs[i]].t(), x2d[:, :lay.prefix[i]], out=grads[i])
            return
        tab = _bwd_weight_table(lay, need, cfg.block_m, cfg.block_n, x2d.device)
        _chain_bwd_weight_kernel[(tab.shape[0],)](
            dy, x2d, flat, tab, m, dy.stride(0), x2d.stride(0),
            EVEN_M=all(lay.outs[i] % cfg.block_m == 0 for i in need),
            EVEN_N=all(lay.prefix[i] % cfg.block_n == 0 for i in need), ALIGNED=aligned, UPCAST=_upcast(dy),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    cfg = _pick("bwd_w", _shape_key("bwd_w", x2d, lay, (tuple(need),)), BWD_WEIGHT_CONFIGS + [PER_CHAIN_CUBLAS], launch, config)
    launch(cfg)
    return grads
