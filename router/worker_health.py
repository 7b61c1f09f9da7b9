"""The router's view of its workers: the worker list, health polls, and the serving verdict.

A background task (``_poll_loop``) refreshes the worker list from the backend (a worker Ray gave up on is out for
good), polls every live worker for a report within ``router.poll_timeout_s`` and, with ``router.rebalance``, runs
a rebalancing round (``router/scale_control.py``). A report feeds placement (the registry), the latency model and
the metrics; a failed poll takes the worker out until it reports again and fails its requests in flight over at once
(``_fail_inflight`` sets their attempts' failover futures: ``router/attempt.py``). After each round the serving
verdict (``health``: a healthy worker that prefills and a healthy decode worker, the service neither starting nor
stopping) is published to the metrics and to ``health_listeners`` when it changes, and the head of the KV wait
line is woken.

A mixin of ``Router`` (``router/core.py``), which sets up the state it uses.
"""

from __future__ import annotations

import asyncio
import logging

from colm.proto.rpc import error_line
from colm.router.backend import cancelled_itself

log = logging.getLogger("colm.router")


def _poll_failure(e: BaseException, timeout_s: float) -> str:
    """Why a health poll failed, in one line: a timeout says so (its message is empty), any other error as
    ``error_line`` gives it."""
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer within router.poll_timeout_s={timeout_s:g} s"
    if isinstance(e, asyncio.CancelledError):
        return "the call was cut before it answered (its channel was closed)"
    return error_line(e)[:300]



class WorkerHealth:
    async def refresh_workers(self) -> None:
        known = set()
        for w in self.backend.workers():
            known.add(w.worker_id)
            was_dead = w.worker_id in self.registry.workers and self.registry.workers[w.worker_id].dead
            state = self.registry.add(w.worker_id, w.role, w.address, dead=w.dead)
            if w.dead and not was_dead:
                log.error("worker %s (%s) is out of service for good: %s", w.worker_id, w.role, w.dead)
                self._fail_inflight(state.worker_id)
                self.metrics.forget_load(w.worker_id)
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
            except (Exception, asyncio.CancelledError) as e:  # any failure to answer takes the worker out until it
                if isinstance(e, asyncio.CancelledError) and cancelled_itself():  # reports again; a cancellation
                    raise  # of this round (the router stopping) ends it
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
            except (Exception, asyncio.CancelledError) as e:  # the loop must outlive any one bad round; only its own
                if isinstance(e, asyncio.CancelledError) and cancelled_itself():  # cancellation (the router stopping)
                    raise  # ends it
                log.exception("router poll loop")
