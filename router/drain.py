"""Graceful shutdown of the router's fronts: one drain period for the requests in flight on gRPC and on HTTP.

``RouterServer.stop`` (SIGTERM or Ctrl-C in ``colm serve``) runs ``Drain.run`` before it stops any server. From its
start, both fronts refuse new requests with ``Drain.refusal`` (gRPC UNAVAILABLE, HTTP 503 and the connection closed)
while they still listen, so that health probes read "shutting down" (the router's health says so on every
interface: ``Router.stop_serving``); the requests in flight on either front get ``router.drain_s`` seconds, together,
to finish; those still running then are cut: cancelled, they answer ``Drain.cut`` (gRPC UNAVAILABLE; HTTP 503, or an
error event in a stream already under way). Only then do the servers stop. A second stop signal during the drain
(``Drain.end``: ``colm serve`` on a second SIGTERM or Ctrl-C) ends it at once: what is still in flight is cut then, the
same way, with a ``cut`` that says the drain was ended early.

A front serves each request inside ``with drain.serving() as call:`` (on the request's task: the one the cut
cancels), having checked ``drain.refusal`` first with no ``await`` in between, and in ``except
asyncio.CancelledError`` asks ``drain.cut_error()`` whether the cancellation is the cut (then it answers that error
instead of passing the cancellation on). While the request's task runs code of the server library that must not be
interrupted (grpc.aio writing a message the handler yielded: a cancellation there ends the call with no status), the
front sets ``call.outside``: the cut then only marks the call (``call.cut``), for the front to answer once its code
runs again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger("colm.router")

CUT_GRACE_S = 2.0  # how long the requests cut at the drain's end get to send their error


class Call:
    """A request in flight (``Drain.serving``)."""

    __slots__ = ("task", "outside", "cut", "cancelled")

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task
        self.outside = False  # the task runs the server library's code now: the cut must not cancel it
        self.cut: str | None = None  # the cut's error, once the drain period is over
        self.cancelled = False  # the cut cancelled the task (not yet absorbed)


class Drain:
    def __init__(self, drain_s: float) -> None:
        self.drain_s = drain_s
        self.refusal: str | None = None  # set once the drain starts: why a new request is refused
        self.cut = (f"router shutting down: the request did not finish within the drain period "
                    f"(router.drain_s={drain_s:g} s)")
        self._calls: dict[asyncio.Task, Call] = {}  # the requests in flight, by task
        self._ended = asyncio.Event()  # set by ``end``: the drain is over now, whatever is left

    @property
    def in_flight(self) -> int:
        return sum(not task.done() for task in self._calls)

    @contextlib.contextmanager
    def serving(self):
        """Around a request's whole handling, on the request's own task; yields its ``Call``."""
        call = Call(asyncio.current_task())
        self._calls[call.task] = call
        try:
            yield call
        finally:
            del self._calls[call.task]

    def cut_error(self) -> str | None:
        """In a request's ``except asyncio.CancelledError``: ``cut`` when the cancellation is the drain's cut (it is
        then absorbed: the request answers the error), None for any other (pass it on)."""
        call = self._calls.get(asyncio.current_task())
        if call is None or not call.cancelled:
            return None
        call.cancelled = False
        call.task.uncancel()
        return call.cut

    def begin(self) -> str:
        """Refuse new requests from now on; returns the refusal (the reason health gives too)."""
        if self.refusal is None:
            self.refusal = (f"router shutting down: not taking new requests (those in flight get "
                            f"router.drain_s={self.drain_s:g} s to finish)")
        return self.refusal

    def end(self) -> None:
        """End the drain now (a second stop signal): ``run`` cuts what is still in flight at once, with a ``cut`` that
        says the drain was ended early; before ``run``, it cuts as soon as it starts. Call it on the drain's loop."""
        if self._ended.is_set():
            return
        self.cut = (f"router shutting down: the request did not finish before a second stop signal ended the drain "
                    f"early (router.drain_s={self.drain_s:g} s)")
        self._ended.set()

    async def run(self) -> int:
        """``begin``; wait up to ``drain_s`` (or until ``end``) for the requests in flight, then cut the rest and give
        them ``CUT_GRACE_S`` to answer. Returns how many were cut."""
        self.begin()
        # the requests' tasks, not their ``serving`` blocks: a stream handler that grpc stopped driving (its client
        # went away) ends its block only when the generator is collected
        tasks = [task for task in self._calls if not task.done()]
        if tasks and not self._ended.is_set():
            log.info("shutting down: %d request(s) in flight get up to %g s to finish (router.drain_s)", len(tasks),
                     self.drain_s)
            finished = asyncio.ensure_future(asyncio.wait(tasks))  # waiting for them cancels none of them
            ended = asyncio.ensure_future(self._ended.wait())
            try:
                await asyncio.wait({finished, ended}, timeout=self.drain_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                finished.cancel()
                ended.cancel()
        left = [call for call in self._calls.values() if not call.task.done()]
        if left:
            why = "a second stop signal ended the drain" if self._ended.is_set() else \
                f"router.drain_s={self.drain_s:g} s passed"
            log.warning("shutting down: cutting %d request(s) still in flight: %s", len(left), why)
            for call in left:
                call.cut = self.cut
                if not call.outside:
                    call.cancelled = True
                    call.task.cancel()
            await asyncio.wait([c.task for c in left], timeout=CUT_GRACE_S)
        return len(left)
