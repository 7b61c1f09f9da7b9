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


def test_requests_wait_in_line_for_blocks_instead_of_being_refused(tmp_path):
    """Six requests at once on a pool that holds two of them: the rest wait in line for blocks (router.kv_wait_s)
    and every one is served with the reference tokens; with kv_wait_s 0 the same burst has refusals."""
    from concurrent.futures import ThreadPoolExecutor

    full = save_tiny_air(tmp_path)
    p = prompts([20] * 6, seed=9)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    refs = [generate(full, q, params, scale=2).token_ids for q in p]
    for wait_s in (30.0, 0.0):
        # 20 blocks of 4 tokens; a request takes 9 (35 tokens of K/V): two at a time
        de = DecodeEngine.from_checkpoint(tmp_path, DecodeConfig(num_blocks=20, block_size=4, colocated_prefill=True))
        bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05, kv_wait_s=wait_s),
                                     full.cfg, ByteTokenizer(), EngineBackend({}, {"decode-0": de}), block_size=4))
        try:
            wait_serving(bg.grpc_addr, timeout_s=60)
            with Client(bg.grpc_addr) as c, ThreadPoolExecutor(6) as pool:
                def one(q):
                    try:
                        return c.complete(q, max_new_tokens=16, scale=2, ignore_eos=True)["token_ids"]
                    except grpc.RpcError as e:
                        return e.code()
                outs = list(pool.map(one, p))
            assert len(bg.router.kv_queue) == 0
        finally:
            bg.stop()
        if wait_s:
            assert outs == refs
        else:
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in outs
            assert all(o == r for o, r in zip(outs, refs) if not isinstance(o, grpc.StatusCode))


def test_the_kv_line_is_first_come_first_served():
    import asyncio

    from colm.router.kv_wait import KVWaitQueue

    async def main():
        q = KVWaitQueue()
        assert q.may_try("a")  # nobody waits: anyone may try
        q.join("a"), q.join("b"), q.join("a")
        assert len(q) == 2 and q.may_try("a") and not q.may_try("b") and not q.may_try("c")
        woken = asyncio.ensure_future(q.wait("b", poll_s=10))
        await asyncio.sleep(0)
        q.leave("a")  # the head leaves: the next in line is woken at once, not at its poll
        await asyncio.wait_for(woken, timeout=1)
        assert q.may_try("b")
        t = asyncio.get_running_loop().time()
        await q.wait("b", poll_s=0.05)  # nothing wakes it: back after its poll
        assert asyncio.get_running_loop().time() - t >= 0.04
        q.leave("c")  # not in line: nothing changes
        assert len(q) == 1
        q.leave("b")
        assert len(q) == 0 and q.may_try("c")

    asyncio.run(main())


def test_a_fixed_scale_service_refuses_other_scales_and_lists_only_its_own(tmp_path):
    """router.fixed_scale (the colocated baseline): a request or switch that pins another scale is refused (it was
    served at the fixed scale while its answer claimed it), and /v1/models and ListScales list the served scale
    alone."""
    from colm.router.local_backend import LocalBackend
    from router_helpers import get_json

    full = save_tiny_air(tmp_path)
    bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=0, fixed_scale=2), full.cfg, ByteTokenizer(),
                                 LocalBackend(full, fixed_scale=2)))
    try:
        p = prompts([9], seed=1)[0]
        with Client(bg.grpc_addr) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.complete(p, max_new_tokens=4, scale=1)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "fixed_scale" in e.value.details()
            out = c.complete(p, max_new_tokens=4, scale=2, ignore_eos=True)
            assert set(out["scales"]) == {2}
            assert [s["scale"] for s in c.list_scales()] == [2]
        status, body = post_json(f"{bg.http_url}/v1/completions", {"prompt": p, "max_tokens": 4, "scale": 1})[:2]
        assert status == 400 and "fixed_scale" in body["error"]["message"]
        assert post_json(f"{bg.http_url}/v1/completions", {"model": "colm@1", "prompt": p, "max_tokens": 4})[0] == 404
        ids = [m["id"] for m in get_json(f"{bg.http_url}/v1/models")[1]["data"]]
        assert ids == ["colm", "colm@2"]
    finally:
        bg.stop()
