"""Batches of a request's events, as many as came since its consumer last took some.

``coalesced(events)`` drains an async iterator in a task of its own and yields lists: one event each while the
consumer keeps up, several at once when it falls behind (a client reading slowly, or an event loop with more
ready work than one decode step's worth). The public gRPC stream sends one message per list, so a router at its
CPU limit sends fewer, fuller messages instead of falling further behind: the cost of a message (protobuf, HTTP/2
frame, the client's parse), about two thirds of the router's host time per token on the CPU, is paid per batch.
Order is kept; an error of ``events`` is raised after the events before it were yielded; closing the consumer
cancels the task (the producer's cleanup runs there).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncIterator, TypeVar

T = TypeVar("T")


async def coalesced(events: AsyncIterator[T]) -> AsyncIterator[list[T]]:
    pending: collections.deque = collections.deque()
    ready = asyncio.Event()
    end: list = []  # [None] once events ended, [exception] if it raised

    async def pump() -> None:
        try:
            async for ev in events:
                pending.append(ev)
                ready.set()
            end.append(None)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, in order
            end.append(e)
        finally:
            ready.set()

    task = asyncio.ensure_future(pump())
    try:
        while True:
            await ready.wait()
            ready.clear()
            if pending:
                batch = list(pending)
                pending.clear()
                yield batch
            if end and not pending:
                if end[0] is not None:
                    raise end[0]
                return
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
