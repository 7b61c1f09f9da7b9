"""Exceptions the serving engines raise, one per gRPC status they map to at the boundary.

Engines stay free of gRPC; each service's interceptor (``colm.proto.rpc``) maps these to status
codes: ``ValueError`` -> INVALID_ARGUMENT, ``CapacityError`` -> RESOURCE_EXHAUSTED,
``DeadlineError`` -> DEADLINE_EXCEEDED, ``UnknownRequestError`` -> NOT_FOUND, ``TransferError`` ->
DATA_LOSS, ``PeerUnavailableError`` -> UNAVAILABLE, ``RequestAbortedError`` -> CANCELLED,
``RequestFailedError`` -> ABORTED, ``EngineDeadError`` -> UNAVAILABLE, anything else -> INTERNAL. The router reads UNAVAILABLE as a worker that is
gone and ABORTED / INTERNAL as one request that failed on a worker that serves on.
"""

from __future__ import annotations


class CapacityError(RuntimeError):
    """Not enough KV blocks, queue slots or batch room for the request right now."""


class DeadlineError(TimeoutError):
    """A wait (KV arrival, queue, transfer) ran past its deadline."""


class UnknownRequestError(KeyError):
    """No request with this id is known to the worker (never reserved, or already finished)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown request"


class TransferError(RuntimeError):
    """The KV stream of a request was corrupt, truncated or inconsistent with its reservation."""


class PeerUnavailableError(ConnectionError):
    """The other worker could not be reached or died mid-transfer."""


class RequestAbortedError(RuntimeError):
    """The request was aborted (by the router or because its peer failed)."""


class RequestFailedError(RuntimeError):
    """This request failed inside the engine (its step, its sampling); the engine and its other requests go on."""


class NoTokenAllowedError(ValueError):
    """The request's own constraints (allowed token ids, a grammar or choice, min_tokens with its stop ids) leave no
    token allowed at some output position: the request's input is at fault (INVALID_ARGUMENT), not the worker."""


class EngineDeadError(RuntimeError):
    """The engine's loop ended with an error: the worker serves nothing more (its health fails, its requests end)."""
