"""Where a put's bytes land in decode's pool: the pool's geometry and a put's byte segments (source offset in the
sender's buffer, offset in the pool, length), laid out with numpy for many puts at once.

The sender turns segments into its WRITE's descriptor lists (``nixl_sender``); the receiver sums the pool bytes at
a chunk's segments to check its checksum (``nixl_receiver``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PoolGeometry:
    """The layout of a pool ``kv [2, num_layers, num_blocks, block_size, kv_heads, head_dim]`` (contiguous) of
    elements of ``itemsize`` bytes: what a sender needs to address its slots."""
    num_layers: int
    num_blocks: int
    block_size: int
    kv_heads: int
    head_dim: int
    itemsize: int

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K (or V) of one layer: one slot."""
        return self.kv_heads * self.head_dim * self.itemsize

    @property
    def num_bytes(self) -> int:
        return 2 * self.num_layers * self.num_blocks * self.block_size * self.token_bytes


def token_runs(blocks, block_size: int, t0: int, t1: int) -> np.ndarray:
    """Token positions [t0, t1) (t0 < t1) of a sequence holding ``blocks`` as maximal runs of consecutive slots:
    int64 [runs, 3] rows (token_a, token_b, first_slot)."""
    first, last = t0 // block_size, (t1 - 1) // block_size
    if t0 < 0 or t1 <= t0 or last >= len(blocks):
        raise ValueError(f"tokens [{t0}, {t1}) do not lie in the {len(blocks)} blocks of {block_size}")
    ids = np.asarray(blocks[first : last + 1], dtype=np.int64)
    heads = np.concatenate(([0], np.flatnonzero(ids[1:] != ids[:-1] + 1) + 1)).astype(np.int64)
    ends = np.append(heads[1:], len(ids))
    a = np.maximum(t0, (first + heads) * block_size)
    b = np.minimum(t1, (first + ends) * block_size)
    return np.stack([a, b, ids[heads] * block_size + a - (first + heads) * block_size], axis=1)


def put_segments(geo: PoolGeometry, l0: int, l1: int, t0: int, t1: int, runs: np.ndarray) -> np.ndarray:
    """The byte segments of a put of layers [l0, l1) x tokens [t0, t1) (``runs``: ``token_runs`` of [t0, t1)):
    int64 [2 * (l1 - l0) * runs, 3] rows (source offset, pool offset, length). The source is the put laid out in
    pool order, ``[2, l1 - l0, t1 - t0, kv_heads, head_dim]`` contiguous; rows run in its order (K then V, layers,
    runs), so they cover it from 0 to its end without gaps, and the checksum of the rows' pool bytes in row order is
    the checksum of the source."""
    return batch_segments(geo, np.array([[l0, l1, 0]], dtype=np.int64), t0, t1, runs)


def batch_segments(geo: PoolGeometry, puts: np.ndarray, t0: int, t1: int, runs: np.ndarray) -> np.ndarray:
    """The segments of several puts of tokens [t0, t1) at once: ``puts`` int64 [P, 3] rows (l0, l1, offset of the
    put's source in a common buffer). int64 [sum 2 x (l1 - l0) x runs, 3] rows (source offset, pool offset,
    length): each put's rows in ``put_segments``' order, shifted by its offset, the puts in order."""
    l0, l1, off = puts[:, 0], puts[:, 1], puts[:, 2]
    nl, nt, tb = l1 - l0, t1 - t0, geo.token_bytes
    per = 2 * nl                                                       # [P] (K/V, layer) pairs of each put
    put = np.repeat(np.arange(len(puts)), per)                         # [Q] the put of each pair
    k = np.arange(len(put)) - np.repeat(np.cumsum(per) - per, per)     # [Q] c * nl + layer - l0, inside its put
    c, layer = k // nl[put], l0[put] + k % nl[put]
    src = off[put] + k * nt * tb                                       # [Q] the pair's first byte in the source
    dst = (c * geo.num_layers + layer) * (geo.num_blocks * geo.block_size) * tb  # [Q] the pair's slot 0 in the pool
    a, b, slot = runs[:, 0], runs[:, 1], runs[:, 2]                    # [R]
    rows = np.stack([(src[:, None] + (a - t0)[None, :] * tb).reshape(-1),
                     (dst[:, None] + slot[None, :] * tb).reshape(-1),
                     np.broadcast_to((b - a)[None, :] * tb, (len(put), len(runs))).reshape(-1)], axis=1)
    return rows


def ranges_segments(geo: PoolGeometry, ranges, offsets, runs_of) -> tuple[np.ndarray, np.ndarray]:
    """The segments of the puts ``ranges`` [(l0, l1, t0, t1)] whose sources start at ``offsets`` in a common buffer,
    the puts of one token range laid out together (``batch_segments``; ``runs_of(t0, t1)``: that range's
    ``token_runs``). Returns (int64 [rows, 3] segments, int64 [rows] the index in ``ranges`` of each row's put)."""
    by_tokens: dict[tuple[int, int], list] = {}
    for i, ((l0, l1, t0, t1), off) in enumerate(zip(ranges, offsets)):
        by_tokens.setdefault((t0, t1), []).append((i, l0, l1, off))
    segs, index = [], []
    for (t0, t1), items in by_tokens.items():
        runs = runs_of(t0, t1)
        puts = np.array([(l0, l1, off) for _, l0, l1, off in items], dtype=np.int64)  # [P, 3]
        segs.append(batch_segments(geo, puts, t0, t1, runs))
        index.append(np.repeat(np.array([i for i, *_ in items], dtype=np.int64), 2 * (puts[:, 1] - puts[:, 0]) * len(runs)))
    if not segs:
        return np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(segs), np.concatenate(index)


def to_pool_order(kv: torch.Tensor) -> torch.Tensor:
    """A put's ``kv [nl, nt, 2, Hkv, hd]`` as the view ``[2, nl, nt, Hkv, hd]`` whose contiguous copy is the source
    of ``put_segments``."""
    return kv.permute(2, 0, 1, 3, 4)
