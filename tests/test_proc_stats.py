"""``bench/_proc_stats``: a process's CPU use and context switches over an interval, from /proc."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _proc_stats  # noqa: E402


def test_a_busy_process_uses_about_a_core_and_a_sleeping_one_none():
    me = {"me": os.getpid(), "gone": 2**22 + 12345}  # a pid that does not exist is left out
    a = _proc_stats.snapshot(me)
    t = time.monotonic()
    while time.monotonic() - t < 0.5:
        sum(range(1000))
    busy = _proc_stats.delta(a, _proc_stats.snapshot(me))
    assert set(busy) == {"me"} and 0.5 < busy["me"]["cores"] < 1.5
    a = _proc_stats.snapshot(me)
    time.sleep(0.5)
    idle = _proc_stats.delta(a, _proc_stats.snapshot(me))
    assert idle["me"]["cores"] < 0.2 and idle["me"]["voluntary_switches_per_s"] >= 0


def test_cpu_sampler_takes_cores_over_a_window_found_afterwards():
    """Read in the background with times, then asked for a busy stretch and an idle one of the same pass: about a
    core over the first, none over the second (the pass as a whole would average them)."""
    me = {"me": os.getpid(), "gone": 2**22 + 12346}
    sampler = _proc_stats.CpuSampler(me, interval_s=0.05)
    time.sleep(0.3)
    b0 = time.perf_counter()
    while time.perf_counter() - b0 < 0.6:
        sum(range(1000))
    b1 = time.perf_counter()
    time.sleep(0.6)
    i1 = time.perf_counter()
    time.sleep(0.1)
    sampler.stop()
    busy = sampler.cores_between(b0 + 0.1, b1 - 0.1)
    idle = sampler.cores_between(b1 + 0.1, i1)
    assert set(busy) == {"me"} and 0.5 < busy["me"] < 1.5
    assert idle["me"] < 0.2
    assert sampler.cores_between(b0 - 100, b1) == {}  # before the first reading: no figure


def test_cpu_sampler_interpolates_at_the_window_edges():
    sampler = _proc_stats.CpuSampler({}, interval_s=10)
    sampler.stop()
    sampler.readings = {"p": ([0.0, 1.0, 2.0], [0.0, 1.0, 1.5])}  # a core in the first second, half in the next
    assert sampler.cores_between(0.5, 1.5) == {"p": (1.25 - 0.5) / 1.0}
    assert sampler.cores_between(1.0, 2.0) == {"p": 0.5}
