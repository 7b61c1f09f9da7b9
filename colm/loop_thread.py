"""The background thread that runs an engine's loop: start it once, stop it (wake it, join it).

Engines (prefill, decode, the colocated baseline's full prefill) own one ``LoopThread``; their loop
checks ``stopping`` under the same condition variable that ``stop`` notifies. A loop that ends with an exception
(a bug: engines catch each request's own failures) is recorded in ``error`` and logged, then each ``on_error``
callback runs with it: the engine fails what it holds and reports itself dead, and a worker process exits so that
its supervisor (Ray) restarts it.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from colm.errors import EngineDeadError

log = logging.getLogger(__name__)


class LoopThread:
    def __init__(self, target: Callable[[], None], name: str, wake: threading.Condition,
                 join_timeout_s: float = 30.0) -> None:
        self.target, self.name, self.wake, self.join_timeout_s = target, name, wake, join_timeout_s
        self.stopping = False
        self.error: BaseException | None = None  # what ended the loop, if it did not end by ``stop``
        self.on_error: list[Callable[[BaseException], None]] = []
        self._thread: threading.Thread | None = None

    def dead(self, what: str) -> EngineDeadError | None:
        """The error requests get once the loop has ended with one (``what``: the engine, for the message), else
        None."""
        return None if self.error is None else EngineDeadError(f"{what}: its loop ended with {self.error!r}")

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self.stopping = False
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
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
