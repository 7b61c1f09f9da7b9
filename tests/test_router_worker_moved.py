"""A worker that comes back on a new address while the router has calls out to its old one.

``GrpcBackend.set_workers`` closes the old channel; grpc.aio then raises ``asyncio.CancelledError`` (not an
``AioRpcError``) in every task awaiting a call on it, although none of those tasks was cancelled. The router's health
poll loop treated that as its own cancellation and ended for good: every report went stale, every worker read
unhealthy, and the restarted worker's new address was never taken up (the service stopped serving after a Ray actor
restart). These tests move a worker while a Stats poll to it is out."""

from __future__ import annotations

import asyncio
import threading

import pytest

from colm.proto import load_proto
from colm.proto.rpc import make_server
from colm.router.backend import WorkerInfo
from colm.router.grpc_backend import GrpcBackend
from _async_helpers import until

kv_pb2, kv_grpc = load_proto("kv")
TOKEN = "worker-moved-test-token"


class StandIn(kv_grpc.DecodeWorkerServicer):
    """A decode worker whose Stats answers at once, or (``hold``) only once ``release`` is set (at most 20 s)."""

    def __init__(self, hold: bool) -> None:
        self.hold = hold
        self.release = threading.Event()
        self.asked = threading.Event()

    def Stats(self, request, context):  # noqa: N802 - gRPC servicer API
        self.asked.set()
        if self.hold:
            self.release.wait(20)
        return kv_pb2.DecodeStats(num_blocks=64, num_free_blocks=64)

    def Score(self, request, context):  # noqa: N802
        self.asked.set()
        self.release.wait(20)
        return kv_pb2.ScoreReply()


@pytest.fixture
def workers():
    """(old worker that holds its Stats, its port, new worker that answers, its port)."""
    out, servers = [], []
    for hold in (True, False):
        s = StandIn(hold)
        server, port = make_server("127.0.0.1:0", TOKEN)
        kv_grpc.add_DecodeWorkerServicer_to_server(s, server)
        server.start()
        servers.append(server)
        out += [s, port]
    yield out
    for s in out[::2]:
        s.release.set()
    for server in servers:
        server.stop(0)


@pytest.mark.parametrize("call", ["poll", "score"])
def test_a_call_cut_by_the_move_fails_as_a_call_not_as_a_cancellation(workers, call):
    old, old_port, new, new_port = workers

    async def run():
        b = GrpcBackend([WorkerInfo("decode-0", "decode", f"127.0.0.1:{old_port}")], cluster_token=TOKEN)
        try:
            task = asyncio.ensure_future(b.poll("decode-0") if call == "poll" else b.prompt_logprobs("decode-0", [65, 66], 1))
            await until(old.asked.is_set, "the call never reached the worker")
            b.set_workers([WorkerInfo("decode-0", "decode", f"127.0.0.1:{new_port}")])
            with pytest.raises(Exception) as e:  # noqa: PT011 - the kind is checked below
                await asyncio.wait_for(task, 10)
            assert not isinstance(e.value, asyncio.CancelledError)
            assert "moved" in str(e.value) or "CANCELLED" in str(e.value), e.value
            assert not task.cancelled()
            # the backend talks to the worker at its new address from now on
            r = await asyncio.wait_for(b.poll("decode-0"), 10)
            assert r.total_blocks == 64
        finally:
            await b.close()

    asyncio.run(run())


def test_a_cancelled_poll_is_still_a_cancellation(workers):
    """The caller's own cancellation (a timeout, a shutdown) stays a cancellation."""
    old, old_port, _, _ = workers

    async def run():
        b = GrpcBackend([WorkerInfo("decode-0", "decode", f"127.0.0.1:{old_port}")], cluster_token=TOKEN)
        try:
            task = asyncio.ensure_future(b.poll("decode-0"))
            await until(old.asked.is_set, "the call never reached the worker")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(b.poll("decode-0"), 0.3)
        finally:
            await b.close()

    asyncio.run(run())


def test_the_health_poll_loop_outlives_a_worker_moving_under_its_poll(workers):
    """The router's loop goes on: the moved worker reports from its new address and is healthy again, and the service
    serves (the loop had ended: every worker turned unhealthy once its report went stale)."""
    from colm.presets import tiny
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.tokenizer import ByteTokenizer

    old, old_port, new, new_port = workers

    async def run():
        b = GrpcBackend([WorkerInfo("decode-0", "decode", f"127.0.0.1:{old_port}")], cluster_token=TOKEN)
        r = Router(RouterConfig(grpc_port=0, http_port=0, metrics_port=None, poll_interval_s=0.05, poll_timeout_s=15),
                   tiny(), ByteTokenizer(), b)
        r.registry.stale_after_s = 1.0  # a report older than this reads unhealthy
        loop_task = asyncio.ensure_future(r._poll_loop())
        try:
            await until(old.asked.is_set, "the call never reached the worker")
            b.set_workers([WorkerInfo("decode-0", "decode", f"127.0.0.1:{new_port}")])
            for _ in range(200):  # up to 10 s
                await asyncio.sleep(0.05)
                w = r.registry.workers.get("decode-0")
                if w is not None and w.address.endswith(f":{new_port}") and r.registry.state(w) == "healthy":
                    break
            assert not loop_task.done(), loop_task
            assert w.address == f"127.0.0.1:{new_port}"
            assert r.registry.state(w) == "healthy"
            await asyncio.sleep(1.5)  # past stale_after_s: reports keep coming
            assert r.registry.state(r.registry.workers["decode-0"]) == "healthy"
        finally:
            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)
            await b.close()

    asyncio.run(run())


def test_the_poll_loop_outlives_any_backend_that_raises_cancelled_error(caplog):
    """Any backend: a poll that raises CancelledError without the loop being cancelled takes the worker out (as any
    failed poll does) and the loop goes on; the loop's own cancellation still ends it."""
    from colm.presets import tiny
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.policy import WorkerReport
    from colm.tokenizer import ByteTokenizer

    class Flaky:
        def __init__(self) -> None:
            self.polls = 0

        def workers(self):
            return [WorkerInfo("decode-0", "decode", "here")]

        async def poll(self, worker_id):
            self.polls += 1
            if self.polls == 3:
                raise asyncio.CancelledError()  # as grpc.aio raises it for a call whose channel was closed
            return WorkerReport(worker_id=worker_id, role="decode", total_blocks=8, free_blocks=8)

    async def run():
        b = Flaky()
        r = Router(RouterConfig(grpc_port=0, http_port=0, metrics_port=None, poll_interval_s=0.02, rebalance=False),
                   tiny(), ByteTokenizer(), b)
        task = asyncio.ensure_future(r._poll_loop())
        for _ in range(250):
            await asyncio.sleep(0.02)
            if b.polls >= 6:
                break
        assert b.polls >= 6 and not task.done()
        assert r.registry.state(r.registry.workers["decode-0"]) == "healthy"
        # the failed poll took it out (said once), and the next report put it back
        assert [m for m in caplog.messages if "decode-0 failed its health poll" in m] == \
            ["worker decode-0 failed its health poll: the call was cut before it answered (its channel was closed)"]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert task.cancelled()

    asyncio.run(run())
