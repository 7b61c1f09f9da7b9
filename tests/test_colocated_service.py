"""The colocated deployment through the router: one decode worker that prefills its own prompts and no prefill
worker. In process (``EngineBackend``) and as a worker process over gRPC (both token-stream modes): greedy tokens
equal ``colm generate`` at every scale, with speculative requests and a mid-stream switch; health counts the
worker as able to prefill, its prompt queue reaches the router's policy, and nothing is left reserved."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("colm.decode_worker.service")

from colm import checkpoint  # noqa: E402
from colm.assets import demo_model_dir  # noqa: E402
from colm.client import Client  # noqa: E402
from colm.decode_worker.config import DecodeConfig  # noqa: E402
from colm.decode_worker.engine import DecodeEngine  # noqa: E402
from colm.generate import generate  # noqa: E402
from colm.router.backend import WorkerInfo  # noqa: E402
from colm.router.config import RouterConfig  # noqa: E402
from colm.router.core import Router  # noqa: E402
from colm.router.engine_backend import EngineBackend  # noqa: E402
from colm.router.call_stream import CallStream  # noqa: E402
from colm.router.grpc_backend import GrpcBackend  # noqa: E402
from colm.sampling import SamplingParams  # noqa: E402
from colm.tokenizer import ByteTokenizer  # noqa: E402
from _engine_helpers import wait_pool_free  # noqa: E402
from router_helpers import BackgroundRouter, start_worker_procs  # noqa: E402

TOKEN = "test-cluster-token"
TEXTS = ("Hi", "x", "The import statement", "a longer prompt " * 9)  # "x": one token, nothing to prefill


def _check_reference_tokens(bg, model) -> None:
    tok = ByteTokenizer()
    with Client(bg.grpc_addr) as c:
        h = c.health()
        assert h["serving"], h
        for text in TEXTS:
            for scale in range(1, model.cfg.num_chains + 1):
                want = generate(model, tok.encode(text), SamplingParams(max_new_tokens=10, ignore_eos=True),
                                scale=scale).token_ids
                assert c.complete(text, max_new_tokens=10, scale=scale, ignore_eos=True)["token_ids"] == want
            spec = c.complete(text, max_new_tokens=10, ignore_eos=True, scale=model.cfg.num_chains, speculative=3)
            assert spec["token_ids"] == want
        # a client-side switch mid-stream: the tokens follow the scales they were served at
        served, ids = [], []
        for ev in c.stream(TEXTS[2], max_new_tokens=12, scale=2, ignore_eos=True, request_id="colo-switch"):
            if ev["kind"] != "token":
                continue
            ids.append(ev["id"])
            served.append(ev["scale"])
            if len(ids) == 4:
                c.set_scale("colo-switch", 1)
        ref = generate(model, tok.encode(TEXTS[2]), SamplingParams(max_new_tokens=12, ignore_eos=True),
                       scale_schedule=lambda i: served[i]).token_ids
        assert ids == ref and 1 in served


def test_in_process_colocated_engine_serves_reference_tokens():
    model_dir = str(demo_model_dir())
    de = DecodeEngine.from_checkpoint(model_dir, DecodeConfig(num_blocks=256, colocated_prefill=True,
                                                              max_batched_tokens=32))
    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05),
                    checkpoint.load_config(model_dir), ByteTokenizer(), EngineBackend({}, {"decode-0": de}))
    bg = BackgroundRouter(router)
    try:
        _check_reference_tokens(bg, checkpoint.load(model_dir).eval())
        assert de.stats().num_prefill_chunks > 0
        assert router.policy.model.prefill_queue == {"decode-0": 0}  # the colocated worker's own prompt queue
    finally:
        bg.stop()
    assert de.pool.num_free == de.pool.num_blocks


@pytest.mark.parametrize("stream", ["batched", "per_request"])
def test_colocated_worker_process_serves_reference_tokens(stream, monkeypatch):
    """... a request costs one call to start (its Start or StartGeneration reserves it: no Reserve), and a request
    the router ends at its finishing token (its length) costs no Abort RPC: the worker ended it."""
    aborts, calls = [], []
    monkeypatch.setattr(GrpcBackend, "_abort_in_background", lambda self, worker, rid, attempts=3, after=None: aborts.append(rid))
    stub_of = GrpcBackend._decode

    class Counted:
        def __init__(self, stub):
            self.stub = stub

        def __getattr__(self, name):
            calls.append(name)
            return getattr(self.stub, name)

    monkeypatch.setattr(GrpcBackend, "_decode", lambda self, worker: Counted(stub_of(self, worker)))
    call_of = CallStream.call

    def counted_call(self, method, *args):  # the same calls, sent as messages of the worker's Calls stream
        calls.append(method)
        return call_of(self, method, *args)

    monkeypatch.setattr(CallStream, "call", counted_call)
    model_dir = str(demo_model_dir())
    env = {**os.environ, "COLM_CLUSTER_TOKEN": TOKEN}
    procs = []
    try:
        addrs = start_worker_procs(model_dir, (("decode", '{"num_blocks": 256, "colocated_prefill": true, '
                                                          '"max_batched_tokens": 40}'),), env, procs)
        workers = [WorkerInfo("decode-0", "decode", addrs["decode"])]
        bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=None, token_stream=stream),
                                     checkpoint.load_config(model_dir), ByteTokenizer(),
                                     GrpcBackend(workers, cluster_token=TOKEN, token_stream=stream)))
        try:
            _check_reference_tokens(bg, checkpoint.load(model_dir).eval())
        finally:
            bg.stop()
        assert aborts == []
        assert "Reserve" not in calls and calls.count("Start" if stream == "batched" else "StartGeneration") >= 10
        import grpc

        from colm.proto import load_proto

        _, kv_grpc = load_proto("kv")
        with grpc.insecure_channel(addrs["decode"]) as ch:
            s = wait_pool_free(kv_grpc.DecodeWorkerStub(ch))
        assert s.prefills and s.num_free_blocks == s.num_blocks and s.num_prefill_queued_tokens == 0
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
