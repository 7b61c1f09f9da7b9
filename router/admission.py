"""Admission control: bounded concurrency plus a bounded waiting queue, each wait under a deadline.

A request enters with ``async with admission.slot(deadline)``: it runs at once if fewer than
``max_running`` requests run, waits in FIFO order if fewer than ``max_queued`` wait, and is refused
with ``Overloaded`` (RESOURCE_EXHAUSTED plus a retry hint) otherwise. A wait that outlives the
request's deadline ends with ``asyncio.TimeoutError`` (DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque


class Overloaded(Exception):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(self, max_running: int, max_queued: int, retry_after_s: float = 0.5) -> None:
        if max_running < 1:
            raise ValueError(f"max_running={max_running}: must be >= 1")
        if max_queued < 0:
            raise ValueError(f"max_queued={max_queued}: must be >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self.num_running = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def num_queued(self) -> int:
        return len(self._waiters)

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # hand the slot straight to the oldest waiter
                return
        self.num_running -= 1

    @contextlib.asynccontextmanager
    async def slot(self, deadline: float | None = None):
        """``deadline``: absolute ``time.monotonic()`` by which the request must be running."""
        if self.num_running < self.max_running and not self._waiters:
            self.num_running += 1
        else:
            if len(self._waiters) >= self.max_queued:
                raise Overloaded(f"router queue full ({self.max_queued} waiting, {self.num_running} running)",
                                 self.retry_after_s)
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(asyncio.shield(fut), timeout)
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release()  # we were handed a slot just as we gave up: pass it on
                else:
                    fut.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(fut)
                raise
        try:
            yield
        finally:
            self._release()
