"""One attempt of a request on its workers, and what its failure means.

An attempt starts with ``_begin_attempt``: its workers count it in flight, and it gets a failover future that a
health poll sets when it takes one of them out (``router/worker_health.py``). Its tokens come through
``_next_watched`` (unless the backend watches its own streams): WorkerFailed on a failover or a silent worker
(``_silence`` asks the backend whom to blame), DeadlineExceeded at the deadline. It ends with ``_end_attempt``. A
failure is turned into a retry or the request's error: a worker that failed (``_worker_failed``) is left out of the
request's next picks and out of service until it reports again, up to ``router.max_retries``; a request that failed
on a worker that serves on (``_request_failed``) is retried once. ``_prompt_logprobs`` scores the prompt as a whole
attempt of its own, with the same guarantees.

A mixin of ``Router`` (``router/core.py``), which sets up the state it uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from colm.router.backend import EngineToken, RequestFailed, WorkerFailed, silent_worker
from colm.router.request import DeadlineExceeded, RequestError, RequestSpec, Unavailable

log = logging.getLogger("colm.router")


class Attempts:
    async def _next_watched(self, stream, spec: RequestSpec, failover: asyncio.Future, attempt_id: str,
                            decode_id: str, num_out: int) -> EngineToken | None:
        """The stream's next token (None at its end), watched here: WorkerFailed when a health poll takes one
        of the attempt's workers out or no token comes for ``token_timeout_s`` (naming the worker the backend
        says is silent: ``_silence``); DeadlineExceeded at the deadline. A backend that watches its own streams
        (``watches_tokens``) skips this task per token."""
        left = spec.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(f"request {spec.request_id} passed its deadline after {num_out} tokens")
        next_tok = asyncio.ensure_future(anext(stream))
        silence = None
        try:
            await asyncio.wait({next_tok, failover}, timeout=min(left, self.cfg.token_timeout_s),
                               return_when=asyncio.FIRST_COMPLETED)
            if not next_tok.done():  # asked before the cancel below ends the attempt's stream (and its prefill call)
                silence = self._silence(attempt_id, decode_id)
        finally:
            if not next_tok.done():  # cancelled mid-wait, or no token in time: the stream must not run on
                next_tok.cancel()
                with contextlib.suppress(BaseException):
                    await next_tok
        if next_tok.cancelled():
            if failover.done():  # a health poll took one of this attempt's workers out
                raise WorkerFailed(failover.result(), "failed its health check")
            if left <= self.cfg.token_timeout_s:
                raise DeadlineExceeded(f"request {spec.request_id} passed its deadline")
            raise silence or self._silence(attempt_id, decode_id)
        try:
            return next_tok.result()
        except StopAsyncIteration:
            return None

    def _silence(self, attempt_id: str, decode_id: str) -> WorkerFailed:
        """The failure of an attempt without a token for ``token_timeout_s``: whom the backend blames (``silence``: a
        prefill worker whose Prefill has not finished, not the decode worker waiting for its K/V), else the decode
        worker."""
        blame = getattr(self.backend, "silence", None)
        if blame is not None:
            return blame(attempt_id, decode_id, self.cfg.token_timeout_s)
        return silent_worker({}, attempt_id, decode_id, self.cfg.token_timeout_s)

    def _worker_failed(self, spec: RequestSpec, e: WorkerFailed, failed: dict[str, float], retries: int,
                       done: int) -> None:
        """Attempt ``retries`` of ``spec`` failed on worker ``e.worker_id``: leave the worker out of this request's
        next picks and out of service until it reports again; Unavailable past ``max_retries``."""
        self.metrics.retries.inc()
        failed[e.worker_id] = time.monotonic()
        w = self.registry.workers.get(e.worker_id)
        was_healthy = w is not None and w.healthy
        inflight = self.registry.mark_unhealthy(e.worker_id)
        if was_healthy:  # once per outage, not once per request that meets it
            log.warning("worker %s taken out of service (%s); %d requests in flight there", e.worker_id, e,
                        len(inflight))
        self._update_health()
        if retries > self.cfg.max_retries:
            raise Unavailable(f"request {spec.request_id}: {e}; gave up after {retries - 1} retries") from None
        log.warning("request %s: %s; retrying (%d) with %d tokens done", spec.request_id, e, retries, done)

    def _request_failed(self, spec: RequestSpec, e: RequestFailed, failures: int, done: int) -> None:
        """The request failed for the ``failures``-th time on a worker that serves on: retried once, on any worker;
        RequestError the second time."""
        self.metrics.retries.inc()
        if failures > 1:
            raise RequestError(f"request {spec.request_id} {e}; it failed twice, not retried again") from None
        log.warning("request %s %s; retrying with %d tokens done", spec.request_id, e, done)

    def _begin_attempt(self, spec: RequestSpec, *worker_ids: str) -> asyncio.Future:
        """An attempt of ``spec`` on ``worker_ids`` starts: they count it in flight, and the returned future gets the
        id of one of them that a health poll takes out meanwhile (``_fail_inflight``)."""
        for wid in worker_ids:
            self.registry.start(wid, spec.uid)
        failover = self._failovers[spec.uid] = asyncio.get_running_loop().create_future()
        return failover

    def _end_attempt(self, spec: RequestSpec, failover: asyncio.Future, *worker_ids: str) -> None:
        self._failovers.pop(spec.uid, None)
        if not failover.done():
            failover.cancel()
        for wid in worker_ids:
            self.registry.finish(wid, spec.uid)

    async def _prompt_logprobs(self, spec: RequestSpec, scale: int) -> list[tuple[float, int, float]]:
        """The prompt's log-probs at ``scale`` from a decode worker, with a generation attempt's guarantees: within
        the request's deadline; a worker that fails the call or a health poll meanwhile is left out and the call
        retried on another (or on it once Ray restarted it), up to ``max_retries``; a request failure once."""
        failed: dict[str, float] = {}
        retries = request_failures = 0
        while True:
            _, decode = await self._pick(spec, spec.prompt_ids, len(spec.prompt_ids), failed, decode_only=True)
            failover = self._begin_attempt(spec, decode.worker_id)
            call = asyncio.ensure_future(self.backend.prompt_logprobs(decode.worker_id, spec.prompt_ids, scale))
            try:
                await asyncio.wait({call, failover}, timeout=max(0.0, spec.deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
                if call.done():
                    return call.result()
                if failover.done():
                    raise WorkerFailed(failover.result(), "failed its health check")
                raise DeadlineExceeded(f"request {spec.request_id} passed its deadline scoring its prompt")
            except RequestFailed as e:
                request_failures += 1
                self._request_failed(spec, e, request_failures, 0)
            except WorkerFailed as e:
                retries += 1
                self._worker_failed(spec, e, failed, retries, 0)
            finally:
                if not call.done():
                    call.cancel()
                    with contextlib.suppress(BaseException):
                        await call
                self._end_attempt(spec, failover, decode.worker_id)
