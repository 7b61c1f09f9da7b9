"""A backend over prefill and decode engines living in the router's process (no gRPC, no Ray).

Same request path as the gRPC backend, with direct calls: ``DecodeEngine.reserve`` ->
``PrefillEngine.submit`` with a ``LocalKVSink`` writing the chain-1 K/V straight into the decode
engine's reserved blocks -> ``DecodeEngine.start_generation`` whose token stream is read in a
thread and handed to the event loop. Used by tests (the disaggregated path without processes) and
by benchmarks on a machine without Ray. A stopped engine counts as a dead worker (``WorkerFailed``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import numpy as np

from colm.errors import CapacityError, EngineDeadError, RequestAbortedError, UnknownRequestError
from colm.logits_adjust import reads_prompt
from colm.router.backend import EngineRequest, EngineToken, RequestFailed, WorkerFailed, WorkerInfo, silent_worker
from colm.router.placement import NoWorker
from colm.router.metrics import report_timeline
from colm.router.policy import WorkerReport


class EngineBackend:
    def __init__(self, prefill: dict, decode: dict) -> None:
        self.prefill = dict(prefill)  # worker id -> PrefillEngine
        self.decode = dict(decode)  # worker id -> DecodeEngine
        self._prefills: dict[str, tuple[str, object]] = {}  # attempt id -> (prefill worker, its prefill's future)

    async def start(self) -> None:
        for e in list(self.prefill.values()) + list(self.decode.values()):
            e.start()

    async def close(self) -> None:
        for e in list(self.prefill.values()) + list(self.decode.values()):
            e.stop()

    def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo(w, "prefill") for w in self.prefill] + [WorkerInfo(w, "decode") for w in self.decode]

    async def poll(self, worker_id: str) -> WorkerReport:
        if worker_id in self.prefill:
            e = self.prefill[worker_id]
            if not e.alive():
                raise WorkerFailed(worker_id, "prefill engine stopped")
            return WorkerReport.of_prefill(worker_id, e.stats())
        e = self.decode[worker_id]
        if not e.alive():
            raise WorkerFailed(worker_id, "decode engine stopped")
        return WorkerReport.of_decode(worker_id, e.stats())

    async def generate(self, req: EngineRequest, prefill_id: str, decode_id: str) -> AsyncIterator[EngineToken]:
        from colm.prefill_worker.sinks import LocalKVSink

        de = self.decode[decode_id]
        loop = asyncio.get_running_loop()
        if not de.alive():
            raise WorkerFailed(decode_id, "decode engine stopped")
        colocated = prefill_id == decode_id  # the decode engine prefills the prompt itself
        try:
            de.reserve(req.request_id, len(req.prompt_ids), req.params.max_new_tokens, timeout_s=req.timeout_s,
                       prefill_tokens=req.prompt_ids[:-1] if colocated else None, cache_salt=req.cache_salt)
        except CapacityError as e:
            raise NoWorker(f"{decode_id}: {e}", full=True) from None
        except EngineDeadError as e:  # its loop ended between the health poll and this request
            raise WorkerFailed(decode_id, str(e)) from None
        finished = False
        try:
            if colocated:
                de.prefill_kv(req.request_id, req.prompt_ids[:-1], cache_salt=req.cache_salt)
            elif len(req.prompt_ids) > 1:
                fut = self.prefill[prefill_id].submit(req.request_id, list(req.prompt_ids),
                                                      LocalKVSink(de, req.request_id), timeout_s=req.timeout_s)
                fut.add_done_callback(lambda f: f.exception() and de.fail_kv(req.request_id, f.exception()))
                fut.add_done_callback(lambda f: _observe_prefill(f, req))
                self._prefills[req.request_id] = (prefill_id, fut)
            stream = de.start_generation(req.request_id, req.prompt_ids[-1], req.params, scale=req.scale,
                                         kv_timeout_s=req.timeout_s, speculative=req.speculative,
                                         context_ids=(np.asarray(req.prompt_ids[:-1])
                                                      if reads_prompt(req.params, req.prior_output)
                                                      and not colocated else None),
                                         prior_output=req.prior_output)
            it = iter(stream)
            done = object()
            while True:
                try:
                    ev = await loop.run_in_executor(None, next, it, done)
                except (RequestAbortedError, EngineDeadError) as e:
                    raise WorkerFailed(decode_id, str(e)) from None
                if ev is done:
                    finished = True
                    return
                report_timeline(req, "decode", ev.monotonic_s, ev.timeline_ms)
                yield EngineToken(ev.token_id, ev.scale, ev.logprob, ev.drafted, ev.top_logprobs)
                if ev.finish_reason:
                    finished = True
                    return
        except UnknownRequestError as e:
            # the reservation ran out before its prefill or start (its timeout is the request's time left: a deadline
            # of a few ms), or an abort raced them: the request's own fate, as a worker's NOT_FOUND is over gRPC
            raise RequestFailed(decode_id, f"NOT_FOUND: {e}") from None
        finally:
            self._prefills.pop(req.request_id, None)
            if not finished:
                with contextlib.suppress(Exception):
                    de.abort(req.request_id)

    def silence(self, request_id: str, decode_id: str, idle_s: float) -> WorkerFailed:
        """The failure of attempt ``request_id`` after ``idle_s`` without a token: its prefill engine's while that
        prefill has not finished (the decode engine waits for the K/V), else its decode engine's (as
        ``GrpcBackend.silence``). Asked by the router before it closes the attempt's stream."""
        return silent_worker(self._prefills, request_id, decode_id, idle_s)

    async def set_scale(self, decode_id: str, request_id: str, scale: int) -> None:
        self.decode[decode_id].set_scale(request_id, scale)

    async def reset_prefix_cache(self, decode_id: str) -> int:
        return self.decode[decode_id].reset_prefix_cache()

    async def abort(self, decode_id: str, request_id: str) -> None:
        self.decode[decode_id].abort(request_id)

    async def prompt_logprobs(self, decode_id: str, prompt_ids: list[int], scale: int):
        return await asyncio.get_running_loop().run_in_executor(None, self.decode[decode_id].score, list(prompt_ids),
                                                                scale)


def _observe_prefill(fut, req: EngineRequest) -> None:
    """A finished prefill's milestones (runs on the prefill's thread; prometheus metrics are thread-safe)."""
    # the colocated baseline's full-model prefill returns a byte count, not a PrefillResult: no timeline there
    r = fut.result() if fut.exception() is None else None
    if getattr(r, "timeline_ms", None):
        report_timeline(req, "prefill", r.monotonic_s, r.timeline_ms)
