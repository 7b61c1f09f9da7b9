"""The router's request path, independent of gRPC and HTTP.

A request's path: ``validate`` (ValueError -> INVALID_ARGUMENT) -> admission slot under the
request's deadline (Overloaded -> RESOURCE_EXHAUSTED) -> the policy picks the scale from the live
latency model (BudgetUnmet -> RESOURCE_EXHAUSTED) -> placement picks a prefill and a decode worker
-> the backend streams tokens, which the router checks for stop conditions and detokenizes
incrementally. If a worker dies mid-stream, the request is retried on other workers with the
tokens produced so far appended to the prompt, as long as its deadline and retry count allow.

Background tasks poll every worker for a report (feeding placement, the latency model and the
metrics; a failed poll takes the worker out) and lower the scale of running requests whose
per-token budget the current load breaks.

``Router`` holds the state every part shares, its lifecycle, and the request loop (``generate`` / ``_serve``); the
other parts are mixed in from modules of their own: ``router/request.py`` (the spec, events and errors),
``router/validation.py`` (``validate``), ``router/picking.py`` (an attempt's workers, the KV wait line),
``router/attempt.py`` (an attempt's bookkeeping, its watched stream, retries), ``router/scale_control.py`` (scale
switches and rebalancing) and ``router/worker_health.py`` (polls and the serving verdict).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import AsyncIterator

from colm.router.admission import Admission
from colm.router.attempt import Attempts
from colm.router.backend import Backend, EngineRequest, RequestFailed, WorkerFailed
from colm.router.config import RouterConfig
from colm.router.kv_wait import KVWaitQueue
from colm.router.metrics import RouterMetrics
from colm.router.picking import AttemptPicking
from colm.router.placement import NoWorker, WorkerRegistry
from colm.router.policy import Decision, PolicyConfig, RunningRequest, ScalePolicy
from colm.router.request import DeadlineExceeded, Event, RequestError, RequestSpec, Unavailable, UnknownRequest
from colm.router.scale_control import ScaleControl
from colm.router.validation import RequestValidation
from colm.router.worker_health import WorkerHealth
from colm.router.worker_metrics import WorkerMetricsCollector
from colm.stopping import StopChecker

log = logging.getLogger("colm.router")

# the request's types and errors live in router/request.py; the fronts and tests import them from here too
__all__ = ["DeadlineExceeded", "Event", "RequestError", "RequestSpec", "Router", "Unavailable", "UnknownRequest"]


class Router(WorkerHealth, ScaleControl, RequestValidation, AttemptPicking, Attempts):
    def __init__(self, cfg: RouterConfig, model_cfg, tokenizer, backend: Backend, block_size: int = 16) -> None:
        stream = getattr(backend, "token_stream", None)  # a backend that talks to workers says how they stream
        if stream is not None and stream != cfg.token_stream:
            raise ValueError(f"router.token_stream={cfg.token_stream!r}, but the backend was made with token_stream="
                             f"{stream!r}: make the backend from the router's config")
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.backend = backend
        self._poll_errors: dict[str, str] = {}  # worker -> why its last health poll failed
        self.policy = ScalePolicy(PolicyConfig.from_model(
            model_cfg, alpha=cfg.ewma_alpha, headroom=cfg.headroom, speculative=cfg.speculative,
            speculative_gammas=tuple(cfg.speculative_gammas), speculative_max_batch=cfg.speculative_max_batch))
        self.registry = WorkerRegistry(block_size=block_size, stale_after_s=max(10.0, 20 * cfg.poll_interval_s),
                                       affinity_balance=cfg.prefix_affinity_balance if cfg.prefix_affinity else None,
                                       stall_s=cfg.worker_stall_s)
        self.admission = Admission(cfg.max_running, cfg.max_queued)
        self.metrics = RouterMetrics(cfg.served_model_name)
        # requests waiting for KV blocks, first come first served
        self.kv_queue = KVWaitQueue(on_length=self.metrics.kv_waiting.set)
        self.metrics.registry.register(WorkerMetricsCollector(
            lambda: [(w.worker_id, w.metrics_url) for w in self.backend.workers() if not w.dead]))
        # uid -> (its state, the id and decode worker of its attempt running now: a retry runs under an id of its own)
        self.running: dict[str, tuple[RunningRequest, str, str]] = {}
        self._tasks: list[asyncio.Task] = []
        self._failovers: dict[str, asyncio.Future] = {}  # request id -> set to a worker id when it fails a poll
        self._serving: bool | None = None  # last health() verdict, None before the first
        self._by_client_id: dict[str, set[str]] = {}  # client request id -> uids of its running requests
        self._states: dict[str, RunningRequest] = {}  # uid -> its decoding state (scale), across retries
        # uid -> held while a scale change of the request is on its way to its worker (a client's switch, a rebalancing
        # move, a retry's catch-up), so that two never race there and the worker ends at the scale the state says
        self._scale_locks: dict[str, asyncio.Lock] = {}
        self._scale_resends: set[asyncio.Task] = set()  # switches sent again to a worker slow to answer them
        self.health_listeners: list = []  # called with the new verdict (bool) whenever it changes
        # set while the service around this router is not up yet (e.g. its router replicas do not listen yet): health
        # says not serving, with this reason, so clients that spread over the replicas do not connect to this one alone
        self.starting: str | None = None
        # set once the service stops (``stop_serving``): health says not serving, with this reason, from then on
        self.stopping: str | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start()
        await self.refresh_workers()
        await self.poll_once()
        self._tasks = [asyncio.create_task(self._poll_loop())]

    async def close(self) -> None:
        tasks = [*self._tasks, *self._scale_resends]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.backend.close()

    async def reset_prefix_cache(self) -> dict[str, int | str]:
        """Every live decode worker forgets its cached prefixes (and the router its prefix-affinity memory):
        {worker: idle blocks freed, or the error that worker answered}."""
        out: dict[str, int | str] = {}
        for w in self.backend.workers():
            if w.role != "decode" or w.dead:
                continue
            try:
                out[w.worker_id] = await self.backend.reset_prefix_cache(w.worker_id)
            except Exception as e:  # noqa: BLE001 - one worker's failure is its entry, the others still reset
                out[w.worker_id] = f"{type(e).__name__}: {e}"
            if self.registry.affinity is not None:
                self.registry.affinity.forget(w.worker_id)
        return out

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, spec: RequestSpec) -> AsyncIterator[Event]:
        """Stream a request's events. Raises Overloaded / BudgetUnmet / DeadlineExceeded / Unavailable."""
        status, scale = "error", 0
        self.metrics.queued.set(self.admission.num_queued + 1)
        self._by_client_id.setdefault(spec.request_id, set()).add(spec.uid)
        try:
            async with self.admission.slot(spec.deadline):
                self.metrics.queued.set(self.admission.num_queued)
                self.metrics.running.set(self.admission.num_running)
                decision = self.policy.choose(spec.budget, len(spec.prompt_ids), spec.params.max_new_tokens,
                                              pinned_scale=self.cfg.fixed_scale or spec.scale)
                scale = decision.scale
                if decision.degraded:
                    self.metrics.degraded.inc()
                async for ev in self._serve(spec, decision):
                    yield ev
                    if ev.kind == "finish":
                        status = "ok"
        except asyncio.TimeoutError:
            status = "deadline"
            raise DeadlineExceeded(f"request {spec.request_id} waited past its deadline for admission") from None
        except BaseException as e:
            status = {"Overloaded": "overloaded", "BudgetUnmet": "rejected", "DeadlineExceeded": "deadline",
                      "Unavailable": "unavailable", "CancelledError": "cancelled",
                      "GeneratorExit": "cancelled"}.get(type(e).__name__, "error")
            raise
        finally:
            uids = self._by_client_id.get(spec.request_id)
            if uids is not None:
                uids.discard(spec.uid)
                if not uids:
                    del self._by_client_id[spec.request_id]
            self._states.pop(spec.uid, None)
            self._scale_locks.pop(spec.uid, None)
            self.metrics.requests.labels(status, str(scale)).inc()
            self.metrics.running.set(self.admission.num_running)
            # a request refused at a full queue, or gone (cancelled, deadline) while queued, leaves the queue too
            self.metrics.queued.set(self.admission.num_queued)

    async def _serve(self, spec: RequestSpec, decision: Decision) -> AsyncIterator[Event]:
        yield Event("decision", decision=decision)
        if spec.prompt_logprobs:
            yield Event("prompt_logprobs", prompt_logprobs=await self._prompt_logprobs(spec, decision.scale))
        params = spec.params
        speculative = spec.speculative or decision.speculative  # the client's drafts per round, else the policy's
        out: list[int] = []
        # the request's stop rules over all its attempts; the text, O(window) per token. The engines get no stop
        # strings: only here is the whole text (colm.stopping says why both check)
        stopper = StopChecker(params, self.tokenizer.eos_id, self.tokenizer.decode)
        times: list[float] = []
        failed: dict[str, float] = {}  # worker id -> when it failed this request: out until it reports again
        retries = request_failures = drafted = 0
        state = self._states[spec.uid] = RunningRequest(spec.uid, decision.scale, spec.budget,
                                                         pinned=spec.scale is not None)
        scale_lock = self._scale_locks[spec.uid] = asyncio.Lock()
        finish = "length"
        kv_give_up, refused = time.monotonic() + self.cfg.kv_wait_s, ""  # waiting for KV blocks: until then
        while len(out) < params.max_new_tokens:
            left = spec.deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"request {spec.request_id} passed its deadline after {len(out)} tokens")
            prompt = spec.prompt_ids + out
            prefill, decode = await self._pick(spec, prompt, len(prompt) + params.max_new_tokens - len(out),
                                               failed, kv_give_up=kv_give_up, refused=refused)
            refused = ""
            attempt = retries + request_failures
            left = spec.deadline - time.monotonic()
            req = EngineRequest(f"{spec.uid}.{attempt}" if attempt else spec.uid, tuple(prompt),
                                replace(params, max_new_tokens=params.max_new_tokens - len(out), stop_strings=(),
                                        min_tokens=max(0, params.min_tokens - len(out))),
                                state.scale, left, self.tokenizer.eos_id, self.metrics.observe_phases,
                                speculative=speculative, cache_salt=spec.cache_salt, prior_output=len(out))
            failover = self._begin_attempt(spec, prefill.worker_id, decode.worker_id)
            self.running[spec.uid] = (state, req.request_id, decode.worker_id)
            watched = getattr(self.backend, "watches_tokens", False)
            if watched:  # the backend ends the stream on a failover, a silent worker or the deadline
                req = replace(req, failover=failover, token_timeout_s=self.cfg.token_timeout_s)
            stream = self.backend.generate(req, prefill.worker_id, decode.worker_id)
            attempt_start = len(out)
            try:
                while True:
                    if watched:
                        try:
                            tok = await anext(stream)
                        except StopAsyncIteration:
                            break
                    else:
                        tok = await self._next_watched(stream, spec, failover, req.request_id, decode.worker_id,
                                                       len(out))
                        if tok is None:
                            break
                    now_ms = (time.monotonic() - spec.arrival) * 1e3
                    if len(out) == attempt_start:
                        # this attempt's first token: its KV has reached the decode worker, the prefill worker is
                        # done with it, and its failing a health poll from now on must not fail the request over
                        if prefill is not decode:
                            self.registry.finish(prefill.worker_id, spec.uid)
                        if not out:  # the request's first token
                            self.metrics.prompt_tokens.inc(len(spec.prompt_ids))
                        if tok.scale != state.scale:  # a switch may have reached the worker before this attempt
                            async with scale_lock:
                                with contextlib.suppress(Exception):
                                    await self.backend.set_scale(decode.worker_id, req.request_id, state.scale)
                    out.append(tok.token_id)
                    times.append(now_ms)
                    reason = stopper.add(tok.token_id)  # a partial UTF-8 character waits for the token completing it
                    self.metrics.tokens.labels(str(tok.scale)).inc()
                    if tok.drafted:
                        drafted += 1
                        self.metrics.draft_accepted.inc()
                    yield Event("token", token_id=tok.token_id, text=stopper.delta, scale=tok.scale, time_ms=now_ms,
                                logprob=tok.logprob, drafted=tok.drafted, top_logprobs=tok.top_logprobs)
                    if reason:
                        finish = reason
                        break
                if finish != "stop" and len(out) < params.max_new_tokens:
                    finish = "stop"  # the engine ended early: it applied a stop condition of its own
                break
            except RequestFailed as e:  # the worker serves on: retry once, on any worker
                request_failures += 1
                self._request_failed(spec, e, request_failures, len(out))
            except WorkerFailed as e:
                retries += 1
                self._worker_failed(spec, e, failed, retries, len(out))
            except NoWorker as e:  # the worker refused its blocks: its last report said it had them; wait in line
                if not e.full or attempt_start != len(out) or time.monotonic() >= kv_give_up:
                    raise
                refused = str(e)
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()
                self.running.pop(spec.uid, None)
                self._end_attempt(spec, failover, prefill.worker_id, decode.worker_id)
        ttft = times[0] if times else 0.0
        total = (time.monotonic() - spec.arrival) * 1e3
        sc = str(decision.scale)
        if times:
            self.metrics.ttft.labels(sc).observe(ttft / 1e3)
            tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
            if tpot is not None:
                self.metrics.tpot.labels(sc).observe(tpot / 1e3)
            self.metrics.observe_token_times(sc, times)
            if (retries == 0 and state.scale == decision.scale and decision.scale in self.policy.model.step_ms
                    and not speculative):
                # a clean sample of the error of a prediction made from measurements (not from priors); rounds'
                # tokens come in bursts at another rate, so a speculative request is no sample of a plain step's
                m = self.policy.model
                m.observe_request(m.ttft_ms(decision.scale, len(spec.prompt_ids), corrected=False), ttft,
                                  m.tpot_ms(decision.scale, corrected=False), tpot)
        self.metrics.e2e.labels(sc).observe(total / 1e3)
        self.metrics.success.labels(finish, sc).inc()
        tail = stopper.finish()
        yield Event("finish", text=tail, finish_reason=finish,
                    usage={"prompt_tokens": len(spec.prompt_ids), "completion_tokens": len(out), "ttft_ms": ttft,
                           "total_ms": total, "retries": retries, "draft_accepted_tokens": drafted})
