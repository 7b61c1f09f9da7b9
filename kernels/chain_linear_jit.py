"""Triton jit helpers of the chain Linear's kernels: grouped tile order, one masked K step, forward-table rows, bias,
the masked store, and one input-gradient chunk.

Shared by the forward (``chain_linear_fwd``), the backward (``chain_linear_bwd``), the few-row matrix-vector kernel
(``chain_linear_gemv``) and the Hopper variants (``chain_linear_hopper``), so all of them keep the same masking rules:
never an input column >= P_i, columns past a tile's valid ones neither read from a weight nor stored.
"""

from __future__ import annotations

try:  # Triton is optional: CPU-only installs import this module and use the reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False


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
