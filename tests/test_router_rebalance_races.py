"""Rebalancing (``Router.rebalance_once``) against the other things that change a running request's scale, with the
interleavings forced step by step over a scripted backend (no model, no network):

* after a failover the request runs under its retry's attempt id (``<uid>.1``): a move reaches that attempt, on the
  worker it now runs on (it was looked up by the first attempt's id, found nothing and was silently dropped); a move
  whose reply comes back only after the retry's first token reaches the retry too (the router took the scale as moved
  while the retry decoded at the old one to its end);
* a client's switch (``set_scale``) pins the scale: a move already decided for the request, or already on its way to
  the worker, never leaves the worker or the router at another scale than the client's."""

from __future__ import annotations

import asyncio

from colm.presets import preset
from colm.router.backend import EngineToken, WorkerFailed, WorkerInfo
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.policy import WorkerReport
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer

END = object()  # fed to an attempt: its stream ends (the request finished on the worker)


class ScriptedBackend:
    """One prefill worker p0, decode workers d0 and d1. Each attempt streams what the test feeds it (a token id,
    an exception to raise, or ``END``). ``set_scale`` applies a scale when its call returns, as a worker's reply
    says it applied it; ``held`` (scale -> Event) holds a call to that scale until the test releases it."""

    def __init__(self) -> None:
        self.feeds: dict[str, asyncio.Queue] = {}  # attempt id -> what it streams next
        self.placed: dict[str, str] = {}  # attempt id -> its decode worker
        self.scales: dict[str, int] = {}  # attempt id -> the scale the worker decodes it at
        self.calls: list[tuple[str, str, int]] = []  # set_scale calls: (decode worker, attempt id, scale)
        self.held: dict[int, asyncio.Event] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def workers(self):
        return [WorkerInfo("p0", "prefill"), WorkerInfo("d0", "decode"), WorkerInfo("d1", "decode")]

    async def poll(self, wid):
        if wid == "p0":
            return WorkerReport(wid, "prefill")
        return WorkerReport(wid, "decode", free_blocks=1000, total_blocks=1000)

    async def generate(self, req, prefill_id, decode_id):
        feed = self.feeds[req.request_id] = asyncio.Queue()
        self.placed[req.request_id], self.scales[req.request_id] = decode_id, req.scale
        try:
            while True:
                item = await feed.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield EngineToken(item, self.scales[req.request_id])
        finally:
            self.placed.pop(req.request_id, None)

    async def set_scale(self, decode_id, request_id, scale):
        self.calls.append((decode_id, request_id, scale))
        if scale in self.held:
            await self.held[scale].wait()
        if self.placed.get(request_id) == decode_id:
            self.scales[request_id] = scale

    async def abort(self, *a):
        pass


async def _until(cond, timeout: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < end, "timed out"
        await asyncio.sleep(0.001)


async def _router() -> tuple[Router, ScriptedBackend]:
    backend = ScriptedBackend()
    router = Router(RouterConfig(grpc_port=0, http_port=None, max_retries=3), preset("tiny-air"), ByteTokenizer(),
                    backend)
    await router.refresh_workers()
    await router.poll_once()  # no poll loop: nothing but the test moves a scale
    # the policy's rule (every unpinned request one scale down), so that the test decides when a move is due
    router.policy.rebalance = lambda running: {r.request_id: 1 for r in running if not r.pinned and r.scale > 1}
    return router, backend


def _start(router: Router, client_id: str) -> tuple[str, asyncio.Task]:
    """A request of ``client_id`` the router starts at scale 2, not pinned: (its uid, the task that reads its
    events)."""
    spec = router.validate([5, 6, 7], None, SamplingParams(max_new_tokens=50, ignore_eos=True), request_id=client_id)

    async def read():
        return [ev async for ev in router.generate(spec)]

    return spec.uid, asyncio.ensure_future(read())


async def _finish(backend: ScriptedBackend, attempt_id: str, reader: asyncio.Task) -> list:
    backend.feeds[attempt_id].put_nowait(END)
    return await asyncio.wait_for(reader, 5)


def test_a_move_after_a_failover_reaches_the_retried_attempt():
    async def main():
        router, backend = await _router()
        uid, reader = _start(router, "retried")
        await _until(lambda: uid in backend.feeds)
        assert backend.scales[uid] == 2
        first_worker = backend.placed[uid]
        backend.feeds[uid].put_nowait(65)
        backend.feeds[uid].put_nowait(WorkerFailed(first_worker, "gone"))  # the attempt fails over
        retry = f"{uid}.1"
        await _until(lambda: retry in backend.placed)
        backend.feeds[retry].put_nowait(66)
        await _until(lambda: backend.feeds[retry].empty())
        await router.rebalance_once()
        assert backend.calls == [(backend.placed[retry], retry, 1)] and backend.placed[retry] != first_worker
        assert backend.scales[retry] == 1 and router._states[uid].scale == 1
        backend.feeds[retry].put_nowait(67)
        events = await _finish(backend, retry, reader)
        assert [(e.token_id, e.scale) for e in events if e.kind == "token"] == [(65, 2), (66, 2), (67, 1)]

    asyncio.run(main())


def test_a_client_switch_made_while_a_move_of_the_same_request_is_on_its_way_wins():
    async def main():
        router, backend = await _router()
        uid, reader = _start(router, "switched")
        await _until(lambda: uid in backend.feeds)
        backend.feeds[uid].put_nowait(65)
        backend.held[1] = asyncio.Event()  # the move to scale 1 is on its way to the worker until released
        move = asyncio.ensure_future(router.rebalance_once())
        await _until(lambda: backend.calls)
        switch = asyncio.ensure_future(router.set_scale("switched", 2))  # the client pins scale 2 meanwhile
        await asyncio.sleep(0.01)
        backend.held[1].set()
        assert await asyncio.wait_for(switch, 5) == 2
        await asyncio.wait_for(move, 5)
        assert backend.scales[uid] == 2, backend.calls  # the worker ends at the client's scale
        state = router._states[uid]
        assert state.scale == 2 and state.pinned  # and so does the router (a retry would start there)
        await router.rebalance_once()  # pinned: left alone from now on
        assert backend.scales[uid] == 2 and router._states[uid].scale == 2
        await _finish(backend, uid, reader)

    asyncio.run(main())


def test_a_request_pinned_while_an_earlier_move_of_the_round_is_on_its_way_is_not_moved():
    async def main():
        router, backend = await _router()
        first, reader_a = _start(router, "a")
        second, reader_b = _start(router, "b")
        await _until(lambda: first in backend.feeds and second in backend.feeds)
        backend.held[1] = asyncio.Event()
        move = asyncio.ensure_future(router.rebalance_once())  # decides both moves, sends one, then the other
        await _until(lambda: backend.calls)
        held_id = backend.calls[0][1]
        other_client = "b" if held_id == first else "a"
        other = second if held_id == first else first
        assert await router.set_scale(other_client, 2) == 2  # the other request's client pins it meanwhile
        backend.held[1].set()
        await asyncio.wait_for(move, 5)
        assert backend.scales[held_id] == 1 and router._states[held_id].scale == 1  # the move sent is kept
        assert backend.scales[other] == 2 and router._states[other].scale == 2, backend.calls
        assert (backend.placed[other], other, 1) not in backend.calls
        await _finish(backend, first, reader_a)
        await _finish(backend, second, reader_b)

    asyncio.run(main())


def test_a_move_whose_reply_comes_after_a_failover_reaches_the_retried_attempt():
    """A move the worker applied, whose reply comes back only after the attempt failed over and its retry (started at
    the old scale) sent its first token: the router must not take the scale as moved while the retry runs at the old
    one (its state said 1, the worker decoded at 2 until the end: no later round moved it, as it 'was' at 1)."""
    async def main():
        router, backend = await _router()
        uid, reader = _start(router, "late-reply")
        await _until(lambda: uid in backend.feeds)
        backend.feeds[uid].put_nowait(65)
        await _until(lambda: backend.feeds[uid].empty())
        reply = asyncio.Event()
        real = backend.set_scale

        async def applied_then_late(decode_id, request_id, scale):  # the worker applies it; its reply is late
            await real(decode_id, request_id, scale)
            if request_id == uid:
                await reply.wait()

        backend.set_scale = applied_then_late
        move = asyncio.ensure_future(router.rebalance_once())
        await _until(lambda: backend.calls)
        assert backend.scales[uid] == 1
        backend.feeds[uid].put_nowait(WorkerFailed(backend.placed[uid], "gone"))  # fails over meanwhile
        retry = f"{uid}.1"
        await _until(lambda: retry in backend.placed)
        assert backend.scales[retry] == 2  # the router's state still said 2 when the retry started
        backend.feeds[retry].put_nowait(66)  # the retry's first token, at 2: nothing to catch up yet
        await _until(lambda: backend.feeds[retry].empty())
        await asyncio.sleep(0.01)
        reply.set()
        await asyncio.wait_for(move, 5)
        assert router._states[uid].scale == backend.scales[retry], backend.calls
        backend.feeds[retry].put_nowait(67)
        events = await _finish(backend, retry, reader)
        assert [(e.token_id, e.scale) for e in events if e.kind == "token"] == [(65, 2), (66, 2), (67, 1)]

    asyncio.run(main())
