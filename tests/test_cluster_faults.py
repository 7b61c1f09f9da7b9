"""Faults a cluster operator meets, without a cluster: the router over a stand-in backend whose prefill worker
stops answering (its node partitioned or stopped) while the decode worker, with a small KV pool, serves on.

* A request that waits for the missing prefill worker ends UNAVAILABLE (HTTP 503), never RESOURCE_EXHAUSTED
  (429, "no decode worker has N free KV blocks"): the decode blocks of each pick retried while it waits are not
  counted against the decode worker.
* A failed health poll is logged on one line that says why (a timeout names ``router.poll_timeout_s``, a gRPC
  error its code and details), not a multi-line gRPC dump or an empty ``TimeoutError:``; so is an abort that
  could not reach a gone decode worker.

The same faults on a real multi-node Ray cluster: tests/test_cluster_faults_netns.py."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest
import torch

from colm.client import Client
from colm.model import CoLM
from colm.presets import preset
from colm.router.backend import WorkerInfo
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.tokenizer import ByteTokenizer
from router_helpers import BackgroundRouter, LocalPrefillPair, until

DECODE_BLOCKS = 12  # a small pool: a request of 20 + 32 tokens needs 4 blocks of 16


class SilentPrefill(LocalPrefillPair):
    """p0's polls can hang (a partitioned node: no answer until the poll times out) or fail with a gRPC error."""

    def __init__(self, model) -> None:
        super().__init__(model, decode_blocks=DECODE_BLOCKS)
        self.prefill = "up"  # "up" | "silent" | "refused"

    async def prefill_poll(self):
        if self.prefill == "silent":
            await asyncio.sleep(3600)
        if self.prefill == "refused":
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="failed to connect to all addresses; Connection refused",
                                       debug_error_string="UNAVAILABLE:\nfailed to connect")


@pytest.fixture()
def served():
    torch.manual_seed(0)
    cfg = preset("tiny-air")
    backend = SilentPrefill(CoLM(cfg).reset_parameters(seed=1).eval())
    router = Router(RouterConfig(grpc_port=0, http_port=0, poll_interval_s=0.05, poll_timeout_s=0.5,
                                 worker_wait_s=2.0), cfg, ByteTokenizer(), backend)
    bg = BackgroundRouter(router)
    yield bg, backend, router
    bg.stop()


def test_a_silent_prefill_worker_is_unavailable_not_a_full_decode_pool(served):
    from router_helpers import post_json

    bg, backend, router = served
    prompt = "x" * 20
    with Client(bg.grpc_addr) as c:
        want = c.complete(prompt, max_new_tokens=32)["token_ids"]
        backend.prefill = "silent"
        assert until(lambda: not c.health()["serving"])
        t0 = time.time()
        with pytest.raises(grpc.RpcError) as e:  # waits worker_wait_s for the prefill worker, then says why
            c.complete(prompt, max_new_tokens=32, deadline_ms=10_000)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, (e.value.code(), e.value.details())
        assert "no healthy prefill worker" in e.value.details() and time.time() - t0 < 5
        status, body = post_json(f"{bg.http_url}/v1/completions",
                                 {"prompt": prompt, "max_tokens": 32, "temperature": 0, "deadline_ms": 10_000})
        assert status == 503, (status, body)
        counted = {s.labels["status"]: s.value for m in router.metrics.registry.collect()
                   if m.name == "colm_requests" for s in m.samples if s.name == "colm_requests_total"}
        assert counted.get("unavailable") == 2 and "error" not in counted, counted
        backend.prefill = "up"  # the node is back: served again, the same tokens
        assert until(lambda: c.health()["serving"])
        assert c.complete(prompt, max_new_tokens=32)["token_ids"] == want


@pytest.mark.parametrize("mode, says", [("silent", "no answer within router.poll_timeout_s=0.5 s"),
                                        ("refused", "UNAVAILABLE: failed to connect to all addresses")])
def test_a_failed_health_poll_is_one_line_that_says_why(served, caplog, mode, says):
    bg, backend, router = served
    with caplog.at_level(logging.WARNING, logger="colm.router"):
        backend.prefill = mode
        assert until(lambda: any("p0 failed its health poll" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if "p0 failed its health poll" in r.getMessage()]
    assert len(lines) == 1 and says in lines[0] and "\n" not in lines[0], lines


def test_a_failed_abort_on_a_gone_worker_is_one_line(caplog):
    """A failed attempt's abort on a decode worker that is gone (its node killed) is logged on one line."""
    import socket

    from colm.router.grpc_backend import GrpcBackend

    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # a port nothing listens on: connection refused
    port = s.getsockname()[1]
    s.close()

    async def run():
        backend = GrpcBackend([WorkerInfo("d0", "decode", f"127.0.0.1:{port}")])
        backend._abort_in_background("d0", "r1")
        await asyncio.wait_for(asyncio.gather(*list(backend._aborts)), 30)
        for rid in ("r2", "r3"):  # the other attempts the gone worker held
            backend._abort_in_background("d0", rid)
        await asyncio.wait_for(asyncio.gather(*list(backend._aborts)), 30)
        await backend.close()

    with caplog.at_level(logging.DEBUG, logger="colm.router"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if "abort of r1 on d0 failed" in r.getMessage()]
    assert len(lines) == 1 and "UNAVAILABLE: " in lines[0] and "\n" not in lines[0], lines
    # one warning per gone worker; its other failed aborts at debug level
    failed = [(r.levelno, r.getMessage()) for r in caplog.records if "failed: " in r.getMessage()]
    assert [lvl for lvl, _ in failed] == [logging.WARNING, logging.DEBUG, logging.DEBUG], failed
