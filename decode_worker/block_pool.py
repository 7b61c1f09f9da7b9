"""``BlockPool``: the decode worker's paged K/V memory and its free list.

K and V of all layers live in one tensor ``kv [2, layers, num_blocks, block_size, kv_heads, head_dim]``
(one allocation, so one CUDA IPC handle shares it: the ``cuda_pool`` hand-off); ``k = kv[0]`` and
``v = kv[1]``, and ``k[l]`` is the per-layer pool the paged attention kernel reads. A request takes
whole blocks with ``allocate`` (after ``can_allocate``) and gives them back with ``free``; double frees
and foreign block ids are refused so leaks and aliasing show up as errors, not as wrong tokens.
``PagedKV`` is the part without the free list (layout, slots, writes): a prefill worker that writes
straight into a decode worker's pool views that pool's memory as a ``PagedKV``.

Received K/V go in through ``write`` with a ``CopyPlan`` (``copy_plan``): where a token range of a
sequence lands, made once per range and reused for every layer of it, so the per-layer host work
is the copies' launches alone (the hand-off's writes sit on the prefill's launch path).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from colm.config import ModelConfig
from colm.errors import CapacityError

from colm.decode_worker.prefix_cache import PrefixIndex


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


def num_blocks_from_memory(cfg: ModelConfig, block_size: int, dtype: torch.dtype, device, fraction: float) -> int:
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return max(1, int(free * fraction) // bytes_per_block(cfg, block_size, dtype))


MAX_SLICE_RUNS = 2  # a token range of more runs of consecutive slots is written with one scatter (K and V at once)


@dataclass(frozen=True, eq=False)
class CopyPlan:
    """Where token positions start..end-1 of a sequence land in the pool. ``runs`` [(offset_a, offset_b, first_slot)]
    with offsets from ``start`` when the range is at most ``MAX_SLICE_RUNS`` runs of consecutive slots (slice
    copies: no index tensor); else ``slots`` [end - start] int64 on the pool's device (one scatter per K and V)."""
    start: int
    end: int
    runs: tuple[tuple[int, int, int], ...] = ()
    slots: torch.Tensor | None = None


class PagedKV:
    """K/V pages ``kv [2, layers, num_blocks, block_size, kv_heads, head_dim]`` (contiguous) and where token
    ranges of a sequence's block list land in them. No allocator: ``BlockPool`` adds the free list."""

    def __init__(self, kv: torch.Tensor) -> None:
        if kv.dim() != 6 or kv.shape[0] != 2 or not kv.is_contiguous():
            raise ValueError(f"PagedKV: kv must be a contiguous [2, layers, blocks, block_size, kv_heads, head_dim] "
                             f"tensor, got {list(kv.shape)}")
        self.kv = kv
        self.k, self.v = kv[0], kv[1]  # [L, N, bs, Hkv, hd] each
        layers, self.num_blocks, self.block_size, heads, hd = self.k.shape
        flat = (layers, self.num_blocks * self.block_size, heads, hd)
        self._kv_slots = kv.view(2, *flat)  # [2, L, slots, Hkv, hd]: slot = block * block_size + offset

    def slot(self, blocks: list[int], pos: int) -> int:
        """Flat slot id of token position ``pos`` of a sequence holding ``blocks``."""
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot ids [end - start] (int64) of token positions start..end-1 of a sequence."""
        if start >= end:
            return torch.empty(0, dtype=torch.int64)
        first, ids = self._touched(blocks, start, end)
        bs = self.block_size
        table = (np.asarray(ids, dtype=np.int64)[:, None] * bs + np.arange(bs)).reshape(-1)  # slots of blocks ids
        return torch.from_numpy(table[start - first * bs : end - first * bs])

    def runs(self, blocks: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
        """Token positions start..end-1 as maximal runs of consecutive slots: [(token_a, token_b, first_slot)].
        Blocks come off the free stack in ascending order, so a request's blocks are mostly one run."""
        if start >= end:
            return []
        return self._runs(start, end, *self._run_heads(blocks, start, end))

    def _touched(self, blocks: list[int], start: int, end: int) -> tuple[int, list[int]]:
        """(first, ids): ids = blocks[first:], the blocks that positions start..end-1 (start < end) lie in."""
        first, last = start // self.block_size, (end - 1) // self.block_size
        if last >= len(blocks):
            raise IndexError(f"token {end - 1} is past the {len(blocks)} blocks of the sequence")
        return first, blocks[first : last + 1]

    def _run_heads(self, blocks: list[int], start: int, end: int) -> tuple[int, list[int], list[int]]:
        """(first, ids, heads): ``_touched`` plus heads = the indices into ids where a run of consecutive block ids
        (so of consecutive slots) begins. One vectorised pass, no per-block loop."""
        first, ids = self._touched(blocks, start, end)
        arr = np.asarray(ids, dtype=np.int64)  # [n]
        return first, ids, [0, *(np.flatnonzero(arr[1:] != arr[:-1] + 1) + 1).tolist()]

    def _runs(self, start: int, end: int, first: int, ids: list[int], heads: list[int]) -> list[tuple[int, int, int]]:
        bs = self.block_size
        out = []
        for i, j in zip(heads, heads[1:] + [len(ids)]):  # one run: blocks ids[i:j]
            a = max(start, (first + i) * bs)
            out.append((a, min(end, (first + j) * bs), ids[i] * bs + a % bs))
        return out

    def copy_plan(self, blocks: list[int], start: int, end: int) -> CopyPlan:
        """The ``CopyPlan`` of token positions start..end-1 (start < end) of a sequence holding ``blocks``."""
        first, ids, heads = self._run_heads(blocks, start, end)
        if len(heads) <= MAX_SLICE_RUNS:
            runs = self._runs(start, end, first, ids, heads)
            return CopyPlan(start, end, runs=tuple((a - start, b - start, s) for a, b, s in runs))
        return CopyPlan(start, end, slots=self.slots(blocks, start, end).to(self.k.device))

    def write(self, plan: CopyPlan, layer_start: int, layer_end: int, kv: torch.Tensor) -> None:
        """kv [layer_end - layer_start, plan.end - plan.start, 2, Hkv, hd] (the pool's device and dtype) into the
        plan's slots of layers layer_start..layer_end-1; asynchronous on a CUDA pool (current stream)."""
        # one copy (or scatter) per run writes K and V together: the prefill's launch path pays per call
        pages = self._kv_slots[:, layer_start:layer_end]  # [2, nl, slots, Hkv, hd]
        src = kv.permute(2, 0, 1, 3, 4)  # [2, nl, T, Hkv, hd]
        if plan.slots is None:
            for a, b, s in plan.runs:
                pages[:, :, s : s + b - a].copy_(src[:, :, a:b])
        else:
            pages.index_copy_(2, plan.slots, src)


class BlockPool(PagedKV):
    """``PagedKV`` with its free list and reference counts: a block is held by every request whose block list has it
    (more than one only for a cached prefix block, ``decode_worker.prefix_cache``). A block no request holds is free,
    or, when it holds a cached prefix, idle: still found by ``match`` and taken over by ``allocate`` when no plain
    free block is left. ``num_free`` counts both."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device, dtype: torch.dtype) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks}: must be > 0")
        super().__init__(torch.zeros((2, cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim),
                                     device=device, dtype=dtype))
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: recently freed blocks are reused first
        self._refs = [0] * num_blocks  # requests holding each block
        self.cache = PrefixIndex()
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._free) + self.cache.num_idle

    @property
    def num_cached(self) -> int:
        """Blocks holding a cached prefix (held by requests or idle)."""
        return self.cache.num_cached

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks for one request: plain free ones first, then idle cached ones (forgotten, oldest first)."""
        with self._lock:
            if n > self.num_free:
                raise CapacityError(f"KV pool full: need {n} blocks, {self.num_free} of {self.num_blocks} free")
            k = min(n, len(self._free))
            blocks = [self._free.pop() for _ in range(k)] + [self.cache.evict() for _ in range(n - k)]
            for b in blocks:
                self._refs[b] = 1
            return blocks

    def free(self, blocks: list[int]) -> None:
        """One request lets ``blocks`` go (its whole block list, in token order)."""
        with self._lock:
            if len(set(blocks)) != len(blocks):
                raise ValueError("free: a block appears twice in one block list")
            for b in blocks:
                if not 0 <= b < self.num_blocks or self._refs[b] <= 0:
                    raise ValueError(f"free: block {b} is not allocated (double free or foreign id)")
            # last block first: plain ones are pushed back so that the next allocate pops them in ascending order,
            # cached ones turn idle deepest first, so a prefix's tail is evicted before its root
            for b in reversed(blocks):
                self._refs[b] -= 1
                if self._refs[b]:
                    continue
                if self.cache.holds(b):
                    self.cache.idle(b)
                else:
                    self._free.append(b)

    def match(self, digests: list[bytes]) -> list[int]:
        """The cached blocks of the longest cached prefix of ``digests`` (``prefix_cache.block_hashes``), now held
        once more by the caller (give them back with ``free``)."""
        out: list[int] = []
        with self._lock:
            for d in digests:
                b = self.cache.lookup(d)
                if b is None:
                    break
                if self._refs[b] == 0:
                    self.cache.take(b)
                self._refs[b] += 1
                out.append(b)
        return out

    def register(self, blocks: list[int], digests: list[bytes]) -> int:
        """Cache held ``blocks`` (their K/V complete) under ``digests``, pairwise; a digest or block cached already is
        skipped. The number cached."""
        n = 0
        with self._lock:
            for b, d in zip(blocks, digests):
                if self._refs[b] > 0 and self.cache.add(d, b):
                    n += 1
        return n

    def clear_cache(self) -> int:
        """Forget every cached prefix (idle blocks become plain free blocks; held ones are freed as plain blocks
        later). The number of idle blocks freed."""
        with self._lock:
            idle = self.cache.clear_idle()
            self._free.extend(reversed(sorted(idle)))
            return len(idle)
