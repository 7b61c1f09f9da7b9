"""The router's admission gauges after requests leave abnormally: a request refused at a full queue, one cancelled
while queued for admission and one whose deadline passes there leave ``colm:num_requests_waiting`` (and
``colm:num_requests_running``) at the idle service's values."""

import asyncio

import pytest

from colm.model import CoLM
from colm.presets import preset
from colm.router.admission import Overloaded
from colm.router.config import RouterConfig
from colm.router.core import DeadlineExceeded, Router
from colm.router.local_backend import LocalBackend
from colm.router.policy import Budget
from colm.tokenizer import ByteTokenizer


def test_admission_gauges_return_to_idle_after_refused_cancelled_and_expired_waiters():
    cfg = preset("tiny-air")
    model = CoLM(cfg).reset_parameters(seed=1).eval()
    router = Router(RouterConfig(grpc_port=0, http_port=None, max_running=1, max_queued=2), cfg, ByteTokenizer(),
                    LocalBackend(model))
    queued = router.metrics.queued._value.get
    running = router.metrics.running._value.get

    def spec(deadline_ms: float | None = None):
        budget = Budget(deadline_ms=deadline_ms) if deadline_ms else None
        return router.validate(None, "Hello, chains", {"max_new_tokens": 4}, budget)

    async def until(cond):
        for _ in range(500):
            if cond():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    async def run():
        await router.start()
        try:
            holder = router.generate(spec())
            assert (await anext(holder)).kind == "decision"  # holds the only slot while it is not read on
            waiters = [asyncio.ensure_future(anext(router.generate(spec()))) for _ in range(2)]
            await until(lambda: router.admission.num_queued == 2)
            assert queued() == 2
            with pytest.raises(Overloaded):  # the queue is full: refused, never queued
                await anext(router.generate(spec()))
            for w in waiters:  # clients gone while queued
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            assert router.admission.num_queued == 0
            assert queued() == 0
            with pytest.raises(DeadlineExceeded):  # its deadline passes while queued
                await anext(router.generate(spec(deadline_ms=100)))
            assert queued() == 0
            await holder.aclose()
            assert router.admission.num_running == 0 and running() == 0 and queued() == 0
        finally:
            await router.close()

    asyncio.run(run())
