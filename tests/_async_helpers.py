"""Shared waits of the router's asyncio tests."""

from __future__ import annotations

import asyncio
from typing import Callable


async def until(cond: Callable[[], bool], message: str, timeout_s: float = 5.0) -> None:
    """Return once ``cond()`` holds, polling every 10 ms; an AssertionError with ``message`` after ``timeout_s``."""
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(message)
