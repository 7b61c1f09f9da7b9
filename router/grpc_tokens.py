"""A request's tokens from its decode worker's batched token stream (``token_stream="batched"``).

One Tokens stream per decode worker (``router/token_subscription.py``) carries every request's tokens, a message per
decode step. ``_batched_tokens`` opens it on first use, registers the request's queue, sends ``Start``, and reads the
queue: the request's tokens, and the events that end the attempt, queued by timers and callbacks rather than a task
per token: its Prefill call failing, its deadline, ``token_timeout_s`` without a token (``silence``), a health
poll's failover, the stream breaking, or the worker's failure of the request. It raises as the per-request stream
would (``router/grpc_request.py``).

A mixin of ``GrpcBackend`` (``router/grpc_backend.py``), which sets up the state it uses.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from colm.proto import load_proto
from colm.router import grpc_request
from colm.router.backend import EngineRequest, EngineToken, WorkerFailed
from colm.router.grpc_request import _start_request, _tops, _unabandoned
from colm.router.metrics import report_timeline
from colm.router.request import DeadlineExceeded
from colm.router.token_subscription import StreamBroken, TokenSubscription

kv_pb2, _ = load_proto("kv")
_PREFILL_DONE = object()  # queued when a request's Prefill call ends (batched token stream)
_DEADLINE = object()  # queued when a request's deadline passes (batched token stream)
_SILENT = object()  # queued when no token came for EngineRequest.token_timeout_s (batched token stream)


class BatchedTokens:
    def _subscription(self, decode_id: str) -> TokenSubscription:
        s = self._subs.get(decode_id)
        if s is None:
            s = self._subs[decode_id] = TokenSubscription(
                lambda subscriber: self._decode(decode_id).Tokens(kv_pb2.TokenSubscribeRequest(subscriber=subscriber),
                                                                  metadata=self._md()))
        return s

    async def _batched_tokens(self, req: EngineRequest, decode_id: str, timeout: float, prefill_task,
                              prefill_id: str, ended: list, placing: list) -> AsyncIterator[EngineToken]:
        """``Start`` on the decode worker, then this request's events from the worker's Tokens stream (opened on
        first use). Ends after the finishing token (``ended`` gets an entry just before it is yielded: the worker
        ended the request, nothing is left to abort); raises as the per-request stream would."""
        sub = self._subscription(decode_id)
        try:
            await sub.ensure_open(min(timeout, grpc_request.CALL_TIMEOUT_S))
        except grpc.aio.AioRpcError as e:
            raise self._failure(e, decode_id) from None
        except (asyncio.TimeoutError, StopAsyncIteration):
            raise WorkerFailed(decode_id, "its token stream did not open") from None
        q = sub.register(req.request_id)
        loop = asyncio.get_running_loop()
        timers = [loop.call_later(timeout, q.put_nowait, _DEADLINE)]  # timers per request, none per token
        last = [loop.time()]  # when the last token (or the start) came
        idle = req.token_timeout_s

        def check_idle() -> None:  # re-armed from the last token's time: one timer per token_timeout_s
            due = last[0] + idle
            if loop.time() >= due:
                q.put_nowait(_SILENT)
            else:
                timers.append(loop.call_at(due, check_idle))

        if idle:
            timers.append(loop.call_later(idle, check_idle))
        if prefill_task is not None:  # None: colocated, Start carries the prompt
            prefill_task.add_done_callback(lambda _t: q.put_nowait(_PREFILL_DONE))
        if req.failover is not None:
            req.failover.add_done_callback(lambda f: None if f.cancelled() else q.put_nowait(f))
        try:
            bound = min(timeout, grpc_request.CALL_TIMEOUT_S)
            try:
                await _unabandoned(placing, self._unary(
                    decode_id, "Start", _start_request(req, timeout, sub.subscriber, prefill_task is None),
                    kv_pb2.StartGenerationReply, bound), req.failover)
            except grpc.aio.AioRpcError as e:
                raise self._capped_failure(e, decode_id, timeout, bound) from None
            streaming = False  # a token came: the KV is all on the decode worker, the prefill's outcome no longer matters
            while True:
                item = await q.get()
                if item is _PREFILL_DONE:
                    if not streaming and not prefill_task.cancelled() and prefill_task.exception() is not None:
                        raise await self._prefill_failure(prefill_task.exception(), prefill_id, decode_id)
                    continue
                if item is _DEADLINE:
                    raise DeadlineExceeded(f"request {req.request_id} passed its deadline")
                if item is _SILENT:
                    raise self.silence(req.request_id, decode_id, idle)
                if isinstance(item, asyncio.Future):  # a health poll took one of this attempt's workers out
                    raise WorkerFailed(item.result(), "failed its health check")
                if isinstance(item, StreamBroken):
                    if isinstance(item.cause, grpc.aio.AioRpcError):
                        raise self._failure(item.cause, decode_id) from None
                    raise WorkerFailed(decode_id, str(item))
                if isinstance(item, kv_pb2.TokenFailure):
                    code = getattr(grpc.StatusCode, item.code, grpc.StatusCode.UNKNOWN)
                    raise self._failure_of(code, item.message, decode_id)
                if not streaming:
                    self._prefills.pop(req.request_id, None)
                streaming = True
                last[0] = loop.time()
                if item.timeline_ms:
                    report_timeline(req, "decode", item.monotonic_s, item.timeline_ms)  # the first event carries it
                if item.finish_reason:
                    ended.append(True)
                yield EngineToken(item.token_id, item.scale, item.logprob, item.drafted, _tops(item))
                if item.finish_reason:
                    return
        finally:
            for t in timers:
                t.cancel()
            sub.unregister(req.request_id)
