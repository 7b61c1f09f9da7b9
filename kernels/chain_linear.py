"""Chain Linear: y_i = W_i x_{<=i} + b_i for output chain i (paper eq. 1), reference and Triton kernels.

Parameter layout (shared by the model, the checkpoint format and the Triton kernel):
a chain Linear over n chains holds n separate weight tensors, one per *output* chain,

    W_i : [out_i, in_1 + ... + in_i]      (row-major, contiguous)
    b_i : [out_i]                          (optional)

so the block lower-triangular matrix is never stored densely, chain i's parameters are one tensor
(freezing chain i = freezing W_i, b_i), and a scale-k forward simply uses W_1..W_k.

Activations at scale k are sized for the scale: x is ``[..., in_1 + ... + in_k]`` and the result is
``[..., out_1 + ... + out_k]``; nothing of chains > k is computed.

GPU path (``chain_linear_triton``, an autograd Function) does only the nonzero blocks' work, one
launch per pass:

* forward  y[:, O_i + n] = x[:, :P_i] @ W_i[n, :]ᵀ      a tile of output chain i runs its K-loop to P_i
* input grad dx[:, c]   = Σ_{i ≥ j} dy_i @ W_i[:, c]   a tile of input chain j loops over chains ≥ j
* weight grad dW_i      = dy_iᵀ @ x[:, :P_i]            only tiles inside each W_i exist

The separate W_i are reached through element offsets from W_1's address, stored in small int64 tile
tables built on the host (cached); tiles are ordered longest-K-loop first (the staircase's tall end)
so the block scheduler packs the short tiles into the tail. Block sizes are tuned per shape
(``colm.kernels._tuning``); the forward's candidates also hold two Hopper variants, which live in
``chain_linear_hopper`` (a persistent kernel, one program per SM whose tiles' K steps form one flat loop,
and one with TMA descriptor loads and stores, aligned layouts on sm_90+ only), and for at most 8 rows
the CUDA-core matrix-vector kernel of ``chain_linear_gemv``. ``COLM_CHAIN_LINEAR=ref`` forces the
reference everywhere (the naive per-chain baseline).
"""

from __future__ import annotations

import os
from itertools import accumulate
from typing import NamedTuple, Sequence

import torch

from colm.kernels import _tuning

try:  # Triton is optional: CPU-only installs import this module and use the reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False


def chain_linear_ref(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """Plain PyTorch chain Linear: one GEMM per output chain on the input prefix it may read."""
    outs = []
    for i, w in enumerate(weights):
        # w: [out_i, in_prefix_i]; x[..., :in_prefix_i] is the part chain i may see.
        y = torch.nn.functional.linear(x[..., : w.shape[1]], w, None if biases is None else biases[i])
        outs.append(y)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def check_chain_linear_args(x: torch.Tensor, weights: Sequence[torch.Tensor], biases) -> None:
    """Validate the layout above; raise ValueError naming the offending tensor."""
    if not weights:
        raise ValueError("chain_linear: weights is empty (need at least one chain)")
    prev = 0
    for i, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"chain_linear: weights[{i}] must be 2-D [out_i, in_prefix_i], got {tuple(w.shape)}")
        if w.shape[1] <= prev:
            raise ValueError(
                f"chain_linear: weights[{i}] reads {w.shape[1]} input features, which must exceed "
                f"weights[{i - 1}]'s {prev} (input prefixes grow with the chain)"
            )
        prev = w.shape[1]
        if biases is not None and tuple(biases[i].shape) != (w.shape[0],):
            raise ValueError(f"chain_linear: biases[{i}] has shape {tuple(biases[i].shape)}, expected ({w.shape[0]},)")
    if biases is not None and len(biases) != len(weights):
        raise ValueError(f"chain_linear: {len(biases)} biases for {len(weights)} weights")
    if x.shape[-1] != prev:
        raise ValueError(f"chain_linear: input has {x.shape[-1]} features, the active chains read {prev}")


def _use_triton(x: torch.Tensor, weights, biases) -> bool:
    if not (HAS_TRITON and x.is_cuda) or os.environ.get("COLM_CHAIN_LINEAR", "") == "ref":
        return False
    if x.dtype not in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled():
        return False
    tensors = list(weights) + (list(biases) if biases is not None else [])
    return all(t.dtype == x.dtype and t.device == x.device for t in tensors)


def needs_grad(x: torch.Tensor, weights) -> bool:
    """Whether autograd records a Linear of ``x`` by ``weights`` here."""
    return torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))


def _few_rows_inference(x: torch.Tensor, weights) -> bool:
    return x.numel() <= _gemv.MAX_ROWS * x.shape[-1] and _fused.enabled() and not needs_grad(x, weights)


def chain_linear(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None
) -> torch.Tensor:
    """Chain Linear with the fastest available implementation (Triton on CUDA, else the reference).

    One chain is a plain Linear (cuBLAS through the reference) except at decode's few rows without
    autograd, where the tuner weighs the matrix-vector kernel against cuBLAS (cuBLAS' one-row GEMV ran at
    a tenth of the copy rate on 2 MB weights). Under CUDA autocast to a half type the kernel runs on the
    inputs cast as autocast would cast them for a Linear (``chain_linear_autocast``): the per-chain reference
    there paid its input gradient as a zero-filled full-width tensor per chain, summed (1.7x the kernel's time
    on the 1B attention shape, bench/results/chain_linear_h100_2026-11-23.json). fp32 inputs without autocast
    and mixed dtypes take the reference.
    """
    if (len(weights) > 1 or _few_rows_inference(x, weights)) and _use_triton(x, weights, biases):
        return chain_linear_triton(x, weights, biases)
    dtype = _autocast_dtype(x)
    if dtype is not None and len(weights) > 1 and all(t.is_cuda for t in weights):
        return chain_linear_autocast(x, weights, biases, dtype)
    return chain_linear_ref(x, weights, biases)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The half dtype CUDA autocast runs a Linear of ``x`` in, or None (no autocast, no kernel, or forced ref)."""
    if not (HAS_TRITON and x.is_cuda and torch.is_autocast_enabled("cuda")):
        return None
    if os.environ.get("COLM_CHAIN_LINEAR", "") == "ref":
        return None
    dtype = torch.get_autocast_dtype("cuda")
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def chain_linear_autocast(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None,
                          dtype: torch.dtype) -> torch.Tensor:
    """The Triton chain Linear as autocast runs a Linear: ``x``, weights and biases cast to ``dtype`` (casts that
    autograd differentiates, so fp32 master weights get fp32 gradients), the kernel with autocast off."""
    def cast(t):
        return t if t.dtype == dtype else t.to(dtype)

    with torch.autocast(x.device.type, enabled=False):
        if any(w.dtype != dtype for w in weights):
            weights = _PackCast.apply(dtype, *weights)
        return chain_linear_triton(cast(x), list(weights), None if biases is None else [cast(b) for b in biases])


class _PackCast(torch.autograd.Function):
    """``weights`` cast to ``dtype`` into one new buffer, returned as views of it (one copy launch per chain, as
    casting each would be). The kernel reaches every chain's weight by its offset from the first, so casts that
    land wherever the allocator puts them would give every step new offsets and a new tile table; in one buffer
    the offsets are the layout's. The backward casts each view's gradient back to its weight's dtype."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        sizes = [w.numel() for w in weights]
        flat = torch.empty(sum(sizes), dtype=dtype, device=weights[0].device)
        outs, off = [], 0
        for w, n in zip(weights, sizes):
            view = flat[off:off + n].view(w.shape)
            view.copy_(w)
            outs.append(view)
            off += n
        ctx.dtypes = [w.dtype for w in weights]
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return (None, *(None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes)))


# --------------------------------------------------------------------------------------------------
# Configurations and host-side tile tables
# --------------------------------------------------------------------------------------------------


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
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _grouped_tile(pid, num_m_tiles, num_n_tiles, GROUP: tl.constexpr):
        """(M tile, table row) of program ``pid``.

        Walks GROUP table rows (same-length tiles) across all M tiles before the next GROUP rows: keeps
        the table's longest-first order and reuses W tiles and x rows in L2."""
        per_group = GROUP * num_m_tiles
        first_n = (pid // per_group) * GROUP
        size_n = tl.minimum(num_n_tiles - first_n, GROUP)
        pid_m = (pid % per_group) // size_n
        pid_n = first_n + (pid % per_group) % size_n
        return pid_m, pid_n

    @triton.jit
    def _load_dot(acc, a_ptrs, b_ptrs, rk, k_limit, EVEN: tl.constexpr, UPCAST: tl.constexpr):
        """acc += a @ b for one K step; a [BM, BK], b [BK, BN], K positions >= k_limit read as 0 unless EVEN."""
        if EVEN:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = rk < k_limit
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 as raw uint16 bits: widen there
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)

    @triton.jit
    def _fwd_tile_row(tab_ptr, pid_n, ALIGNED: tl.constexpr):
        """Forward table row ``pid_n``: (row pointer, W_i offset, K = P_i, first y column, valid columns)."""
        row = tab_ptr + pid_n * 5
        w_off = tl.load(row)
        K = tl.load(row + 1).to(tl.int32)
        y_col = tl.load(row + 2)
        n_valid = tl.load(row + 3).to(tl.int32)
        if ALIGNED:
            w_off = tl.multiple_of(w_off, 8)
            K = tl.multiple_of(K, 8)
            y_col = tl.multiple_of(y_col, 8)
        return row, w_off, K, y_col, n_valid

    @triton.jit
    def _with_bias(acc, b_ptr, row, rn, n_valid, EVEN_N: tl.constexpr):
        """acc + the tile's bias columns (forward table row ``row``: bias offset in its 5th field)."""
        rn_ld = rn if EVEN_N else rn % n_valid
        return acc + tl.load(b_ptr + tl.load(row + 4) + rn_ld).to(tl.float32)[None, :]

    @triton.jit
    def _store_tile(out_ptr, acc, rm, rn, stride_m, col, M, n_valid, EVEN_N: tl.constexpr):
        """out[rm, col + rn] = acc for rows < M (and columns < n_valid unless EVEN_N)."""
        ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_m + col + rn[None, :]
        if EVEN_N:  # a column-free mask keeps the stores vectorised
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None])
        else:
            tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < n_valid)[None, :])

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

    @triton.jit
    def _chunk_dot(acc, chunk_ptr, g, a_base, w_ptr, b_cols, rk, ALIGNED: tl.constexpr, EVEN_K: tl.constexpr,
                   UPCAST: tl.constexpr):
        """acc += dy[:, chunk] @ W_i[chunk rows, tile columns] for chunk row ``g`` of the input-grad chunk table
        ([w_off, P_i, dy_col, k_valid]); ``a_base`` points at dy column 0 of the tile's rows, ``b_cols`` are the
        tile's dx columns."""
        info = chunk_ptr + g * 4
        w_off = tl.load(info)
        P = tl.load(info + 1)
        dy_col = tl.load(info + 2)
        if ALIGNED:
            w_off = tl.multiple_of(w_off, 8)
            P = tl.multiple_of(P, 8)
            dy_col = tl.multiple_of(dy_col, 8)
        return _load_dot(acc, a_base + dy_col, w_ptr + w_off + rk[:, None] * P + b_cols, rk,
                         tl.load(info + 3).to(tl.int32), EVEN_K, UPCAST)

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


# --------------------------------------------------------------------------------------------------
# Launchers (one per pass) and the autograd Function
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


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [M, F] with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class ChainLinearFunction(torch.autograd.Function):
    """Autograd wrapper: apply(x, num_chains, has_bias, configs, *weights, *biases)."""

    @staticmethod
    def forward(ctx, x, n, has_bias, configs, *params):
        weights, biases = list(params[:n]), (list(params[n:]) if has_bias else None)
        lay = _layout(weights)
        x2d = _as_rows(x)
        y = chain_linear_forward(x2d, weights, biases, lay, configs.get("fwd"))
        ctx.save_for_backward(x2d, *weights)
        ctx.meta = (n, has_bias, configs, lay, x.shape)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        n, has_bias, configs, lay, x_shape = ctx.meta
        x2d, *weights = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        if dy.stride(-1) != 1 or dy.stride(0) != dy.shape[1]:
            dy = dy.contiguous()
        dx = None
        if ctx.needs_input_grad[0]:
            dx = chain_linear_backward_input(dy, weights, lay, configs.get("bwd_i")).view(x_shape)
        need = [i for i in range(n) if ctx.needs_input_grad[4 + i]]
        grads = chain_linear_backward_weight(dy, x2d, lay, need, configs.get("bwd_w"))
        dws = [grads.get(i) for i in range(n)]
        dbs = []
        if has_bias:
            need_b = [ctx.needs_input_grad[4 + n + i] for i in range(n)]
            db_all = dy.sum(0, dtype=torch.float32).to(dy.dtype) if any(need_b) else None  # [ΣO]
            for i in range(n):
                s = lay.out_start[i]
                dbs.append(db_all[s:s + lay.outs[i]] if need_b[i] else None)
        return (dx, None, None, None, *dws, *dbs)


def chain_linear_triton(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None = None,
    configs: dict[str, GemmConfig] | None = None,
) -> torch.Tensor:
    """Triton chain Linear (autograd-aware). ``configs`` may pin {"fwd","bwd_i","bwd_w"} block configs."""
    if not HAS_TRITON:
        raise RuntimeError("chain_linear_triton needs triton")
    check_chain_linear_args(x, weights, biases)
    for i, w in enumerate(weights):
        if not w.is_contiguous():
            raise ValueError(f"chain_linear: weights[{i}] must be contiguous, got strides {w.stride()}")
        if w.dtype != x.dtype:
            raise ValueError(f"chain_linear: weights[{i}] is {w.dtype}, input is {x.dtype}")
    if biases is not None and not all(b.is_contiguous() and b.dtype == x.dtype for b in biases):
        raise ValueError("chain_linear: biases must be contiguous and of the input's dtype")
    params = list(weights) + (list(biases) if biases is not None else [])
    return ChainLinearFunction.apply(x, len(weights), biases is not None, configs or {}, *params)


# At the end: the few-row kernel's, the Hopper forward variants' and the fused launches' modules build on this
# one's tables and jit helpers.
from colm.kernels import chain_linear_gemv as _gemv  # noqa: E402
from colm.kernels import chain_linear_hopper as _hopper  # noqa: E402
from colm.kernels import fused_linear as _fused  # noqa: E402
