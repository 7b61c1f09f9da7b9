"""A request that no decode worker's whole KV pool could hold is the request's fault (gRPC INVALID_ARGUMENT, HTTP 400,
naming the sizes), not a pool that is full for now (RESOURCE_EXHAUSTED / 429 with Retry-After, which tells a client
to retry what can never succeed). The pool is counted in each worker's own block size."""

from __future__ import annotations

import grpc
import pytest

from colm.client import Client
from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.generate import generate
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.engine_backend import EngineBackend
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer
from _engine_helpers import prompts, save_tiny_air
from router_helpers import BackgroundRouter, post_json, wait_serving


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_pool_fit")
    full = save_tiny_air(path)
    # 6 blocks of 16 tokens (96 tokens) on the worker, while the router's own default block size is 4
    de = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=6, block_size=16, colocated_prefill=True))
    bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=0, poll_interval_s=0.05), full.cfg,
                                 ByteTokenizer(), EngineBackend({}, {"decode-0": de}), block_size=4))
    try:
        wait_serving(bg.grpc_addr, timeout_s=60)
        yield bg, full
    finally:
        bg.stop()


def test_a_request_that_fits_the_pool_is_served(service):
    bg, full = service
    p = prompts([60], seed=2)[0]  # 60 + 20 tokens: 79 of K/V, 5 blocks of 16 (20 in the router's blocks of 4)
    with Client(bg.grpc_addr) as c:
        out = c.complete(p, max_new_tokens=20, scale=2, ignore_eos=True)
    assert out["token_ids"] == generate(full, p, SamplingParams(max_new_tokens=20, ignore_eos=True), scale=2).token_ids


def test_a_request_larger_than_every_pool_is_invalid_not_exhausted(service):
    bg, _ = service
    p = prompts([80], seed=3)[0]  # 80 + 20 tokens: 7 blocks of 16 > 6
    with Client(bg.grpc_addr) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.complete(p, max_new_tokens=20, scale=2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "100 tokens" in e.value.details() and "96 tokens" in e.value.details()
    status, body = post_json(f"{bg.http_url}/v1/completions", {"prompt": p, "max_tokens": 20})[:2]
    assert status == 400 and "shorten the prompt or lower max_tokens" in body["error"]["message"], body
