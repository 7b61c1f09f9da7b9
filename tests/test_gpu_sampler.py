"""``bench/_gpu_busy.GpuSampler``: nvidia-smi's busy, SM clock and power lines parsed, means over a stretch."""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _gpu_busy  # noqa: E402


def test_samples_and_clocks_are_parsed_and_averaged_since_a_mark():
    g = _gpu_busy.GpuSampler.__new__(_gpu_busy.GpuSampler)
    g.samples, g.extra, g.times = [], [], []
    g.proc = type("P", (), {"stdout": io.StringIO("10, 345, 80.0\n87, 1980, 650.5\n90, 1755, 700\n[N/A], 1, 1\n"
                                                   "50, [N/A], [N/A]\n")})()
    g._read()
    assert g.samples == [10.0, 87.0, 90.0, 50.0]  # a line without a busy figure is skipped
    assert g.mean_since(1) == (87 + 90 + 50) / 3
    assert g.clocks_since(1) == {"sm_clock_mhz_mean": 1867.5, "sm_clock_mhz_min": 1755.0, "power_w_mean": 675.2}
    assert g.clocks_since(4) is None and g.mean_since(9) is None  # no clocks in the last sample; nothing past the end
