"""The benchmarks' figures over the measured load only.

``colm loadtest`` keeps each request's send time (``sent_s``, the sender's perf_counter), so a GPU sampler in another
process can average over the measured load (first send to last answer) instead of the client command's whole run:
``bench/serve_path.py`` averaged nvidia-smi over the ``colm loadtest`` subprocess, whose start-up (8 client processes
imported and spawned) and report (summary, plot), with no request in flight, took 2.0-2.8 s of 7.2-23.4 s in the
published runs.
``bench/goodput_rescore.py`` took a run's wall time as num_requests / throughput, though the throughput counts the OK
requests only."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

from colm.loadtest import LoadSpec, Result, load_window, run, summarize
from colm.model import CoLM
from colm.presets import preset
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.local_backend import LocalBackend
from colm.tokenizer import ByteTokenizer
from router_helpers import BackgroundRouter

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import _gpu_busy  # noqa: E402


def _rescore_module():
    spec = importlib.util.spec_from_file_location("goodput_rescore", BENCH / "goodput_rescore.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.timeout(180)
def test_the_load_window_is_the_measured_load_on_the_callers_clock():
    """Client processes (spawned) report send times on the parent's perf_counter timeline; the window they give is
    the measured load (its length the run's wall time), inside the call, after the warm-up and start-up."""
    cfg = preset("tiny-air")
    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05), cfg, ByteTokenizer(),
                    LocalBackend(CoLM(cfg).reset_parameters(seed=0).eval(), max_concurrency=2))
    bg = BackgroundRouter(router)
    try:
        spec = LoadSpec(concurrency=4, num_requests=24, prompt_len=(4, 8), output_len=(2, 4), warmup_requests=4,
                        processes=2)
        t_before = time.perf_counter()
        summary = run(bg.grpc_addr, spec, None, None, progress=False)
        t_after = time.perf_counter()
    finally:
        bg.stop()
    t = summary["total"]
    assert t["num_ok"] == 24 and "sent_s" in summary["requests"]["fields"]
    window = load_window(summary)
    assert window is not None and t_before < window[0] < window[1] < t_after
    wall = t["num_ok"] / t["throughput_rps"]  # the run's wall time: first send to last answer of the slowest process
    assert abs((window[1] - window[0]) - wall) < 0.1 + 0.05 * wall
    # the call itself is longer: health check, two processes spawned, their warm-ups, the report
    assert (t_after - t_before) > (window[1] - window[0])
    assert load_window({"requests": {"fields": ["rate", "e2e_ms"], "rows": [[0.0, 1.0]]}}) is None  # older files


def test_gpu_busy_is_averaged_over_the_window_only():
    g = _gpu_busy.GpuSampler.__new__(_gpu_busy.GpuSampler)
    g.samples, g.extra, g.times = [], [], []
    # 2 s idle (client start-up), 8 s at 90 %, 1 s idle (its report): one sample per 100 ms
    for i in range(110):
        g.times.append(100.0 + i * 0.1)
        g.samples.append(90.0 if 20 <= i < 100 else 0.0)
        g.extra.append((1980.0, 600.0))
    assert g.mean_since(0) == pytest.approx(90.0 * 80 / 110)  # the whole run: 65 %
    assert g.mean_between(102.0, 109.95) == pytest.approx(90.0)
    assert g.mean_between(200.0, 201.0) is None


def test_rescoring_a_run_at_its_own_slo_gives_its_goodput_when_requests_failed():
    spec = LoadSpec(rates=(4.0,), num_requests=4, slo_ttft_ms=100.0, slo_tpot_ms=10.0)
    rs = [Result(4.0, "none", ttft_ms=50.0, e2e_ms=120.0, output_tokens=8, sent_s=1.0),
          Result(4.0, "none", ttft_ms=60.0, e2e_ms=130.0, output_tokens=8, sent_s=1.2),
          Result(4.0, "none", ttft_ms=300.0, e2e_ms=400.0, output_tokens=8, sent_s=1.4),
          Result(4.0, "none", status="UNAVAILABLE", e2e_ms=5.0, sent_s=1.6)]
    summary = summarize(rs, spec, {0: 2.0})
    assert summary["rates"][0]["goodput_rps"] == pytest.approx(2 / 2.0)
    got = _rescore_module().rescore(summary, {"ttft_ms": 100.0, "tpot_ms": 10.0})
    assert got[4.0]["good"] == 2 and got[4.0]["goodput_rps"] == pytest.approx(summary["rates"][0]["goodput_rps"])
