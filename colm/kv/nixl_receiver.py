"""Decode's half of the ``nixl`` transport: its pool's NIXL registration for a grant, and the checks of the chunks
the sender marks as written (their checksums read from the pool where the bytes landed; nothing is copied).

``pool_grant_fields`` registers the pool with this process's decode agent (once) and fills ``KVPoolGrant.nixl_*``;
``verify_range`` checks one chunk now, or on a device pool with ``wsum32`` only its ranges, leaving its sum to
``check_pending`` at the stream's end (all chunks in one launch, one read).
"""

from __future__ import annotations

import numpy as np
import torch

from colm.errors import TransferError
from colm.kernels.wsum32 import wsum32_segments
from colm.kv.nixl_agent import endpoint
from colm.kv.nixl_checksums import pool_checksum, side_stream
from colm.kv.nixl_segments import PoolGeometry, put_segments, ranges_segments, token_runs
from colm.kv_wire import KVLayout


def pool_grant_fields(engine) -> dict:
    """The ``KVPoolGrant.nixl_*`` fields of ``engine``'s pool: registered with this process's decode agent on first
    use (DRAM or VRAM, as the pool lies)."""
    ep = endpoint("decode")
    addr, nbytes, mem, device = ep.register(engine.pool.kv)
    return dict(nixl_agent=ep.name, nixl_metadata=ep.metadata, nixl_addr=addr, nixl_bytes=nbytes, nixl_mem=mem,
                nixl_device=device)


def geometry_of(pool) -> PoolGeometry:
    """``PoolGeometry`` of a ``PagedKV`` / ``BlockPool``."""
    _, layers, blocks, bs, heads, hd = pool.kv.shape
    return PoolGeometry(layers, blocks, bs, heads, hd, pool.kv.element_size())


def verify_range(pool, blocks, layout: KVLayout, chunk, kind: str, request_id: str = "", pending: bool = False):
    """Decode: the checksum of the chunk's cells as they lie in the pool equals the sender's; TransferError if not
    (or if its ranges lie outside the stream's). ``pending`` (a device pool, ``wsum32``): only the ranges are
    checked now; returns them, (l0, l1, t0, t1), for ``check_pending``, which sums a stream's chunks at its end
    (their pool segments laid out in one numpy pass, summed in one launch, read once). Otherwise None."""
    l0, l1, t0, t1 = chunk.layer_start, chunk.layer_end, chunk.token_start, chunk.token_end
    if not (0 <= l0 < l1 <= layout.num_layers and 0 <= t0 < t1 <= layout.num_tokens):
        raise TransferError(f"request {request_id}: chunk layers [{l0},{l1}) tokens [{t0},{t1}) outside {layout.num_layers} layers x "
                            f"{layout.num_tokens} tokens")
    geo = geometry_of(pool)
    if pending and kind == "wsum32" and pool.kv.is_cuda and geo.token_bytes % 2 == 0:  # whole 16-bit words
        return l0, l1, t0, t1
    segs = put_segments(geo, l0, l1, t0, t1, token_runs(blocks, geo.block_size, t0, t1))
    _check(pool_checksum(pool.kv, segs, kind), chunk, request_id)
    return None


def _check(got: int, chunk, request_id: str) -> None:
    if got != chunk.crc32:
        raise TransferError(f"request {request_id}: checksum mismatch in chunk {chunk.seq} (layers [{chunk.layer_start},"
                            f"{chunk.layer_end}) tokens [{chunk.token_start},{chunk.token_end}) as written into the pool)")


def pending_segments(geo: PoolGeometry, blocks, ranges: list) -> np.ndarray:
    """The pool words of the chunks ``ranges`` [(l0, l1, t0, t1)] in the blocks ``blocks``: int64 [rows, 3] (first
    word, words, index of the chunk in ``ranges``), each chunk's rows in ``put_segments`` order; the chunks of one
    token range laid out together (``ranges_segments``). ``geo.token_bytes`` is even."""
    seg, chunk = ranges_segments(geo, ranges, [0] * len(ranges),
                                 lambda t0, t1: token_runs(blocks, geo.block_size, t0, t1))
    return np.stack([seg[:, 1] // 2, seg[:, 2] // 2, chunk], axis=1)


def check_pending(pool, blocks, pending: list, request_id: str = "") -> None:
    """Decode, at a stream's end: the chunks whose checks ``verify_range(pending=True)`` left pending, [(chunk, its
    ranges)], summed in one launch (``wsum32_segments``) and compared with one host read; TransferError at the first
    mismatch."""
    if not pending:
        return
    segs = pending_segments(geometry_of(pool), blocks, [r for _, r in pending])  # [rows, 3] first word, words, chunk
    words = pool.kv.view(-1).view(torch.uint8).view(torch.int16)  # the pool's 16-bit words
    with side_stream(pool.kv.device):
        sums = wsum32_segments(words, segs, len(pending)).tolist()
    for (chunk, _), got in zip(pending, sums):
        _check(int(got), chunk, request_id)

