"""Run a router: its gRPC service, the OpenAI-compatible HTTP front and the metrics port, on one loop.

``RouterServer.start()`` returns once everything listens; ``addresses`` says where. ``stop()`` drains first: health
says not serving and both fronts refuse new requests at once, the requests in flight on either front get
``router.drain_s`` together, and those left are cut with an error saying so (``router/drain.py``); then the servers
stop. ``end_drain()`` (a second stop signal) cuts the drain short. Used by the launcher (``colm serve``), by the GPU
load test (engines as plain processes) and by tests.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from colm.router.core import Router
from colm.router.drain import CUT_GRACE_S, Drain

log = logging.getLogger("colm.router")


class RouterServer:
    def __init__(self, router: Router) -> None:
        self.router = router
        self.grpc_server = None
        self.http_runner = None
        self.http_guard = None  # the HTTP front's connection limits (router/http_guard.py), once it listens
        self.metrics_server = None
        self.addresses: dict[str, str] = {}
        self.drain = Drain(router.cfg.drain_s)  # both fronts' requests in flight, and their shutdown

    async def start(self) -> dict[str, str]:
        try:
            return await self._start()
        except BaseException:
            await self.stop()  # whatever did start (router loop, gRPC) must not outlive a failed start
            raise

    async def _start(self) -> dict[str, str]:
        from colm.router.grpc_server import start_grpc

        cfg = self.router.cfg
        await self.router.start()
        self.grpc_server, port = await start_grpc(self.router, self.drain)
        self.addresses["grpc"] = f"{cfg.host}:{port}"
        if cfg.http_port is not None:
            from colm.router.http_api import start_http

            self.http_runner, hport, self.http_guard = await start_http(self.router, self.drain)
            scheme = "https" if cfg.tls_cert else "http"
            self.addresses["http"] = f"{scheme}://{cfg.host}:{hport}"
        if cfg.metrics_port is not None:
            from colm.router.metrics import serve_metrics

            # Its own host (loopback by default): metrics carry no API key, so router.host=0.0.0.0 must not expose them.
            self.metrics_server = serve_metrics(self.router.metrics.registry, cfg.metrics_host, cfg.metrics_port)
            mport = self.metrics_server[0].server_port
            self.addresses["metrics"] = f"http://{cfg.metrics_host}:{mport}/metrics"
        return self.addresses

    async def stop(self) -> None:
        """Drain (health not serving and new requests refused at once, ``router.drain_s`` for those in flight, the
        rest cut), then stop the servers and the router."""
        self.router.stop_serving(self.drain.begin())
        await self.drain.run()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=CUT_GRACE_S)
        if self.metrics_server is not None:
            self.metrics_server[0].shutdown()
        await self.router.close()

    def end_drain(self) -> None:
        """A second stop signal: the drain (``stop``) ends now, cutting what is in flight; on the server's loop."""
        self.drain.end()


class ThreadedRouterServer:
    """A RouterServer on its own event loop in a background thread (benchmarks, tests, a Ray router replica).

    ``call(coro)`` runs a coroutine on that loop and returns its result."""

    def __init__(self, router: Router) -> None:
        import asyncio

        self.router = router
        self.server = RouterServer(router)
        self.loop = asyncio.new_event_loop()
        self.executor = ThreadPoolExecutor(thread_name_prefix="colm-router-blocking")  # the loop's run_in_executor
        self.loop.set_default_executor(self.executor)
        self.thread = threading.Thread(target=self.loop.run_forever, name="colm-router", daemon=True)
        self.thread.start()
        try:
            self.addresses = self.call(self.server.start())
        except BaseException:
            self.end_loop()
            raise

    def call(self, coro, timeout: float = 60.0):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def grpc_addr(self) -> str:
        return self.addresses["grpc"]

    @property
    def http_url(self) -> str:
        return self.addresses["http"]

    def end_drain(self) -> None:
        """``RouterServer.end_drain`` on the server's loop, from any thread (a ``stop`` in progress ends soon after)."""
        self.loop.call_soon_threadsafe(self.server.end_drain)

    def stop(self) -> None:
        """Stop the server (its drain), then its loop and the loop's default executor."""
        self.call(self.server.stop(), timeout=self.router.cfg.drain_s + 60)
        self.end_loop()

    def end_loop(self) -> None:
        """Stop the loop (of a server stopped here or another way: a launcher's ``stop`` on it) and end its default
        executor. Its threads ran blocking work (``LocalBackend``'s model steps, tokenizing); left idle for the rest of
        the process, each kept an OpenMP team, and with more such threads than cores libgomp stops spinning and every
        later torch call of the process waits on futexes."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        # not loop.shutdown_default_executor(): that waits for work still running (a cut request's model steps); these
        # threads end once it is done, and queued work is cancelled
        if not self.thread.is_alive():
            self.executor.shutdown(wait=False, cancel_futures=True)
