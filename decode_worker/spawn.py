"""``DecodeProcess``: a decode worker (engine + ``DecodeServer``) in a child process of this one.

The cuda_ipc hand-off needs decode in another process than prefill (CUDA IPC cannot open a handle
in the process that exported it); tests and benchmarks use this to run both on one GPU. Path: the
parent spawns the child (``multiprocessing`` "spawn": CUDA does not survive ``fork``) -> the child
builds the engine with ``factory(*args)`` (a module-level function, pickled by name), starts the
server and sends its address back -> ``stop()`` asks it to shut down; ``kill()`` is SIGKILL (fault
tests). The child also exits when the parent goes away (its end of the pipe closes).
"""

from __future__ import annotations

import multiprocessing as mp
import traceback


def _serve(conn, factory, args, cluster_token: str, address: str) -> None:
    try:
        from colm.decode_worker.service import DecodeServer

        server = DecodeServer(factory(*args), cluster_token, address).start()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("address", server.address))
    try:
        conn.recv()  # "stop", or EOFError when the parent died
    except (EOFError, OSError):
        pass
    server.stop(grace=0.5)


class DecodeProcess:
    def __init__(self, factory, args=(), cluster_token: str = "", address: str = "127.0.0.1:0",
                 start_timeout_s: float = 300.0) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, factory, tuple(args), cluster_token, address),
                                   name="colm-decode-child", daemon=True)
        self.process.start()
        child.close()
        if not self._conn.poll(start_timeout_s):
            self.kill()
            raise TimeoutError(f"decode child did not start within {start_timeout_s:.0f} s")
        kind, value = self._conn.recv()
        if kind == "error":
            self.process.join(10)
            raise RuntimeError(f"decode child failed to start:\n{value}")
        self.address: str = value

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process.is_alive():
            try:
                self._conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.kill()
        self._conn.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.join(10)

    def __enter__(self) -> "DecodeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
