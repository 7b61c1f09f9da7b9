"""What a greedy decode step reads from its logits, in two Triton launches, beside the PyTorch reference.

For logits ``[B, V]`` a decode step needs each row's log-sum-exp (fp32), its argmax (the first index
of the largest logit, as ``torch.argmax``) and, for one device->host read, ``packed [2, B]`` float64
holding the argmax ids (exact in float64) and their log-probs ``max - lse``. Eagerly that is about a
dozen small kernels (an fp32 copy of the logits, two reductions, argmax, a gather, casts, a stack),
each a few microseconds at batch 1, where the whole step is ~1.5 ms. Here:

1. ``_partial_kernel``, grid (B, chunks of ``BLOCK`` vocabulary entries): each chunk's max, first
   argmax and sum of exp(x - max) in fp32;
2. ``_merge_kernel``, grid (B,): the row's max, the first chunk index holding it, and
   lse = max + log(sum_c s_c * exp(m_c - max)).

The argmax is exactly torch's (ties go to the lowest index). The log-sum-exp sums in another order than
``torch.logsumexp``, so it may differ in the last fp32 bits (relative 1e-6). ``greedy_head`` runs
Triton for CUDA bf16/fp16/fp32 logits and the reference elsewhere.
"""

from __future__ import annotations

import torch

from colm.kernels import _tuning

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

BLOCK = 4096  # vocabulary entries per program: a 128K vocabulary is 32 programs per row


def greedy_head_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse [B] fp32, greedy [B, 1] int64, packed [2, B] float64) of ``logits [B, V]``."""
    lse = torch.logsumexp(logits.float(), dim=-1)
    greedy = logits.argmax(dim=-1, keepdim=True)
    lp = logits.gather(1, greedy)[:, 0].float() - lse
    return lse, greedy, torch.stack([greedy[:, 0].double(), lp.double()])


if HAS_TRITON:

    @triton.jit
    def _partial_kernel(logits_ptr, part_ptr, V, stride_row, num_chunks, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + offs, mask=offs < V,
                    other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        first = tl.argmax(x, 0, tie_break_left=True)
        s = tl.sum(tl.exp(x - m), 0)  # masked entries are -inf: exp gives 0
        base = part_ptr + (row * num_chunks + c) * 3  # partials [B, chunks, 3]: max, sum, argmax (fp32)
        tl.store(base, m)
        tl.store(base + 1, s)
        tl.store(base + 2, (c * BLOCK + first).to(tl.float32))  # exact: V < 2**24

    @triton.jit
    def _merge_kernel(part_ptr, lse_ptr, greedy_ptr, packed_ptr, B, num_chunks, C_PAD: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, C_PAD)
        ok = c < num_chunks
        base = part_ptr + (row * num_chunks + c) * 3
        m = tl.load(base, mask=ok, other=float("-inf"))
        s = tl.load(base + 1, mask=ok, other=0.0)
        idx = tl.load(base + 2, mask=ok, other=3.0e38)
        top = tl.max(m, 0)
        lse = top + tl.log(tl.sum(tl.where(ok, s * tl.exp(m - top), 0.0), 0))
        best = tl.min(tl.where(ok & (m == top), idx, 3.0e38), 0)  # the first chunk that holds the max
        tl.store(lse_ptr + row, lse)
        tl.store(greedy_ptr + row, best.to(tl.int64))
        tl.store(packed_ptr + row, best.to(tl.float64))
        tl.store(packed_ptr + B + row, (top - lse).to(tl.float64))


def greedy_head_triton(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton ``greedy_head_ref`` of ``logits [B, V]`` (unit column stride)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"greedy_head: logits must be [B, V] with unit column stride, got {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    b, v = logits.shape
    if v >= 1 << 24:
        raise ValueError(f"greedy_head: vocabulary of {v} entries, at most {(1 << 24) - 1}")
    dev = logits.device
    lse = torch.empty(b, device=dev, dtype=torch.float32)
    greedy = torch.empty(b, 1, device=dev, dtype=torch.int64)
    packed = torch.empty(2, b, device=dev, dtype=torch.float64)
    if b == 0:
        return lse, greedy, packed
    chunks = triton.cdiv(v, BLOCK)
    part = torch.empty(b, chunks, 3, device=dev, dtype=torch.float32)
    _partial_kernel[(b, chunks)](logits, part, v, logits.stride(0), chunks, BLOCK=BLOCK, num_warps=8)
    _merge_kernel[(b,)](part, lse, greedy, packed, b, chunks, C_PAD=max(2, triton.next_power_of_2(chunks)),
                        num_warps=1)
    return lse, greedy, packed


def greedy_head(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, greedy, packed) of ``logits [B, V]``: two Triton launches on CUDA, else the reference."""
    if (HAS_TRITON and logits.is_cuda and not _tuning.interpreting() and logits.dim() == 2
            and logits.stride(1) == 1 and logits.shape[1] < 1 << 24):
        return greedy_head_triton(logits)
    return greedy_head_ref(logits)
