"""The router's gRPC backend on the cuda_pool and nixl paths: when the pair's facts (the workers' Stats: CUDA
and one host for cuda_pool, decode listing nixl for nixl) let the transport's grant wait for the reservation,
Prefill (path "cuda_pool" / "nixl") goes out before Reserve has answered; otherwise Reserve comes first and
Prefill carries the router's path. A Reserve that fails cancels the Prefill already sent. Fake stubs record the
order; the workers' side of the concurrency (the grant waiting for the reservation) is in tests/test_kv_pool.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from colm.proto import load_proto
from colm.router.backend import EngineRequest, WorkerInfo
from colm.router.grpc_backend import GrpcBackend
from colm.router.placement import NoWorker
from colm.sampling import SamplingParams

kv_pb2, _ = load_proto("kv")


class _Rpc(grpc.aio.AioRpcError):
    def __init__(self, code):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"fake {code.name}")


class FakeWorkers:
    """Decode and prefill stubs in one: every call is logged; Reserve answers only when ``release`` is set."""

    def __init__(self, cuda: bool, reserve_code=None, hosts=("h", "h"), transports=()) -> None:
        self.cuda = cuda
        self.hosts = hosts  # (prefill's host_id, decode's)
        self.transports = transports  # what decode's Stats says it can receive
        self.reserve_code = reserve_code
        self.log: list[str] = []
        self.release = asyncio.Event()
        self.prefill_task = None

    async def Stats(self, request, metadata=None, timeout=None):  # noqa: N802 - gRPC stub API
        if isinstance(request, kv_pb2.DecodeStatsRequest):
            return kv_pb2.DecodeStats(host_id=self.hosts[1], num_blocks=8, num_free_blocks=8, cuda_kv=self.cuda,
                                      transports=self.transports)
        return kv_pb2.PrefillStats(host_id=self.hosts[0], cuda=self.cuda)

    async def Reserve(self, request, metadata=None, timeout=None):  # noqa: N802
        self.log.append("reserve_sent")
        await self.release.wait()
        if self.reserve_code is not None:
            raise _Rpc(self.reserve_code)
        self.log.append("reserve_replied")
        return kv_pb2.ReserveReply(request_id=request.request_id, host_id=self.hosts[1], cuda_kv=self.cuda,
                                   transports=self.transports)

    async def _prefill(self, request):
        await asyncio.sleep(0.05)
        return kv_pb2.PrefillReply(request_id=request.request_id, num_tokens=len(request.token_ids) - 1,
                                   path=request.path or "shm")

    def Prefill(self, request, metadata=None, timeout=None):  # noqa: N802
        # issued (a grpc.aio call starts when it is made); Reserve may answer from now on
        self.log.append(f"prefill:{request.path}")
        self.release.set()
        self.prefill_task = asyncio.get_running_loop().create_task(self._prefill(request))
        return self.prefill_task

    def StartGeneration(self, request, metadata=None, timeout=None):  # noqa: N802
        async def events():
            yield kv_pb2.TokenEvent(request_id=request.request_id, token_id=7, index=0, scale=1, finish_reason="length")
        return events()

    def Tokens(self, request, metadata=None, timeout=None):  # noqa: N802 - the batched token stream
        self.batches = asyncio.Queue()
        self.batches.put_nowait(kv_pb2.TokenBatch())  # subscribed

        class Call:
            def __aiter__(call):
                return call

            async def __anext__(call):
                return await self.batches.get()

            def cancel(call):
                return True

        return Call()

    async def Start(self, request, metadata=None, timeout=None):  # noqa: N802
        self.log.append("start")
        self.batches.put_nowait(kv_pb2.TokenBatch(events=[kv_pb2.TokenEvent(
            request_id=request.request_id, token_id=7, index=0, scale=1, finish_reason="length")]))
        return kv_pb2.StartGenerationReply(request_id=request.request_id)

    async def Abort(self, request, metadata=None, timeout=None):  # noqa: N802
        self.log.append("abort")
        return kv_pb2.AbortReply(request_id=request.request_id, found=False)


@pytest.fixture(params=["batched", "per_request"])
def token_stream(request):
    return request.param


def backend_over(fake: FakeWorkers, token_stream: str = "batched") -> GrpcBackend:
    # unary calls: the fake stubs log each call as it is made (the Calls stream's order is in test_call_stream.py)
    b = GrpcBackend([WorkerInfo("p0", "prefill", "127.0.0.1:1"), WorkerInfo("d0", "decode", "127.0.0.1:2")],
                    token_stream=token_stream, worker_calls="unary")
    b._decode = b._prefill = lambda worker_id: fake
    return b


async def one_request(b: GrpcBackend, fake: FakeWorkers):
    await b.poll("p0")
    await b.poll("d0")
    if not fake.cuda and "nixl" not in fake.transports:
        asyncio.get_running_loop().call_later(0.01, fake.release.set)  # Reserve is awaited before Prefill here
    req = EngineRequest("r1", (1, 2, 3, 4), SamplingParams(max_new_tokens=1), scale=1, timeout_s=5.0)
    return [t.token_id async for t in b.generate(req, "p0", "d0")]


def test_cuda_pool_pair_sends_prefill_before_reserve_answers(token_stream):
    fake = FakeWorkers(cuda=True)
    assert asyncio.run(one_request(backend_over(fake, token_stream), fake)) == [7]
    assert fake.log[:3] == ["prefill:cuda_pool", "reserve_sent", "reserve_replied"]


def test_a_nixl_pair_on_two_hosts_sends_prefill_before_reserve_answers(token_stream):
    """nixl's grant waits for the reservation too: once decode's Stats lists it, auto picks it for two hosts
    (no CUDA needed) and Prefill (path "nixl", with what decode can receive) goes out with Reserve."""
    pytest.importorskip("nixl._api")
    fake = FakeWorkers(cuda=False, hosts=("h1", "h2"), transports=("grpc", "nixl"))
    sent = []
    prefill = fake.Prefill
    fake.Prefill = lambda request, **kw: sent.append(request) or prefill(request, **kw)
    assert asyncio.run(one_request(backend_over(fake, token_stream), fake)) == [7]
    assert fake.log[:3] == ["prefill:nixl", "reserve_sent", "reserve_replied"]
    assert not sent[0].same_host and list(sent[0].decode_transports) == ["grpc", "nixl"]


def test_a_reserve_reply_tells_the_router_what_decode_receives(token_stream):
    """A decode worker lists its transports in Stats only after its first Reserve; the router learns them from that
    Reserve's reply, so the next request to the pair sends Prefill with Reserve without waiting for a poll."""
    pytest.importorskip("nixl._api")

    class FreshDecode(FakeWorkers):
        async def Stats(self, request, metadata=None, timeout=None):  # noqa: N802
            r = await super().Stats(request, metadata, timeout)
            if isinstance(r, kv_pb2.DecodeStats):
                del r.transports[:]  # not made yet
            return r

    fake = FreshDecode(cuda=False, hosts=("h1", "h2"), transports=("grpc", "nixl"))
    b = backend_over(fake, token_stream)

    async def run():
        await b.poll("p0")
        await b.poll("d0")
        asyncio.get_running_loop().call_later(0.01, fake.release.set)  # the first Reserve is awaited before Prefill
        first = EngineRequest("r1", (1, 2, 3, 4), SamplingParams(max_new_tokens=1), scale=1, timeout_s=5.0)
        assert [t.token_id async for t in b.generate(first, "p0", "d0")] == [7]
        fake.release.clear()
        asyncio.get_running_loop().call_later(1.0, fake.release.set)  # a Reserve awaited first answers in 1 s
        second = EngineRequest("r2", (1, 2, 3, 4), SamplingParams(max_new_tokens=1), scale=1, timeout_s=5.0)
        assert [t.token_id async for t in b.generate(second, "p0", "d0")] == [7]

    asyncio.run(run())
    i = fake.log.index("prefill:auto")  # the first request: Reserve answered, then Prefill with the router's path
    assert fake.log[i - 2:i] == ["reserve_sent", "reserve_replied"], fake.log
    second = fake.log[fake.log.index("prefill:auto") + 1:]
    second = second[next(k for k, e in enumerate(second) if e in ("reserve_sent", "prefill:nixl")):]
    assert second[:3] == ["prefill:nixl", "reserve_sent", "reserve_replied"], fake.log


def test_other_pairs_reserve_first(token_stream):
    fake = FakeWorkers(cuda=False)
    assert asyncio.run(one_request(backend_over(fake, token_stream), fake)) == [7]
    assert fake.log[:3] == ["reserve_sent", "reserve_replied", "prefill:auto"]


def test_failed_reserve_cancels_the_prefill_sent_with_it():
    fake = FakeWorkers(cuda=True, reserve_code=grpc.StatusCode.RESOURCE_EXHAUSTED)

    async def run():
        with pytest.raises(NoWorker):
            await one_request(backend_over(fake), fake)
        await asyncio.sleep(0.05)  # the background abort

    asyncio.run(run())
    # decode refused the reservation, so it holds nothing of this request: no abort (one could only hit another
    # request's reservation under the same id)
    assert fake.log[0] == "prefill:cuda_pool" and fake.prefill_task.cancelled() and "abort" not in fake.log
