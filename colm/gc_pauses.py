"""Python's cyclic garbage collector in the serving processes: the heap left by start-up frozen, every pause timed.

A full (generation-2) collection visits every object the collector tracks, and no thread of the process runs Python
meanwhile: in a decode worker the step loop stops, so every running request's next token waits for it. Once a worker
has started, its heap holds some 340 K tracked objects (torch, Triton, gRPC, Ray, protobuf and their modules, the
model, the captured graphs): one full collection of them took 180 ms on a 2-core CPU. They live as long as the
process, so visiting them again finds nothing. ``freeze_start_heap`` collects once, then moves every object that
exists to the collector's permanent generation (``gc.freeze``), which later collections never visit; what requests
allocate is collected as before. vLLM's engine core and SGLang's scheduler freeze their start-up heap the same way.

``GcPauses`` times every collection through ``gc.callbacks`` (one per process) and exposes them as the histogram
``colm_<role>_gc_pause_seconds{generation}`` with the longest in ``colm_<role>_gc_pause_max_seconds`` (role: router,
prefill or decode; workers add their ``worker`` label), the measure of what the freeze buys. ``COLM_GC_FREEZE=0`` leaves the heap unfrozen, for side-by-side runs.
"""

from __future__ import annotations

import atexit
import bisect
import gc
import itertools
import logging
import os
import threading
import time

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds


def freeze_enabled() -> bool:
    value = os.environ.get("COLM_GC_FREEZE", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on"):
        raise ValueError(f"COLM_GC_FREEZE={value!r}: allowed are 1/0, true/false, yes/no, on/off")
    return value in ("1", "true", "yes", "on")


def freeze_start_heap() -> int:
    """Collect everything collectable now, then freeze what is left; returns the number of objects frozen (0 when
    ``COLM_GC_FREEZE`` turns it off). Call it once the process has started and before it serves."""
    if not freeze_enabled():
        return 0
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    # At exit, hand the frozen objects back to the collector: left frozen, the interpreter's shutdown never collects
    # them, and nanobind (Triton's bindings) then printed some 30 lines of "leaked instances/types/functions ... a
    # reference counting issue" as `colm serve` exited.
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)
    n = gc.get_freeze_count()
    logging.getLogger(__name__).info("froze the start-up heap: %d objects (%.0f ms)", n, (time.perf_counter() - t0) * 1e3)
    return n


class GcPauses:
    """Every collection of this process, timed: counts and seconds per generation in histogram buckets."""

    _installed: "GcPauses | None" = None
    _install_lock = threading.Lock()

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start: float | None = None
        self.counts = [[0] * (len(BUCKETS) + 1) for _ in range(3)]  # [generation][bucket], the last one +Inf
        self.sums = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]

    @classmethod
    def install(cls) -> "GcPauses":
        """The process's instance, its callback added to ``gc.callbacks`` on first use."""
        with cls._install_lock:
            if cls._installed is None:
                cls._installed = cls()
                gc.callbacks.append(cls._installed._callback)
            return cls._installed

    def _callback(self, phase: str, info: dict) -> None:
        # Collections run with the GIL held, one at a time per process, so start and stop pair up.
        if phase == "start":
            self._start = time.perf_counter()
            return
        if self._start is None:
            return
        self.observe(info["generation"], time.perf_counter() - self._start)
        self._start = None

    def observe(self, generation: int, seconds: float) -> None:
        i = bisect.bisect_left(BUCKETS, seconds)  # the first bucket whose bound holds it; len(BUCKETS): +Inf
        with self._lock:
            self.counts[generation][i] += 1
            self.sums[generation] += seconds
            self.max_s[generation] = max(self.max_s[generation], seconds)

    def snapshot(self) -> dict:
        """{generation: {"count", "sum_s", "max_s"}} so far."""
        with self._lock:
            return {g: {"count": sum(self.counts[g]), "sum_s": self.sums[g], "max_s": self.max_s[g]} for g in range(3)}

    def metrics(self, role: str, labels: dict[str, str] | None = None):
        """The histogram ``colm_<role>_gc_pause_seconds`` and the gauge ``colm_<role>_gc_pause_max_seconds`` (the
        longest pause so far), both by generation after ``labels``."""
        labels = dict(labels or {})
        names = [*labels, "generation"]
        hist = HistogramMetricFamily(f"colm_{role}_gc_pause_seconds",
                                     "Pauses of Python's garbage collector in this process, by generation", labels=names)
        longest = GaugeMetricFamily(f"colm_{role}_gc_pause_max_seconds",
                                    "The longest pause of Python's garbage collector in this process", labels=names)
        with self._lock:
            counts = [list(c) for c in self.counts]
            sums, maxes = list(self.sums), list(self.max_s)
        for g in range(3):
            buckets = list(zip([*map(str, BUCKETS), "+Inf"], itertools.accumulate(counts[g])))
            hist.add_metric([*labels.values(), str(g)], buckets, sums[g])
            longest.add_metric([*labels.values(), str(g)], maxes[g])
        return hist, longest


class GcPausesCollector:
    """A Prometheus collector of this process's ``GcPauses`` under ``role`` (and fixed labels, e.g. the worker)."""

    def __init__(self, role: str, labels: dict[str, str] | None = None) -> None:
        self.role, self.labels = role, dict(labels or {})
        self.pauses = GcPauses.install()

    def collect(self):
        yield from self.pauses.metrics(self.role, self.labels)
