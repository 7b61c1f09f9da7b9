"""What a failed worker call means for the router, and freeing what a failed attempt held.

``_failure`` / ``_failure_of`` map a worker's gRPC status to the router's exceptions: INVALID_ARGUMENT -> ValueError,
RESOURCE_EXHAUSTED -> NoWorker(full) (the request waits in the KV line), DEADLINE_EXCEEDED -> DeadlineExceeded, a
refused cluster token -> RuntimeError, the request's own failure on a worker that serves on -> RequestFailed (retried
once), anything else (UNAVAILABLE, a dead channel) -> WorkerFailed naming the worker (retried elsewhere).
``_prefill_failure`` blames a failed Prefill on the decode worker it pushed to when that one does not answer.
``_abort_in_background`` frees a failed attempt's decode reservation without holding up its retry.

A mixin of ``GrpcBackend`` (``router/grpc_backend.py``), which sets up the state it uses.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from colm.proto import load_proto
from colm.proto.rpc import error_line
from colm.router.backend import RequestFailed, WorkerFailed
from colm.router.request import DeadlineExceeded

log = logging.getLogger("colm.router")
kv_pb2, _ = load_proto("kv")

# Reserve answers that say the decode worker holds nothing for the request: an abort would hit nothing of
# ours, or (a reused id) another request's reservation.
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED)


class CallFailures:
    def _abort_in_background(self, decode_id: str, request_id: str, attempts: int = 3, after=None) -> None:
        """Free a failed attempt's decode reservation without holding up its retry. A few tries with a
        generous timeout: under load an abort that timed out once (it was awaited with 2 s) left the
        reservation held until its deadline, minutes later. A worker that is gone frees nothing anyway.
        ``after``: the attempt's Reserve (or Start) call still in flight: the abort goes once it has answered, and not
        at all when the worker refused it (nothing of ours is held there)."""
        async def run():
            if after is not None:
                try:
                    await after
                except grpc.aio.AioRpcError as e:
                    if e.code() in _REFUSED:
                        return
                except BaseException:  # noqa: BLE001 - the call broke: whether it reserved is unknown, abort anyway
                    pass
            for i in range(attempts):
                try:
                    await self._unary(decode_id, "Abort", kv_pb2.AbortRequest(request_id=request_id),
                                      kv_pb2.AbortReply, 10.0)
                    self._aborts_quiet.discard(decode_id)
                    return
                except (grpc.aio.AioRpcError, WorkerFailed) as e:
                    if isinstance(e, WorkerFailed) or e.code() == grpc.StatusCode.UNAUTHENTICATED or i == attempts - 1:
                        why = " ".join(str(e).split()) if isinstance(e, WorkerFailed) else error_line(e)
                        self._log_failed_abort(decode_id, request_id, why)
                        return
                    await asyncio.sleep(0.2 * (i + 1))

        task = asyncio.ensure_future(run())
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    def _log_failed_abort(self, decode_id: str, request_id: str, why: str) -> None:
        """A warning for the first abort a worker fails, then debug lines until one succeeds there: a killed worker
        fails the abort of every attempt it held, each one of the same cause."""
        if decode_id not in self._aborts_quiet:
            self._aborts_quiet.add(decode_id)
            log.warning("abort of %s on %s failed: %s (further failed aborts there are logged at debug level until "
                        "one succeeds)", request_id, decode_id, why)
            return
        log.debug("abort of %s on %s failed: %s", request_id, decode_id, why)

    async def _prefill_failure(self, e: BaseException, prefill_id: str, decode_id: str) -> Exception:
        """A failed Prefill may mean the decode worker it pushes to is gone: blame whoever does not answer."""
        if not isinstance(e, grpc.aio.AioRpcError):
            return e
        if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS):
            try:
                await self.poll(decode_id)
            except Exception:
                return WorkerFailed(decode_id, f"unreachable while {prefill_id} pushed KV: {e.details()}")
        return self._failure(e, prefill_id)

    def _capped_failure(self, e: grpc.aio.AioRpcError, worker_id: str, timeout: float, bound: float) -> Exception:
        """``_failure`` of a call bounded by ``bound`` s for a request with ``timeout`` s left: its DEADLINE_EXCEEDED
        before the request's own time is up is the worker's silence (WorkerFailed: retried elsewhere), not the
        request's deadline (a hung worker's Reserve failed requests with 50 s left as DEADLINE_EXCEEDED)."""
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and bound < timeout:
            return WorkerFailed(worker_id, f"no answer within {bound:g} s ({e.details()})")
        return self._failure(e, worker_id)

    def _failure(self, e: grpc.aio.AioRpcError, worker_id: str) -> Exception:
        return self._failure_of(e.code(), e.details(), worker_id)

    def _failure_of(self, code: grpc.StatusCode, details: str, worker_id: str) -> Exception:
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ValueError(details)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            from colm.router.placement import NoWorker

            return NoWorker(f"{worker_id}: {details}", full=True)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"{worker_id}: {details}")
        if code == grpc.StatusCode.UNAUTHENTICATED or code == grpc.StatusCode.PERMISSION_DENIED:
            return RuntimeError(f"{worker_id} refused the cluster token: {details}")
        # this request failed there; the worker's polls say if it lives. NOT_FOUND: the worker no longer holds the
        # request (its reservation ran out with a deadline of a few ms, or an abort raced its start): that request's
        # own fate, not a worker gone (it took the worker out of service and failed its other requests over)
        if code in (grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS,
                    grpc.StatusCode.UNKNOWN, grpc.StatusCode.NOT_FOUND):
            return RequestFailed(worker_id, f"{code.name}: {details}")
        return WorkerFailed(worker_id, f"{code.name}: {details}")
