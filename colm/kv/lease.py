"""A grant's hold on a request's blocks: how long they stay out of the free list after the request ends.

Transports whose sender writes into decode's blocks itself (cuda_pool, nixl) get a grant of the request's blocks
(``DecodeEngine.grant_kv``) with a ``WriterLease``, made by their receiving half (``colm.kv.receivers``). The engine
keeps a held list and asks the lease; the rules are here:

* while the sender's stream is open, the blocks are held even if the request ended (its writes may still land);
  the lease's ``stop_writer`` (nixl: cancel the stream) is called once when the request ends first, so a silent
  sender holds them for the grace, not until its own deadline;
* a clean end (KVEnd after the writes were queued) frees them at once, or when the sender's ready event completes
  (cuda_pool in another process: the writes are queued on its device), at most ``ready_timeout_s`` later;
* a broken stream frees them after ``grace_s`` (a live sender may still have writes in flight).

Byte transports (grpc, shm, cuda_ipc) copy into the blocks themselves and need no lease.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("colm.kv")


def ready_state(event) -> str:
    """A sender's ready event: "done", "pending", or "failed" (it can no longer be queried: its writes will not run)."""
    try:
        return "done" if event.query() else "pending"
    except RuntimeError as e:
        log.warning("a KV ready event failed: %s", e)
        return "failed"


@dataclass(eq=False)
class WriterLease:
    grace_s: float                 # a broken stream: how long its queued writes may still land
    ready_timeout_s: float         # a clean end with a ready event: the longest its writes may take to run
    stop_writer: Callable[[], None] | None = None  # ends the sender's stream when the request ends first
    open: bool = True              # the sender's stream has not ended yet
    ready: object | None = None    # the sender's ready event, when its clean end came before its writes ran
    release_at: float | None = None  # set once the time the blocks may go is known

    def holds(self) -> bool:
        """Whether a request ending now must keep its blocks out of the free list."""
        return self.open or (self.ready is not None and ready_state(self.ready) == "pending")

    def request_ended(self, now: float | None = None) -> Callable[[], None] | None:
        """The request ended while ``holds()``: when its blocks may go, if known already (a pending ready event
        bounds it); returns the ``stop_writer`` to call, once, off the caller's lock (None if there is none)."""
        if not self.open:
            self.release_at = (time.monotonic() if now is None else now) + self.ready_timeout_s
            return None
        stop, self.stop_writer = self.stop_writer, None
        return stop

    def stream_ended(self, clean: bool, now: float | None = None) -> bool:
        """The sender's stream ended (``clean``: KVEnd after its writes were queued). False if it had ended already
        (the receiver's end and its RPC-end callback both report it)."""
        if not self.open:
            return False
        self.open, self.stop_writer = False, None
        wait = (self.ready_timeout_s if self.ready is not None else 0.0) if clean else self.grace_s
        self.release_at = (time.monotonic() if now is None else now) + wait
        return True

    def releasable(self, now: float | None = None) -> bool:
        """The held blocks may go back: the stream is over and its time came, or its ready event is no longer
        pending."""
        if self.open or self.release_at is None:
            return False
        return (time.monotonic() if now is None else now) >= self.release_at or \
            (self.ready is not None and ready_state(self.ready) != "pending")
