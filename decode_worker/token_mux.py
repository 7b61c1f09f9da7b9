"""Batched token delivery: every request of one subscriber (a router) on one stream, one message per step.

The per-request path (``TokenStream``) costs one gRPC message, one handler-thread wake-up and, on the router,
one awaited read per generated token: at 64 running requests that is 64 messages per decode step, each
taking the GIL from the step loop. A subscriber opens one ``Subscription`` instead; requests started for it
get a ``MuxStream`` whose events collect in the subscriber's pending list, and the step loop hands the whole
list over once per step (``flush``): one wake-up and one message per step however large the batch.

A request's failure travels as an event carrying the exception (the service turns it into a status code and
message); a subscriber that goes away ends with ``close`` and the engine aborts its requests.
"""

from __future__ import annotations

import threading
from typing import Iterator

from colm.decode_worker.request import TokenEvent


class Subscription:
    """One subscriber's queue of event lists. Iterating yields each flushed list (``TokenEvent`` or
    ``(request_id, exception)`` items) until ``close``."""

    def __init__(self, subscriber: str) -> None:
        self.subscriber = subscriber
        self._cond = threading.Condition(threading.Lock())
        self._pending: list = []
        self._ready = False  # the pending list has been flushed (or holds a failure): wake the reader
        self._closed = False

    def add(self, item, wake: bool) -> None:
        with self._cond:
            if self._closed:
                return
            self._pending.append(item)
            if wake:
                self._ready = True
                self._cond.notify()

    def flush(self) -> None:
        with self._cond:
            if self._pending and not self._ready:
                self._ready = True
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    @property
    def closed(self) -> bool:
        return self._closed

    def next_batch(self, timeout_s: float | None = None) -> list | None:
        """The flushed items (possibly empty after ``timeout_s``), or None once closed."""
        with self._cond:
            if not self._ready and not self._closed:
                self._cond.wait(timeout_s)
            if self._closed:
                return None
            items, self._pending, self._ready = self._pending, [], False
            return items

    def __iter__(self) -> Iterator[list]:
        while True:
            items = self.next_batch()
            if items is None:
                return
            if items:
                yield items


class MuxStream:
    """A request's stream into its subscriber's pending list (the engine's ``push`` / ``close`` calls)."""

    __slots__ = ("request_id", "sub")

    def __init__(self, request_id: str, sub: Subscription) -> None:
        self.request_id, self.sub = request_id, sub

    def push(self, ev: TokenEvent) -> None:
        self.sub.add(ev, wake=False)  # the step loop flushes once per step

    def close(self, exc: BaseException | None = None) -> None:
        if exc is not None:  # a normal end was the last token's finish_reason already
            self.sub.add((self.request_id, exc), wake=True)


class TokenMux:
    """The engine's subscribers by id. ``open`` replaces an older subscription of the same id (a router that
    reconnected): the old one ends, and requests keep their stream object, which points at the old one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, Subscription] = {}

    def open(self, subscriber: str) -> Subscription:
        if not subscriber:
            raise ValueError("subscriber: must be a non-empty id")
        sub = Subscription(subscriber)
        with self._lock:
            old = self._subs.get(subscriber)
            self._subs[subscriber] = sub
        if old is not None:
            old.close()
        return sub

    def remove(self, sub: Subscription) -> None:
        with self._lock:
            if self._subs.get(sub.subscriber) is sub:
                del self._subs[sub.subscriber]
        sub.close()

    def get(self, subscriber: str) -> Subscription | None:
        with self._lock:
            return self._subs.get(subscriber)

    def flush(self) -> None:
        with self._lock:
            subs = list(self._subs.values())
        for sub in subs:
            sub.flush()
