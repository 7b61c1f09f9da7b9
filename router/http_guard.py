"""The HTTP front's connection limits: a deadline for every request head, and caps on open connections.

aiohttp reads a request's head with no time limit and accepts connections until the process runs out of file
descriptors: clients sending one header byte every few seconds on thousands of connections (slowloris) kept them
all open, and at the descriptor limit every other client was locked out (and each refused accept was logged). No
API key helps: the key is read from a head that never completes.

``ConnectionGuard`` hooks the aiohttp ``Server``'s per-connection callbacks (``attach``):
- a connection that would pass ``router.http_max_connections`` open in all, or
  ``router.http_max_connections_per_client`` from one address, is answered 503 and closed as it opens;
- a connection gets ``router.http_head_timeout_s`` to deliver a complete request head, from its opening and
  again from the end of each response (a keep-alive connection idle that long is closed, as servers do); the
  app's middleware reports each head (``head_received``) and each response's end (``response_done``).
A response being written has no deadline (a token stream may run for minutes).

``quiet_client_errors`` keeps malformed requests (a request line or header past aiohttp's 8190 bytes, bad HTTP)
from flooding the log: aiohttp logged each with an ERROR and its traceback; they are the client's fault, so each
is one INFO line, at most ``ClientErrorLogFilter.per_minute`` a minute (the rest counted in the next line).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections import Counter

log = logging.getLogger("colm.router")

RESERVED_FDS = 1024  # descriptors kept for gRPC, workers, files and logs when the cap follows the process limit


def default_max_connections() -> int:
    """The process's open-file limit less ``RESERVED_FDS`` (at least 64)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, (soft if soft != resource.RLIM_INFINITY else 65536) - RESERVED_FDS)


def _refusal(status: str, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "overloaded", "param": None,
                                 "code": int(status.split()[0])}}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\nRetry-After: 1\r\n\r\n").encode() + body


class ConnectionGuard:
    def __init__(self, head_timeout_s: float, max_connections: int, max_per_client: int, metrics=None) -> None:
        self.metrics = metrics  # RouterMetrics (its http_* series), or None
        self.head_timeout_s = head_timeout_s
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.open: dict[object, str] = {}  # aiohttp request handler (one per connection) -> client address
        self.per_client: Counter = Counter()
        self.num_refused = 0
        self.num_timed_out = 0
        self._timers: dict[object, asyncio.TimerHandle] = {}
        self._transports: dict[object, asyncio.Transport] = {}

    def attach(self, server) -> None:
        """Wrap ``server``'s (an aiohttp ``web.Server``) connection callbacks."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler, transport) -> None:
            made(handler, transport)
            try:
                admit(handler, transport)
            except Exception:  # noqa: BLE001 - a fault of the guard must not break the HTTP front
                log.exception("HTTP connection guard failed; the connection is served unguarded")

        def admit(handler, transport) -> None:
            peer = transport.get_extra_info("peername")
            client = str(peer[0]) if peer else "?"
            full = len(self.open) >= self.max_connections
            if full or self.per_client[client] >= self.max_per_client:
                self.num_refused += 1
                cap = "http_max_connections" if full else "http_max_connections_per_client"
                which = f"router.{cap}"
                if self.metrics is not None:
                    self.metrics.http_refused.labels(cap).inc()
                transport.write(_refusal("503 Service Unavailable", f"too many open connections ({which}); "
                                                                    "retry later or reuse a connection"))
                transport.close()
                return
            self.open[handler] = client
            self.per_client[client] += 1
            self._transports[handler] = transport
            self._count()
            self._arm(handler)

        def connection_lost(handler, exc=None) -> None:
            lost(handler, exc)
            try:
                release(handler)
            except Exception:  # noqa: BLE001
                log.exception("HTTP connection guard failed to release a connection")

        def release(handler) -> None:
            client = self.open.pop(handler, None)
            if client is not None:
                self.per_client[client] -= 1
                if self.per_client[client] <= 0:
                    del self.per_client[client]
            self._transports.pop(handler, None)
            timer = self._timers.pop(handler, None)
            if timer is not None:
                timer.cancel()
            self._count()

        server.connection_made = connection_made
        server.connection_lost = connection_lost

    def head_received(self, request) -> None:
        """A request's head is complete (the app's middleware runs): no deadline while it is served."""
        timer = self._timers.pop(request.protocol, None)
        if timer is not None:
            timer.cancel()

    def response_done(self, request) -> None:
        """The response ended: the connection's next head is due within ``head_timeout_s``."""
        if request.protocol in self.open:
            self._arm(request.protocol)

    def timed_out(self) -> None:
        """A connection closed for a late request head or body."""
        self.num_timed_out += 1
        if self.metrics is not None:
            self.metrics.http_timed_out.inc()

    def _count(self) -> None:
        if self.metrics is not None:
            self.metrics.http_connections.set(len(self.open))

    def _arm(self, handler) -> None:
        old = self._timers.pop(handler, None)
        if old is not None:
            old.cancel()
        self._timers[handler] = asyncio.get_running_loop().call_later(self.head_timeout_s, self._expire, handler)

    def _expire(self, handler) -> None:
        self._timers.pop(handler, None)
        transport = self._transports.get(handler)
        if transport is not None and not transport.is_closing():
            self.timed_out()
            transport.close()


class ClientErrorLogFilter(logging.Filter):
    """On ``aiohttp.server``: a record of a client's malformed request (an ``HttpProcessingError`` of status 4xx)
    becomes one INFO line without its traceback, at most ``per_minute`` of them a minute; other records pass."""

    def __init__(self, per_minute: int = 10) -> None:
        super().__init__()
        self.per_minute = per_minute
        self._window = 0.0
        self._shown = 0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or not 400 <= (exc.code or 0) < 500:
            return True
        now = time.monotonic()
        if now - self._window >= 60.0:
            self._window, self._shown = now, 0
        if self._shown >= self.per_minute:
            self.suppressed += 1
            return False
        self._shown += 1
        first = str(exc.message).splitlines()[0][:200] if exc.message else type(exc).__name__
        more = f" ({self.suppressed} more not logged)" if self.suppressed else ""
        self.suppressed = 0
        record.msg, record.args = "%s: %s %s%s", (record.getMessage(), exc.code, first, more)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        return True


def quiet_client_errors() -> ClientErrorLogFilter:
    """Install ``ClientErrorLogFilter`` on ``aiohttp.server`` once per process; returns it."""
    logger = logging.getLogger("aiohttp.server")
    for f in logger.filters:
        if isinstance(f, ClientErrorLogFilter):
            return f
    f = ClientErrorLogFilter()
    logger.addFilter(f)
    return f
