"""``bench/_pyspy.summarize``: folded py-spy stacks become the GIL-busy share and the top self / inclusive functions."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _pyspy  # noqa: E402


def test_summarize_counts_self_and_inclusive_shares():
    raw = "\n".join([
        "<module> (serve.py:3);loop (engine.py:10);step (engine.py:20) 60",
        "<module> (serve.py:3);loop (engine.py:10);emit (engine.py:40) 30",
        "<module> (serve.py:3);poll (/usr/lib/python3.12/selectors.py:5) 10",
        "not a stack line",
    ])
    s = _pyspy.summarize(raw, seconds=2.0, rate=100)
    assert s["samples"] == 100
    assert s["gil_busy_share"] == 0.5  # 100 samples of 200 possible
    assert s["top_self"][0] == ["step (engine.py)", 0.6]
    assert ["poll (selectors.py)", 0.1] in s["top_self"]
    incl = dict(s["top_inclusive"])
    assert incl["<module> (serve.py)"] == 1.0 and incl["loop (engine.py)"] == 0.9


def test_summarize_of_nothing_is_empty():
    s = _pyspy.summarize("", seconds=1.0, rate=100)
    assert s["samples"] == 0 and s["top_self"] == [] and s["gil_busy_share"] == 0.0
