"""Chain Linear block configurations, host-side tile tables, and the launch helpers every pass shares.

The kernels (``chain_linear_fwd``, ``chain_linear_bwd``, ``chain_linear_gemv``, ``chain_linear_hopper`` and the fused
launches of ``fused_linear``) reach the separate W_i through element offsets from W_1's address, stored in small int64
tile tables built here on the host and cached in ``_TABLES`` (one dict for all of them); tiles are ordered
longest-K-loop first (the staircase's tall end) so the block scheduler packs the short tiles into the tail. Block
sizes come from the candidate lists below, tuned per shape (``_pick``: ``colm.kernels._tuning``).
"""

from __future__ import annotations

from itertools import accumulate
from typing import NamedTuple

import torch

from colm.kernels import _tuning


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    nested: bool = False  # input grad only: loop chains, then K within a chain (else one flat K-loop)
    persistent: bool = False  # forward and input grad: one program per SM walks its tiles in one flat K-step loop
    tma: bool = False  # forward only: operands and result through TMA tensor descriptors (sm_90+, aligned)
    gemv: bool = False  # forward only, M <= 8: the CUDA-core matrix-vector kernel (``chain_linear_gemv``)


# Hopper-friendly candidates (wgmma tiles); the first is the untuned default.
FWD_CONFIGS = [
    GemmConfig(128, 256, 64, 8, 3),
    GemmConfig(128, 128, 64, 8, 4),
    GemmConfig(128, 128, 64, 4, 4),
    GemmConfig(256, 128, 64, 8, 3),
    GemmConfig(128, 256, 64, 8, 4),
    GemmConfig(64, 256, 64, 4, 4),
    GemmConfig(64, 128, 64, 4, 4),  # few rows
    # Hopper variants (kept after the first five: the input-grad candidates are built from those).
    GemmConfig(128, 256, 64, 8, 3, persistent=True),
    GemmConfig(128, 128, 64, 8, 4, persistent=True),
    GemmConfig(128, 256, 64, 8, 3, tma=True),
    GemmConfig(128, 256, 64, 8, 3, persistent=True, tma=True),
    GemmConfig(128, 128, 64, 8, 4, persistent=True, tma=True),
]
# Few rows (decode steps, M <= 64): the pass reads the weights once; narrow tiles and long K-steps give
# enough programs to keep HBM busy (a 2048-wide output is 64 programs at BLOCK_N 32), one launch per layer.
FWD_SMALL_M_CONFIGS = [
    GemmConfig(16, 32, 128, 4, 4),
    GemmConfig(16, 64, 128, 4, 4),
    GemmConfig(16, 32, 256, 4, 3),
    GemmConfig(16, 16, 256, 4, 4),
    GemmConfig(32, 64, 128, 4, 4),
    GemmConfig(64, 64, 128, 4, 4),
]
SMALL_M = 64
# the input grad's persistent variants (chain_linear_hopper) walk the flat chunk table: never nested
BWD_INPUT_CONFIGS = [c._replace(nested=n) for c in FWD_CONFIGS[:5] for n in (False, True)] + \
    [c._replace(persistent=True) for c in FWD_CONFIGS[:3]]
BWD_WEIGHT_CONFIGS = [
    GemmConfig(128, 256, 64, 8, 3),
    GemmConfig(128, 128, 64, 8, 4),
    GemmConfig(128, 128, 64, 4, 4),
    GemmConfig(256, 128, 64, 8, 3),
    GemmConfig(128, 128, 128, 8, 3),
]
INTERPRETER_CONFIG = GemmConfig(16, 16, 16, 1, 1)
# Not a Triton config: the per-chain cuBLAS loop. The tuner weighs it against the kernels, so a shape
# where the loop wins (few rows, e.g. decode steps, where cuBLAS splits K) never runs slower than it.
PER_CHAIN_CUBLAS = GemmConfig(0, 0, 0, 0, 0)

_TABLES: dict[tuple, torch.Tensor] = {}
GROUP_N = 8


def _table(key: tuple, rows: list[list[int]], device) -> torch.Tensor:
    t = _TABLES.get(key)
    if t is None:
        if len(_TABLES) > 4096:
            _TABLES.clear()
        t = torch.tensor(rows if rows else [[0]], dtype=torch.int64)
        if torch.device(device).type == "cuda" and not torch.cuda.is_current_stream_capturing():
            # from pinned memory without a wait: a pageable copy synchronizes the stream, and a training step
            # that builds a table stalls its whole launch queue on it (in a capture the copy would be replayed
            # from a host buffer the allocator may reuse, so capture keeps the plain copy)
            t = t.pin_memory().to(device, non_blocking=True)
        else:
            t = t.to(device)
        _TABLES[key] = t
    return t


def _rel_offsets(tensors) -> tuple[int, ...]:
    """Element offsets of ``tensors`` from the first: what a table holds, so what its key needs (the absolute
    addresses change whenever autocast or FSDP hands the kernel freshly allocated weights)."""
    return tuple(_elem_offset(t, tensors[0]) for t in tensors)


def _elem_offset(t: torch.Tensor, base: torch.Tensor) -> int:
    return (t.data_ptr() - base.data_ptr()) // t.element_size()


class _Layout(NamedTuple):
    prefix: list[int]  # P_i: input features chain i reads
    outs: list[int]  # out_i
    out_start: list[int]  # O_i: first output column of chain i
    in_sizes: list[int]  # in_j
    in_start: list[int]  # first input column of chain j


def _layout(weights) -> _Layout:
    prefix = [w.shape[1] for w in weights]
    outs = [w.shape[0] for w in weights]
    in_sizes = [p - q for p, q in zip(prefix, [0] + prefix[:-1])]
    return _Layout(prefix, outs, [0] + list(accumulate(outs))[:-1], in_sizes, [0] + prefix[:-1])


def _aligned(lay: _Layout, tensors) -> bool:
    dims = lay.prefix + lay.outs
    return all(d % 8 == 0 for d in dims) and all(t.data_ptr() % 16 == 0 for t in tensors)


def fwd_tile_rows(weights, cols, b_offs, bn: int) -> list[list[int]]:
    """Forward-table rows [w_off, P, y_col, n_valid, b_off] per tile of ``bn`` output columns, longest K first, for
    weights ``[out, P]`` whose outputs start at ``cols`` and biases at element ``b_offs`` (offsets from
    ``weights[0]``: the kernels reach every weight from that one pointer)."""
    rows = []
    for i in sorted(range(len(weights)), key=lambda i: -weights[i].shape[1]):
        out, p = weights[i].shape
        w_off = _elem_offset(weights[i], weights[0])
        rows.extend([w_off + n0 * p, p, cols[i] + n0, min(bn, out - n0), b_offs[i] + n0] for n0 in range(0, out, bn))
    return rows


def _fwd_table(lay, weights, biases, bn, device):
    """Rows [w_off, P_i, y_col, n_valid, b_off] per output tile of BLOCK_N columns, longest K first."""
    b_offs = _rel_offsets(biases) if biases else (0,) * len(weights)
    key = ("fwd", _rel_offsets(weights), b_offs, tuple(lay.prefix), tuple(lay.outs), bn, device)
    if key in _TABLES:
        return _TABLES[key]
    return _table(key, fwd_tile_rows(weights, lay.out_start, b_offs, bn), device)


def _bwd_input_tables(lay, weights, bn, bk, device):
    """Tile rows [x_col, n_valid, first_chunk, first_chain] (longest first); chunk rows
    [w_off of W_i[r0, 0], P_i, dy_col, k_valid] for every BLOCK_K rows of every chain, chain-major;
    chain rows [w_off of W_i[0, 0], P_i, O_i, out_i]."""
    key = ("bwd_i", _rel_offsets(weights), tuple(lay.prefix), tuple(lay.outs), bn, bk, device)
    if key in _TABLES:
        return _TABLES[key]
    n = len(weights)
    chunks, first_chunk, chains = [], [], []
    for i in range(n):
        first_chunk.append(len(chunks))
        w_off = _elem_offset(weights[i], weights[0])
        chains.append([w_off, lay.prefix[i], lay.out_start[i], lay.outs[i]])
        for r0 in range(0, lay.outs[i], bk):
            chunks.append([w_off + r0 * lay.prefix[i], lay.prefix[i], lay.out_start[i] + r0, min(bk, lay.outs[i] - r0)])
    tiles = []
    for j in range(n):  # input chain 1 reads every output chain: its tiles are the longest
        for c0 in range(0, lay.in_sizes[j], bn):
            tiles.append([lay.in_start[j] + c0, min(bn, lay.in_sizes[j] - c0), first_chunk[j], j])
    tabs = (_table(key + ("t",), tiles, device), _table(key + ("c",), chunks, device),
            _table(key + ("n",), chains, device), len(tiles), len(chunks))
    _TABLES[key] = tabs
    return tabs


def _bwd_weight_table(lay, need, bm, bn, device):
    """Rows [dw_off, P_i, dy_col, x_col, m_valid, n_valid] per tile of the chains in ``need``
    (offsets into one flat gradient buffer holding the needed dW_i back to back)."""
    key = ("bwd_w", tuple(lay.prefix), tuple(lay.outs), tuple(need), bm, bn, device)
    if key in _TABLES:
        return _TABLES[key]
    rows, off, group = [], 0, 4
    for i in need:
        p, o = lay.prefix[i], lay.outs[i]
        r_tiles = list(range(0, o, bm))
        for g in range(0, len(r_tiles), group):  # a few dy panels against every x panel: L2 reuse
            for c0 in range(0, p, bn):
                for r0 in r_tiles[g:g + group]:
                    rows.append([off + r0 * p + c0, p, lay.out_start[i] + r0, c0, min(bm, o - r0), min(bn, p - c0)])
        off += o * p
    return _table(key, rows, device)


# --------------------------------------------------------------------------------------------------
# Launch helpers (every pass)
# --------------------------------------------------------------------------------------------------


def _shape_key(pass_name, x2d, lay, extra=()):
    m = x2d.shape[0]
    return (pass_name, x2d.dtype, x2d.device, tuple(lay.prefix), tuple(lay.outs), 1 << max(m - 1, 0).bit_length()) + extra


def _upcast(t: torch.Tensor) -> bool:
    return _tuning.interpreting() and t.dtype == torch.bfloat16


def _pick(pass_name, key, candidates, launch, config, graph: bool = False):
    if config is not None:
        return config
    if _tuning.interpreting():
        return INTERPRETER_CONFIG
    return _tuning.pick(key, candidates, launch, graph=graph)


def fwd_flags(x2d, cfg: GemmConfig, outs, prefixes, has_bias: bool) -> dict:
    """The forward GEMM kernels' constexprs and launch options for ``cfg`` over weights of ``outs`` rows and
    ``prefixes`` input features (a chain Linear's, or a fused launch's segments)."""
    return dict(HAS_BIAS=has_bias, EVEN_N=all(o % cfg.block_n == 0 for o in outs),
                EVEN_K=all(p % cfg.block_k == 0 for p in prefixes), UPCAST=_upcast(x2d),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP=GROUP_N,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
