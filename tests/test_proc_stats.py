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
