"""``DecodeProcess``: a decode worker (engine + ``DecodeServer``) in a child process of this one
(``colm.spawn.WorkerProcess``, role "decode").

The cuda_ipc and cuda_pool hand-offs need decode in another process than prefill (CUDA IPC cannot open
a handle in the process that exported it); tests and benchmarks use this to run both on one GPU.
``factory(*args)`` builds the engine in the child (a module-level function, pickled by name).
"""

from __future__ import annotations

from colm.spawn import WorkerProcess


class DecodeProcess(WorkerProcess):
    def __init__(self, factory, args=(), cluster_token: str = "", address: str = "127.0.0.1:0",
                 start_timeout_s: float = 300.0) -> None:
        super().__init__("decode", factory, args, cluster_token, address, start_timeout_s)
