"""The worker's half of the ``Calls`` stream: a caller's unary calls as messages of one long-lived stream.

A unary gRPC call pays its stream set-up, metadata and a handler dispatch each time (0.4-1 ms of Python from the
router's call to the worker's handler, ``bench/rpc_latency.py``); a message on a stream that is already open
reaches its reader in about half that. ``serve_calls`` runs on the worker side of ``Calls``: a reader thread takes
each ``CallMessage``, runs the named unary method of the servicer on a thread of a pool (a Prefill holds its thread
until its K/V is delivered, as its unary call does) with a ``CallContext`` standing in for the gRPC context, and
the stream sends each ``CallResult`` as the call finishes.

Semantics kept from unary calls: engine exceptions map to the same status codes and log lines
(``colm.proto.rpc.status_for``); ``context.abort`` fails the call with its code; callbacks registered with
``add_callback`` run when the call ends, and at once when the caller cancels it (a ``cancel`` message) or the
stream ends under it (router gone). The stream itself passed the cluster-token check when it opened.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import grpc

from colm.proto import load_proto
from colm.proto.rpc import status_for

log = logging.getLogger("colm.rpc")
kv_pb2, _ = load_proto("kv")
_END = object()


class CallAborted(Exception):
    """``CallContext.abort``: the call fails with ``code`` and ``details`` (as ``grpc.ServicerContext.abort``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class CallContext:
    """The part of ``grpc.ServicerContext`` a unary handler uses, for one call carried on a ``Calls`` stream."""

    def __init__(self, metadata, timeout_s: float) -> None:
        self._metadata = metadata
        self._deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        self._callbacks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._ended = False

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return not self._ended

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` when the call ends or is cancelled; False (not registered) once it has ended."""
        with self._lock:
            if self._ended:
                return False
            self._callbacks.append(callback)
            return True

    def abort(self, code: grpc.StatusCode, details: str):
        raise CallAborted(code, details)

    def end(self) -> None:
        """The call ended (finished, cancelled or its stream gone): its callbacks run, each once."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception:  # noqa: BLE001 - one callback's failure must not skip the others
                log.exception("a call's termination callback failed")


def serve_calls(handlers: dict[str, tuple[Callable, type]], request_iterator, context, max_workers: int = 64):
    """Answer the ``CallMessage`` s of one ``Calls`` stream: ``handlers`` maps a method name to (the servicer's
    unary method, its request class); yields ``CallResult`` s as calls finish. ``max_workers``: calls running at
    once on this stream (threads made as needed)."""
    results: queue.SimpleQueue = queue.SimpleQueue()
    running: dict[int, CallContext] = {}
    lock = threading.Lock()
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="colm-call")
    metadata = context.invocation_metadata()

    def run(msg, ctx: CallContext) -> None:
        result = kv_pb2.CallResult(call_id=msg.call_id)
        request = None
        try:
            fn, request_cls = handlers[msg.method]
            request = request_cls.FromString(msg.request)
            result.reply = fn(request, ctx).SerializeToString()
        except CallAborted as e:
            result.code, result.details = e.code.name, e.details
        except Exception as exc:  # noqa: BLE001 - the boundary maps every failure to a status, as a unary call's
            code = status_for(exc)
            level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
            log.log(level, "%s request_id=%s -> %s: %s", msg.method, getattr(request, "request_id", "") or "-",
                    code.name, exc, exc_info=code == grpc.StatusCode.INTERNAL)
            result.code, result.details = code.name, f"{type(exc).__name__}: {exc}"
        with lock:
            running.pop(msg.call_id, None)
        results.put(result)
        ctx.end()

    def read() -> None:
        try:
            for msg in request_iterator:
                if msg.cancel:
                    with lock:
                        ctx = running.pop(msg.call_id, None)
                    if ctx is not None:
                        ctx.end()
                    continue
                if msg.method not in handlers:
                    results.put(kv_pb2.CallResult(call_id=msg.call_id, code=grpc.StatusCode.UNIMPLEMENTED.name,
                                                  details=f"method {msg.method!r} is not carried on Calls; "
                                                          f"these are: {', '.join(sorted(handlers))}"))
                    continue
                ctx = CallContext(metadata, msg.timeout_s)
                with lock:
                    running[msg.call_id] = ctx
                pool.submit(run, msg, ctx)
        except Exception:  # noqa: BLE001 - the stream broke: the generator below ends it
            pass
        finally:
            pool.shutdown(wait=True)  # the caller closed its side: the calls still running answer first
            results.put(_END)

    context.add_callback(lambda: results.put(_END))  # the stream ended (cancelled, caller gone)
    context.send_initial_metadata(())  # the caller's open returns: this worker carries Calls
    threading.Thread(target=read, name="colm-calls-reader", daemon=True).start()
    try:
        while True:
            item = results.get()
            if item is _END:
                return
            yield item
    finally:
        with lock:
            orphans = list(running.values())
            running.clear()
        for ctx in orphans:  # nobody will read their replies: cancelled, as a broken unary call's handler is
            ctx.end()
