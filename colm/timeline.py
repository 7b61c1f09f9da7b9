"""``Timeline``: when one request passed each milestone on one worker (the host's monotonic clock).

Both engines keep one per request (prefill: submitted .. delivered; decode: reserved .. first_token)
and return it relative to a reference milestone together with that milestone's monotonic time, so a
reader can put the workers of one host on one clock (``bench/engines.py``) and the router can turn
spans into phase metrics (``colm.router.metrics``).
"""

from __future__ import annotations

import time


class Timeline:
    __slots__ = ("stamps",)

    def __init__(self) -> None:
        self.stamps: dict[str, float] = {}  # milestone -> time.monotonic()

    def mark(self, milestone: str, again: bool = False, now: float | None = None) -> None:
        """Stamp ``milestone`` (now, or at ``now``) the first time only, unless ``again``."""
        if again or milestone not in self.stamps:
            self.stamps[milestone] = time.monotonic() if now is None else now

    def __getitem__(self, milestone: str) -> float:
        return self.stamps[milestone]

    def ms_since(self, milestone: str) -> float:
        return (time.monotonic() - self.stamps[milestone]) * 1000.0

    def span_ms(self, start: str, end: str) -> float:
        return (self.stamps[end] - self.stamps[start]) * 1000.0

    def relative_ms(self, reference: str) -> tuple[dict[str, float], float]:
        """(milestone -> ms after ``reference``, ``reference`` on the monotonic clock)."""
        t0 = self.stamps.get(reference, 0.0)
        return {k: (v - t0) * 1000.0 for k, v in self.stamps.items()}, t0
