"""A 200-request load test at several rates against a router serving tiny-air: JSON and PNG written."""

import contextlib
import json

import pytest

from colm.loadtest import LoadSpec, run, table
from colm.model import CoLM
from colm.presets import preset
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.local_backend import LocalBackend
from colm.tokenizer import ByteTokenizer
from router_helpers import BackgroundRouter


@contextlib.contextmanager
def _tiny_router():
    """(router, its BackgroundRouter) serving tiny-air in-process (two requests at a time); stopped on exit."""
    cfg = preset("tiny-air")
    model = CoLM(cfg).reset_parameters(seed=0).eval()
    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05), cfg, ByteTokenizer(),
                    LocalBackend(model, max_concurrency=2))
    bg = BackgroundRouter(router)
    try:
        yield router, bg
    finally:
        bg.stop()


def test_loadtest_200_requests_writes_json_and_png(tmp_path):
    with _tiny_router() as (router, bg):
        spec = LoadSpec(rates=(40.0, 80.0, 160.0), num_requests=200, prompt_len=(4, 12), output_len=(2, 6),
                        budgets=(("none", 1.0), ("scale:1", 1.0), ("tpot:1000", 1.0)), slo_ttft_ms=5000,
                        slo_tpot_ms=1000)
        out_json, out_png = tmp_path / "lt.json", tmp_path / "lt.png"
        summary = run(bg.grpc_addr, spec, str(out_json), str(out_png), progress=False)
    data = json.loads(out_json.read_text())
    assert data["total"]["num_requests"] == 200 and data["total"]["num_ok"] == 200
    assert [e["rate"] for e in data["rates"]] == [40.0, 80.0, 160.0]
    assert sum(e["num_requests"] for e in data["rates"]) == 200
    for e in data["rates"]:
        assert e["ttft_ms"]["p50"] <= e["ttft_ms"]["p99"] and e["throughput_rps"] > 0
        assert 0 < e["decision_ms"]["p50"] <= e["ttft_ms"]["p50"]  # the router's decision comes before a token
        assert abs(sum(e["scale_mix"].values()) - 1.0) < 1e-9
        assert set(e["by_scale"]) <= {"1", "2"}
    # pinned scale-1 requests are served at scale 1; unconstrained ones at the full scale
    assert all(e["scale_mix"].get("1", 0) > 0 and e["scale_mix"].get("2", 0) > 0 for e in data["rates"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "rate" in table(summary)


def test_closed_loop_against_the_baseline(tmp_path):
    """`colm serve --baseline`: one colocated engine with the full model's prefill, every request at full scale
    whatever its budget; a request pinning another scale is refused (INVALID_ARGUMENT), not served at full scale."""
    import asyncio
    import threading

    from colm.deploy.config import ClusterConfig
    from colm.deploy.launcher import Launcher

    cfg = ClusterConfig.from_dict({"model": {"path": "demo"}, "decode": {"num_blocks": 256},
                                   "router": {"grpc_port": 0, "http_port": None, "metrics_port": None}})
    launcher = Launcher(cfg, baseline=True)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    addrs = asyncio.run_coroutine_threadsafe(launcher.start(), loop).result(120)
    try:
        spec = LoadSpec(concurrency=4, num_requests=20, prompt_len=(4, 12), output_len=(2, 6),
                        budgets=(("tpot:0.001", 1.0), ("none", 1.0)), warmup_requests=6)
        summary = run(addrs["grpc"], spec, str(tmp_path / "c.json"), str(tmp_path / "c.png"), progress=False)
        pinned = run(addrs["grpc"], LoadSpec(concurrency=2, num_requests=4, prompt_len=(4, 12), output_len=(2, 6),
                                             budgets=(("scale:1", 1.0),)), None, None, progress=False)
    finally:
        asyncio.run_coroutine_threadsafe(launcher.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
    assert summary["total"]["num_ok"] == 20 and summary["total"]["num_requests"] == 20
    assert summary["rates"][0]["scale_mix"] == {"2": 1.0}  # no scale choice, whatever the budget
    assert pinned["total"]["num_ok"] == 0 and pinned["total"]["errors"] == {"INVALID_ARGUMENT": 4}
    de = launcher.server.router.backend.decode["baseline-0"]
    assert de.stats().num_free_blocks == de.stats().num_blocks and de.stats().prefills
    assert de.config.prefill_scale == 0 and de.stats().num_prefill_chunks > 0
    assert de.stats().num_finished == 26  # the 6 warm-up requests ran but are not in the summary


def test_warmup_settings_are_validated():
    with pytest.raises(ValueError, match="warmup_requests=-1"):
        LoadSpec(warmup_requests=-1)
    with pytest.raises(ValueError, match="warmup_concurrency=0"):
        LoadSpec(warmup_concurrency=0)


def test_a_closed_loop_split_over_client_processes(tmp_path):
    """Three spawned client processes share the clients, requests and warm-up: every request is counted once,
    answered, and served (the router saw the warm-up too)."""
    with _tiny_router() as (router, bg):
        spec = LoadSpec(concurrency=5, num_requests=31, prompt_len=(4, 12), output_len=(2, 6), warmup_requests=4,
                        processes=3, connections=2)
        summary = run(bg.grpc_addr, spec, str(tmp_path / "p.json"), None, progress=False)
        reg = router.metrics.registry
        served = sum(reg.get_sample_value("colm_requests_total", {"model_name": router.cfg.served_model_name,
                                                                  "status": "ok", "scale": str(k)}) or 0
                     for k in (1, 2))
    t = summary["total"]
    assert t["num_requests"] == 31 and t["num_ok"] == 31 and t["throughput_rps"] > 0
    assert len(summary["requests"]["rows"]) == 31
    assert served == 35  # and the 4 warm-up requests


def test_an_open_loop_split_over_client_processes_keeps_its_rates(tmp_path):
    """Two processes each send a Poisson stream at half of each rate, starting each rate together: the summary has
    the rates asked for, each with its share of the requests."""
    with _tiny_router() as (router, bg):
        spec = LoadSpec(rates=(20.0, 40.0), num_requests=24, prompt_len=(4, 8), output_len=(2, 4), processes=2)
        summary = run(bg.grpc_addr, spec, None, None, progress=False)
    assert [e["rate"] for e in summary["rates"]] == [20.0, 40.0]
    assert [e["num_requests"] for e in summary["rates"]] == [12, 12] and summary["total"]["num_ok"] == 24


def test_client_processes_need_enough_clients_or_requests():
    with pytest.raises(ValueError, match="processes=7"):
        LoadSpec(rates=(1.0, 2.0), num_requests=12, processes=7)  # 6 requests per rate for 7 processes
    with pytest.raises(ValueError, match="processes=4"):
        LoadSpec(concurrency=3, processes=4)
    with pytest.raises(ValueError, match="processes=0"):
        LoadSpec(concurrency=3, processes=0)
    with pytest.raises(ValueError, match="connections=0"):
        LoadSpec(concurrency=3, connections=0)


def test_a_closed_loop_ramp_starts_the_clients_one_after_another():
    """``ramp_s``: client i of a closed loop starts i / concurrency of the ramp after the start, so at any time t
    into the ramp at most floor(t / step) + 1 requests are in flight; without it all clients send at once. A ramp
    needs a closed loop."""
    import asyncio

    from colm.loadtest import run_load

    def in_flight(ramp_s: float):
        spec = LoadSpec(concurrency=6, num_requests=40, prompt_len=(4, 6), output_len=(2, 3), ramp_s=ramp_s)
        with _tiny_router() as (_, bg):
            results, wall = asyncio.run(run_load(bg.grpc_addr, spec, progress=False))
        assert len(results) == 40 and all(r.status == "OK" for r in results)
        t0 = min(r.sent_s for r in results)
        spans = [(r.sent_s - t0, r.sent_s - t0 + r.e2e_ms / 1e3) for r in results]
        return (lambda t: sum(a <= t < b for a, b in spans)), spans, wall[0.0]

    step = 0.25
    count, spans, wall = in_flight(6 * step)
    assert wall >= 5 * step
    for k in range(6):  # inside the k-th step of the ramp, k + 1 clients have started (a little slack at the edges)
        for t in (k * step + 0.05, k * step + step - 0.05):
            assert count(t) <= k + 1, (t, count(t), spans[:8])
    together, spans, _ = in_flight(0.0)
    assert max(together(a) for a, _ in spans) > 2, spans[:8]  # no ramp: several in flight from the start
    with pytest.raises(ValueError, match="ramp_s"):
        LoadSpec(rates=(1.0,), num_requests=4, ramp_s=1.0)
    with pytest.raises(ValueError, match="ramp_s"):
        LoadSpec(concurrency=2, ramp_s=-1.0)
