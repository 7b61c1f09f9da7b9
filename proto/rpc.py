"""gRPC plumbing shared by the internal services: cluster-token auth, error mapping, size limits.

``make_server(address, cluster_token, ...)`` builds a ``grpc.server`` whose interceptor rejects calls
without the cluster token (constant-time compare, UNAUTHENTICATED) and maps engine exceptions to
status codes (see ``colm.errors``), logging the request id. ``make_channel`` sets the same explicit
message-size limits on the client side; ``auth_metadata`` is the metadata every client call sends.
"""

from __future__ import annotations

import hmac
import logging
from concurrent import futures

import grpc

from colm.errors import (CapacityError, DeadlineError, EngineDeadError, PeerUnavailableError, RequestAbortedError,
                         RequestFailedError, TransferError, UnknownRequestError)

log = logging.getLogger("colm.rpc")

TOKEN_KEY = "x-colm-cluster-token"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # KV chunks are a few MiB; anything near this is a bug or an attack
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]

# Order matters: subclasses before their bases (UnknownRequestError is a KeyError, DeadlineError a TimeoutError).
_STATUS = [
    (UnknownRequestError, grpc.StatusCode.NOT_FOUND),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (TransferError, grpc.StatusCode.DATA_LOSS),
    (PeerUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (EngineDeadError, grpc.StatusCode.UNAVAILABLE),
    (RequestAbortedError, grpc.StatusCode.CANCELLED),
    (RequestFailedError, grpc.StatusCode.ABORTED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
]


def error_line(e: BaseException) -> str:
    """An error as one line for a log or a message: a gRPC error (anything with ``code()`` and ``details()``) as
    "CODE: details" (its str() is a multi-line dump), anything else as "Type: message"."""
    code, details = getattr(e, "code", None), getattr(e, "details", None)
    if callable(code) and callable(details):
        why = f"{getattr(code(), 'name', code())}: {details() or ''}"
    else:
        why = f"{type(e).__name__}: {e}"
    return " ".join(why.split())


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        return grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.UNAVAILABLE else code
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def auth_metadata(cluster_token: str) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_KEY, cluster_token),)


def _request_id(request) -> str:
    return getattr(request, "request_id", "") or "-"


class ServiceInterceptor(grpc.ServerInterceptor):
    """Token check on every call, then engine exceptions -> gRPC status codes."""

    def __init__(self, cluster_token: str) -> None:
        if not cluster_token:
            raise ValueError("cluster_token is empty: internal endpoints always require one")
        self._token = cluster_token.encode()

    def intercept_service(self, continuation, details):
        sent = dict(details.invocation_metadata or ()).get(TOKEN_KEY, "")
        sent = sent.encode() if isinstance(sent, str) else sent
        handler = continuation(details)
        if not hmac.compare_digest(sent, self._token):
            return _deny(handler)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary, method),
                                                       handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(handler.stream_unary, method),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(handler.unary_stream, method),
                                                        handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(_wrap_stream(handler.stream_stream, method),
                                                     handler.request_deserializer, handler.response_serializer)


def _deny(handler):
    """A handler of the method's own kind that refuses the call before reading anything: a streaming call given a
    unary one (the old refusal) waited for a request message its caller may never send first."""
    def deny(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")

    def deny_stream(request_or_iterator, context):
        deny(request_or_iterator, context)
        yield  # a generator: the streaming handler's shape

    if handler is not None and handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler is not None and handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    if handler is not None and handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


def _fail(context, method: str, request, exc: BaseException):
    code = status_for(exc)
    level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
    log.log(level, "%s request_id=%s -> %s: %s", method, _request_id(request), code.name, exc,
            exc_info=code == grpc.StatusCode.INTERNAL)
    context.abort(code, f"{type(exc).__name__}: {exc}")


def _wrap_unary(fn, method):
    def wrapped(request, context):
        try:
            return fn(request, context)
        except Exception as exc:  # noqa: BLE001 - the boundary maps every failure to a status
            if _already_aborted(exc, context):
                raise
            _fail(context, method, request, exc)

    return wrapped


def _wrap_stream(fn, method):
    def wrapped(request, context):
        try:
            yield from fn(request, context)
        except Exception as exc:  # noqa: BLE001
            if _already_aborted(exc, context):
                raise
            _fail(context, method, request, exc)

    return wrapped


def _already_aborted(exc: BaseException, context) -> bool:
    """The handler called ``context.abort``: its exception carries the handler's own status; let it through.
    grpcio's sync server raises a bare ``Exception()`` there (and marks the call aborted); other versions a class of
    their own from a grpc module."""
    if getattr(getattr(context, "_state", None), "aborted", False):
        return True
    return type(exc).__module__.startswith("grpc") and not isinstance(exc, grpc.RpcError)


# Servers refuse SO_REUSEPORT: a second server on a taken port must fail, not share it silently.
# Clients ping every 10 s even between calls (CHANNEL_OPTIONS); a server's default policy allows a ping without
# data only every 5 min and answered the third with GOAWAY "too_many_pings" (logged as an error, the channel
# reconnected with its keepalive doubled). Accept them down to 5 s apart.
SERVER_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.http2.min_ping_interval_without_data_ms", 5_000)]


def bind_port(server, address: str, what: str, credentials=None) -> int:
    """Bind ``server`` (sync or aio) to ``address``; OSError naming ``what`` if the port cannot be had."""
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None
                else server.add_insecure_port(address))
    except RuntimeError:  # grpcio raises instead of returning 0 on a failed bind
        port = 0
    if port == 0:
        raise OSError(f"{what}: cannot listen on {address} ({_why_not_bound(address)}); choose another port (0 = any "
                      "free one) or an address of this machine")
    return port


def _why_not_bound(address: str) -> str:
    """The OS's reason ``address`` (host:port) cannot be bound, found by binding a plain socket there (grpcio
    does not say): "Address already in use", "Cannot assign requested address", ..."""
    import socket

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.bind(sockaddr)
    except OSError as e:
        return e.strerror or str(e)
    except ValueError:
        return "not a host:port"
    return "in use?"


def make_server(address: str, cluster_token: str, max_workers: int = 32) -> tuple[grpc.Server, int]:
    """A server bound to ``address`` (use "127.0.0.1:0" for an ephemeral port); returns (server, port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="colm-rpc"),
                         interceptors=[ServiceInterceptor(cluster_token)],
                         options=CHANNEL_OPTIONS + SERVER_OPTIONS)
    return server, bind_port(server, address, "worker gRPC address")


def make_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


class EngineServer:
    """An engine's loop plus its gRPC server on ``address`` ("127.0.0.1:0" picks a free port).

    ``add_service(server)`` registers the worker's servicer; ``start``/``stop`` run both together.
    ``max_workers``: the server's threads (created as needed). The sync server runs every call on a
    thread of its own for the call's whole life, so a worker whose calls wait on each other (decode:
    StartGeneration streams wait for the KV that PushKV streams bring) needs a thread for every call
    its engine can hold at once; the subclasses derive it from their engine's bounds."""

    def __init__(self, engine, cluster_token: str, address: str, add_service, max_workers: int = 64) -> None:
        self.engine = engine
        self.max_workers = max_workers
        self.server, self.port = make_server(address, cluster_token, max_workers)
        add_service(self.server)
        self.address = f"{address.rsplit(':', 1)[0]}:{self.port}"

    def start(self):
        self.engine.start()
        self.server.start()
        return self

    def stop(self, grace: float | None = 1.0) -> None:
        self.server.stop(grace).wait()
        self.engine.stop()
