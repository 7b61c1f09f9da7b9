"""Changing the scale of running requests: a client's switch (``set_scale``, which pins the scale) and
rebalancing (``rebalance_once``, run by the poll loop with ``router.rebalance``: lower the scale of requests whose
per-token budget the current load breaks), and which scales this router serves at all (``router.fixed_scale``).

A switch updates the request's ``RunningRequest`` state (which a retry starts from) and then sends the scale to
the decode worker of the attempt running now (``Router.running``), under the request's scale lock, so that a
client's switch and a rebalancing move never race at the worker and the worker ends at the scale the state says.

A mixin of ``Router`` (``router/core.py``), which sets up the state it uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from colm.errors import UnknownRequestError
from colm.router.backend import WorkerFailed
from colm.router.request import DeadlineExceeded, UnknownRequest

log = logging.getLogger("colm.router")

SCALE_RESEND_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # a switch a live worker did not answer in time: sent again after


class ScaleControl:
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
            if await self._send_scale(u, request_id):
                # a live worker slow to answer (a long iteration, a graph captured): the switch holds, is answered,
                # and goes to the request's attempt again until a worker answers
                log.warning("request %s: its worker did not answer its scale switch in time; sending it again",
                            request_id)
                self._resend_scale(u, request_id)
        self.metrics.scale_changes.inc(moved)
        return scale

    async def _send_scale(self, uid: str, request_id: str) -> bool:
        """Send request ``uid``'s scale (its state's, now) to its attempt running now, under its scale lock (after a
        rebalancing move already on its way there, never beside it). True when the worker did not answer in time;
        False when it answered, or there was nothing to send it to."""
        lock = self._scale_locks.get(uid)
        if lock is None:  # it has ended meanwhile
            return False
        async with lock:
            state, attempt_id, decode_id = self.running.get(uid, (None, "", ""))
            if state is None:  # between attempts: the next one starts at the state's scale
                return False
            try:
                await self.backend.set_scale(decode_id, attempt_id, state.scale)
            except UnknownRequestError:
                # the worker holds no such attempt: it has just ended there (its last token is on the way), or the
                # attempt has not reached it yet (its first token sends the switch again: ``_serve``)
                pass
            except WorkerFailed as e:
                # the worker is gone (killed, restarting): out of service, and its attempts fail over now; the retry
                # starts at the state's scale
                log.warning("request %s: its scale switch did not reach its worker (%s); it fails over at scale %d",
                            request_id, e, state.scale)
                self._fail_inflight(e.worker_id)
            except DeadlineExceeded:
                return True
        return False

    def _resend_scale(self, uid: str, request_id: str) -> None:
        """Send request ``uid``'s scale (the state's at each try, so a later switch is never undone) to its attempt
        running then, after 0.5, 1, 2, 4 and 8 s, until a worker answers, the attempt has ended, or the tries run out
        (logged)."""
        async def run() -> None:
            for delay in SCALE_RESEND_DELAYS_S:
                await asyncio.sleep(delay)
                if not await self._send_scale(uid, request_id):
                    return
            log.error("request %s: its worker answered none of %d scale switches; it may run at its old scale",
                      request_id, len(SCALE_RESEND_DELAYS_S) + 1)

        task = asyncio.ensure_future(run())
        self._scale_resends.add(task)
        task.add_done_callback(self._scale_resends.discard)

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
                    # it failed over while the move was on its way: the retry started at the old scale, and its first
                    # token may have come (and found nothing to catch up) before the state said the new one
                    _, now_id, now_decode = self.running.get(uid, (None, attempt_id, ""))
                    if now_id != attempt_id:
                        await self.backend.set_scale(now_decode, now_id, scale)
