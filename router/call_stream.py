"""The router's half of a worker's ``Calls`` stream: unary calls sent as messages of one open stream.

``CallStream.call(method, request, reply_cls, timeout)`` behaves as ``stub.<method>(request, timeout=timeout)`` of
grpc.aio: it returns the reply, or raises ``grpc.aio.AioRpcError`` with the worker's status code and details (the
router's failure mapping is unchanged), ``DEADLINE_EXCEEDED`` after ``timeout`` (the worker is told to cancel the
call), and cancelling the awaiting task cancels the call on the worker. The stream opens on the first call and
again after it ends; when it breaks, every call waiting on it fails with the stream's code (UNAVAILABLE for a
worker gone), as each of their unary calls would have. A worker without ``Calls`` answers UNIMPLEMENTED once
(``unsupported`` turns True); the caller then sends unary calls. See ``colm.proto.call_stream`` for the worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Callable

import grpc

from colm.proto import load_proto

log = logging.getLogger("colm.router")
kv_pb2, _ = load_proto("kv")


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """An ``AioRpcError`` as a failed unary call raises it."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class CallStream:
    """One worker's ``Calls`` stream (``open_stream()``: a new ``stream_stream`` call on the worker's channel)."""

    def __init__(self, open_stream: Callable[[], grpc.aio.StreamStreamCall]) -> None:
        self._open_stream = open_stream
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, tuple[asyncio.Future, type, object]] = {}  # call id -> (future, reply, stream)
        self._ids = itertools.count(1)
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write at a time per call
        self._open_lock = asyncio.Lock()  # one stream opens at a time
        self._background: set[asyncio.Task] = set()
        self._last_error: grpc.aio.AioRpcError | None = None  # why the last stream ended
        self.unsupported = False  # the worker answered UNIMPLEMENTED: it has no Calls (an older worker)

    async def call(self, method: str, request, reply_cls: type, timeout: float):
        if self.unsupported:
            raise rpc_error(grpc.StatusCode.UNIMPLEMENTED, "this worker has no Calls stream")
        call = await self._ensure_open(timeout)
        call_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = (fut, reply_cls, call)
        # the write runs in a task of its own, shielded: grpc.aio cancels the whole stream when a write into it is
        # interrupted, which would fail every other call on it (and take the worker out) for one caller's cancellation
        sent = asyncio.ensure_future(self._write(call, kv_pb2.CallMessage(
            call_id=call_id, method=method, request=request.SerializeToString(), timeout_s=timeout)))
        try:
            await asyncio.shield(sent)
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            self._cancel_on_worker(call, call_id)
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except asyncio.CancelledError:
            if sent.done():
                self._cancel_on_worker(call, call_id)
            else:  # the message still goes out: cancel it on the worker once it has
                sent.add_done_callback(lambda t: None if t.cancelled() or t.exception() is not None
                                       else self._cancel_on_worker(call, call_id))
            raise
        finally:
            self._pending.pop(call_id, None)
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # retrieved: an answer that came as the caller gave up leaves no warning behind

    async def close(self) -> None:
        """End the stream (the worker cancels what still runs on it) and fail what waits on it."""
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self._fail_pending(rpc_error(grpc.StatusCode.CANCELLED, "the router closed the worker's call stream"), call)

    # ---- internals -------------------------------------------------------------------------------
    async def _ensure_open(self, timeout: float) -> grpc.aio.StreamStreamCall:
        """The open stream, or a new one once the worker's handler answered (its initial metadata): a worker
        without Calls (UNIMPLEMENTED), a wrong token or a worker that is down fail here with their own code."""
        if self._call is not None:
            return self._call
        async with self._open_lock:
            if self._call is None:
                call = self._open_stream()
                try:
                    await asyncio.wait_for(call.initial_metadata(), timeout)
                except asyncio.TimeoutError:
                    call.cancel()
                    raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                                    "the worker's call stream did not open") from None
                except asyncio.CancelledError:
                    call.cancel()
                    raise
                if call.done():  # ended before any reply: its status says why
                    code, details = await call.code(), await call.details()
                    if code == grpc.StatusCode.UNIMPLEMENTED:
                        self.unsupported = True
                    raise rpc_error(code if code != grpc.StatusCode.OK else grpc.StatusCode.UNAVAILABLE,
                                    details or "the worker ended its call stream")
                self._call = call
                self._reader = asyncio.ensure_future(self._read(call))
            return self._call

    async def _write(self, call, msg) -> None:
        try:
            async with self._write_lock:
                await call.write(msg)
        except Exception as e:  # noqa: BLE001 - the stream is finished or broken: its reader holds why
            if self._reader is not None:
                await asyncio.gather(self._reader, return_exceptions=True)
            raise self._last_error or rpc_error(grpc.StatusCode.UNAVAILABLE,
                                                f"the worker's call stream broke: {e}") from None

    async def _read(self, call) -> None:
        err = None
        try:
            async for res in call:
                entry = self._pending.get(res.call_id)
                if entry is None or entry[0].done():  # given up on (timed out, cancelled)
                    continue
                fut, reply_cls, _ = entry
                if res.code:
                    code = getattr(grpc.StatusCode, res.code, grpc.StatusCode.UNKNOWN)
                    fut.set_exception(rpc_error(code, res.details))
                else:
                    fut.set_result(reply_cls.FromString(res.reply))
            err = rpc_error(grpc.StatusCode.UNAVAILABLE, "the worker ended its call stream")
        except grpc.aio.AioRpcError as e:
            err = e
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.unsupported = True
        except asyncio.CancelledError:
            err = rpc_error(grpc.StatusCode.CANCELLED, "the worker's call stream was cancelled")
        except Exception as e:  # noqa: BLE001
            err = rpc_error(grpc.StatusCode.UNAVAILABLE, f"the worker's call stream broke: {e}")
        finally:
            if self._call is call:
                self._call = None  # the next call opens a new stream
            self._last_error = err
            self._fail_pending(err, call)

    def _fail_pending(self, err: grpc.aio.AioRpcError, call) -> None:
        """Fail the calls waiting on stream ``call`` with ``err``."""
        for call_id, (fut, _, on) in list(self._pending.items()):
            if on is not call:
                continue
            del self._pending[call_id]
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # retrieved: a caller that already gave up leaves no warning behind

    def _cancel_on_worker(self, call, call_id: int) -> None:
        """Tell the worker to cancel ``call_id`` (in the background: the caller's own exit must not wait)."""
        if call is not self._call:
            return  # that stream is gone, and with it the call

        async def send():
            try:
                await self._write(call, kv_pb2.CallMessage(call_id=call_id, cancel=True))
            except Exception:  # noqa: BLE001 - a stream that broke cancelled the call on the worker anyway
                pass

        task = asyncio.ensure_future(send())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
