"""Health tells the truth: the router serves only with a healthy prefill AND decode worker, and a worker whose
restarts are exhausted shows as dead (gRPC Health, grpc.health.v1, metrics)."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from colm.client import Client
from colm.model import CoLM
from colm.presets import preset
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.tokenizer import ByteTokenizer
from router_helpers import BackgroundRouter, LocalPrefillPair, until


class FlakyPrefill(LocalPrefillPair):
    """p0 can go silent (its polls fail) or die for good (reported dead by the worker pool)."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.down = False

    async def prefill_poll(self):
        if self.down or self.dead:
            raise ConnectionError("prefill worker gone")


@pytest.fixture()
def served():
    torch.manual_seed(0)
    cfg = preset("tiny-air")
    backend = FlakyPrefill(CoLM(cfg).reset_parameters(seed=1).eval())
    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05, worker_wait_s=0.5), cfg,
                    ByteTokenizer(), backend)
    bg = BackgroundRouter(router)
    yield bg, backend, router
    bg.stop()


def _grpc_health(addr: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="colm.v1.Colm"), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def test_a_missing_prefill_worker_means_not_serving_everywhere(served):
    bg, backend, router = served
    with Client(bg.grpc_addr) as c:
        assert c.health()["serving"] and _grpc_health(bg.grpc_addr) == "SERVING"
        backend.down = True
        assert until(lambda: not c.health()["serving"])
        h = c.health()
        assert "no healthy worker that prefills" in h["reason"] and "p0: unhealthy" in h["reason"], h
        assert {w["worker_id"]: w["state"] for w in h["workers"]} == {"p0": "unhealthy", "d0": "healthy"}
        assert until(lambda: _grpc_health(bg.grpc_addr) == "NOT_SERVING")
        assert router.metrics.registry.get_sample_value("colm_serving") == 0
        with pytest.raises(grpc.RpcError) as e:  # and a request says so, within worker_wait_s
            c.complete("hi", max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        backend.down = False  # it comes back (Ray restarted it): serving again
        assert until(lambda: c.health()["serving"] and _grpc_health(bg.grpc_addr) == "SERVING")
        assert c.complete("hi", max_new_tokens=2)["usage"]["completion_tokens"] == 2


def test_a_worker_out_of_restarts_shows_as_dead(served):
    bg, backend, router = served
    backend.dead = "died and Ray will not restart it (max_restarts=3 exhausted)"
    with Client(bg.grpc_addr) as c:
        assert until(lambda: not c.health()["serving"])
        w = {w["worker_id"]: w for w in c.health()["workers"]}["p0"]
        assert w["state"] == "dead" and "max_restarts=3 exhausted" in w["detail"] and not w["healthy"]
        assert router.metrics.registry.get_sample_value("colm_worker_dead", {"worker": "p0", "role": "prefill"}) == 1
        t0 = time.time()
        with pytest.raises(grpc.RpcError) as e:  # nothing to wait for: fails at once
            c.complete("hi", max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and time.time() - t0 < 0.5


def test_a_request_failing_on_a_worker_does_not_take_the_worker_out(served):
    """A worker answering one request with ABORTED/INTERNAL (that request failed; the worker serves on) gets the
    request retried once and stays in service; a request failing twice ends alone with INTERNAL."""
    from colm.router.backend import RequestFailed

    bg, backend, router = served
    real, failures = backend.generate, {"left": 1}

    async def failing(req, prefill_id, decode_id):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RequestFailed(decode_id, "ABORTED: decode step failed")
        async for t in real(req, prefill_id, decode_id):
            yield t

    backend.generate = failing
    with Client(bg.grpc_addr) as c:
        r = c.complete("Hello", max_new_tokens=4)
        assert r["usage"]["completion_tokens"] == 4
        assert all(w["state"] == "healthy" for w in c.health()["workers"]) and c.health()["serving"]
        failures["left"] = 2
        with pytest.raises(grpc.RpcError) as e:
            c.complete("Hello", max_new_tokens=4)
        assert e.value.code() == grpc.StatusCode.INTERNAL and "failed twice" in e.value.details()
        assert c.health()["serving"] and c.complete("Hello", max_new_tokens=4)["token_ids"] == r["token_ids"]


def test_a_dead_decode_worker_shows_no_blocks_in_health_or_metrics(served):
    """A decode worker out of restarts holds no KV any more: Health gives it no blocks and its KV gauges go."""
    bg, backend, router = served
    from colm.router.backend import WorkerInfo

    gone = {"d0": ""}
    backend.workers = lambda: [WorkerInfo("p0", "prefill"), WorkerInfo("d0", "decode", dead=gone["d0"])]
    used = lambda: router.metrics.registry.get_sample_value("colm_kv_blocks_capacity", {"worker": "d0"})  # noqa: E731
    usage = lambda: router.metrics.registry.get_sample_value(  # noqa: E731
        "colm:kv_cache_usage_perc", {"model_name": router.cfg.served_model_name, "worker": "d0"})
    with Client(bg.grpc_addr) as c:
        assert until(lambda: c.health()["serving"] and used() == 1000)
        d0 = {w["worker_id"]: w for w in c.health()["workers"]}["d0"]
        assert d0["free_blocks"] == d0["total_blocks"] == 1000 and usage() == 0.0
        gone["d0"] = "died and Ray will not restart it (max_restarts=3 exhausted)"
        assert until(lambda: not c.health()["serving"])
        d0 = {w["worker_id"]: w for w in c.health()["workers"]}["d0"]
        assert d0["state"] == "dead" and d0["free_blocks"] == d0["total_blocks"] == 0, d0
        assert used() is None and usage() is None
