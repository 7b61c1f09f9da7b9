"""``BlockPool``: the decode worker's paged K/V memory and its free list.

K and V of all layers live in two tensors ``[layers, num_blocks, block_size, kv_heads, head_dim]``;
``k_pool[l]`` is the per-layer pool the paged attention kernel reads. A request takes whole blocks
with ``allocate`` (after ``can_allocate``) and gives them back with ``free``; double frees and
foreign block ids are refused so leaks and aliasing show up as errors, not as wrong tokens.
"""

from __future__ import annotations

import threading

import torch

from colm.config import ModelConfig
from colm.errors import CapacityError


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return 2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * torch.empty(0, dtype=dtype).element_size()


def num_blocks_from_memory(cfg: ModelConfig, block_size: int, dtype: torch.dtype, device, fraction: float) -> int:
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return max(1, int(free * fraction) // bytes_per_block(cfg, block_size, dtype))


class BlockPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device, dtype: torch.dtype) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks}: must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, N, bs, Hkv, hd]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: recently freed blocks are reused first
        self._is_free = [True] * num_blocks
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        with self._lock:
            if n > len(self._free):
                raise CapacityError(f"KV pool full: need {n} blocks, {len(self._free)} of {self.num_blocks} free")
            blocks = [self._free.pop() for _ in range(n)]
            for b in blocks:
                self._is_free[b] = False
            return blocks

    def free(self, blocks: list[int]) -> None:
        with self._lock:
            for b in blocks:
                if not 0 <= b < self.num_blocks or self._is_free[b]:
                    raise ValueError(f"free: block {b} is not allocated (double free or foreign id)")
            for b in reversed(blocks):  # pushed back so that the next allocate pops them in ascending order
                self._is_free[b] = True
                self._free.append(b)

    def slot(self, blocks: list[int], pos: int) -> int:
        """Flat slot id of token position ``pos`` of a sequence holding ``blocks``."""
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """Flat slot ids [end - start] (int64) of token positions start..end-1 of a sequence."""
        pos = torch.arange(start, end)
        table = torch.tensor(blocks, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def runs(self, blocks: list[int], start: int, end: int) -> list[tuple[int, int, int]]:
        """Token positions start..end-1 as maximal runs of consecutive slots: [(token_a, token_b, first_slot)].
        Blocks come off the free stack in ascending order, so a request's blocks are mostly one run."""
        bs = self.block_size
        out: list[list[int]] = []
        pos = start
        while pos < end:
            stop = min(end, (pos // bs + 1) * bs)
            slot = blocks[pos // bs] * bs + pos % bs
            if out and out[-1][2] + (out[-1][1] - out[-1][0]) == slot:
                out[-1][1] = stop
            else:
                out.append([pos, stop, slot])
            pos = stop
        return [tuple(r) for r in out]
