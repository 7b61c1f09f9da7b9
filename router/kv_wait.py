"""Requests waiting for KV blocks, first come first served.

When every decode worker's pool is full for now, a request waits here (up to ``router.kv_wait_s``, within its
deadline) instead of being refused with RESOURCE_EXHAUSTED at once, as vLLM's and SGLang's schedulers keep a request
waiting until the cache has room. Only the head of the queue tries to place itself; a request that arrives while
others wait joins behind them, so small requests do not overtake a waiting large one forever. The head is woken when
it may find room: when the request ahead of it leaves (placed, gave up or cancelled) and after each round of worker
reports (``wake``), and at least every ``poll_s`` in any case.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Callable


class KVWaitQueue:
    def __init__(self, on_length: Callable[[int], None] | None = None) -> None:
        self._waiting: OrderedDict[str, asyncio.Event] = OrderedDict()  # request uid -> its wake-up, oldest first
        self._on_length = on_length or (lambda n: None)  # told the line's length whenever it changes (a gauge)

    def __len__(self) -> int:
        return len(self._waiting)

    def may_try(self, uid: str) -> bool:
        """Whether ``uid`` may try to place itself now: nobody waits, or it is the oldest waiter."""
        return not self._waiting or next(iter(self._waiting)) == uid

    def join(self, uid: str) -> None:
        """Wait in line (a no-op for a request already in it)."""
        if uid not in self._waiting:
            self._waiting[uid] = asyncio.Event()
            self._on_length(len(self._waiting))

    def leave(self, uid: str) -> None:
        """Out of line (placed, given up, cancelled); the next in line is woken if ``uid`` was at the head."""
        head = self.may_try(uid)
        if self._waiting.pop(uid, None) is None:
            return
        self._on_length(len(self._waiting))
        if head:
            self.wake()

    def wake(self) -> None:
        """The head tries again now (room may have appeared)."""
        if self._waiting:
            next(iter(self._waiting.values())).set()

    async def wait(self, uid: str, poll_s: float) -> None:
        """Until ``uid`` is woken or ``poll_s`` passes (``uid`` must have joined)."""
        ev = self._waiting[uid]
        try:
            await asyncio.wait_for(ev.wait(), timeout=poll_s)
        except asyncio.TimeoutError:
            pass
        ev.clear()
