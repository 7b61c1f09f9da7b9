"""Prefix caching: the K/V blocks of prompts already computed, found again by the tokens they hold.

Many requests open with the same tokens (a system prompt, a few-shot preamble, the earlier turns of a chat).
Their K/V are the same, so a prompt's full blocks can be taken over from an earlier request instead of being
computed again; only the rest of the prompt runs through prefill. With CoLM-Air the K/V come from chain 1 alone,
so one cached prefix serves a request at any scale, and a mid-stream scale switch keeps it.

A block is named by the digest of *every* token up to its end (``block_hashes``: one running BLAKE2b over the
prompt's tokens as int64, a 16-byte digest at each block boundary), so equal digests mean equal prefixes, not
only equal blocks; an optional salt (``cache_salt``) gives a tenant its own namespace, so requests of different
salts never share blocks (and cannot learn from timing whether another tenant sent a prompt). Only full blocks of
the prompt's tokens but the last are cached: the decode steps write from the last prompt token on, so a cached
block is never written again while it is cached.

``PrefixIndex`` is the block pool's index of cached blocks: digest <-> block, plus the least-recently-used order
of the cached blocks no request holds. Those still count as free: ``BlockPool.allocate`` takes plain free blocks
first and then evicts from the front of that order (a request's deepest blocks go first, so a prefix's root
outlives its tails). The pool keeps the reference counts (``BlockPool.match``, ``register``, ``free``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

DIGEST_BYTES = 16
MAX_CACHE_SALT = 256  # characters of a request's cache namespace


def block_hashes(tokens, block_size: int, salt: str = "") -> list[bytes]:
    """Digest of tokens[: (i + 1) * block_size] for every full block i of ``tokens`` (a 1-D int sequence)."""
    ids = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))  # [n]
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"colm-kv-prefix")
    if salt:
        h.update(b"salt\x00" + salt.encode("utf-8") + b"\x00")
    out = []
    raw = ids.tobytes()
    step = block_size * ids.itemsize
    for i in range(len(ids) // block_size):
        h.update(raw[i * step : (i + 1) * step])
        out.append(h.copy().digest())
    return out


class PrefixIndex:
    """Cached blocks by digest, and the eviction order of those no request holds (under the pool's lock)."""

    def __init__(self) -> None:
        self._block: dict[bytes, int] = {}  # digest -> block
        self._digest: dict[int, bytes] = {}  # block -> digest
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; the front is evicted first

    @property
    def num_cached(self) -> int:
        return len(self._digest)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def lookup(self, digest: bytes) -> int | None:
        return self._block.get(digest)

    def holds(self, block: int) -> bool:
        return block in self._digest

    def add(self, digest: bytes, block: int) -> bool:
        """Cache ``block`` under ``digest`` unless either is cached already (two requests computed the same prefix at
        once: the first one's block stays the cached one). True when added."""
        if digest in self._block or block in self._digest:
            return False
        self._block[digest] = block
        self._digest[block] = digest
        return True

    def idle(self, block: int) -> None:
        """The last request holding the cached ``block`` let it go: it is evicted after those idle before it."""
        self._idle[block] = None

    def take(self, block: int) -> None:
        """A request holds the cached ``block`` again: it is not evictable."""
        self._idle.pop(block, None)

    def evict(self) -> int:
        """Forget the least recently idle cached block and return it (now a plain free block)."""
        block, _ = self._idle.popitem(last=False)
        del self._block[self._digest.pop(block)]
        return block

    def clear_idle(self) -> list[int]:
        """Forget every idle cached block (returned, now plain free blocks) and uncache the held ones."""
        idle = list(self._idle)
        self._idle.clear()
        self._block.clear()
        self._digest.clear()
        return idle
