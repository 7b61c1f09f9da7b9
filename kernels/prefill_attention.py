"""Causal attention of packed prompt segments over the paged KV pool: the kernel of chunked prefill.

A chunk packs S prompt segments' queries into ``q [N, Hq, D]``. ``segments [S, 4]`` gives each one's
(first row in q, number of rows, first prompt position, first page): segment s owns rows
``q_off .. q_off + q_len - 1`` at positions ``pos0 .. pos0 + q_len - 1`` of its prompt, whose keys
``0 .. pos0 + q_len - 1`` are in the pool (this chunk's were written just before) at the blocks
``pages[page0], pages[page0 + 1], ...`` (``pages [P]``: every segment's block list, one after the other; pool
layout: see ``paged_attention``). Row ``q_off + i`` attends causally to keys ``0 .. pos0 + i``: a prompt's first chunk
(``pos0`` 0) over its own keys, a later chunk over the prompt so far. GQA: query head h reads K/V head
``h // (Hq // Hkv)``.

Work is cut into tiles of ``BLOCK_M`` rows of one segment, one program per (tile, query head). The tile list
``tiles [T, 2]`` (segment, first row within it; segment -1: an unused tile) is made on the host
(``plan_tiles``), so one launch of a fixed T, as a CUDA graph replays it, serves any mix of segments whose
tiles fit. Rows of q that no segment owns (a graph's padding) are left as they were in ``out``.

Each program walks its keys in ``BLOCK_N`` tiles with an online softmax; the keys before the tile's first
position need no causal mask (a first loop), the rest do (a second). ``paged_prefill_attention_ref`` is the
plain-PyTorch reference (float32 math; float64 if q is), used off CUDA.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from colm.kernels import _tuning

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

LOG2E = 1.4426950408889634
BLOCK_M = 64  # query rows per tile (CUDA); a chunk plan's tiles use the same value


def plan_tiles(q_lens, num_tiles: int, block_m: int = BLOCK_M) -> np.ndarray:
    """tiles [num_tiles, 2] int64 for segments of ``q_lens`` rows: (segment, first row) per tile, (-1, 0) after the
    last. Raises if they need more than ``num_tiles``."""
    tiles = np.zeros((num_tiles, 2), dtype=np.int64)
    tiles[:, 0] = -1
    i = 0
    for s, n in enumerate(q_lens):
        for m0 in range(0, int(n), block_m):
            if i == num_tiles:
                raise ValueError(f"plan_tiles: segments of {list(q_lens)} rows need more than {num_tiles} tiles "
                                 f"of {block_m} rows")
            tiles[i] = (s, m0)
            i += 1
    return tiles


def max_tiles(num_rows: int, num_segments: int, block_m: int = BLOCK_M) -> int:
    """Tiles enough for any ``num_segments`` segments of ``num_rows`` rows in all."""
    return -(-num_rows // block_m) + num_segments


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def paged_prefill_attention_ref(q, k_pool, v_pool, pages, segments, sm_scale=None, out=None) -> torch.Tensor:
    """The attention of every segment (see the module docstring), one at a time; rows of no segment keep ``out``'s
    values (zeros when ``out`` is None)."""
    n, hq, d = q.shape
    block_size, hkv = k_pool.shape[1], k_pool.shape[2]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros_like(q) if out is None else out
    for q_off, q_len, pos0, page0 in segments.tolist():
        if q_len <= 0:
            continue
        end = pos0 + q_len
        blocks = pages[page0 : page0 + -(-end // block_size)].long()
        k = k_pool[blocks].reshape(-1, hkv, d)[:end].to(acc).repeat_interleave(hq // hkv, dim=1)  # [end, Hq, D]
        v = v_pool[blocks].reshape(-1, hkv, d)[:end].to(acc).repeat_interleave(hq // hkv, dim=1)
        qs = q[q_off : q_off + q_len].to(acc)  # [q_len, Hq, D]
        scores = torch.einsum("ihd,jhd->hij", qs, k) * scale  # [Hq, q_len, end]
        qpos = torch.arange(pos0, end, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(end, device=q.device)[None, :] > qpos, float("-inf"))
        out[q_off : q_off + q_len] = torch.einsum("hij,jhd->ihd", scores.softmax(-1), v).to(q.dtype)
    return out


# --------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _kv_tile(pool_ptr, pages_ptr, page0, kpos, k_ok, kvh, d, d_ok, block_size,
                 NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr):
        # [BLOCK_N, D_PAD] of the pool: positions kpos of this segment's prompt, K/V head kvh
        page = tl.load(pages_ptr + page0 + kpos // block_size, mask=k_ok, other=0).to(tl.int64)
        slot = page * block_size + kpos % block_size
        ptrs = pool_ptr + slot[:, None] * (NUM_KV * HEAD_DIM) + kvh * HEAD_DIM + d[None, :]
        return tl.load(ptrs, mask=k_ok[:, None] & d_ok[None, :], other=0.0)

    @triton.jit
    def _attend_keys(q, m_i, l_i, acc, n0, qpos, end, k_ptr, v_ptr, pages_ptr, page0, kvh, d, d_ok, block_size,
                     sm_scale, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr, CAUSAL: tl.constexpr):
        # one online-softmax update of the tile's (m_i, l_i, acc) with keys n0 .. n0+BLOCK_N-1 (masked past ``end``
        # and, when CAUSAL, past each row's own position)
        kpos = n0 + tl.arange(0, BLOCK_N)
        k_ok = kpos < end
        k = _kv_tile(k_ptr, pages_ptr, page0, kpos, k_ok, kvh, d, d_ok, block_size, NUM_KV, HEAD_DIM)
        v = _kv_tile(v_ptr, pages_ptr, page0, kpos, k_ok, kvh, d, d_ok, block_size, NUM_KV, HEAD_DIM)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale  # [M, N], log2 units
        if CAUSAL:
            s = tl.where((kpos[None, :] <= qpos[:, None]) & k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pages_ptr, seg_ptr, tiles_ptr, sm_scale,
                        stride_qn, stride_qh, stride_on, stride_oh, block_size,
                        NUM_KV: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        tile = tl.program_id(0)
        h = tl.program_id(1)
        seg = tl.load(tiles_ptr + 2 * tile)
        if seg < 0:
            return
        m0 = tl.load(tiles_ptr + 2 * tile + 1)
        q_off = tl.load(seg_ptr + 4 * seg)
        q_len = tl.load(seg_ptr + 4 * seg + 1)
        pos0 = tl.load(seg_ptr + 4 * seg + 2)
        page0 = tl.load(seg_ptr + 4 * seg + 3)
        rows = m0 + tl.arange(0, BLOCK_M)  # [M] rows of this segment
        row_ok = rows < q_len
        d = tl.arange(0, D_PAD)
        d_ok = d < HEAD_DIM
        q = tl.load(q_ptr + (q_off + rows).to(tl.int64)[:, None] * stride_qn + h * stride_qh + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        qpos = pos0 + rows  # [M]
        kvh = h // GROUP
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
        end = pos0 + tl.minimum(m0 + BLOCK_M, q_len)  # keys 0 .. end-1
        full_end = (pos0 + m0) // BLOCK_N * BLOCK_N  # keys below: before every row of the tile, no mask
        for n0 in range(0, full_end, BLOCK_N):
            m_i, l_i, acc = _attend_keys(q, m_i, l_i, acc, n0, qpos, end, k_ptr, v_ptr, pages_ptr, page0, kvh, d,
                                         d_ok, block_size, sm_scale, NUM_KV, HEAD_DIM, BLOCK_N, UPCAST, PRECISION,
                                         CAUSAL=False)
        for n0 in range(full_end, end, BLOCK_N):
            m_i, l_i, acc = _attend_keys(q, m_i, l_i, acc, n0, qpos, end, k_ptr, v_ptr, pages_ptr, page0, kvh, d,
                                         d_ok, block_size, sm_scale, NUM_KV, HEAD_DIM, BLOCK_N, UPCAST, PRECISION,
                                         CAUSAL=True)
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(o_ptr + (q_off + rows).to(tl.int64)[:, None] * stride_on + h * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _check(q, k_pool, v_pool, pages, segments, tiles=None):
    if q.dim() != 3:
        raise ValueError(f"paged_prefill_attention: q must be [N, Hq, D], got {tuple(q.shape)}")
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape or k_pool.shape[3] != q.shape[2]:
        raise ValueError(f"paged_prefill_attention: pools {tuple(k_pool.shape)}, {tuple(v_pool.shape)} do not fit "
                         f"q {tuple(q.shape)} ([blocks, block_size, Hkv, D] each)")
    if q.shape[1] % k_pool.shape[2]:
        raise ValueError(f"paged_prefill_attention: {q.shape[1]} query heads not a multiple of {k_pool.shape[2]} "
                         "KV heads")
    if segments.dim() != 2 or segments.shape[1] != 4 or pages.dim() != 1:
        raise ValueError(f"paged_prefill_attention: segments must be [S, 4] and pages [P], got "
                         f"{tuple(segments.shape)} and {tuple(pages.shape)}")
    if tiles is not None and (tiles.dim() != 2 or tiles.shape[1] != 2):
        raise ValueError(f"paged_prefill_attention: tiles must be [T, 2], got {tuple(tiles.shape)}")


def paged_prefill_attention_triton(q, k_pool, v_pool, pages, segments, tiles, sm_scale=None, out=None,
                                   launch: dict | None = None) -> torch.Tensor:
    """The Triton kernel over ``tiles`` (see ``plan_tiles``; its block_m is ``launch['block_m']``, default
    ``BLOCK_M``). Integer inputs may be int32 or int64; nothing here reads them on the host."""
    _check(q, k_pool, v_pool, pages, segments, tiles)
    if not all(t.is_contiguous() for t in (k_pool, v_pool, pages, segments, tiles)):
        raise ValueError("paged_prefill_attention: pools, pages, segments and tiles must be contiguous")
    if q.stride(-1) != 1:
        q = q.contiguous()
    n, hq, d = q.shape
    hkv = k_pool.shape[2]
    out = torch.zeros_like(q) if out is None else out
    if out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"paged_prefill_attention: out must be {tuple(q.shape)} with unit last stride")
    # the fastest of the H200 sweep in bench/prefill_attention.py
    cfg = {"block_m": BLOCK_M, "block_n": 128, "num_warps": 4, "num_stages": 2, **(launch or {})}
    scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * LOG2E
    upcast = _tuning.interpreting() and q.dtype == torch.bfloat16
    _prefill_kernel[(tiles.shape[0], hq)](
        q, k_pool, v_pool, out, pages, segments, tiles, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_pool.shape[1],
        NUM_KV=hkv, GROUP=hq // hkv, HEAD_DIM=d, D_PAD=max(16, triton.next_power_of_2(d)),
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], UPCAST=upcast,
        PRECISION="ieee" if q.dtype == torch.float32 else None,  # float32 models: no TF32 rounding in the dots
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def paged_prefill_attention(q, k_pool, v_pool, pages, segments, tiles, sm_scale=None,
                            out=None) -> torch.Tensor:
    """out [N, Hq, D]: each segment's causal attention over its paged prompt (Triton on CUDA, the reference
    elsewhere; the reference reads ``segments`` on the host and needs no ``tiles``)."""
    if HAS_TRITON and q.is_cuda:
        return paged_prefill_attention_triton(q, k_pool, v_pool, pages, segments, tiles, sm_scale, out)
    _check(q, k_pool, v_pool, pages, segments)
    return paged_prefill_attention_ref(q, k_pool, v_pool, pages, segments, sm_scale, out)
