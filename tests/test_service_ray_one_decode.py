"""Drills on a real Ray cluster with ONE prefill and ONE decode worker: a decode worker killed mid-stream (the
stream waits for Ray's restart and ends exactly), a client reusing a running request's id (neither request
is touched), and a worker whose restarts are exhausted (health says so)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from router_helpers import launched_on_ray, wait_serving

ray = pytest.importorskip("ray")
pytest.importorskip("grpc_health")

PROMPT = "The import statement"


@pytest.fixture(scope="module")
def service():
    # a simulated one-GPU machine: with the split asked for, the bundled num_gpus_per_worker: auto must place both
    # workers on it
    yield from launched_on_ray({
        "model": {"path": "demo"},
        "workers": {"num_prefill": 1, "num_decode": 1, "num_cpus_per_worker": 0.5, "max_restarts": 2,
                    "mode": "disaggregated"},  # as by default; auto would colocate on one GPU (test_service_ray_colocated)
        "decode": {"num_blocks": 512, "block_size": 16},
        "router": {"grpc_port": 0, "http_port": 0, "metrics_port": 0, "poll_interval_s": 0.1, "max_retries": 3,
                   "poll_timeout_s": 10,
                   "worker_wait_s": 240},
        "ray": {"num_cpus": 4}}, num_gpus=1)


def _reference(n: int) -> list[int]:
    from colm import checkpoint
    from colm.assets import demo_model_dir
    from colm.generate import generate
    from colm.sampling import SamplingParams
    from colm.tokenizer import ByteTokenizer

    model = checkpoint.load(str(demo_model_dir())).eval()
    tok = ByteTokenizer()
    return generate(model, tok.encode(PROMPT), SamplingParams(max_new_tokens=n, ignore_eos=True), scale=2).token_ids


def _stream(addr: str, n: int, on_token=None, request_id: str = "") -> tuple[list[int], dict]:
    from colm.client import Client

    toks, finish = [], {}
    with Client(addr, timeout_s=480) as c:
        for ev in c.stream(PROMPT, max_new_tokens=n, scale=2, ignore_eos=True, request_id=request_id):
            if ev["kind"] == "token":
                toks.append(ev["id"])
                if on_token is not None:
                    on_token(len(toks))
            elif ev["kind"] == "finish":
                finish = ev
    return toks, finish


def test_one_gpu_places_both_workers_with_half_a_gpu_each(service):
    launcher, addrs = service
    assert launcher.pool._num_gpus() == 0.5
    h = wait_serving(addrs["grpc"], 30)
    assert {w["worker_id"] for w in h["workers"]} == {"prefill-0", "decode-0"}
    assert all(w["address"].startswith("127.0.0.1:") for w in h["workers"])  # the embedded cluster: loopback
    assert ray.available_resources().get("GPU", 0) == 0  # both halves taken


def test_router_metrics_port_serves_every_workers_metrics(service):
    """Workers' metrics ports are ephemeral, on their own nodes: the router's known port re-serves them."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    launcher, addrs = service
    wait_serving(addrs["grpc"], 30)
    with urllib.request.urlopen(addrs["metrics"], timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    workers = {s.labels.get("worker") for name in ("colm_decode_num_blocks", "colm_prefill_num_queued")
               for s in families[name].samples}
    assert workers == {"decode-0", "prefill-0"}, workers
    assert {s.labels["worker"]: s.value for s in families["colm_worker_scrape_errors"].samples} == \
        {"decode-0": 0.0, "prefill-0": 0.0}


def test_the_only_decode_worker_killed_mid_stream_the_stream_completes_exactly(service):
    from concurrent.futures import ThreadPoolExecutor

    launcher, addrs = service
    n = 400
    killed = threading.Event()

    def kill_at(i: int) -> None:
        if i == 20 and not killed.is_set():
            killed.set()
            launcher.pool.kill("decode-0", restart=True)

    with ThreadPoolExecutor(1) as pool:  # the reference is made while the stream waits for Ray's restart
        reference = pool.submit(_reference, n)
        toks, finish = _stream(addrs["grpc"], n, kill_at)
        want = reference.result()
    assert killed.is_set()
    assert toks == want, f"first difference at {next(i for i, (a, b) in enumerate(zip(toks, want)) if a != b)}"
    assert finish["finish_reason"] == "length" and finish["usage"]["retries"] >= 1
    wait_serving(addrs["grpc"])


def test_a_reused_request_id_touches_neither_request(service):
    from colm.client import Client

    launcher, addrs = service
    wait_serving(addrs["grpc"])
    n = 300
    want = _reference(n)
    second = {}

    def reuse_at(i: int) -> None:
        if i == 10 and not second:
            with Client(addrs["grpc"]) as c:
                second["reply"] = c.complete(PROMPT, max_new_tokens=8, scale=2, ignore_eos=True, request_id="dup")

    toks, finish = _stream(addrs["grpc"], n, reuse_at, request_id="dup")
    assert toks == want and finish["usage"]["retries"] == 0  # the first ran to its end, untouched
    assert second["reply"]["token_ids"] == want[:8] and second["reply"]["request_id"] == "dup"
    h = wait_serving(addrs["grpc"], 10)  # no worker was marked unhealthy
    assert all(w["inflight"] == 0 for w in h["workers"])


def test_a_worker_out_of_restarts_is_reported_dead_and_health_says_not_serving(service):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from colm.client import Client
    from router_helpers import get_json

    launcher, addrs = service
    wait_serving(addrs["grpc"])
    launcher.pool.kill("prefill-0", restart=False)  # as if its max_restarts were used up
    end = time.time() + 30
    with Client(addrs["grpc"]) as c:
        while time.time() < end and "prefill-0: dead" not in c.health()["reason"]:
            time.sleep(0.2)  # not serving at its first failed poll; dead once the pool hears from Ray
        h = c.health()
        assert not h["serving"] and "prefill-0: dead" in h["reason"], h
        w = {w["worker_id"]: w for w in h["workers"]}["prefill-0"]
        assert w["state"] == "dead" and "will not restart" in w["detail"]
        with pytest.raises(grpc.RpcError) as e:
            c.complete(PROMPT, max_new_tokens=4)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(addrs["grpc"]) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="colm.v1.Colm"), timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
    status, body = get_json(addrs["http"] + "/health")
    assert status == 503 and "prefill-0" in body.get("reason", ""), body
