"""Recent decode step times per scale, as the router's latency model reads them.

``StepTimes.record`` keeps each step's wall time and batch size under the widest scale it ran; a step
during which a CUDA graph was captured or a kernel was tuned is left out by the caller (hundreds of
milliseconds, once per shape, nothing like the next step). ``summary`` gives, per scale, the median
step time and the mean batch size of the steps of the last ``window_s`` seconds. A scale with no step
that recent is not reported at all, so the router prices it from the scales that ran (by parameter
count) instead of from an old figure: before this, one slow early measurement kept a scale priced out
of every budget, and with no traffic at that scale nothing ever corrected it (an H100 load test served
all of 320 requests at scale 1 while scale 2 met the budget with room to spare).
"""

from __future__ import annotations

import collections
import statistics
import time

STEP_STATS_WINDOW_S = 30.0  # steps older than this no longer describe the worker
STEP_STATS_MAX_SAMPLES = 64  # per scale


class StepTimes:
    def __init__(self, window_s: float = STEP_STATS_WINDOW_S, max_samples: int = STEP_STATS_MAX_SAMPLES) -> None:
        if window_s <= 0 or max_samples < 1:
            raise ValueError(f"window_s={window_s}, max_samples={max_samples}: must be > 0 and >= 1")
        self.window_s = window_s
        self._samples: dict[int, collections.deque] = collections.defaultdict(
            lambda: collections.deque(maxlen=max_samples))  # scale -> (time s, step ms, batch size)

    def record(self, scale, step_ms: float, batch: int, now: float | None = None) -> None:
        """``scale``: the key the step is kept under (a scale; speculative rounds use "scale:gamma")."""
        self._samples[scale].append((time.monotonic() if now is None else now, float(step_ms), int(batch)))

    def summary(self, now: float | None = None) -> tuple[dict[int, float], dict[int, float]]:
        """({scale: median step ms}, {scale: mean batch size}) over the steps of the last ``window_s``."""
        now = time.monotonic() if now is None else now
        ms_by_scale, batch_by_scale = {}, {}
        for scale, d in self._samples.items():
            recent = [(ms, b) for t, ms, b in d if now - t <= self.window_s]
            if recent:
                ms_by_scale[scale] = statistics.median(ms for ms, _ in recent)
                batch_by_scale[scale] = sum(b for _, b in recent) / len(recent)
        return ms_by_scale, batch_by_scale
