"""Unary calls as messages of a worker's ``Calls`` stream (``colm.proto.call_stream`` on the worker,
``colm.router.call_stream`` in the router), over a real gRPC server with the cluster-token interceptor: replies
and status codes as unary calls give them, many calls in flight finishing out of order, deadlines and
cancellations reaching the worker's handler, a worker that dies and comes back, a wrong token, and a worker
without the stream (the router falls back to unary calls)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from colm.proto import load_proto
from colm.proto.call_stream import serve_calls
from colm.proto.rpc import make_server
from colm.router.backend import WorkerInfo
from colm.router.call_stream import CallStream
from colm.router.config import RouterConfig
from colm.router.grpc_backend import GrpcBackend

kv_pb2, kv_grpc = load_proto("kv")
TOKEN = "call-stream-test-token"
MD = (("x-colm-cluster-token", TOKEN),)


class StandIn(kv_grpc.DecodeWorkerServicer):
    """Reserve answers after ``prompt_len`` ms (0: at once); some request ids fail on purpose; every call's
    end (finished or cancelled) is recorded through the context's callbacks, as a unary handler registers them."""

    def __init__(self) -> None:
        self.ended: dict[str, threading.Event] = {}
        self.handled: list[str] = []

    def Calls(self, request_iterator, context):  # noqa: N802 - gRPC servicer API
        yield from serve_calls({"Reserve": (self.Reserve, kv_pb2.ReserveRequest)}, request_iterator, context, 16)

    def Reserve(self, request, context):  # noqa: N802
        rid = request.request_id
        ended = self.ended.setdefault(rid, threading.Event())
        context.add_callback(ended.set)
        self.handled.append(rid)
        if rid == "bad-value":
            raise ValueError("prompt_len: 0 is not allowed (1..8192)")
        if rid == "not-found":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such reservation")
        deadline = time.monotonic() + request.prompt_len / 1000
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.002)
        return kv_pb2.ReserveReply(request_id=rid, num_blocks=request.max_new_tokens)


def serve(servicer, port: int = 0):
    server, port = make_server(f"127.0.0.1:{port}", TOKEN)
    kv_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    server.start()
    return server, port


def reserve(rid: str, ms: int = 0, n: int = 1):
    return kv_pb2.ReserveRequest(request_id=rid, prompt_len=ms, max_new_tokens=n)


def stream_on(channel, token: str = TOKEN) -> CallStream:
    stub = kv_grpc.DecodeWorkerStub(channel)
    return CallStream(lambda: stub.Calls(metadata=(("x-colm-cluster-token", token),)))


@pytest.fixture
def worker():
    servicer = StandIn()
    server, port = serve(servicer)
    yield servicer, port
    server.stop(0)


def test_replies_and_status_codes_as_unary_calls(worker):
    servicer, port = worker

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            cs = stream_on(ch)
            r = await cs.call("Reserve", reserve("a", n=7), kv_pb2.ReserveReply, 5.0)
            assert (r.request_id, r.num_blocks) == ("a", 7)
            unary = kv_grpc.DecodeWorkerStub(ch)
            for rid, code in (("bad-value", grpc.StatusCode.INVALID_ARGUMENT),
                              ("not-found", grpc.StatusCode.NOT_FOUND)):
                with pytest.raises(grpc.aio.AioRpcError) as on_stream:
                    await cs.call("Reserve", reserve(rid), kv_pb2.ReserveReply, 5.0)
                with pytest.raises(grpc.aio.AioRpcError) as as_call:
                    await unary.Reserve(reserve(rid), metadata=MD, timeout=5.0)
                assert on_stream.value.code() == as_call.value.code() == code
                assert on_stream.value.details() == as_call.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await cs.call("Stats", kv_pb2.DecodeStatsRequest(), kv_pb2.DecodeStats, 5.0)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED and "Reserve" in e.value.details()
            # the stream outlived every failure: one more call on it
            assert (await cs.call("Reserve", reserve("b"), kv_pb2.ReserveReply, 5.0)).request_id == "b"
            await cs.close()

    asyncio.run(run())
    assert all(servicer.ended[rid].is_set() for rid in ("a", "b", "bad-value", "not-found"))  # callbacks at the end


def test_many_calls_in_flight_finish_out_of_order(worker):
    _, port = worker

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            cs = stream_on(ch)
            order = []

            async def one(i):
                r = await cs.call("Reserve", reserve(f"r{i}", ms=10 * (12 - i), n=i), kv_pb2.ReserveReply, 10.0)
                order.append(i)
                assert (r.request_id, r.num_blocks) == (f"r{i}", i)

            await asyncio.gather(*(one(i) for i in range(12)))
            await cs.close()
            return order

    order = asyncio.run(run())
    assert sorted(order) == list(range(12)) and order != list(range(12))  # replies came as calls finished


def test_deadline_and_cancellation_reach_the_handler(worker):
    servicer, port = worker

    async def ended_soon(rid: str) -> None:  # the handler's cancellation callback ran, well before its 5 s
        for _ in range(100):
            if servicer.ended[rid].is_set():
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{rid}: the worker's handler was not cancelled")

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            cs = stream_on(ch)
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await cs.call("Reserve", reserve("slow", ms=5000), kv_pb2.ReserveReply, 0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 2.0
            await ended_soon("slow")  # told to cancel while the stream stays open
            task = asyncio.ensure_future(cs.call("Reserve", reserve("dropped", ms=5000), kv_pb2.ReserveReply, 30.0))
            while "dropped" not in servicer.handled:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await ended_soon("dropped")
            ok = await cs.call("Reserve", reserve("after"), kv_pb2.ReserveReply, 5.0)  # the stream is still good
            assert ok.request_id == "after"
            await cs.close()

    asyncio.run(run())


def test_a_worker_that_dies_fails_the_waiting_calls_and_a_new_one_is_reached():
    servicer = StandIn()
    server, port = serve(servicer)

    async def run():
        nonlocal server
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            cs = stream_on(ch)
            assert (await cs.call("Reserve", reserve("first"), kv_pb2.ReserveReply, 5.0)).request_id == "first"
            waiting = asyncio.ensure_future(cs.call("Reserve", reserve("lost", ms=5000), kv_pb2.ReserveReply, 30.0))
            while "lost" not in servicer.handled:
                await asyncio.sleep(0.01)
            t0 = time.monotonic()
            server.stop(0)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await waiting
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            assert time.monotonic() - t0 < 5.0
            server, _ = serve(servicer, port)  # the worker back on its address
            for _ in range(50):  # the channel reconnects; the next call opens a new stream
                try:
                    r = await cs.call("Reserve", reserve("again"), kv_pb2.ReserveReply, 5.0)
                    break
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.UNAVAILABLE
                    await asyncio.sleep(0.1)
            assert r.request_id == "again"
            await cs.close()

    try:
        asyncio.run(run())
    finally:
        server.stop(0)
    assert servicer.ended["lost"].wait(2.0)  # the handler was told its caller went away


def test_wrong_token_is_refused(worker):
    servicer, port = worker

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            cs = stream_on(ch, token="not-the-token")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await cs.call("Reserve", reserve("intruder"), kv_pb2.ReserveReply, 5.0)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await cs.close()

    asyncio.run(run())
    assert "intruder" not in servicer.handled


def test_router_falls_back_to_unary_calls_for_a_worker_without_the_stream():
    """A worker whose service predates ``Calls`` (only Reserve registered) answers the stream with UNIMPLEMENTED
    once; the router's backend then sends that call, and the next, as unary calls."""
    servicer = StandIn()
    server, port = make_server("127.0.0.1:0", TOKEN)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("colm.v1.DecodeWorker", {
        "Reserve": grpc.unary_unary_rpc_method_handler(servicer.Reserve, kv_pb2.ReserveRequest.FromString,
                                                       kv_pb2.ReserveReply.SerializeToString)}),))
    server.start()

    async def run():
        b = GrpcBackend([WorkerInfo("d0", "decode", f"127.0.0.1:{port}")], cluster_token=TOKEN)
        try:
            for rid in ("old-1", "old-2"):
                r = await b._unary("d0", "Reserve", reserve(rid), kv_pb2.ReserveReply, 5.0)
                assert r.request_id == rid
            assert b._call_streams["d0"].unsupported
        finally:
            await b.close()

    try:
        asyncio.run(run())
    finally:
        server.stop(0)
    assert servicer.handled == ["old-1", "old-2"]


def test_worker_calls_setting_is_checked():
    with pytest.raises(ValueError, match="router.worker_calls='rpc': must be one of stream, unary"):
        RouterConfig(worker_calls="rpc")
    with pytest.raises(ValueError, match="worker_calls='rpc'"):
        GrpcBackend([], worker_calls="rpc")


def test_a_caller_cancelled_mid_write_leaves_the_stream_and_its_other_calls_alone(worker):
    """grpc.aio cancels a whole stream call when a write into it is interrupted: one request's cancellation (a client
    gone) must not end the worker's Calls stream, failing every other call on it (the router then took the worker out
    of service and failed its requests over)."""
    servicer, port = worker

    async def run():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            cs = stream_on(ch)
            await cs.call("Reserve", reserve("open"), kv_pb2.ReserveReply, 5.0)
            stream = cs._call
            bystander = asyncio.ensure_future(cs.call("Reserve", reserve("bystander", ms=1500), kv_pb2.ReserveReply,
                                                      10.0))
            for i in range(40):  # cancelled after 0..3 turns of the loop: before, during and after its write
                task = asyncio.ensure_future(cs.call("Reserve", reserve(f"gone{i}"), kv_pb2.ReserveReply, 5.0))
                for _ in range(i % 4):
                    await asyncio.sleep(0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            r = await bystander  # the other call on the stream is answered
            assert r.request_id == "bystander"
            assert cs._call is stream and not stream.done()  # the same stream serves on
            assert (await cs.call("Reserve", reserve("after"), kv_pb2.ReserveReply, 5.0)).request_id == "after"
            await cs.close()

    asyncio.run(run())


class SlowReserve(kv_grpc.DecodeWorkerServicer):
    """A decode worker whose Reserve takes 300 ms and, like the real one, does not stop for its caller's cancellation;
    Abort frees what Reserve holds."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.lock = threading.Lock()
        self.reserved = threading.Event()  # a Reserve handler has run to its end

    def Calls(self, request_iterator, context):  # noqa: N802 - gRPC servicer API
        yield from serve_calls({"Reserve": (self.Reserve, kv_pb2.ReserveRequest),
                                "Abort": (self.Abort, kv_pb2.AbortRequest)}, request_iterator, context, 16)

    def Reserve(self, request, context):  # noqa: N802
        time.sleep(0.3)
        with self.lock:
            self.held.add(request.request_id)
        self.reserved.set()
        return kv_pb2.ReserveReply(request_id=request.request_id, num_blocks=1, block_size=16)

    def Abort(self, request, context):  # noqa: N802
        with self.lock:
            found = request.request_id in self.held
            self.held.discard(request.request_id)
        return kv_pb2.AbortReply(request_id=request.request_id, found=found)


@pytest.mark.parametrize("calls", ["stream", "unary"])
def test_a_request_cancelled_during_its_reserve_leaves_no_reservation(calls):
    """A request cancelled (its client gone) while its Reserve is in flight: the abort that frees its blocks must not
    overtake the Reserve on the worker, where it would find nothing and the reservation made after it would hold its
    blocks until the request's deadline."""
    from colm.router.backend import EngineRequest
    from colm.sampling import SamplingParams

    servicer = SlowReserve()
    server, port = serve(servicer)
    try:
        async def run():
            b = GrpcBackend([WorkerInfo("decode-0", "decode", f"127.0.0.1:{port}"),
                             WorkerInfo("prefill-0", "prefill", f"127.0.0.1:{port}")], cluster_token=TOKEN,
                            worker_calls=calls)
            req = EngineRequest("gone", tuple(range(65, 85)), SamplingParams(max_new_tokens=8), 1, 60.0, None, None)

            async def consume():
                async for _ in b.generate(req, "prefill-0", "decode-0"):
                    pass

            task = asyncio.ensure_future(consume())
            await asyncio.sleep(0.1)  # the Reserve is on the worker now
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await b.close()  # waits for the background aborts

        asyncio.run(run())
        assert servicer.reserved.wait(5)
        time.sleep(0.1)  # an abort sent after the reservation has had time to land
        assert servicer.held == set()
    finally:
        server.stop(0)
