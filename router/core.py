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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from colm.router.admission import Admission
from colm.router.backend import Backend, EngineRequest, EngineToken, RequestFailed, WorkerFailed
from colm.router.config import RouterConfig
from colm.router.metrics import RouterMetrics
from colm.router.kv_wait import KVWaitQueue
from colm.router.placement import NoWorker, WorkerRegistry
from colm.router.policy import Budget, Decision, PolicyConfig, RunningRequest, ScalePolicy
from colm.router.worker_metrics import WorkerMetricsCollector
from colm.decode_worker.config import check_speculative
from colm.errors import UnknownRequestError
from colm.decode_worker.prefix_cache import MAX_CACHE_SALT, block_hashes
from colm.sampling import SamplingParams
from colm.logits_adjust import check_token_ids
from colm.proto.rpc import error_line
from colm.structured import compile_output
from colm.stopping import StopChecker
from colm.tokenizer import encode_prompt_within

log = logging.getLogger("colm.router")


def _poll_failure(e: BaseException, timeout_s: float) -> str:
    """Why a health poll failed, in one line: a timeout says so (its message is empty), any other error as
    ``error_line`` gives it."""
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer within router.poll_timeout_s={timeout_s:g} s"
    return error_line(e)[:300]


class DeadlineExceeded(Exception):
    pass


class Unavailable(Exception):
    pass


class UnknownRequest(LookupError):
    """No running request has the id (NOT_FOUND)."""


class RequestError(Exception):
    """The request failed on the workers, twice, while they serve on (INTERNAL): a bug, not an outage."""


@dataclass
class RequestSpec:
    """A validated request."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    budget: Budget = field(default_factory=Budget)
    scale: int | None = None  # pinned
    prompt_logprobs: bool = False
    speculative: int = 0  # chain-1 self-speculative decoding: drafts per round (0 = off)
    cache_salt: str = ""  # the prefix cache's namespace: K/V are shared only among requests of one salt
    arrival: float = field(default_factory=time.monotonic)
    deadline: float = 0.0  # absolute monotonic
    # the router's own id for the request, unique whatever ids clients send: workers, the registry and the
    # failover map key on it, so a client reusing a running request's id can never touch that request
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Event:
    """One step of a response: the decision first, then tokens, then the finish."""

    kind: str  # "decision" | "token" | "finish"
    decision: Decision | None = None
    token_id: int = 0
    text: str = ""
    scale: int = 0
    time_ms: float = 0.0
    logprob: float = 0.0
    drafted: bool = False  # an accepted chain-1 draft (speculative requests)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, log-prob) of the most likely tokens, if asked for
    finish_reason: str = ""
    prompt_logprobs: list[tuple[float, int, float]] | None = None  # (logprob, top id, top logprob)
    usage: dict | None = None


class Router:
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
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.backend.close()

    async def refresh_workers(self) -> None:
        known = set()
        for w in self.backend.workers():
            known.add(w.worker_id)
            was_dead = w.worker_id in self.registry.workers and self.registry.workers[w.worker_id].dead
            state = self.registry.add(w.worker_id, w.role, w.address, dead=w.dead)
            if w.dead and not was_dead:
                log.error("worker %s (%s) is out of service for good: %s", w.worker_id, w.role, w.dead)
                self._fail_inflight(state.worker_id)
            self.metrics.worker_dead.labels(w.worker_id, w.role).set(1 if w.dead else 0)
        for wid in list(self.registry.workers):
            if wid not in known:
                self.registry.remove(wid)
        self._update_health()

    def _fail_inflight(self, worker_id: str) -> None:
        """Take a worker out; requests in flight there retry elsewhere now, not at their timeout."""
        for rid in self.registry.mark_unhealthy(worker_id):
            fut = self._failovers.get(rid)
            if fut is not None and not fut.done():
                fut.set_result(worker_id)

    def started(self) -> None:
        """The service around this router is up: ``starting`` cleared and health re-evaluated (and published) now."""
        self.starting = None
        self._update_health()

    def stop_serving(self, reason: str) -> None:
        """The service is stopping: health says not serving, with ``reason``, from now on (published now)."""
        self.stopping = reason
        self._update_health()

    def health(self) -> tuple[bool, str]:
        """(whether a request can be served now, why not). Needs a healthy prefill AND a healthy decode worker, and
        the service up (``starting`` and ``stopping`` unset)."""
        missing = [why for why in (self.stopping, self.starting) if why]
        for role in ("prefill", "decode"):
            if self.registry.can_prefill() if role == "prefill" else self.registry.healthy(role):
                continue
            # a decode worker that has not reported yet may be one that prefills itself (colocated)
            states = [f"{w.worker_id}: {self._describe(w) if w.report or w.role == role else 'not reported yet'}"
                      for w in self.registry.workers.values()
                      if w.role == role or (role == "prefill" and (w.report is None or self.registry.prefills_itself(w)))]
            what = "worker that prefills (a prefill worker or a colocated decode worker)" if role == "prefill" \
                else "decode worker"
            missing.append(f"no healthy {what} ({', '.join(states) or 'none registered'})")
        return not missing, "; ".join(missing)

    def _describe(self, w) -> str:
        """A worker's state for the health reason, with why it is out where the registry knows (a stall)."""
        state = self.registry.state(w)
        return f"{state}, {w.stalled}" if state == "unhealthy" and w.stalled else state

    def worker_states(self) -> dict[str, str]:
        """Each registered worker's state as this router sees it: healthy | unhealthy | dead."""
        return {w.worker_id: self.registry.state(w) for w in self.registry.workers.values()}

    def _update_health(self) -> None:
        serving, why = self.health()
        self.metrics.serving.set(1 if serving else 0)
        if serving != self._serving:
            if serving:
                log.info("serving: every role has a healthy worker")
            elif self._serving is None and not any(w.report for w in self.registry.workers.values()):
                log.info("not serving yet (no worker has reported): %s", why)  # a colocated worker says so in its report
            elif self.stopping:
                log.info("not serving: %s", why)
            else:
                log.error("not serving: %s", why)
            self._serving = serving
            for listener in self.health_listeners:
                listener(serving)

    async def poll_once(self) -> None:
        async def one(w):
            try:
                r = await asyncio.wait_for(self.backend.poll(w.worker_id), timeout=self.cfg.poll_timeout_s)
            except Exception as e:  # any failure to answer takes the worker out until it reports again
                why = _poll_failure(e, self.cfg.poll_timeout_s)
                if w.healthy or self._poll_errors.get(w.worker_id) != why:  # once per new reason
                    log.warning("worker %s failed its health poll: %s", w.worker_id, why)
                self._poll_errors[w.worker_id] = why
                self._fail_inflight(w.worker_id)
                self.metrics.worker_healthy.labels(w.worker_id, w.role).set(0)
                return
            self._poll_errors.pop(w.worker_id, None)
            was_stalled = bool(w.stalled)
            self.registry.update(r)
            if w.stalled and not was_stalled:  # once per stall; it stays out until a report shows progress
                log.error("worker %s out of service until it makes progress: %s; %d requests in flight there",
                          w.worker_id, w.stalled, len(w.inflight))
            elif was_stalled and not w.stalled:
                log.warning("worker %s made progress again: back in service", w.worker_id)
            self.policy.observe([r])
            self.metrics.worker_healthy.labels(w.worker_id, w.role).set(1 if self.registry.state(w) == "healthy" else 0)
            self.metrics.observe_report(r)

        await asyncio.gather(*(one(w) for w in list(self.registry.workers.values()) if not w.dead))
        self._update_health()
        self.kv_queue.wake()  # new reports: the request at the head of the KV line may find room now

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_interval_s)
            try:
                await self.refresh_workers()
                await self.poll_once()
                if self.cfg.rebalance:
                    await self.rebalance_once()
            except Exception:  # the loop must outlive any one bad round
                log.exception("router poll loop")

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

    async def set_scale(self, request_id: str, scale: int) -> int:
        """A client's scale switch for its running request ``request_id`` (its own id, as echoed in responses).
        Applies from the decode worker's next step; pins the scale. Raises UnknownRequest / ValueError."""
        if isinstance(scale, bool) or not isinstance(scale, int):
            raise ValueError(f"scale={scale!r}: must be an integer in 1..{self.model_cfg.num_chains}")
        self.check_served_scale(scale)
        uids = {u for u in self._by_client_id.get(request_id, ()) if u in self._states}
        if not uids:
            raise UnknownRequest(f"request_id={request_id!r}: no running request has this id")
        moved = sum(self._states[u].scale != scale for u in uids)  # a switch to the scale it runs at moves nothing
        for u in uids:  # every sequence the id names (a completion's n choices and batched prompts share it)
            state = self._states[u]
            state.scale, state.pinned = scale, True  # a retry starts at it too; rebalancing leaves it alone
        for u in uids:
            lock = self._scale_locks.get(u)
            if lock is None:  # it has ended meanwhile
                continue
            async with lock:  # after a rebalancing move already on its way there, never beside it
                state, attempt_id, decode_id = self.running.get(u, (None, "", ""))
                if state is None:  # between attempts: the next one starts at the pinned scale
                    continue
                try:
                    await self.backend.set_scale(decode_id, attempt_id, state.scale)
                except UnknownRequestError:
                    # the worker holds no such attempt: it has just ended there (its last token is on the way), or
                    # the attempt has not reached it yet (its first token sends the switch again: ``_serve``)
                    pass
        self.metrics.scale_changes.inc(moved)
        return scale

    def served_scales(self) -> list[int]:
        """The scales this router serves: ``router.fixed_scale`` alone when set (the colocated baseline), else all."""
        return [self.cfg.fixed_scale] if self.cfg.fixed_scale else list(range(1, self.model_cfg.num_chains + 1))

    def check_served_scale(self, scale: int) -> None:
        """ValueError for a scale the model does not have, or one this router does not serve (``fixed_scale``)."""
        self.model_cfg.check_scale(scale)
        if self.cfg.fixed_scale and scale != self.cfg.fixed_scale:
            raise ValueError(f"scale={scale}: this service serves scale {self.cfg.fixed_scale} only "
                             f"(router.fixed_scale)")

    async def rebalance_once(self) -> None:
        """Lower the scale of running requests whose per-token budget the current load breaks (``policy.rebalance``).
        Each move goes to the request's attempt running when it is sent (a retry's, after a failover), and never to a
        request its client has pinned since (``set_scale``: the client's switch wins, also over a move on its way)."""
        moves = self.policy.rebalance([state for state, _, _ in self.running.values()])
        for uid, scale in moves.items():
            lock = self._scale_locks.get(uid)
            if lock is None:  # it has ended meanwhile
                continue
            async with lock:
                state, attempt_id, decode_id = self.running.get(uid, (None, "", ""))
                if state is None or state.pinned:  # between attempts, or its client pinned it while earlier moves went
                    continue
                with contextlib.suppress(Exception):
                    await self.backend.set_scale(decode_id, attempt_id, scale)
                    if state.pinned:  # its client switched it meanwhile: that switch, waiting for this lock, goes next
                        continue
                    state.scale = scale
                    self.metrics.scale_changes.inc()

    # ---- requests ------------------------------------------------------------------------------
    async def precompile(self, so) -> None:
        """Compile a request's structured output (a ``colm.structured.StructuredOutput`` or None) in a worker thread,
        so that ``validate``'s compile, on the event loop, finds it cached; a spec that does not compile is left to
        ``validate`` to refuse."""
        if so is None:
            return
        with contextlib.suppress(ValueError):
            await asyncio.get_running_loop().run_in_executor(None, compile_output, so, self.tokenizer,
                                                             self.model_cfg.vocab_size)

    def validate(self, prompt_ids: list[int] | None, text: bytes | str | None, params: SamplingParams | dict,
                 budget: Budget | None = None, scale: int | None = None, request_id: str = "",
                 prompt_logprobs: bool = False, speculative: int = 0, cache_salt: str = "") -> RequestSpec:
        """Build a RequestSpec or raise ValueError with a message naming the bad field."""
        cfg = self.model_cfg
        if isinstance(params, dict):
            params = SamplingParams(**params)
        if text is not None and prompt_ids:
            raise ValueError("give the prompt as text or as token ids, not both")
        if text is not None:
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"prompt text is not valid UTF-8 ({e.reason} at byte {e.start})") from None
            prompt_ids = encode_prompt_within(self.tokenizer, text, cfg.max_seq_len)
        prompt_ids = list(prompt_ids or [])
        if not prompt_ids:
            raise ValueError("prompt is empty: give at least one token")
        bad = [t for t in prompt_ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary 0..{cfg.vocab_size - 1}")
        check_token_ids(params, cfg.vocab_size)
        if params.structured is not None:  # a schema, regex or grammar that does not compile is the client's error
            compile_output(params.structured, self.tokenizer, cfg.vocab_size)
        if len(prompt_ids) + params.max_new_tokens > cfg.max_seq_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
                             f"the context of {cfg.max_seq_len} tokens")
        if scale is not None:
            self.check_served_scale(scale)
        if check_speculative(speculative) and not cfg.kv_sharing:
            raise ValueError(f"speculative={speculative}: chain-1 drafts need a CoLM-Air model (shared KV)")
        if not isinstance(cache_salt, str) or len(cache_salt) > MAX_CACHE_SALT:
            raise ValueError(f"cache_salt: must be a string of at most {MAX_CACHE_SALT} characters")
        budget = budget or Budget()
        now = time.monotonic()
        deadline_s = budget.deadline_ms / 1000 if budget.deadline_ms else self.cfg.default_deadline_s
        return RequestSpec(request_id or uuid.uuid4().hex, prompt_ids, params, budget, scale, prompt_logprobs,
                           speculative, arrival=now, deadline=now + deadline_s, cache_salt=cache_salt)

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
        return WorkerFailed(decode_id, f"no token for {self.cfg.token_timeout_s} s")

    async def _pick(self, spec: RequestSpec, prompt: list[int], total_len: int, failed: dict[str, float],
                    decode_only: bool = False, kv_give_up: float | None = None, refused: str = "") -> tuple:
        """(prefill worker, decode worker) for one attempt (``decode_only``: a decode worker twice, for a call that
        needs no prefill). A worker that failed this request is left out until it reports again (Ray restarted it).
        With no healthy worker of a role but one that may come back (not dead), wait for it within the request's
        deadline and ``worker_wait_s``: a single decode worker's restart costs its streams seconds, not their
        requests. With every decode pool full for now, wait in the KV line (``router/kv_wait.py``) until
        ``kv_give_up`` (default: ``kv_wait_s`` from now); ``refused``: why a worker refused the last pick as full (its
        report was behind): wait before picking again."""
        give_up = min(spec.deadline, time.monotonic() + self.cfg.worker_wait_s)
        if kv_give_up is None:
            kv_give_up = time.monotonic() + self.cfg.kv_wait_s
        digests: dict[int, list[bytes]] = {}  # block size -> the prompt's digests, for prefix affinity
        try:
            if refused:
                await self._wait_for_blocks(spec, kv_give_up, refused)
            while True:
                if not self.kv_queue.may_try(spec.uid):  # others wait for blocks ahead of it: in line behind them
                    await self._wait_for_blocks(spec, kv_give_up, "requests ahead of it wait for KV blocks")
                    continue
                placed = self._try_pick(spec, prompt, total_len, failed, decode_only, digests)
                if isinstance(placed, tuple):
                    return placed
                e = placed
                if e.full:  # every decode pool full for now: wait for blocks, first come first served
                    await self._wait_for_blocks(spec, kv_give_up, str(e))
                    continue
                decode_alone = decode_only or any(self.registry.prefills_itself(w)
                                                  for w in self.registry.workers.values())
                may_return = all(any(not w.dead for w in self.registry.workers.values() if w.role == role)
                                 for role in (("decode",) if decode_alone else ("prefill", "decode")))
                if not may_return or time.monotonic() + self.cfg.poll_interval_s > give_up:
                    raise Unavailable(f"request {spec.request_id}: {e}") from None
                await asyncio.sleep(self.cfg.poll_interval_s)
        finally:
            self.kv_queue.leave(spec.uid)

    async def _wait_for_blocks(self, spec: RequestSpec, give_up: float, why: str) -> None:
        """In the KV wait line until woken or a poll interval passes; DeadlineExceeded at the request's deadline,
        NoWorker(full) (RESOURCE_EXHAUSTED) once ``router.kv_wait_s`` is spent."""
        now = time.monotonic()
        if now >= spec.deadline:
            raise DeadlineExceeded(f"request {spec.request_id} passed its deadline waiting for KV blocks ({why})")
        if now >= give_up:
            raise NoWorker(f"request {spec.request_id}: {why} (waited router.kv_wait_s={self.cfg.kv_wait_s:g} s)",
                           full=True)
        self.kv_queue.join(spec.uid)
        await self.kv_queue.wait(spec.uid, min(self.cfg.poll_interval_s, give_up - now, spec.deadline - now))

    def _try_pick(self, spec: RequestSpec, prompt: list[int], total_len: int, failed: dict[str, float],
                  decode_only: bool, digests: dict[int, list[bytes]]):
        """(prefill, decode) workers, or the NoWorker that says why none could be picked now."""
        exclude = {wid for wid, t in failed.items()
                   if (w := self.registry.workers.get(wid)) is None or w.reported_at <= t}
        try:
            bs = self.registry.affinity_block_size(exclude)
            if bs and bs not in digests:  # as the worker will hash them: the prompt but its last token
                digests[bs] = block_hashes(prompt[:-1], bs, spec.cache_salt)
            decode = self.registry.pick_decode(total_len, exclude=exclude, digests=digests.get(bs))
            if decode_only or self.registry.prefills_itself(decode):  # colocated: it prefills the prompt itself
                return decode, decode
            try:
                return self.registry.pick_prefill(len(prompt), exclude=exclude), decode
            except NoWorker:  # the decode pick is not taken: its blocks must not count against the next try
                self.registry.unpick_decode(decode, total_len)
                raise
        except NoWorker as e:
            return e

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
