"""The background thread that runs an engine's loop: start it once, stop it (wake it, join it).

Engines (prefill, decode, the colocated baseline's full prefill) own one ``LoopThread``; their loop
checks ``stopping`` under the same condition variable that ``stop`` notifies.
"""

from __future__ import annotations

import threading
from typing import Callable


class LoopThread:
    def __init__(self, target: Callable[[], None], name: str, wake: threading.Condition,
                 join_timeout_s: float = 30.0) -> None:
        self.target, self.name, self.wake, self.join_timeout_s = target, name, wake, join_timeout_s
        self.stopping = False
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self.stopping = False
            self._thread = threading.Thread(target=self.target, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Ask the loop to end, wake it, and wait for it (at most ``join_timeout_s``)."""
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout_s)
            self._thread = None
