"""The background thread that runs an engine's loop: start it once, stop it (wake it, join it).

Engines (prefill, decode, the colocated baseline's full prefill) own one ``LoopThread``; their loop
checks ``stopping`` under the same condition variable that ``stop`` notifies. A loop that ends with an exception
(a bug: engines catch each request's own failures) is recorded in ``error`` and logged, then each ``on_error``
callback runs with it: the engine fails what it holds and reports itself dead, and a worker process exits so that
its supervisor (Ray) restarts it.

A loop that does not end but stops moving (a step that never returns, as a hung device sync looks) is seen by its
progress stamp: the loop ``beat``s whenever it gets somewhere (an iteration ended, a prompt chunk ran) and waits for
work in ``idle_wait``. ``stalled_s`` is how long it has gone without a beat while it runs an iteration and its engine
has work: the engines report it in their Stats, and the router takes a worker out while it exceeds
``router.worker_stall_s``. Long work inside one iteration that is progress (a CUDA graph captured on first use, a
kernel tuned) calls ``progress()`` from the loop's thread; warm-up before ``start`` is not the loop's and never counts.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from colm.errors import EngineDeadError

log = logging.getLogger(__name__)
_current = threading.local()  # .runner: the LoopThread whose loop runs on this thread


def progress() -> None:
    """The loop running on the calling thread, if any, made progress inside an iteration (a CUDA graph captured, a
    kernel tuned): its stall clock starts again. A no-op on any other thread."""
    runner = getattr(_current, "runner", None)
    if runner is not None:
        runner.beat()


def _count_tunings_as_progress() -> None:
    """A kernel tuned inside a loop's iteration (a new shape) is that loop's progress (imported here, when an engine
    starts a loop: the kernels do not depend on the serving side)."""
    from colm.kernels import _tuning

    if progress not in _tuning.TUNED_HOOKS:
        _tuning.TUNED_HOOKS.append(progress)


class LoopThread:
    def __init__(self, target: Callable[[], None], name: str, wake: threading.Condition,
                 join_timeout_s: float = 30.0) -> None:
        self.target, self.name, self.wake, self.join_timeout_s = target, name, wake, join_timeout_s
        self.stopping = False
        self.error: BaseException | None = None  # what ended the loop, if it did not end by ``stop``
        self.on_error: list[Callable[[BaseException], None]] = []
        self._thread: threading.Thread | None = None
        self._beat = time.monotonic()  # the loop's last progress (monotonic s)
        self._idle = False  # the loop waits for work in ``idle_wait``

    def dead(self, what: str) -> EngineDeadError | None:
        """The error requests get once the loop has ended with one (``what``: the engine, for the message), else
        None."""
        return None if self.error is None else EngineDeadError(f"{what}: its loop ended with {self.error!r}")

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            _count_tunings_as_progress()
            self.stopping = False
            self.beat()  # warm-up before the start is no stall
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def beat(self) -> None:
        """The loop made progress: an iteration (a step, a batch, a prompt chunk) ended, or work inside one did."""
        self._beat = time.monotonic()

    def idle_wait(self, timeout: float | None = None) -> None:
        """``wake.wait(timeout)`` (the caller holds ``wake``) as the loop's wait for work: no stall while in it, and
        a beat when it ends (the loop is back)."""
        self._idle = True
        try:
            self.wake.wait(timeout)
        finally:
            self.beat()
            self._idle = False

    def stalled_s(self, has_work: bool) -> float:
        """Seconds the loop has gone without progress while its engine has work (``has_work``): since its last beat,
        while it runs (started, not stopping, not ended) and is not waiting for work; else 0."""
        if not has_work or self._idle or self._thread is None or self.stopping or self.error is not None:
            return 0.0
        return max(0.0, time.monotonic() - self._beat)

    def _run(self) -> None:
        _current.runner = self
        try:
            self.target()
        except BaseException as e:  # noqa: BLE001 - recorded and reported: health must stop saying alive
            self.error = e
            log.critical("%s: the loop ended with an error; this engine serves nothing more", self.name, exc_info=True)
            for callback in list(self.on_error):
                try:
                    callback(e)
                except Exception:  # noqa: BLE001 - one callback's failure must not skip the others
                    log.exception("%s: a callback on the loop's error failed", self.name)

    def stop(self) -> None:
        """Ask the loop to end, wake it, and wait for it (at most ``join_timeout_s``)."""
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout_s)
            self._thread = None


class LoopOwner:
    """What an engine whose loop is a ``LoopThread`` in ``self._runner`` says of that loop's death; ``loop_owner``
    names the engine in the error."""

    loop_owner = "engine"
    _runner: LoopThread

    def on_loop_error(self, callback: Callable[[BaseException], None]) -> None:
        """``callback(exc)`` runs (on the loop's thread) if the loop ends with an error, after the engine has failed
        what it held (a worker process exits there, so that Ray restarts it)."""
        self._runner.on_error.append(callback)

    def check_alive(self) -> None:
        """EngineDeadError once the loop has ended with an error (health answers fail from then on)."""
        if (err := self._runner.dead(self.loop_owner)) is not None:
            raise err

    def stall(self, work: int) -> tuple[float, int]:
        """(seconds the loop has made no progress while holding ``work`` requests, those requests): at most a step's
        time while it progresses, (0.0, 0) while it waits for work or holds none. What Stats report, for the router's
        ``worker_stall_s``."""
        stalled = self._runner.stalled_s(work > 0)
        return (stalled, work) if stalled > 0 else (0.0, 0)
