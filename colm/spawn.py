"""``WorkerProcess``: an engine and its gRPC server in a child process of this one.

Used where the workers must live in processes of their own on one machine: the CUDA IPC hand-offs
(a handle cannot be opened in the process that exported it), fault tests (a child can be killed) and
benchmarks that time the hand-off with nothing but the client in the calling process (as the router
runs: a forward must not share its interpreter's lock with the client's threads).

Path: the parent spawns the child (``multiprocessing`` "spawn": CUDA does not survive ``fork``) -> the
child builds the engine with ``factory(*args)`` (a module-level function, pickled by name), wraps it in
the role's server (``DecodeServer`` or ``PrefillServer``), starts it and sends its address back -> the
parent may ``call(fn, *args)``: the child runs ``fn(engine, *args)`` (module-level too) on its main
thread while the server keeps serving, and sends the result back (benchmarks time the engine alone this
way) -> ``stop()`` asks it to shut down; ``kill()`` is SIGKILL. The child also exits when the parent goes
away (its end of the pipe closes).
"""

from __future__ import annotations

import multiprocessing as mp
import traceback

ROLES = ("decode", "prefill")


def _server_class(role: str):
    if role == "decode":
        from colm.decode_worker.service import DecodeServer

        return DecodeServer
    from colm.prefill_worker.service import PrefillServer

    return PrefillServer


def _serve(conn, role: str, factory, args, cluster_token: str, address: str) -> None:
    try:
        server = _server_class(role)(factory(*args), cluster_token, address).start()
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("address", server.address))
    try:
        while True:
            msg = conn.recv()  # "stop", ("call", fn, args), or EOFError when the parent died
            if msg == "stop":
                break
            _, fn, call_args = msg
            try:
                conn.send(("result", fn(server.engine, *call_args)))
            except BaseException:  # noqa: BLE001 - the call failed, the worker serves on
                conn.send(("error", traceback.format_exc()))
    except (EOFError, OSError):
        pass
    server.stop(grace=0.5)


class WorkerProcess:
    """A ``role`` worker ("decode" or "prefill") serving on ``address`` in a spawned child."""

    def __init__(self, role: str, factory, args=(), cluster_token: str = "", address: str = "127.0.0.1:0",
                 start_timeout_s: float = 300.0) -> None:
        if role not in ROLES:
            raise ValueError(f"role={role!r}: must be one of {ROLES}")
        self.role = role
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, role, factory, tuple(args), cluster_token, address),
                                   name=f"colm-{role}-child", daemon=True)
        self.process.start()
        child.close()
        if not self._conn.poll(start_timeout_s):
            self.kill()
            raise TimeoutError(f"{role} child did not start within {start_timeout_s:.0f} s")
        kind, value = self._conn.recv()
        if kind == "error":
            self.process.join(10)
            raise RuntimeError(f"{role} child failed to start:\n{value}")
        self.address: str = value

    @property
    def pid(self) -> int:
        return self.process.pid

    def call(self, fn, *args, timeout_s: float = 300.0):
        """``fn(engine, *args)`` run in the child (``fn`` module-level, arguments and result picklable)."""
        self._conn.send(("call", fn, args))
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"{self.role} child: {getattr(fn, '__name__', fn)} gave no answer in {timeout_s:.0f} s")
        kind, value = self._conn.recv()
        if kind == "error":
            raise RuntimeError(f"{self.role} child: {getattr(fn, '__name__', fn)} failed:\n{value}")
        return value

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

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
