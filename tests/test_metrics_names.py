"""The router's Prometheus metrics as a scraper sees them: the same families on the metrics port and on the HTTP
API's ``/metrics``, vLLM's names (``colm:`` for ``vllm:``) with a ``model_name`` label, totals as counters that
grow with each request, and a Grafana dashboard that asks only for series the router serves."""

import json
import re
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from colm.model import CoLM
from colm.presets import preset
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.local_backend import LocalBackend
from colm.router.metrics import EngineStatsCollector, RouterMetrics
from colm.router.policy import WorkerReport
from colm.tokenizer import ByteTokenizer
from router_helpers import BackgroundRouter, post_json

MODEL = "colm-tiny-test"
DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "colm-dashboard.json"

# name (as the parser reports a family: counters without _total) -> (type, labels every sample carries)
EXPECTED = {
    "colm:num_requests_running": ("gauge", {"model_name"}),
    "colm:num_requests_waiting": ("gauge", {"model_name"}),
    "colm:kv_cache_usage_perc": ("gauge", {"model_name", "worker"}),
    "colm:prompt_tokens": ("counter", {"model_name"}),
    "colm:generation_tokens": ("counter", {"model_name", "scale"}),
    "colm:request_success": ("counter", {"model_name", "finished_reason", "scale"}),
    "colm:time_to_first_token_seconds": ("histogram", {"model_name", "scale"}),
    "colm:inter_token_latency_seconds": ("histogram", {"model_name", "scale"}),
    "colm:request_time_per_output_token_seconds": ("histogram", {"model_name", "scale"}),
    "colm:e2e_request_latency_seconds": ("histogram", {"model_name", "scale"}),
    "colm_requests": ("counter", {"model_name", "status", "scale"}),
    "colm_retries": ("counter", {"model_name"}),
    "colm_scale_changes": ("counter", {"model_name"}),
    "colm_degraded": ("counter", {"model_name"}),
    "colm_kv_blocks_used": ("gauge", {"worker"}),
    "colm_kv_blocks_capacity": ("gauge", {"worker"}),
    "colm_prefill_queued_tokens": ("gauge", {"worker"}),
    "colm_kv_transfer_bytes": ("counter", {"worker"}),
    "colm_kv_transfer_seconds": ("counter", {"worker"}),
    "colm_worker_healthy": ("gauge", {"worker", "role"}),
    "colm_worker_dead": ("gauge", {"worker", "role"}),
    "colm_serving": ("gauge", set()),
}


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    model = CoLM(preset("tiny-air")).reset_parameters(seed=1).eval()
    router = Router(RouterConfig(grpc_port=0, http_port=0, metrics_port=0, served_model_name=MODEL,
                                 poll_interval_s=0.05), preset("tiny-air"), ByteTokenizer(), LocalBackend(model))
    bg = BackgroundRouter(router)
    yield bg
    bg.stop()


def scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def both_ports(bg) -> tuple[dict, dict]:
    return scrape(bg.addresses["metrics"]), scrape(bg.http_url + "/metrics")


def value(families: dict, sample: str, **labels) -> float:
    """Sum of the samples named ``sample`` whose labels include ``labels``."""
    fam = families[re.sub(r"_(total|sum|count|bucket)$", "", sample)]
    return sum(s.value for s in fam.samples if s.name == sample and labels.items() <= s.labels.items())


def complete(bg, prompt: str, n: int, scale: int) -> dict:
    status, body = post_json(f"{bg.http_url}/v1/completions", {"prompt": prompt, "max_tokens": n, "temperature": 0,
                                                              "ignore_eos": True, "scale": scale})
    assert status == 200, body
    return body


def test_both_ports_serve_the_same_families_with_honest_types_and_labels(served):
    complete(served, "names", 3, 1)  # every request-level family has a sample
    metrics_port, http_port = both_ports(served)
    assert set(metrics_port) == set(http_port)
    for name, (kind, labels) in EXPECTED.items():
        for fams in (metrics_port, http_port):
            assert name in fams, f"{name} missing: {sorted(fams)}"
            assert fams[name].type == kind, (name, fams[name].type)
            samples = [s for s in fams[name].samples if not s.name.endswith("_created")]
            assert samples, name
            for s in samples:
                assert labels <= set(s.labels), (name, s.labels)
                if "model_name" in labels:
                    assert s.labels["model_name"] == MODEL
            if kind == "counter":  # cumulative totals are counters named _total, never gauges holding totals
                assert {s.name for s in samples} == {name + "_total"}, name
    for fams in (metrics_port, http_port):
        for name, fam in fams.items():
            if fam.type == "gauge":
                assert not name.endswith("_total"), f"gauge {name} is named like a counter"
    assert metrics_port["colm_worker_scrape_errors"].type == "gauge"  # no sample: no worker here has a metrics URL
    usage = [s.value for s in metrics_port["colm:kv_cache_usage_perc"].samples]
    assert usage and all(0.0 <= v <= 1.0 for v in usage)


def test_counters_grow_with_a_request(served):
    before, _ = both_ports(served)
    body = complete(served, "Hello, chains", 5, 2)
    assert body["usage"]["completion_tokens"] == 5
    for after in both_ports(served):
        grew = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
        assert grew("colm:request_success_total", scale="2", finished_reason="length") == 1
        assert grew("colm_requests_total", scale="2", status="ok") == 1
        assert grew("colm:prompt_tokens_total") == body["usage"]["prompt_tokens"] == len(b"Hello, chains")
        assert grew("colm:generation_tokens_total", scale="2") == 5
        assert grew("colm:time_to_first_token_seconds_count", scale="2") == 1
        assert grew("colm:e2e_request_latency_seconds_count", scale="2") == 1
        assert grew("colm:request_time_per_output_token_seconds_count", scale="2") == 1
        assert grew("colm:inter_token_latency_seconds_count", scale="2") == 4  # the gaps between 5 tokens


def test_transfer_totals_become_counter_increments():
    m = RouterMetrics("m")
    for total_bytes, total_s in ((100, 0.5), (100, 0.5), (250, 0.75), (40, 0.25)):  # the last: totals restarted
        m.observe_report(WorkerReport("p0", "prefill", transfer_bytes=total_bytes, transfer_s=total_s))
    assert m.registry.get_sample_value("colm_kv_transfer_bytes_total", {"worker": "p0"}) == 250 + 40
    assert m.registry.get_sample_value("colm_kv_transfer_seconds_total", {"worker": "p0"}) == 0.75 + 0.25
    m.observe_report(WorkerReport("d0", "decode", total_blocks=8, free_blocks=6))
    assert m.registry.get_sample_value("colm:kv_cache_usage_perc", {"model_name": "m", "worker": "d0"}) == 0.25
    assert m.registry.get_sample_value("colm_kv_blocks_capacity", {"worker": "d0"}) == 8
    # a colocated worker's prefix-cache totals (tokens) become vLLM's prefix_cache_queries / _hits counters
    for queries, hits in ((64, 0), (128, 48), (128, 48), (30, 16)):  # the last: totals restarted
        m.observe_report(WorkerReport("c0", "decode", total_blocks=8, free_blocks=8, prefills=True,
                                      prefix_query_tokens=queries, prefix_hit_tokens=hits))
    labels = {"model_name": "m", "worker": "c0"}
    assert m.registry.get_sample_value("colm:prefix_cache_queries_total", labels) == 128 + 30
    assert m.registry.get_sample_value("colm:prefix_cache_hits_total", labels) == 48 + 16


def test_engine_stats_running_counts_are_counters():
    from dataclasses import dataclass

    from prometheus_client import CollectorRegistry, generate_latest

    @dataclass
    class Stats:
        num_running: int = 3
        num_finished: int = 7
        num_steps: int = 40
        host_id: str = "h"

    class Engine:
        def stats(self):
            return Stats()

    r = CollectorRegistry()
    r.register(EngineStatsCollector(Engine(), "decode", "d0"))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(r).decode())}
    assert fams["colm_decode_num_running"].type == "gauge"
    assert fams["colm_decode_num_finished"].type == "counter" and fams["colm_decode_num_steps"].type == "counter"
    assert fams["colm_decode_num_finished"].samples[0].name == "colm_decode_num_finished_total"
    # re-served on the router's port (colm.router.worker_metrics), the types survive
    from colm.router.metrics import serve_metrics
    from colm.router.worker_metrics import WorkerMetricsCollector

    server, _ = serve_metrics(r, "127.0.0.1", 0)
    try:
        router_side = CollectorRegistry()
        router_side.register(WorkerMetricsCollector(
            lambda: [("d0", f"http://127.0.0.1:{server.server_port}/metrics")]))
        fams = {f.name: f for f in text_string_to_metric_families(generate_latest(router_side).decode())}
    finally:
        server.shutdown()
    assert fams["colm_decode_num_finished"].type == "counter" and fams["colm_decode_num_running"].type == "gauge"
    assert fams["colm_decode_num_finished"].samples[0].value == 7
    assert [s.value for s in fams["colm_worker_scrape_errors"].samples] == [0.0]


def test_grafana_dashboard_asks_only_for_served_series(served):
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 6
    fams, _ = both_ports(served)
    asked = {n for e in exprs for n in re.findall(r"\b(colm[:_][a-zA-Z0-9_:]*)", e)}
    worker_side = {n for n in asked if n.startswith(("colm_decode_", "colm_prefill_num"))}  # served by workers
    unknown = {n for n in asked - worker_side if re.sub(r"_(total|bucket|sum|count)$", "", n) not in fams}
    assert not unknown, sorted(unknown)
    for n in asked - worker_side:  # a counter is asked for by its _total series, anything else never by _total
        assert n.endswith("_total") == (fams.get(re.sub(r"_total$", "", n)) is not None
                                        and fams[re.sub(r"_total$", "", n)].type == "counter"), n
    for needed in ("colm_request_phase_seconds_bucket", "colm_kv_transfer_bytes_total", "colm_worker_dead",
                   "colm_worker_healthy", "colm_serving", "colm:generation_tokens_total"):
        assert needed in asked, needed
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "model_name"}


def test_http_metrics_need_the_api_key_when_one_is_set():
    import urllib.error

    model = CoLM(preset("tiny-air")).reset_parameters(seed=1).eval()
    key = "metrics-key-0123456789"
    bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=0, metrics_port=None, api_key=key),
                                 preset("tiny-air"), ByteTokenizer(), LocalBackend(model)))
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bg.http_url + "/metrics", timeout=30)
        assert e.value.code == 401
        req = urllib.request.Request(bg.http_url + "/metrics", headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert "colm:num_requests_running" in r.read().decode()
    finally:
        bg.stop()


def test_a_metrics_port_closes_idle_connections_and_bounds_them(monkeypatch):
    """Idle connections to a metrics port held a thread each for good (prometheus_client's server): now past
    ``METRICS_MAX_CONNECTIONS`` a connection is closed as it opens, a silent one is closed after
    ``METRICS_SOCKET_TIMEOUT_S``, and a scrape is served again once they are gone; the threads go with them."""
    import socket
    import threading
    import time

    from prometheus_client import CollectorRegistry, Counter

    from colm.router import metrics

    monkeypatch.setattr(metrics, "METRICS_MAX_CONNECTIONS", 4)
    monkeypatch.setattr(metrics, "METRICS_SOCKET_TIMEOUT_S", 0.5)
    reg = CollectorRegistry()
    Counter("colm_probe", "a probe", registry=reg).inc(3)
    server, _ = metrics.serve_metrics(reg, "127.0.0.1", 0)
    threads0 = threading.active_count()
    try:
        idle = [socket.create_connection(("127.0.0.1", server.server_port)) for _ in range(6)]
        for s in idle:
            s.settimeout(3.0)
        time.sleep(0.2)
        assert threading.active_count() <= threads0 + 4
        t0 = time.monotonic()
        assert all(s.recv(100) == b"" for s in idle)  # the extra two at once, the four after their timeout
        assert time.monotonic() - t0 < 2.5
        for s in idle:
            s.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5) as r:
            assert b"colm_probe_total 3.0" in r.read()
        deadline = time.monotonic() + 3
        while threading.active_count() > threads0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= threads0
    finally:
        server.shutdown()
