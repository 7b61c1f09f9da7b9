"""A decode worker that hangs (its process stopped, a stuck host) while a request's Reserve or Start call waits on it.

With the batched token stream the backend watches an attempt's failover itself, but only once Start had answered:
a health poll that took the hung worker out did not fail over the requests whose Reserve or Start were still out, so
they waited for the call's own bound (10 s), and that call's DEADLINE_EXCEEDED then failed them as past their
deadline (DEADLINE_EXCEEDED to the client with most of its deadline left) instead of retrying them elsewhere. Seen
with a SIGSTOPped decode actor under load. Stand-in workers over real gRPC; seconds in all."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from colm.proto import load_proto
from colm.proto.rpc import make_server
from colm.router.backend import EngineRequest, WorkerFailed, WorkerInfo
from colm.router.grpc_backend import GrpcBackend
from colm.sampling import SamplingParams
from _async_helpers import until

kv_pb2, kv_grpc = load_proto("kv")
TOKEN = "hung-worker-test-token"


class HungDecode(kv_grpc.DecodeWorkerServicer):
    """A decode worker whose ``hang`` call ("Reserve" or "Start") answers only once ``release`` is set (at most 20 s);
    the other calls answer at once. ``aborted`` lists the request ids it was asked to abort."""

    def __init__(self, hang: str) -> None:
        self.hang = hang
        self.release = threading.Event()
        self.asked = threading.Event()
        self.aborted: list[str] = []
        self.stop_tokens = threading.Event()

    def _maybe_hang(self, name: str) -> None:
        if name == self.hang:
            self.asked.set()
            self.release.wait(20)

    def Reserve(self, request, context):  # noqa: N802 - gRPC servicer API
        self._maybe_hang("Reserve")
        return kv_pb2.ReserveReply(request_id=request.request_id)

    def Start(self, request, context):  # noqa: N802
        self._maybe_hang("Start")
        return kv_pb2.StartGenerationReply(request_id=request.request_id)

    def Tokens(self, request, context):  # noqa: N802
        yield kv_pb2.TokenBatch()
        self.stop_tokens.wait(30)

    def Abort(self, request, context):  # noqa: N802
        self.aborted.append(request.request_id)
        return kv_pb2.AbortReply(request_id=request.request_id, found=True)


class IdlePrefill(kv_grpc.PrefillWorkerServicer):
    def Prefill(self, request, context):  # noqa: N802
        time.sleep(20)
        return kv_pb2.PrefillReply()


@pytest.fixture(params=["Reserve", "Start"])
def hung(request):
    """(the stand-in decode worker, hanging in ``request.param``, and the worker list: decode-0, prefill-0)."""
    decode, servers = HungDecode(request.param), []
    infos = []
    for wid, role, servicer, add in (("decode-0", "decode", decode, kv_grpc.add_DecodeWorkerServicer_to_server),
                                     ("prefill-0", "prefill", IdlePrefill(), kv_grpc.add_PrefillWorkerServicer_to_server)):
        server, port = make_server("127.0.0.1:0", TOKEN)
        add(servicer, server)
        server.start()
        servers.append(server)
        infos.append(WorkerInfo(wid, role, f"127.0.0.1:{port}"))
    yield decode, infos
    decode.release.set()
    decode.stop_tokens.set()
    for server in servers:
        server.stop(0)


def _request(failover, timeout_s: float = 30.0) -> EngineRequest:
    return EngineRequest("req-1", (65, 66, 67), SamplingParams(max_new_tokens=4), 1, timeout_s, failover=failover,
                         token_timeout_s=30.0)


async def _first(stream):
    async for tok in stream:
        return tok


def test_a_failover_during_a_hung_call_fails_the_attempt_over_at_once(hung):
    """A health poll takes the hung worker out while the attempt's Reserve (or Start) is out: the attempt fails with
    WorkerFailed at once, not after the call's bound; the abort of what it may have reserved goes once the worker
    answers the call."""
    decode, infos = hung

    async def run():
        b = GrpcBackend(infos, cluster_token=TOKEN, worker_calls="unary")  # a stand-in has no Calls stream
        try:
            failover = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(_first(b.generate(_request(failover), "prefill-0", "decode-0")))
            await until(decode.asked.is_set, "the call never reached the worker")
            t0 = time.monotonic()
            failover.set_result("decode-0")  # what Router._fail_inflight does when the worker fails its poll
            with pytest.raises(WorkerFailed) as e:
                await asyncio.wait_for(task, 5)
            assert e.value.worker_id == "decode-0"
            assert time.monotonic() - t0 < 2.0
            assert decode.aborted == []  # not before the call answered: the abort would find nothing
            decode.release.set()
            for _ in range(200):
                if decode.aborted:
                    break
                await asyncio.sleep(0.05)
            assert decode.aborted == ["req-1"]
        finally:
            decode.release.set()
            decode.stop_tokens.set()
            await b.close()

    asyncio.run(run())


def test_a_hung_call_past_its_bound_is_the_workers_failure_not_the_deadline(hung, monkeypatch):
    """No poll takes the worker out (a long router.poll_timeout_s): the Reserve (or Start) times out at its own bound,
    well within the request's deadline; that is the worker's silence (WorkerFailed, retried elsewhere), not
    DEADLINE_EXCEEDED for the request."""
    from colm.router import grpc_request

    monkeypatch.setattr(grpc_request, "CALL_TIMEOUT_S", 0.5)
    decode, infos = hung

    async def run():
        b = GrpcBackend(infos, cluster_token=TOKEN, worker_calls="unary")  # a stand-in has no Calls stream
        try:
            failover = asyncio.get_running_loop().create_future()
            with pytest.raises(WorkerFailed) as e:
                await asyncio.wait_for(_first(b.generate(_request(failover), "prefill-0", "decode-0")), 10)
            assert e.value.worker_id == "decode-0" and "no answer within 0.5 s" in str(e.value)
        finally:
            decode.release.set()
            decode.stop_tokens.set()
            await b.close()

    asyncio.run(run())
