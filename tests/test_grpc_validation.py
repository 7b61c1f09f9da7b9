"""Regression tests of the public gRPC boundary (``colm.v1.Colm``) found by fuzzing it, against a router with
real prefill and decode workers (processes of ``colm.deploy.worker_main``, the demo checkpoint, a tiny KV pool):
unparseable messages, every number of a GenerateRequest checked and named by its proto path, a full KV pool
as RESOURCE_EXHAUSTED with a retry-after, and no "Task exception was never retrieved" when a deadline
cancels a request waiting for its next token."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import subprocess
import sys
import threading
import time

import grpc
import pytest

pytest.importorskip("colm.decode_worker.service")

from colm import checkpoint  # noqa: E402
from colm.assets import demo_model_dir  # noqa: E402
from colm.client import Client  # noqa: E402
from colm.proto import load_proto  # noqa: E402
from colm.router.backend import WorkerInfo  # noqa: E402
from colm.router.config import RouterConfig  # noqa: E402
from colm.router.core import Router  # noqa: E402
from colm.router.grpc_backend import GrpcBackend  # noqa: E402
from colm.tokenizer import ByteTokenizer  # noqa: E402
from router_helpers import BackgroundRouter, walk_away  # noqa: E402

TOKEN = "grpc-validation-token-0123456789"
pb2, _ = load_proto("public")
METHODS = {"Generate": True, "Complete": False, "Tokenize": False, "ListScales": False, "Health": False}  # streaming?


class Cluster:
    """One decode and one prefill worker process and a router over them (GrpcBackend) on a background loop."""

    def __init__(self, num_blocks: int, block_size: int = 16, **router_kw) -> None:
        model_dir = str(demo_model_dir())
        env = {**os.environ, "COLM_CLUSTER_TOKEN": TOKEN}
        self.procs: dict[str, subprocess.Popen] = {}
        self.addrs = addrs = {}
        try:
            for role, cfg in (("decode", f'{{"num_blocks": {num_blocks}, "block_size": {block_size}}}'),
                              ("prefill", "{}")):  # both start at once, then each says READY
                self.procs[role] = subprocess.Popen([sys.executable, "-m", "colm.deploy.worker_main", "--role", role,
                                                     "--model", model_dir, "--config", cfg, "--log-level", "WARNING"],
                                                    stdout=subprocess.PIPE, text=True, env=env)
            for role, p in self.procs.items():
                ready = p.stdout.readline().split()
                assert ready[:2] == ["READY", role], ready
                addrs[role] = ready[2]
            workers = [WorkerInfo("decode-0", "decode", addrs["decode"]),
                       WorkerInfo("prefill-0", "prefill", addrs["prefill"])]
            cfg = RouterConfig(grpc_port=0, http_port=None, **{"poll_interval_s": 0.1, **router_kw})
            self.bg = BackgroundRouter(Router(cfg, checkpoint.load_config(model_dir), ByteTokenizer(),
                                              GrpcBackend(workers, cluster_token=TOKEN), block_size=block_size))
        except BaseException:
            self.stop_workers()
            raise
        self.addr = self.bg.grpc_addr

    def stop_workers(self) -> None:
        for p in self.procs.values():
            p.terminate()
            p.wait(30)

    def stop(self) -> None:
        self.bg.stop()
        self.stop_workers()

    def workers_alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.values())

    def settle(self, timeout_s: float = 30.0) -> int:
        """Poll the workers until the decode pool is all free again (aborts run in the background, and the
        router places by the last report); returns the free blocks last reported."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.bg.call(self.bg.router.poll_once())
            rep = self.bg.router.registry.workers["decode-0"].report
            if (rep and rep.free_blocks == rep.total_blocks) or time.monotonic() > deadline:
                return rep.free_blocks if rep else 0
            time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(num_blocks=8)  # 128 tokens of KV: a 100-token prompt with 100 new tokens can never fit
    yield c
    c.stop()


def raw_call(addr: str, method: str, payload: bytes, timeout: float = 10.0):
    """Send ``payload`` as the request bytes of ``/colm.v1.Colm/<method>`` (identity serializers)."""
    with grpc.insecure_channel(addr) as ch:
        path = f"/colm.v1.Colm/{method}"
        if METHODS[method]:
            return list(ch.unary_stream(path)(payload, timeout=timeout))
        return ch.unary_unary(path)(payload, timeout=timeout)


def base_request(**over) -> "pb2.GenerateRequest":
    req = pb2.GenerateRequest(text=b"Hello", sampling=pb2.Sampling(max_new_tokens=3))
    for path, value in over.items():
        msg = req
        *parents, name = path.split(".")
        for p in parents:
            msg = getattr(msg, p)
        setattr(msg, name, value)
    return req


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_unparseable_request_is_invalid_argument_with_one_log_line(cluster, caplog):
    """Bytes that are not a message of the method's type (corrupt wire format, a string field holding invalid
    UTF-8) were UNKNOWN, with a traceback logged at ERROR by grpc."""
    caplog.set_level(logging.INFO)
    bad_utf8_string = b"\x0a\x02\xff\xfe"  # field 1 (GenerateRequest.request_id, a string) = b"\xff\xfe"
    for method in METHODS:
        for payload in (b"\xff\xff\xff\xff", b"\x0a\x05ab"):  # bad tag; length past the end
            code, details = code_of(lambda: raw_call(cluster.addr, method, payload))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, payload, code, details)
            assert "parse" in details
    code, details = code_of(lambda: raw_call(cluster.addr, "Complete", bad_utf8_string))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    lines = [r for r in caplog.records if "unparseable" in r.getMessage()]
    assert len(lines) == 2 * len(METHODS) + 1 and all(r.exc_info is None for r in lines)
    assert all("\n" not in r.getMessage() for r in lines)
    with Client(cluster.addr) as c:  # the service is unharmed
        assert c.tokenize("ab") == [97, 98]


BAD_FIELDS = [
    ({"budget.deadline_ms": 1e38}, "budget.deadline_ms=1e+38"),  # was DEADLINE_EXCEEDED at once (timeout overflow)
    ({"budget.deadline_ms": float("nan")}, "budget.deadline_ms=nan"),
    ({"budget.ttft_ms": float("inf")}, "budget.ttft_ms=inf"),
    ({"budget.tpot_ms": -1.0}, "budget.tpot_ms=-1.0"),
    ({"budget.ttft_ms": 3_600_001.0}, "[0, 3600000]"),
    ({"sampling.temperature": float("nan")}, "sampling.temperature=nan"),
    ({"sampling.temperature": 1e-30}, "sampling.temperature="),
    ({"sampling.top_p": float("inf")}, "sampling.top_p=inf"),
    ({"sampling.top_p": -0.5}, "sampling.top_p=-0.5"),
    ({"sampling.top_k": -3}, "sampling.top_k=-3"),
    ({"sampling.seed": -7}, "sampling.seed=-7"),
    ({"budget.on_miss": 7}, "budget.on_miss=7"),  # an open enum: was served as ON_MISS_DEGRADE
    ({"prompt_logprobs": -1}, "prompt_logprobs=-1"),  # was read as "off"
    ({"request_id": "a b\n"}, "request_id="),
    ({"request_id": "r" * 129}, "request_id="),
    ({"scale": -1}, "scale=-1"),
    ({"speculative": 17}, "speculative=17"),
    ({"speculative": -2}, "speculative=-2"),
]


@pytest.mark.parametrize("fields,message", BAD_FIELDS, ids=[m for _, m in BAD_FIELDS])
def test_every_field_is_checked_and_named_by_its_proto_path(cluster, fields, message):
    with Client(cluster.addr) as c:
        for call in (lambda: c.stub.Complete(base_request(**fields), timeout=30),
                     lambda: list(c.stub.Generate(base_request(**fields), timeout=30))):
            code, details = code_of(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and message in details, (code, details)


def test_stop_token_ids_and_stop_strings_are_bounded(cluster):
    with Client(cluster.addr) as c:
        req = base_request()
        req.sampling.stop.extend(["s"] * 17)
        assert code_of(lambda: c.stub.Complete(req, timeout=30))[0] == grpc.StatusCode.INVALID_ARGUMENT
        req = base_request()
        req.sampling.stop_token_ids.extend([-1])
        code, details = code_of(lambda: c.stub.Complete(req, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "sampling.stop_token_ids" in details, details


def test_max_new_tokens_zero_is_the_configured_default(cluster):
    """0 = unset = RouterConfig.default_max_new_tokens (it was a hard-coded 16 in the gRPC servicer)."""
    cluster.settle()
    router = cluster.bg.router
    cfg = router.cfg
    with Client(cluster.addr) as c:
        ref = c.complete("Hello", max_new_tokens=16, ignore_eos=True)["token_ids"]
        assert len(c.complete("Hello", max_new_tokens=0, ignore_eos=True)["token_ids"]) == cfg.default_max_new_tokens
        router.cfg = dataclasses.replace(cfg, default_max_new_tokens=5)
        try:
            assert c.complete("Hello", max_new_tokens=0, ignore_eos=True)["token_ids"] == ref[:5]
        finally:
            router.cfg = cfg
    with pytest.raises(ValueError, match="default_max_new_tokens"):
        RouterConfig(default_max_new_tokens=0)


def test_tokenize_applies_the_message_and_context_limits(cluster):
    with Client(cluster.addr) as c:
        assert c.tokenize("x" * 1024) == [120] * 1024
        code, details = code_of(lambda: c.tokenize("x" * 1025))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "1025 tokens exceeds the context of 1024" in details
        code, details = code_of(lambda: c.tokenize("x" * (5 << 20)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the limit" in details
        code, details = code_of(lambda: c.stub.Tokenize(pb2.TokenizeRequest(text=b"\xff"), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in details


def test_full_kv_pool_waits_in_line_then_is_resource_exhausted_with_retry_after(cluster):
    """A request the decode pool can never hold is INVALID_ARGUMENT, naming the sizes. One that does not fit while
    another request holds the pool waits in line for blocks (``router.kv_wait_s``) and is served once they free;
    past ``kv_wait_s`` it is RESOURCE_EXHAUSTED with a retry-after-s trailer (never UNAVAILABLE: the pool is full,
    no worker is gone)."""
    router = cluster.bg.router
    cfg = router.cfg
    with Client(cluster.addr) as c:
        cluster.settle()
        code, details = code_of(lambda: c.complete("p" * 100, max_new_tokens=100))  # 13 blocks of 16 > 8
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "200 tokens" in details and "128 tokens" in details
        for wait_s in (0.5, cfg.kv_wait_s):
            router.cfg = dataclasses.replace(cfg, kv_wait_s=wait_s)
            try:
                held = c.stub.Generate(c.request("hold the pool", max_new_tokens=90, ignore_eos=True), timeout=120)
                tokens = 0
                for m in held:  # 7 of the 8 blocks are reserved once the first token streams
                    tokens += len(m.tokens)
                    if tokens:
                        break
                cluster.bg.call(router.poll_once())  # the router sees the pool as the worker reports it
                if wait_s < 1:
                    with pytest.raises(grpc.RpcError) as e:
                        c.complete("another request", max_new_tokens=30)
                    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(), e.value.details())
                    assert "KV blocks" in e.value.details() and "kv_wait_s=0.5" in e.value.details()
                    assert float(dict(e.value.trailing_metadata())["retry-after-s"]) > 0
                else:  # in line until the held request ends and frees its blocks, then served
                    waiting = c.stub.Complete.future(c.request("another request", max_new_tokens=30,
                                                               ignore_eos=True), timeout=120)
                    deadline = time.monotonic() + 30
                    while len(router.kv_queue) == 0 and time.monotonic() < deadline:
                        time.sleep(0.01)
                    assert len(router.kv_queue) == 1 and not waiting.done()
                    for m in held:
                        tokens += len(m.tokens)
                    assert len(waiting.result().tokens) == 30
                    assert len(router.kv_queue) == 0
            finally:
                router.cfg = cfg
            for m in held:
                tokens += len(m.tokens)
            assert tokens == 90
            cluster.settle()
        assert len(c.complete("another request", max_new_tokens=30, ignore_eos=True)["token_ids"]) == 30


def test_pool_filled_behind_the_routers_back_waits_then_is_resource_exhausted(cluster):
    """The router places by the decode worker's last report; when the pool filled since (another router, a
    report in flight), the worker's Reserve answers RESOURCE_EXHAUSTED. The request then waits in line for blocks:
    served once they free, RESOURCE_EXHAUSTED with a retry-after past ``kv_wait_s`` (and the worker is not taken
    out)."""
    from colm.proto.rpc import TOKEN_KEY

    kv_pb2, kv_pb2_grpc = load_proto("kv")
    router = cluster.bg.router
    cfg = router.cfg
    md = ((TOKEN_KEY, TOKEN),)
    for wait_s in (1.0, 30.0):
        cluster.settle()
        router.cfg = dataclasses.replace(cfg, poll_interval_s=3.0, kv_wait_s=wait_s)  # the poll loop's sleep is long
        try:
            time.sleep(0.3)
            cluster.bg.call(router.poll_once())  # the router's view: all 8 blocks free
            with grpc.insecure_channel(cluster.addrs["decode"]) as ch:
                decode = kv_pb2_grpc.DecodeWorkerStub(ch)
                decode.Reserve(kv_pb2.ReserveRequest(request_id="outside-0", prompt_len=100, max_new_tokens=28,
                                                     timeout_s=30), metadata=md, timeout=10)  # all 8 blocks
                with Client(cluster.addr) as c:
                    if wait_s < 2:
                        try:
                            with pytest.raises(grpc.RpcError) as e:
                                c.complete("behind the back", max_new_tokens=8)
                        finally:
                            decode.Abort(kv_pb2.AbortRequest(request_id="outside-0"), metadata=md, timeout=10)
                        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.value.code(),
                                                                                       e.value.details())
                        assert "KV pool full" in e.value.details()  # the worker's refusal, not the placement's
                        assert float(dict(e.value.trailing_metadata())["retry-after-s"]) > 0
                    else:
                        waiting = c.stub.Complete.future(c.request("behind the back", max_new_tokens=8,
                                                                   ignore_eos=True), timeout=60)
                        time.sleep(1.0)
                        assert not waiting.done()  # refused by the worker, waiting in line
                        decode.Abort(kv_pb2.AbortRequest(request_id="outside-0"), metadata=md, timeout=10)
                        assert len(waiting.result().tokens) == 8
            assert router.registry.workers["decode-0"].healthy
        finally:
            router.cfg = cfg
    cluster.settle()


def test_deadline_during_a_token_wait_leaves_no_unretrieved_task(cluster, caplog):
    """A request whose deadline passes while the router waits for its next token: the router cancelled its
    wait, but the backend's read of the worker's token stream ran on until the worker's call timed out, and
    its exception was logged as "Task exception was never retrieved" when the task was collected."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    prompt = "t" * 60
    with Client(cluster.addr) as c:
        cluster.settle()
        c.complete(prompt, max_new_tokens=4)  # warm: the first prefill of a shape pays one-time costs
        codes = []
        for deadline_ms in (20, 40, 60, 80, 120, 160, 200, 250):
            cluster.settle()
            codes.append(code_of(lambda: c.complete(prompt, max_new_tokens=20, ignore_eos=True,
                                                    deadline_ms=deadline_ms))[0])
        assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
        time.sleep(1.0)  # the workers' calls run past their own timeouts
        cluster.bg.call(_collect())
        gc.collect()
        time.sleep(0.2)
    leaked = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not leaked, leaked
    assert cluster.workers_alive()
    with Client(cluster.addr) as c:
        assert all(w["healthy"] for w in c.health()["workers"])


async def _collect():
    gc.collect()


def test_cancelled_stream_frees_its_reservation(cluster):
    """A client that walks away mid-stream: the router stops reading the worker's stream and aborts the
    request, so its blocks come back."""
    assert cluster.settle() == 8  # the earlier tests' aborts have run
    with Client(cluster.addr) as c:
        walk_away(c, "walk away", 90)
        assert cluster.settle() == 8


def test_well_formed_requests_still_served_alongside(cluster):
    out = {}

    def run():
        with Client(cluster.addr) as c:
            out["r"] = c.complete("steady", max_new_tokens=8, ignore_eos=True)

    cluster.settle()
    t = threading.Thread(target=run)
    t.start()
    for _ in range(20):
        code_of(lambda: raw_call(cluster.addr, "Complete", b"\x12\x03\xff"))
    t.join(60)
    assert len(out["r"]["token_ids"]) == 8
