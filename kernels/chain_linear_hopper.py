"""Variants of the chain Linear for Hopper-class GPUs: persistent and TMA-descriptor kernels.

``colm.kernels.chain_linear`` launches one program per output tile (``chain_linear_fwd._chain_fwd_kernel``,
``chain_linear_bwd._chain_bwd_input_kernel``). The configs marked ``persistent`` or ``tma`` in its ``FWD_CONFIGS`` and
``BWD_INPUT_CONFIGS`` run here instead:

* ``_chain_fwd_persistent_kernel``: one program per SM walks tiles p, p + P, ... of the same grouped,
  longest-first tile order, with all its tiles' K steps in one hand-flattened loop, so the pipeliner keeps
  loading during a tile's epilogue;
* ``_chain_bwd_input_persistent_kernel``: the same for the input gradient, whose K steps are the chunk
  table's rows (``BLOCK_K`` rows of one chain's W_i each): a tile of input chain j runs the chunks from
  chain j's first to the last, so the chain boundaries inside a tile's K loop and the step from one tile to
  the next are both one more step of the flat loop;
* ``_chain_fwd_tma_kernel``: TMA descriptor loads and stores (a per-tile W_i slab descriptor clips chain
  ends; x gets a per-tile descriptor clipped at P_i when a prefix is not a multiple of BLOCK_K), per tile
  or persistent.

They read the tile tables of ``chain_linear_tables`` and use the jit helpers of ``chain_linear_jit`` (same
masking rules: never an input column >= P_i). ``fwd_variant`` turns a TMA config into pointer loads where the
layout is not 16-byte aligned, the GPU is older than Hopper, or this Triton has no device-side descriptors.
"""

from __future__ import annotations

import torch

from colm.kernels import _tuning
from colm.kernels import chain_linear_jit as _jit
from colm.kernels import chain_linear_tables as _tab

INTERPRETER_NUM_PROGRAMS = 3  # persistent grid under the interpreter: several tiles per program

if _jit.HAS_TRITON:
    import triton
    import triton.language as tl

    # Device-side TMA descriptors: tl.make_tensor_descriptor (Triton >= 3.4) plus a workspace allocator.
    HAS_TMA = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
else:  # pragma: no cover
    HAS_TMA = False


def tma_supported(device: torch.device) -> bool:
    """Device-side TMA descriptors: the Triton API, and Hopper or newer (or the interpreter)."""
    if not HAS_TMA:
        return False
    if _tuning.interpreting():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def fwd_variant(cfg, aligned: bool, device: torch.device):
    """``cfg`` as it runs: a TMA config takes pointer loads where the layout or the build forbids TMA."""
    if cfg.tma and not (aligned and tma_supported(device)):
        return cfg._replace(tma=False)
    return cfg


def num_programs(device: torch.device, num_tiles: int) -> int:
    """Programs of a persistent launch: one per SM (a few under the interpreter), at most one per tile."""
    if _tuning.interpreting():
        return min(INTERPRETER_NUM_PROGRAMS, num_tiles)
    return min(torch.cuda.get_device_properties(device).multi_processor_count, num_tiles)


def _tma_workspace(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch in which the kernels write their TMA descriptors (128 B each, per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def launch_forward(cfg, args, flags: dict, x2d: torch.Tensor, y: torch.Tensor, num_m: int, num_n: int,
                   aligned: bool) -> None:
    """Launch a persistent and/or TMA forward (``cfg`` already through ``fwd_variant``); ``args``/``flags``
    as ``chain_linear_forward`` builds them for ``_chain_fwd_kernel``."""
    m, num_tiles = x2d.shape[0], num_m * num_n
    if cfg.tma:
        if x2d.is_cuda:  # descriptors are written to a workspace this allocator hands out
            triton.set_allocator(_tma_workspace)
        n_prog = num_programs(x2d.device, num_tiles) if cfg.persistent else num_tiles
        _chain_fwd_tma_kernel[(n_prog,)](
            *args, m, x2d.shape[1], y.shape[1], x2d.stride(0), y.stride(0), num_m, num_n, n_prog, **flags)
    elif cfg.persistent:
        n_prog = num_programs(x2d.device, num_tiles)
        _chain_fwd_persistent_kernel[(n_prog,)](
            *args, m, x2d.stride(0), y.stride(0), num_m, num_n, n_prog, ALIGNED=aligned, CHUNK=128, **flags)
    else:
        raise ValueError(f"launch_forward: {cfg} is neither persistent nor TMA")


def launch_backward_input(cfg, dy, w0, dx, tiles, chunks, num_m: int, num_n: int, num_chunks: int, *, even_n: bool,
                          even_k: bool, aligned: bool, upcast: bool) -> None:
    """The persistent input gradient (``cfg.persistent``) over ``chain_linear_tables._bwd_input_tables``' tiles and
    chunks."""
    m = dy.shape[0]
    n_prog = num_programs(dy.device, num_m * num_n)
    _chain_bwd_input_persistent_kernel[(n_prog,)](
        dy, w0, dx, tiles, chunks, m, dy.stride(0), dx.stride(0), num_m, num_n, num_chunks, n_prog,
        EVEN_N=even_n, EVEN_K=even_k, ALIGNED=aligned, UPCAST=upcast, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP=_tab.GROUP_N, CHUNK=128, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


if _jit.HAS_TRITON:

    @triton.jit
    def _chain_bwd_input_persistent_kernel(
        dy_ptr, w_ptr, dx_ptr, tile_ptr, chunk_ptr,  # as chain_linear_bwd._chain_bwd_input_kernel (no chain table)
        M, stride_dym, stride_dxm, num_m_tiles, num_n_tiles, num_chunks, num_programs,
        EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr,
    ):
        """Program p runs tiles p, p + P, ... of the grouped longest-first order; a tile's steps are the chunks
        from its input chain's first chunk to the table's last, all tiles' steps one flat loop (the epilogue,
        and the next tile's set-up, under ``if``)."""
        pid = tl.program_id(0)
        num_tiles = num_m_tiles * num_n_tiles
        num_steps = 0  # Σ (num_chunks - first chunk) over this program's tiles, CHUNK tiles per gather
        for first in range(pid, num_tiles, num_programs * CHUNK):
            tiles = first + tl.arange(0, CHUNK) * num_programs
            _, rows = _jit._grouped_tile(tl.minimum(tiles, num_tiles - 1), num_m_tiles, num_n_tiles, GROUP)
            fc = tl.load(tile_ptr + rows * 4 + 2, mask=tiles < num_tiles, other=num_chunks).to(tl.int32)
            num_steps += tl.sum(num_chunks - fc)
        rn = tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        tile = pid - num_programs
        g = num_chunks - 1  # the chunk of the step; the first step starts a tile
        x_col = tl.full((), 0, tl.int64)
        n_valid = 1
        rm = tl.arange(0, BLOCK_M)
        # placeholders shaped like the real pointers, so the loads pipeline
        a_base = dy_ptr + rm[:, None].to(tl.int64) * stride_dym + rk[None, :]  # [BM, BK] at dy column 0
        b_cols = x_col + rn[None, :].to(tl.int64)  # [1, BN] columns of dx = columns of every W_i
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, num_steps):
            if g == num_chunks - 1:  # next tile
                tile += num_programs
                pid_m, pid_n = _jit._grouped_tile(tile, num_m_tiles, num_n_tiles, GROUP)
                row = tile_ptr + pid_n * 4
                x_col = tl.load(row)
                if ALIGNED:
                    x_col = tl.multiple_of(x_col, 8)
                n_valid = tl.load(row + 1).to(tl.int32)
                g = tl.load(row + 2).to(tl.int32)
                rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
                rm_ld = (rm % M).to(tl.int64)  # clamp instead of masking; the store masks
                rn_ld = rn if EVEN_N else rn % n_valid
                a_base = dy_ptr + rm_ld[:, None] * stride_dym + rk[None, :]
                b_cols = x_col + rn_ld[None, :].to(tl.int64)
            else:
                g += 1
            acc = _jit._chunk_dot(acc, chunk_ptr, g, a_base, w_ptr, b_cols, rk, ALIGNED, EVEN_K, UPCAST)
            if g == num_chunks - 1:  # epilogue of this tile
                _jit._store_tile(dx_ptr, acc, rm, rn, stride_dxm, x_col, M, n_valid, EVEN_N)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    @triton.jit
    def _chain_fwd_persistent_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, tab_ptr,  # as chain_linear_fwd._chain_fwd_kernel
        M, stride_xm, stride_ym, num_m_tiles, num_n_tiles, num_programs,
        HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr,
    ):
        """Program p runs tiles p, p + P, ... (P = num_programs) of the grouped longest-first order.

        Their K steps form one flat loop (tile set-up and epilogue under ``if``), so the pipeliner keeps
        issuing the next tile's loads during the previous tile's epilogue. Triton's own loop flattening
        (tl.range(flatten=True)) only fuses inner loops with bounds invariant to the outer loop, and the
        staircase's K varies per tile, hence the hand-flattened loop."""
        pid = tl.program_id(0)
        num_tiles = num_m_tiles * num_n_tiles
        num_steps = 0  # Σ cdiv(K, BLOCK_K) over this program's tiles, CHUNK tiles per gather
        for first in range(pid, num_tiles, num_programs * CHUNK):
            tiles = first + tl.arange(0, CHUNK) * num_programs
            _, rows = _jit._grouped_tile(tl.minimum(tiles, num_tiles - 1), num_m_tiles, num_n_tiles, GROUP)
            ks = tl.load(tab_ptr + rows * 5 + 1, mask=tiles < num_tiles, other=0).to(tl.int32)
            num_steps += tl.sum(tl.cdiv(ks, BLOCK_K))
        rn = tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        tile = pid - num_programs
        ki = -1
        num_k = 0
        row = tab_ptr
        K = 0
        y_col = tl.full((), 0, tl.int64)
        n_valid = 1
        rm = tl.arange(0, BLOCK_M)
        # placeholders shaped like the real pointers (same contiguity: K-major W) so the loads pipeline
        a_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]  # [BM, BK]
        b_ptrs = w_ptr + rn[None, :].to(tl.int64) * BLOCK_K + rk[:, None]  # [BK, BN]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, num_steps):
            ki = tl.where(ki == num_k - 1, 0, ki + 1)
            if ki == 0:  # next tile
                tile += num_programs
                pid_m, pid_n = _jit._grouped_tile(tile, num_m_tiles, num_n_tiles, GROUP)
                row, w_off, K, y_col, n_valid = _jit._fwd_tile_row(tab_ptr, pid_n, ALIGNED)
                num_k = tl.cdiv(K, BLOCK_K)
                rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
                rm_ld = (rm % M).to(tl.int64)  # clamp instead of masking; the store masks
                rn_ld = rn if EVEN_N else rn % n_valid
                a_ptrs = x_ptr + rm_ld[:, None] * stride_xm + rk[None, :]
                b_ptrs = w_ptr + w_off + rn_ld[None, :].to(tl.int64) * K + rk[:, None]
            k0 = ki * BLOCK_K
            acc = _jit._load_dot(acc, a_ptrs, b_ptrs, rk, K - k0, EVEN_K, UPCAST)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
            if ki == num_k - 1:  # epilogue of this tile
                if HAS_BIAS:
                    acc = _jit._with_bias(acc, b_ptr, row, rn, n_valid, EVEN_N)
                _jit._store_tile(y_ptr, acc, rm, rn, stride_ym, y_col, M, n_valid, EVEN_N)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    @triton.jit
    def _chain_fwd_tma_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, tab_ptr,  # as chain_linear_fwd._chain_fwd_kernel; every base 16-byte aligned
        M, K_all, N_all, stride_xm, stride_ym, num_m_tiles, num_n_tiles, num_programs,
        HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
    ):
        """Tiles pid, pid + P, ... with TMA loads and stores (P = num_programs: SMs, or every tile).

        A tile's W_i slab is its own descriptor (base W_i[n0, 0], shape [n_valid, K]): rows past the
        chain and columns past its prefix read as zero, so x may be read past K when every prefix is a
        multiple of BLOCK_K (else x gets a per-tile descriptor clipped at K, so no later chain leaks
        in). Rows past M read as zero and are not stored; a partial tile's store is clipped at its
        chain's last column by a per-tile y descriptor."""
        x_all = tl.make_tensor_descriptor(x_ptr, shape=[M, K_all], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
        y_all = tl.make_tensor_descriptor(y_ptr, shape=[M, N_all], strides=[stride_ym, 1], block_shape=[BLOCK_M, BLOCK_N])
        rn = tl.arange(0, BLOCK_N)
        for tile in range(tl.program_id(0), num_m_tiles * num_n_tiles, num_programs):
            pid_m, pid_n = _jit._grouped_tile(tile, num_m_tiles, num_n_tiles, GROUP)
            row = tab_ptr + pid_n * 5
            w_off = tl.multiple_of(tl.load(row), 8)
            K = tl.multiple_of(tl.load(row + 1).to(tl.int32), 8)
            y_col = tl.multiple_of(tl.load(row + 2).to(tl.int32), 8)
            n_valid = tl.load(row + 3).to(tl.int32)
            w_desc = tl.make_tensor_descriptor(w_ptr + w_off, shape=[n_valid, K], strides=[K, 1],
                                               block_shape=[BLOCK_N, BLOCK_K])
            if EVEN_K:
                x_desc = x_all
            else:
                x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                                   block_shape=[BLOCK_M, BLOCK_K])
            off_m = pid_m * BLOCK_M
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                a = x_desc.load([off_m, k * BLOCK_K])  # [BM, BK]
                b = w_desc.load([0, k * BLOCK_K])  # [BN, BK]
                if UPCAST:
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32).T, acc)
                else:
                    acc = tl.dot(a, b.T, acc)
            if HAS_BIAS:
                acc = _jit._with_bias(acc, b_ptr, row, rn, n_valid, EVEN_N)
            out = acc.to(y_ptr.dtype.element_ty)
            if EVEN_N:
                y_all.store([off_m, y_col], out)
            else:
                y_tile = tl.make_tensor_descriptor(y_ptr, shape=[M, y_col + n_valid], strides=[stride_ym, 1],
                                                   block_shape=[BLOCK_M, BLOCK_N])
                y_tile.store([off_m, y_col], out)
