"""``RegionArena``: byte ranges of one registered buffer, handed to requests and taken back.

A NIXL transport registers one buffer per process once (registration is a driver/UCX call: never per
request) and gives each request a region of it: the receiver one to be written into, the sender one to
write from. First fit over a sorted free list, neighbours merged on free. A region whose peer may still
write into it (a broken stream) is freed ``after`` a grace period, never at once: another request could
otherwise take it while a late write lands. Thread-safe.
"""

from __future__ import annotations

import bisect
import threading
import time

from colm.errors import CapacityError

ALIGN = 64  # every region starts on a cache line


class RegionArena:
    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"arena size={size}: must be > 0")
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # sorted (offset, length)
        self._used: dict[int, int] = {}  # offset -> length
        self._later: list[tuple[float, int]] = []  # (due, offset): frees after a grace period
        self._lock = threading.Lock()

    @property
    def num_free_bytes(self) -> int:
        with self._lock:
            self._free_due()
            return sum(n for _, n in self._free)

    def allocate(self, n: int) -> int:
        """The offset of a new region of ``n`` bytes (> 0); CapacityError when no free range holds it."""
        if n <= 0:
            raise ValueError(f"region of {n} bytes: must be > 0")
        need = -(-n // ALIGN) * ALIGN
        with self._lock:
            self._free_due()
            for i, (off, length) in enumerate(self._free):
                if length >= need:
                    if length == need:
                        del self._free[i]
                    else:
                        self._free[i] = (off + need, length - need)
                    self._used[off] = need
                    return off
            free = sum(n for _, n in self._free)
        raise CapacityError(f"KV transfer arena full: a region of {n} bytes asked, {free} of {self.size} bytes free "
                            "(in pieces); raise nixl_arena_bytes or lower the load")

    def free(self, offset: int, after_s: float = 0.0) -> None:
        """Give the region at ``offset`` back now, or once ``after_s`` seconds have passed."""
        with self._lock:
            if offset not in self._used:
                raise ValueError(f"free: no region at offset {offset} (double free or foreign offset)")
            if after_s > 0:
                self._later.append((time.monotonic() + after_s, offset))
                return
            self._release(offset)

    def _free_due(self) -> None:
        if not self._later:
            return
        now = time.monotonic()
        due = [o for t, o in self._later if t <= now]
        self._later = [(t, o) for t, o in self._later if t > now]
        for o in due:
            self._release(o)

    def _release(self, offset: int) -> None:
        length = self._used.pop(offset)
        i = bisect.bisect(self._free, (offset, 0))
        self._free.insert(i, (offset, length))
        # merge with the right, then the left neighbour
        if i + 1 < len(self._free) and offset + length == self._free[i + 1][0]:
            self._free[i] = (offset, length + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]
