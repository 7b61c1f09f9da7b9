"""``PrefillProcess``: a prefill worker (engine + ``PrefillServer``) in a child process of this one
(``colm.spawn.WorkerProcess``, role "prefill").

Benchmarks use it to time the hand-off with the prefill's forward in a process of its own, as a
deployment runs it; ``call(fn, ...)`` runs ``fn(engine, ...)`` there (e.g. the compute alone).
"""

from __future__ import annotations

from colm.spawn import WorkerProcess


class PrefillProcess(WorkerProcess):
    def __init__(self, factory, args=(), cluster_token: str = "", address: str = "127.0.0.1:0",
                 start_timeout_s: float = 300.0) -> None:
        super().__init__("prefill", factory, args, cluster_token, address, start_timeout_s)
