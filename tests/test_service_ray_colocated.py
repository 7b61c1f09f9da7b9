"""`colm serve` on a real Ray cluster with one (simulated) GPU: ``workers.mode: auto`` starts one colocated decode
worker that holds the whole GPU and prefills its own prompts (no prefill worker). Served tokens equal ``colm
generate`` at every scale, speculative requests included, and a colocated worker killed mid-stream is restarted by
Ray and the stream ends exactly. Two router replicas (``router.replicas``: a Ray actor beside the launcher's own
router) share the gRPC and HTTP ports: client connections land on both, and both serve reference tokens."""

from __future__ import annotations

import threading
import time

import pytest
from router_helpers import launched_on_ray, wait_serving

ray = pytest.importorskip("ray")

PROMPTS = ("The import statement", "x", "a longer prompt that spans several blocks of the pool " * 3)


SEEN_WHILE_REPLICAS_START: list = []  # the launcher's router's health while its replicas were being started


@pytest.fixture(scope="module")
def service():
    from colm.deploy.launcher import Launcher

    start_replicas = Launcher._start_replicas

    def recorded(self, *args):
        SEEN_WHILE_REPLICAS_START.append(self.server.router.health())
        return start_replicas(self, *args)

    Launcher._start_replicas = recorded
    try:
        yield from _launched()
    finally:
        Launcher._start_replicas = start_replicas


def _launched():
    yield from launched_on_ray({
        "model": {"path": "demo"},
        "workers": {"num_cpus_per_worker": 0.5, "max_restarts": 2, "mode": "auto"},  # 1 prefill + 1 decode asked for
        "decode": {"num_blocks": 512, "block_size": 16, "max_batched_tokens": 64},
        "router": {"grpc_port": 0, "http_port": 0, "metrics_port": 0, "poll_interval_s": 0.1, "replicas": 2,
                   "max_retries": 3, "poll_timeout_s": 10, "worker_wait_s": 240},
        "ray": {"num_cpus": 4}}, num_gpus=1)


def _reference(prompt: str, n: int, scale: int) -> list[int]:
    from colm import checkpoint
    from colm.assets import demo_model_dir
    from colm.generate import generate
    from colm.sampling import SamplingParams
    from colm.tokenizer import ByteTokenizer

    model = checkpoint.load(str(demo_model_dir())).eval()
    return generate(model, ByteTokenizer().encode(prompt), SamplingParams(max_new_tokens=n, ignore_eos=True),
                    scale=scale).token_ids


def test_one_gpu_runs_one_colocated_worker_with_the_whole_gpu(service):
    from colm.client import Client

    launcher, addrs = service
    assert launcher.pool.mode == "colocated" and launcher.pool._num_gpus() == 1.0
    h = wait_serving(addrs["grpc"], 60)
    assert [(w["worker_id"], w["role"]) for w in h["workers"]] == [("decode-0", "decode")]
    with Client(addrs["grpc"], timeout_s=120) as c:
        for prompt in PROMPTS:
            for scale in (1, 2):
                got = c.complete(prompt, max_new_tokens=12, scale=scale, ignore_eos=True)
                assert got["token_ids"] == _reference(prompt, 12, scale), (prompt, scale)
            spec = c.complete(prompt, max_new_tokens=12, scale=2, ignore_eos=True, speculative=4)
            assert spec["token_ids"] == _reference(prompt, 12, 2)


def test_the_colocated_worker_killed_mid_stream_the_stream_completes_exactly(service):
    from concurrent.futures import ThreadPoolExecutor

    from colm.client import Client

    launcher, addrs = service
    n, toks, killed = 300, [], threading.Event()
    with ThreadPoolExecutor(1) as pool, Client(addrs["grpc"], timeout_s=480) as c:
        reference = pool.submit(_reference, PROMPTS[0], n, 2)  # made while the stream waits for Ray's restart
        for ev in c.stream(PROMPTS[0], max_new_tokens=n, scale=2, ignore_eos=True):
            if ev["kind"] == "token":
                toks.append(ev["id"])
                if len(toks) == 20 and not killed.is_set():
                    killed.set()
                    launcher.pool.kill("decode-0", restart=True)
            elif ev["kind"] == "finish":
                finish = ev
        want = reference.result()
    assert killed.is_set() and toks == want
    assert finish["finish_reason"] == "length" and finish["usage"]["retries"] >= 1
    wait_serving(addrs["grpc"])


def _served(metrics_url: str) -> float:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=30).read().decode()
    fam = next(f for f in text_string_to_metric_families(text) if f.name == "colm_requests")
    return sum(s.value for s in fam.samples if s.name == "colm_requests_total" and s.labels.get("status") == "ok")


def _view(router) -> dict:  # the launcher's router, as RouterReplica.health reports the replica's
    serving, why = router.health()
    return {"serving": serving, "why": why, "workers": router.worker_states()}


def test_two_router_replicas_share_the_ports_and_both_serve(service):
    import json
    import urllib.request

    import grpc

    from colm.proto import load_proto

    launcher, addrs = service
    assert len(launcher.replicas) == 1
    replica = ray.get(launcher.replicas[0].addresses.remote())
    assert replica["grpc"] == addrs["grpc"] and replica["http"] == addrs["http"]
    assert replica["metrics"] != addrs["metrics"]
    # the shared ports answer from either router: both must see the restarted worker healthy before the requests
    end, views = time.time() + 120, {}
    while time.time() < end:
        views = {"launcher": _view(launcher.server.router),
                 "replica": ray.get(launcher.replicas[0].health.remote())}
        if all(v["serving"] and set(v["workers"].values()) == {"healthy"} for v in views.values()):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"both routers not serving within 120 s: {views}")
    before = (_served(addrs["metrics"]), _served(replica["metrics"]))
    pb2, pb2_grpc = load_proto("public")
    want = _reference(PROMPTS[1], 6, 2)
    for _ in range(16):  # 16 connections of their own (no shared subchannel): the kernel spreads them over both
        with grpc.insecure_channel(addrs["grpc"], options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            r = pb2_grpc.ColmStub(ch).Complete(pb2.GenerateRequest(
                token_ids=pb2.TokenIds(ids=list(PROMPTS[1].encode())), scale=2,
                sampling=pb2.Sampling(max_new_tokens=6, ignore_eos=True)), timeout=120)
            assert [t.id for t in r.tokens] == want
    after = (_served(addrs["metrics"]), _served(replica["metrics"]))
    assert sum(after) - sum(before) == 16
    assert after[0] > before[0] and after[1] > before[1]  # both routers served
    # while the replica started, the launcher's router said it was not serving yet (clients would all connect to it)
    ((serving, why),) = SEEN_WHILE_REPLICAS_START
    assert not serving and "router replicas starting" in why
    assert launcher.server.router.health()[0]
    # the replica and the engine actor answer requests: not at Ray's default worker niceness (15)
    assert ray.get(launcher.replicas[0].process.remote())["niceness"] == 0
    assert all(ray.get(a.process.remote())["niceness"] == 0 for a in launcher.pool.actors.values())
    body = json.dumps({"model": launcher.cfg.router.served_model_name, "prompt": PROMPTS[1], "max_tokens": 6,
                       "ignore_eos": True, "scale": 2}).encode()
    req = urllib.request.Request(addrs["http"] + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=120).read())
    assert out["choices"][0]["text"]


def test_a_killed_router_replica_is_logged_and_started_again(service, caplog):
    """The replica's process killed (SIGKILL): the launcher logs its death with its pid, its live-router gauge says
    one router serves, and the replica is started again on the same ports after router.replica_restart_backoff_s
    (deploy/replicas.py). It stayed dead, unlogged, before."""
    import logging
    import os
    import signal

    launcher, addrs = service
    registry = launcher.server.router.metrics.registry
    live = lambda: registry.get_sample_value("colm_router_replicas_live")  # noqa: E731
    assert live() == 2
    pid = ray.get(launcher.replicas[0].process.remote())["pid"]
    with caplog.at_level(logging.INFO, logger="colm.serve"):
        os.kill(pid, signal.SIGKILL)
        end = time.time() + 30
        while time.time() < end and live() != 1:
            time.sleep(0.05)
        assert live() == 1
        deaths = [r.getMessage() for r in caplog.records if "router replica 1" in r.getMessage()
                  and r.levelno == logging.ERROR]
        assert deaths and f"(pid {pid}) died while serving" in deaths[0] and "starting it again" in deaths[0], deaths
        end = time.time() + 120
        while time.time() < end and live() != 2:
            time.sleep(0.1)
        assert live() == 2, [r.getMessage() for r in caplog.records]
    again = ray.get(launcher.replicas[0].process.remote(), timeout=30)["pid"]
    assert again != pid
    replica = ray.get(launcher.replicas[0].addresses.remote(), timeout=30)
    assert replica["grpc"] == addrs["grpc"] and replica["http"] == addrs["http"]
    wait_serving(addrs["grpc"])
