"""A router on a background event loop for tests (real gRPC and HTTP on loopback)."""

from __future__ import annotations

import asyncio
import threading


class BackgroundRouter:
    """Runs ``RouterServer(router)`` on its own loop in a thread; ``call(coro)`` runs a coroutine there."""

    def __init__(self, router) -> None:
        from colm.router.server import RouterServer

        self.router = router
        self.server = RouterServer(router)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.addresses = self.call(self.server.start())

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def grpc_addr(self) -> str:
        return self.addresses["grpc"]

    @property
    def http_url(self) -> str:
        return self.addresses["http"]

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def post_json(url: str, body, headers=None, raw: bytes | None = None):
    """POST and return (status, parsed JSON or text)."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text
