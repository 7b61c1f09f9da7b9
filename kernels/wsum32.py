"""The ``wsum32`` KV checksum in one Triton pass, beside the PyTorch reference.

``wsum32`` of a byte string: its little-endian 16-bit words x_i (zero-padded to an even length) summed as
sum_i x_i * (i mod 65521 + 1), mod 2^32 (``colm.kv_wire``). The reference (``wsum32_ref``) runs in torch on the
bytes' device, but as about eight passes over int64 temporaries (widen, mask, arange, mod, multiply, sum) with a
host read per 2^24 words. The kernel reads each word once: program p sums words [p * BLOCK, (p + 1) * BLOCK) into
an int64 partial (at most 2^12 x 2^16 x 2^16 = 2^44: no overflow), and torch sums the partials (at most 2^20 of
them per 2^32 words: below 2^64) before the mod. Both give the same integer on any input.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

MOD = 65521            # weights 1..65521: a word's index mod this, plus one
REF_CHUNK = 1 << 24    # the reference's words per partial sum: 2^24 x 2^16 x 2^16 < 2^63
BLOCK = 4096           # the kernel's words per program (at most 65521: see _weighted_sum)


def wsum32_ref_tensor(words: torch.Tensor) -> torch.Tensor:
    """``wsum32`` of ``words`` (int16 [n], contiguous, the bytes' 16-bit words) in torch, on their device: an int64
    scalar, not read."""
    acc = torch.zeros((), dtype=torch.int64, device=words.device)
    for s in range(0, words.numel(), REF_CHUNK):
        x = words[s : s + REF_CHUNK].to(torch.int64) & 0xFFFF
        w = torch.arange(s, s + x.numel(), dtype=torch.int64, device=words.device) % MOD + 1
        acc = (acc + (x * w).sum()) & 0xFFFFFFFF
    return acc


def wsum32_ref(words: torch.Tensor) -> int:
    """``wsum32_ref_tensor``, read."""
    return int(wsum32_ref_tensor(words))


if HAS_TRITON:

    @triton.jit
    def _weighted_sum(x, first, BLOCK: tl.constexpr):
        """sum_i x_i * ((first + i) mod 65521 + 1) over i < BLOCK (BLOCK <= 65521; x [BLOCK] the unsigned words in
        int32): one scalar mod, the weights in int32 (first mod 65521 + i < 2 x 65521), the products in uint32
        (< 65536 x 65521 < 2^32), only the sum in int64. Per-element int64 mod and multiply made the kernel
        compute-bound far below the memory's speed."""
        w = (first % 65521).to(tl.int32) + tl.arange(0, BLOCK) + 1
        w = tl.where(w > 65521, w - 65521, w)
        return tl.sum((x.to(tl.uint32) * w.to(tl.uint32)).to(tl.int64), 0)

    @triton.jit
    def _partial_kernel(words_ptr, part_ptr, n, BLOCK: tl.constexpr):
        p = tl.program_id(0)
        first = p.to(tl.int64) * BLOCK
        i = tl.arange(0, BLOCK)
        x = tl.load(words_ptr + first + i, mask=i < n - first, other=0).to(tl.int32) & 0xFFFF  # [BLOCK] unsigned
        tl.store(part_ptr + p, _weighted_sum(x, first, BLOCK))


def wsum32_triton_tensor(words: torch.Tensor) -> torch.Tensor:
    """The Triton ``wsum32_ref`` of ``words`` (int16 [n], contiguous) as an int64 scalar on their device, not read:
    several can be queued and read at once."""
    n = words.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.int64, device=words.device)
    grid = triton.cdiv(n, BLOCK)
    part = torch.empty(grid, dtype=torch.int64, device=words.device)  # [programs] partial sums
    _partial_kernel[(grid,)](words, part, n, BLOCK=BLOCK)
    return part.sum() & 0xFFFFFFFF


def wsum32_triton(words: torch.Tensor) -> int:
    """The Triton ``wsum32_ref`` of ``words`` (int16 [n], contiguous); one host read."""
    return int(wsum32_triton_tensor(words))


def wsum32_tensor(words: torch.Tensor) -> torch.Tensor:
    """``wsum32`` of ``words`` (int16 [n], contiguous) as an int64 scalar on their device, not read (several can be
    queued and read at once): the kernel on CUDA, the reference elsewhere."""
    if HAS_TRITON and words.is_cuda:
        return wsum32_triton_tensor(words)
    return wsum32_ref_tensor(words)


# ------------------------------------------------------------------ many ranges in one launch
def segment_table(segs, block: int = BLOCK):
    """The launch table of ``wsum32_segments`` from ``segs`` int64 [S, 3] (first word, words, group): int64 [S, 5]
    rows (first word, words, position of that first word in its group, group, first block of the segment), and the
    number of blocks of ``block`` words they make. A group's words are numbered across its segments in row order.
    O(S) numpy: the blocks themselves are found on the device (a table per block cost milliseconds of host time for
    a 1 GiB pool)."""
    import numpy as np

    segs = np.asarray(segs, dtype=np.int64).reshape(-1, 3)
    start, count, group = segs[:, 0], segs[:, 1], segs[:, 2]
    order = np.argsort(group, kind="stable")                            # [S] row order inside each group kept
    c, g = count[order], group[order]
    before = np.cumsum(c) - c                                           # [S] words before, all groups sorted
    heads = np.concatenate(([0], np.flatnonzero(g[1:] != g[:-1]) + 1)).astype(np.int64)
    base = np.empty(len(segs), dtype=np.int64)
    base[order] = before - np.repeat(before[heads], np.diff(np.append(heads, len(g))))
    nblk = -(-count // block)                                           # [S]
    first_block = np.cumsum(nblk) - nblk
    return np.stack([start, count, base, group, first_block], axis=1), int(nblk.sum())


def wsum32_segments_ref(words: torch.Tensor, segs, num_groups: int) -> torch.Tensor:
    """``wsum32`` of each group of ranges of ``words`` (int16 [n]): group g's ranges (``segs`` rows (first word,
    words, group), in row order) joined. int64 [num_groups] on the words' device."""
    out = []
    for g in range(num_groups):
        parts = [words[s : s + c] for s, c, gg in [tuple(r) for r in segs.tolist()] if gg == g]
        out.append(wsum32_ref(torch.cat(parts)) if parts else 0)
    return torch.tensor(out, dtype=torch.int64, device=words.device)


if HAS_TRITON:

    @triton.jit
    def _segments_kernel(words_ptr, table_ptr, seg_of_ptr, part_ptr, BLOCK: tl.constexpr):
        p = tl.program_id(0)
        row = table_ptr + tl.load(seg_of_ptr + p) * 5                  # this block's segment
        first = (p - tl.load(row + 4)) * BLOCK                          # its first word inside the segment
        n = tl.load(row + 1) - first
        i = tl.arange(0, BLOCK)
        x = tl.load(words_ptr + tl.load(row) + first + i, mask=i < n, other=0).to(tl.int32) & 0xFFFF  # [BLOCK]
        tl.store(part_ptr + p, _weighted_sum(x, tl.load(row + 2) + first, BLOCK))


def wsum32_segments(words: torch.Tensor, segs, num_groups: int) -> torch.Tensor:
    """``wsum32_segments_ref`` in one launch on CUDA (the reference elsewhere): int64 [num_groups], not read."""
    if not (HAS_TRITON and words.is_cuda):
        return wsum32_segments_ref(words, segs, num_groups)
    return wsum32_segments_triton(words, segs, num_groups)


def wsum32_segments_triton(words: torch.Tensor, segs, num_groups: int) -> torch.Tensor:
    table_np, blocks = segment_table(segs)
    out = torch.zeros(num_groups, dtype=torch.int64, device=words.device)
    if blocks == 0:
        return out
    table = torch.from_numpy(table_np).to(words.device)                 # [S, 5]
    block_ids = torch.arange(blocks, dtype=torch.int64, device=words.device)
    seg_of = torch.searchsorted(table[:, 4].contiguous(), block_ids, right=True) - 1  # [blocks] segment of each
    part = torch.empty(blocks, dtype=torch.int64, device=words.device)  # [blocks] partial sums
    _segments_kernel[(blocks,)](words, table, seg_of, part, BLOCK=BLOCK)
    return out.index_add_(0, table[:, 3][seg_of], part) & 0xFFFFFFFF
