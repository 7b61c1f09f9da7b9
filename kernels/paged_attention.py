"""Decode attention over a paged KV pool, and the kernel that writes new K/V into the pool.

Pool layout (one pair per layer): ``k_pool, v_pool : [num_blocks, block_size, Hkv, D]``; a sequence
owns the blocks listed in its row of ``block_tables [B, max_blocks_per_seq]`` (int32), and its token
t lives at slot ``block_tables[b, t // block_size] * block_size + t % block_size``.

Path of one decode step: the engine computes q/k/v for the new token of each sequence, calls
``write_kv_to_pool`` with each token's slot (negative = skip, e.g. padding), then
``paged_decode_attention`` with ``context_lens`` counting that token. GQA is native: query head h
reads KV head ``h // (Hq // Hkv)``; one program serves all query heads of a KV head, so each K/V
byte is read once. An optional ``head_map [Hq]`` (int32) generalises the grouping: query head
``head_map[j]`` reads KV head ``j // group``, and its output goes back to head ``head_map[j]``. CoLM-Air
uses it for its chain-local grouping (``colm.attention.query_head_order``), so the decode step needs
no gathers of q and o into and out of GQA order.

The Triton decode kernel is split-K ("flash-decoding"): when batch × KV heads cannot fill the GPU,
each sequence's context is cut into ``num_splits`` ranges whose partial softmax states (running max,
sum, unnormalised output) a second small kernel merges. Launched with PDL, a program reads its split's first K/V
tile before the wait, and again after it when that tile holds any of the row's ``fresh_tokens`` newest tokens
(those the launches just before wrote: the decode step's one, a verify's T; ``COLM_ATTN_PRELOAD=0`` turns this
off). The ranges are cut from each sequence's own
length inside the kernel, so a launch (or a CUDA graph) sized for a wider block table still spreads a
short context over all its splits. Both entry points use Triton on CUDA; on the CPU the write runs its
plain-PyTorch reference and attention its batched form (``paged_decode_attention_batched``: one gather and a
matmul per KV head for the whole batch), checked against the per-sequence reference.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from colm.kernels import _pdl, _tuning

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


def paged_decode_attention_ref(q, k_pool, v_pool, block_tables, context_lens, sm_scale=None,
                               head_map=None) -> torch.Tensor:
    """One query token per sequence against its paged context; float32 math (float64 if q is).
    ``head_map`` [Hq] (optional): query head ``head_map[j]`` reads KV head ``j // group`` (see the module
    docstring); None is the identity."""
    if head_map is not None:  # attend in GQA order, then put each output back at its own head
        idx = head_map.long()
        out = torch.empty_like(q)
        out[:, idx] = paged_decode_attention_ref(q[:, idx], k_pool, v_pool, block_tables, context_lens, sm_scale)
        return out
    b_count, hq, d = q.shape
    block_size, hkv = k_pool.shape[1], k_pool.shape[2]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty_like(q)
    for b in range(b_count):
        n = int(context_lens[b])
        pages = block_tables[b, : (n + block_size - 1) // block_size].long()
        k = k_pool[pages].reshape(-1, hkv, d)[:n].to(acc_dtype)  # [n, Hkv, D]
        v = v_pool[pages].reshape(-1, hkv, d)[:n].to(acc_dtype)
        k = k.repeat_interleave(hq // hkv, dim=1)  # [n, Hq, D]: head h reads kv head h // group
        v = v.repeat_interleave(hq // hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].to(acc_dtype), k) * scale  # [Hq, n]
        out[b] = torch.einsum("hn,nhd->hd", s.softmax(-1), v).to(q.dtype)
    return out


def paged_decode_attention_batched(q, k_pool, v_pool, block_tables, context_lens, sm_scale=None,
                                   head_map=None) -> torch.Tensor:
    """The CPU path: ``paged_decode_attention_ref``'s result computed for the whole batch at once.

    Every sequence's blocks are gathered with one ``index_select`` per pool into [B, W, Hkv, D] (W: the
    longest context rounded up to whole blocks; past a sequence's length its columns are masked, and its
    unused table entries read block 0), then each KV head attends its group of query heads in one batched
    matmul over strided views, so nothing is repeated per query head and no Python loop runs per sequence.
    Same accumulation dtype as the reference (float32, float64 for float64 q); a sequence of length 0
    gets zeros, as in the reference."""
    if head_map is not None:  # attend in GQA order, then put each output back at its own head
        idx = head_map.long()
        out = torch.empty_like(q)
        out[:, idx] = paged_decode_attention_batched(q[:, idx], k_pool, v_pool, block_tables, context_lens,
                                                     sm_scale)
        return out
    b_count, hq, d = q.shape
    num_blocks, block_size, hkv = k_pool.shape[0], k_pool.shape[1], k_pool.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lens = context_lens.long()
    if b_count == 0 or int(lens.max()) == 0:
        return torch.zeros_like(q)
    width_blocks = -(-int(lens.max()) // block_size)
    width = width_blocks * block_size
    used = torch.arange(width_blocks, device=q.device)[None] * block_size < lens[:, None]  # [B, Wb]
    pages = block_tables[:, :width_blocks].long().masked_fill(~used, 0).reshape(-1)  # [B * Wb]
    k = k_pool.reshape(num_blocks, -1).index_select(0, pages).view(b_count, width, hkv, d).to(acc_dtype)
    v = v_pool.reshape(num_blocks, -1).index_select(0, pages).view(b_count, width, hkv, d).to(acc_dtype)
    qg = q.reshape(b_count, hkv, group, d).to(acc_dtype) * scale  # query head h * group + g reads KV head h
    past_end = (torch.arange(width, device=q.device)[None] >= lens[:, None])[:, None, :]  # [B, 1, W]
    out = torch.empty(b_count, hkv, group, d, dtype=acc_dtype, device=q.device)
    for h in range(hkv):
        s = torch.matmul(qg[:, h], k[:, :, h].transpose(1, 2))  # [B, group, W]
        s.masked_fill_(past_end, float("-inf"))
        out[:, h] = torch.matmul(s.softmax(-1), v[:, :, h])  # [B, group, D]
    out[lens == 0] = 0
    return out.reshape(b_count, hq, d).to(q.dtype)


def write_kv_to_pool_ref(k, v, k_pool, v_pool, slot_mapping) -> None:
    """k_pool.view(-1, Hkv, D)[slot] = k[t] for every token t whose slot is >= 0 (in place)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    hkv, d = k_pool.shape[2], k_pool.shape[3]
    k_pool.view(-1, hkv, d)[slots] = k[keep].to(k_pool.dtype)
    v_pool.view(-1, hkv, d)[slots] = v[keep].to(v_pool.dtype)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _split_range(lens_ptr, b, split, num_splits, BLOCK_T: tl.constexpr):
        """[start, end) of split ``split`` of sequence ``b``: its own context cut into num_splits BLOCK_T-aligned
        ranges (not the table width's: a graph captured for a wider table still spreads a shorter context over
        every split)."""
        ctx = tl.load(lens_ptr + b)
        per_split = tl.cdiv(tl.cdiv(ctx, num_splits), BLOCK_T) * BLOCK_T
        start = split * per_split
        return start, tl.minimum(ctx, start + per_split)

    @triton.jit
    def _kv_tile(k_ptr, v_ptr, bt_ptr, b, t0, end, stride_btb, block_size, kv_col, d_ok, row_stride,
                 BLOCK_T: tl.constexpr, UPCAST: tl.constexpr):
        """K, V [T, D] of tokens t0 .. t0 + BLOCK_T of sequence ``b`` (through its block table; tokens >= end
        read as 0) and which tokens are in range [T]."""
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < end
        blk = tl.load(bt_ptr + b * stride_btb + t // block_size, mask=t_ok, other=0)
        slot = blk.to(tl.int64) * block_size + t % block_size  # [T]
        offs = slot[:, None] * row_stride + kv_col[None, :]  # [T, D]
        kv_ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + offs, mask=kv_ok, other=0.0)
        v = tl.load(v_ptr + offs, mask=kv_ok, other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 as raw bits
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        return k, v, t_ok

    @triton.jit
    def _online_softmax(q, k, v, t_ok, m_i, l_i, acc, qk_scale):
        """The running (max, sum, unnormalised output) of q's heads [G] after one more K/V tile."""
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [G, T], log2 domain
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, part_ptr, map_ptr,
        qk_scale, stride_qb, stride_qh, stride_ob, stride_oh, stride_btb,
        block_size, num_splits, fresh,
        NUM_KV: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
        SPLIT: tl.constexpr, UPCAST: tl.constexpr, HEAD_MAP: tl.constexpr, USE_PDL: tl.constexpr = False,
        PRELOAD: tl.constexpr = False,
    ):
        pid = tl.program_id(0)  # b * NUM_KV + kv head
        split = tl.program_id(1)
        b = pid // NUM_KV
        h = pid % NUM_KV
        d = tl.arange(0, D_PAD)
        d_ok = d < HEAD_DIM
        kv_col = h * HEAD_DIM + d  # [D] within one token's [Hkv, D] row
        row_stride = NUM_KV * HEAD_DIM
        if PRELOAD:
            # before the PDL wait: the length, the table and the first tile's K/V. Every kernel before the
            # predecessor is complete when this one starts (see _pdl), and the launches just before write only the
            # ``fresh`` newest tokens' K/V: a first tile holding any of them is read again after the wait.
            start, end = _split_range(lens_ptr, b, split, num_splits, BLOCK_T)
            k0, v0, ok0 = _kv_tile(k_ptr, v_ptr, bt_ptr, b, start, end, stride_btb, block_size, kv_col, d_ok,
                                   row_stride, BLOCK_T, UPCAST)
            _pdl.wait(USE_PDL)
            fresh_from = tl.load(lens_ptr + b) - fresh
            if (fresh_from < start + BLOCK_T) & (start < end):
                k0, v0, ok0 = _kv_tile(k_ptr, v_ptr, bt_ptr, b, start, end, stride_btb, block_size, kv_col, d_ok,
                                       row_stride, BLOCK_T, UPCAST)
        else:
            _pdl.wait(USE_PDL)
            start, end = _split_range(lens_ptr, b, split, num_splits, BLOCK_T)

        g = tl.arange(0, GROUP_PAD)  # local query head
        g_ok = g < GROUP
        heads = h * GROUP + g
        if HEAD_MAP:  # the query heads this KV head serves, in any order
            heads = tl.load(map_ptr + heads, mask=g_ok, other=0)
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [G, D]
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((GROUP_PAD,), tl.float32)
        acc = tl.zeros((GROUP_PAD, D_PAD), tl.float32)
        first = start
        if PRELOAD:
            if start < end:  # an empty split has no tile (and would give exp2(-inf - -inf))
                m_i, l_i, acc = _online_softmax(q, k0, v0, ok0, m_i, l_i, acc, qk_scale)
            first = start + BLOCK_T
        for t0 in range(first, end, BLOCK_T):
            k, v, t_ok = _kv_tile(k_ptr, v_ptr, bt_ptr, b, t0, end, stride_btb, block_size, kv_col, d_ok,
                                  row_stride, BLOCK_T, UPCAST)
            m_i, l_i, acc = _online_softmax(q, k, v, t_ok, m_i, l_i, acc, qk_scale)

        if SPLIT:
            # partials [B*Hq, num_splits, D_PAD + 2]: unnormalised acc, then m (log2), then l
            row = (b * NUM_KV * GROUP + heads) * num_splits + split
            base = part_ptr + row[:, None] * (D_PAD + 2)
            tl.store(base + d[None, :], acc, mask=g_ok[:, None])
            tl.store(part_ptr + row * (D_PAD + 2) + D_PAD, m_i, mask=g_ok)
            tl.store(part_ptr + row * (D_PAD + 2) + D_PAD + 1, l_i, mask=g_ok)
        else:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty context gives 0, not NaN
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _merge_splits_kernel(
        part_ptr, out_ptr, stride_ob, stride_oh, num_splits,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
        USE_PDL: tl.constexpr = False,
    ):
        _pdl.wait(USE_PDL)
        row = tl.program_id(0)  # b * Hq + head
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        s_ok = s < num_splits
        base = part_ptr + (row * num_splits + s) * (D_PAD + 2)
        m = tl.load(base + D_PAD, mask=s_ok, other=float("-inf"))  # [S]
        l = tl.load(base + D_PAD + 1, mask=s_ok, other=0.0)
        acc = tl.load(base[:, None] + d[None, :], mask=s_ok[:, None], other=0.0)  # [S, D]
        m_max = tl.max(m, 0)
        w = tl.where(s_ok & (l > 0), tl.exp2(m - m_max), 0.0)  # empty splits carry m = -inf, l = 0
        denom = tl.sum(l * w, 0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
        b = row // NUM_HEADS
        h = row % NUM_HEADS
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)

    @triton.jit
    def _write_kv_kernel(
        k_ptr, v_ptr, k_pool_ptr, v_pool_ptr, slot_ptr,
        stride_kt, stride_kh, stride_vt, stride_vh,
        NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
    ):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t)
        h = tl.arange(0, H_PAD)
        d = tl.arange(0, D_PAD)
        slot_2d = tl.full((H_PAD, D_PAD), 0, tl.int64) + slot
        ok = (h < NUM_KV)[:, None] & (d < HEAD_DIM)[None, :] & (slot_2d >= 0)
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=ok)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=ok)
        dst = slot_2d * (NUM_KV * HEAD_DIM) + h[:, None] * HEAD_DIM + d[None, :]  # pool is contiguous
        tl.store(k_pool_ptr + dst, k.to(k_pool_ptr.dtype.element_ty), mask=ok)
        tl.store(v_pool_ptr + dst, v.to(v_pool_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------


def _check_decode_args(q, k_pool, v_pool, block_tables, context_lens, head_map=None):
    if q.dim() != 3:
        raise ValueError(f"paged_decode_attention: q must be [B, Hq, D], got {tuple(q.shape)}")
    if k_pool.dim() != 4 or k_pool.shape != v_pool.shape:
        raise ValueError(f"paged_decode_attention: pools must be equal [blocks, block_size, Hkv, D], got "
                         f"{tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    b, hq, d = q.shape
    hkv = k_pool.shape[2]
    if k_pool.shape[3] != d:
        raise ValueError(f"paged_decode_attention: q head_dim {d} != pool head_dim {k_pool.shape[3]}")
    if hq % hkv:
        raise ValueError(f"paged_decode_attention: {hq} query heads not a multiple of {hkv} KV heads")
    if block_tables.dim() != 2 or block_tables.shape[0] != b or tuple(context_lens.shape) != (b,):
        raise ValueError(f"paged_decode_attention: block_tables {tuple(block_tables.shape)} / context_lens "
                         f"{tuple(context_lens.shape)} do not match batch {b}")
    if block_tables.dtype != torch.int32 or context_lens.dtype != torch.int32:
        raise ValueError("paged_decode_attention: block_tables and context_lens must be int32")
    if head_map is not None and (head_map.dtype != torch.int32 or tuple(head_map.shape) != (hq,)
                                 or head_map.device != q.device):
        raise ValueError(f"paged_decode_attention: head_map must be int32 [{hq}] on {q.device}, got "
                         f"{head_map.dtype} {tuple(head_map.shape)} on {head_map.device}")


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


MIN_SPLIT_TOKENS = 128  # a split walks at least this many tokens (two BLOCK_T tiles)


def _default_launch(num_programs: int, max_ctx: int, device) -> dict:
    """Split the context so that about two waves of programs cover the GPU. At batch 1 a program's
    tiles are a chain of dependent loads (block table, then K, then V), so its latency, not bandwidth,
    sets the time: short splits (``MIN_SPLIT_TOKENS``) keep each chain short."""
    sms = _num_sms(device)
    splits = max(1, min(-(-2 * sms // num_programs), -(-max_ctx // MIN_SPLIT_TOKENS)))
    return {"block_t": 64, "num_warps": 4, "num_stages": 3, "num_splits": splits}


def paged_decode_attention_triton(q, k_pool, v_pool, block_tables, context_lens, sm_scale=None,
                                  launch: dict | None = None, head_map=None, fresh_tokens: int = 1) -> torch.Tensor:
    """Triton decode attention (see module docstring); ``launch`` may pin block_t/num_warps/num_stages/num_splits.
    ``fresh_tokens``: how many of each row's newest tokens the launches just before may have written (at least 1)."""
    if fresh_tokens < 1:
        raise ValueError(f"paged_decode_attention: fresh_tokens={fresh_tokens}, must be at least 1")
    _check_decode_args(q, k_pool, v_pool, block_tables, context_lens, head_map)
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("paged_decode_attention: k_pool and v_pool must be contiguous")
    if q.stride(-1) != 1:
        q = q.contiguous()
    b, hq, d = q.shape
    block_size, hkv = k_pool.shape[1], k_pool.shape[2]
    group = hq // hkv
    out = torch.empty((b, hq, d), device=q.device, dtype=q.dtype)
    if b == 0:
        return out
    scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * LOG2E
    max_ctx = block_tables.shape[1] * block_size  # an upper bound that needs no device sync
    cfg = dict(_default_launch(b * hkv, max_ctx, q.device), **(launch or {}))
    block_t = cfg["block_t"]
    splits = max(1, min(cfg["num_splits"], -(-max_ctx // block_t)))
    d_pad = triton.next_power_of_2(d)
    part = (torch.empty((b * hq, splits, d_pad + 2), device=q.device, dtype=torch.float32)
            if splits > 1 else out)
    upcast = _tuning.interpreting() and q.dtype == torch.bfloat16
    pdl = _pdl.kernel_kwargs(q, b)
    # the early read pays only where the launch starts early (PDL); the interpreter runs it to test it
    preload = (pdl["USE_PDL"] or _tuning.interpreting()) and os.environ.get("COLM_ATTN_PRELOAD", "1") not in ("", "0")
    _paged_decode_kernel[(b * hkv, splits)](
        q, k_pool, v_pool, block_tables, context_lens, out, part, out if head_map is None else head_map,
        scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        block_size, splits, fresh_tokens,
        NUM_KV=hkv, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, D_PAD=d_pad, BLOCK_T=block_t, SPLIT=splits > 1, UPCAST=upcast,
        HEAD_MAP=head_map is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        PRELOAD=preload, **pdl,
    )
    if splits > 1:
        _merge_splits_kernel[(b * hq,)](
            part, out, out.stride(0), out.stride(1), splits,
            NUM_HEADS=hq, HEAD_DIM=d, D_PAD=d_pad, S_PAD=max(2, triton.next_power_of_2(splits)), num_warps=4,
            **pdl,
        )
    return out


def write_kv_to_pool_triton(k, v, k_pool, v_pool, slot_mapping) -> None:
    """Scatter k, v [T, Hkv, D] into the pools at ``slot_mapping`` [T] (int64; negative = skip)."""
    if k.shape != v.shape or k.dim() != 3 or k.shape[1:] != k_pool.shape[2:] or k_pool.shape != v_pool.shape:
        raise ValueError(f"write_kv_to_pool: k {tuple(k.shape)}, v {tuple(v.shape)} do not fit pools "
                         f"{tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    if slot_mapping.shape != (k.shape[0],) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"write_kv_to_pool: slot_mapping must be int64 [{k.shape[0]}], got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()):
        raise ValueError("write_kv_to_pool: k_pool and v_pool must be contiguous")
    t, hkv, d = k.shape
    if t == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    _write_kv_kernel[(t,)](
        k, v, k_pool, v_pool, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV=hkv, HEAD_DIM=d, H_PAD=triton.next_power_of_2(hkv), D_PAD=triton.next_power_of_2(d), num_warps=1,
    )


def paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, sm_scale=None,
                           head_map=None, fresh_tokens: int = 1) -> torch.Tensor:
    """out [B, Hq, D]: softmax(q kᵀ · scale) v over each sequence's paged context (Triton on CUDA).
    ``head_map``, ``fresh_tokens`` (each row's newest tokens just written): see the module docstring."""
    if HAS_TRITON and q.is_cuda:
        return paged_decode_attention_triton(q, k_pool, v_pool, block_tables, context_lens, sm_scale,
                                             head_map=head_map, fresh_tokens=fresh_tokens)
    _check_decode_args(q, k_pool, v_pool, block_tables, context_lens, head_map)
    return paged_decode_attention_batched(q, k_pool, v_pool, block_tables, context_lens, sm_scale, head_map)


def write_kv_to_pool(k, v, k_pool, v_pool, slot_mapping) -> None:
    """Write new tokens' K/V into the paged pools in place (Triton on CUDA, reference elsewhere)."""
    if HAS_TRITON and k.is_cuda:
        write_kv_to_pool_triton(k, v, k_pool, v_pool, slot_mapping)
    else:
        write_kv_to_pool_ref(k, v, k_pool, v_pool, slot_mapping)
