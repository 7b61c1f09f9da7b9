"""The request's scale lock (``Router._scale_locks``) under load, over real engines in process: many requests at once,
clients switching them (to the scale they run at too, and racing their end), rebalancing at a high rate, decode
attempts failing mid-request (retries with a catch-up switch), clients leaving and deadlines passing. Every request
ends, every switch answers promptly, nothing is left behind, and greedy tokens equal ``colm generate`` replaying the
scales the tokens report."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace

import pytest

pytest.importorskip("colm.decode_worker.engine")

from colm import checkpoint  # noqa: E402
from colm.decode_worker.config import DecodeConfig  # noqa: E402
from colm.decode_worker.engine import DecodeEngine  # noqa: E402
from colm.generate import generate  # noqa: E402
from colm.model import CoLM  # noqa: E402
from colm.prefill_worker.engine import PrefillEngine  # noqa: E402
from colm.presets import preset  # noqa: E402
from colm.router.backend import RequestFailed, WorkerFailed  # noqa: E402
from colm.router.config import RouterConfig  # noqa: E402
from colm.router.core import Router  # noqa: E402
from colm.router.engine_backend import EngineBackend  # noqa: E402
from colm.router.request import DeadlineExceeded, UnknownRequest  # noqa: E402
from colm.sampling import SamplingParams  # noqa: E402
from colm.tokenizer import ByteTokenizer  # noqa: E402


class FailingBackend(EngineBackend):
    """``fail[attempt id] = (n, exception class)``: that attempt fails after n tokens (the engine serves on)."""

    def __init__(self, prefill, decode) -> None:
        super().__init__(prefill, decode)
        self.fail: dict[str, tuple[int, type]] = {}

    async def generate(self, req, prefill_id, decode_id):
        n, exc = self.fail.pop(req.request_id, (0, None))
        got = 0
        async for tok in super().generate(req, prefill_id, decode_id):
            yield tok
            got += 1
            if got == n:
                raise exc(decode_id, "injected failure")


def test_switches_rebalancing_failovers_cancels_and_deadlines_at_once(tmp_path):
    path = str(tmp_path)
    checkpoint.save(CoLM(preset("tiny-air")).reset_parameters(seed=7), path, tokenizer={"kind": "byte"})
    tok = ByteTokenizer()
    rng = random.Random(11)

    async def main():
        backend = FailingBackend({"prefill-0": PrefillEngine.from_checkpoint(path)},
                                 {f"decode-{i}": DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=256))
                                  for i in range(2)})
        router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.01, rebalance=True,
                                     max_retries=3), checkpoint.load_config(path), tok, backend)
        # rebalancing moves every unpinned request to a random scale, each round (the poll loop's and ours)
        router.policy.rebalance = lambda running: {r.request_id: rng.randint(1, 2) for r in running if not r.pinned}
        await router.start()
        specs, kinds = [], {}
        for i in range(14):
            kind = ["plain", "plain", "worker-fails", "request-fails", "cancel", "deadline", "shared"][i % 7]
            cid = "shared" if kind == "shared" else f"r{i}"
            spec = router.validate(None, f"prompt {i} " * (1 + i % 3), SamplingParams(max_new_tokens=24 + i,
                                   ignore_eos=True), scale=2 if i % 4 == 0 else None, request_id=cid)
            if kind == "deadline":
                spec = replace(spec, deadline=time.monotonic() + 0.3)
            elif kind == "worker-fails":
                backend.fail[spec.uid] = (3 + i % 5, WorkerFailed)
                backend.fail[f"{spec.uid}.1"] = (2, WorkerFailed)  # and its retry too (a second catch-up)
            elif kind == "request-fails":
                backend.fail[spec.uid] = (4, RequestFailed)
            specs.append(spec)
            kinds[spec.uid] = kind

        events: dict[str, list] = {}
        ended: dict[str, str] = {}

        async def read(spec):
            out = events[spec.uid] = []
            try:
                async for ev in router.generate(spec):
                    out.append(ev)
                    if kinds[spec.uid] == "cancel" and len(out) == 6:
                        raise asyncio.CancelledError  # the client leaves mid-stream
                ended[spec.uid] = "finish"
            except asyncio.CancelledError:
                ended[spec.uid] = "cancelled"
            except DeadlineExceeded:
                ended[spec.uid] = "deadline"

        switch_times: list[float] = []
        stop = asyncio.Event()

        async def switcher(seed):
            r = random.Random(seed)
            while not stop.is_set():
                cid = r.choice([s.request_id for s in specs])
                t0 = time.monotonic()
                try:
                    assert await asyncio.wait_for(router.set_scale(cid, r.randint(1, 2)), 3) in (1, 2)
                except UnknownRequest:  # not running yet, or ended (a switch racing the end)
                    pass
                switch_times.append(time.monotonic() - t0)
                await asyncio.sleep(r.random() * 0.01)

        async def rebalancer():
            while not stop.is_set():
                await asyncio.wait_for(router.rebalance_once(), 3)
                await asyncio.sleep(0.002)

        helpers = [asyncio.ensure_future(switcher(s)) for s in range(3)] + [asyncio.ensure_future(rebalancer())]
        try:
            readers = [asyncio.ensure_future(read(s)) for s in specs]
            done, pending = await asyncio.wait(readers, timeout=60)
            assert not pending, [kinds[s.uid] for s, r in zip(specs, readers) if r in pending]
            for r in done:
                r.result()
            await asyncio.sleep(0.05)  # switches racing the ends keep coming
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*helpers), 5)
            await router.close()
        assert switch_times and max(switch_times) < 3
        assert router._scale_locks == {} and router.running == {} and router._states == {}
        assert router._by_client_id == {} and router._failovers == {}
        return specs, kinds, events, ended

    specs, kinds, events, ended = asyncio.run(asyncio.wait_for(main(), 120))
    model = checkpoint.load(path).eval()
    checked = 0
    for spec in specs:
        if ended[spec.uid] != "finish":
            assert kinds[spec.uid] in ("cancel", "deadline"), (kinds[spec.uid], ended[spec.uid])
            continue
        toks = [(e.token_id, e.scale) for e in events[spec.uid] if e.kind == "token"]
        assert len(toks) == spec.params.max_new_tokens
        scales = [s for _, s in toks]
        want = generate(model, list(spec.prompt_ids), SamplingParams(max_new_tokens=len(toks), ignore_eos=True),
                        scale_schedule=lambda i, scales=scales: scales[i], eos_id=tok.eos_id).token_ids
        assert [t for t, _ in toks] == want, (kinds[spec.uid], scales)
        checked += 1
    assert checked >= 8
    assert {kinds[s.uid] for s in specs if ended[s.uid] == "finish"} >= {"plain", "worker-fails", "request-fails"}
