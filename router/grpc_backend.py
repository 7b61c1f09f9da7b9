"""The router's backend over the workers' internal gRPC API (``proto/colm/v1/kv.proto``).

A request's path: ``DecodeWorker.Reserve`` (KV blocks for prompt + max_new_tokens) ->
``PrefillWorker.Prefill`` (chain-1 forward, K/V pushed to the decode worker) running concurrently
with ``DecodeWorker.StartGeneration`` (waits for the KV, then streams tokens). Where both workers
report CUDA and one host (their Stats), Prefill asks for the ``cuda_pool`` path and goes out together
with Reserve: decode's grant waits for the reservation, so the Reserve round trip leaves the TTFT. Any exit other than
a finished stream aborts the request on the decode worker so its blocks are freed. A call that
fails with UNAVAILABLE / DEADLINE_EXCEEDED on a worker (or a dead channel) raises ``WorkerFailed``
naming that worker, and the router retries elsewhere. Every call carries the cluster token.

The short calls (Reserve, Prefill, Start, SetScale, Abort) go as messages of one ``Calls`` stream per worker
(``worker_calls="stream"``, ``router.call_stream``): no per-call set-up on either side; a worker without it gets
unary calls. Failures and deadlines surface exactly as the unary calls' did.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc

from colm.proto import load_proto
from colm.errors import UnknownRequestError
from colm.logits_adjust import reads_prompt
from colm.proto.convert import sampling_to_decode
from colm.proto.rpc import error_line
from colm.proto.token_ids import pack_token_ids
from colm.router.config import TOKEN_STREAMS, WORKER_CALLS
from colm.router.backend import EngineRequest, EngineToken, RequestFailed, WorkerFailed, WorkerInfo
from colm.router.call_stream import CallStream
from colm.router.metrics import report_timeline
from colm.scoring import prompt_logprobs
from colm.router.policy import WorkerReport
from colm.router.token_subscription import StreamBroken, TokenSubscription

log = logging.getLogger("colm.router")
kv_pb2, kv_pb2_grpc = load_proto("kv")
TOKEN_KEY = "x-colm-cluster-token"
STATS_TIMEOUT_S = 60.0  # the call's own bound; the router's poll gives up sooner (router.poll_timeout_s)
_PREFILL_DONE = object()  # queued when a request's Prefill call ends (batched token stream)
_DEADLINE = object()  # queued when a request's deadline passes (batched token stream)
_SILENT = object()  # queued when no token came for EngineRequest.token_timeout_s (batched token stream)
FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                  grpc.StatusCode.INTERNAL}


class GrpcBackend:
    def __init__(self, workers: list[WorkerInfo], cluster_token: str = "", scorer=None,
                 max_message_bytes: int = 64 << 20, kv_path: str = "auto", token_stream: str = "batched",
                 worker_calls: str = "stream") -> None:
        self.cluster_token = cluster_token
        # KV transport asked of prefill workers (serve.yaml's ``transport:``; "auto": the registry picks by the
        # pair's facts, colm.kv.registry)
        self.kv_path = kv_path
        self.scorer = scorer  # optional full model in this process, for prompt logprobs (echo)
        self.max_message_bytes = max_message_bytes
        self._workers: dict[str, WorkerInfo] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._host_ids: dict[str, str] = {}
        self._transports: dict[str, tuple[str, ...]] = {}  # decode worker -> what it can receive (its Stats)
        self._cuda: dict[str, bool] = {}  # worker -> its engine (decode: its KV pool) is on CUDA, from Stats
        self._transfer: dict[str, list] = {}  # prefill worker -> [bytes, seconds, tokens] handed to decode so far
        self._aborts: set[asyncio.Task] = set()  # background aborts of failed attempts (kept referenced)
        if token_stream not in TOKEN_STREAMS:
            raise ValueError(f"token_stream={token_stream!r}: must be one of {', '.join(TOKEN_STREAMS)}")
        # "batched": one Tokens stream per decode worker carries every request's tokens, a message per step;
        # "per_request": a StartGeneration stream per request, a message per token
        self.token_stream = token_stream
        if worker_calls not in WORKER_CALLS:
            raise ValueError(f"worker_calls={worker_calls!r}: must be one of {', '.join(WORKER_CALLS)}")
        self.worker_calls = worker_calls  # "stream": short calls as messages of a Calls stream; "unary": a call each
        self._call_streams: dict[str, CallStream] = {}
        self.watches_tokens = token_stream == "batched"  # ends its streams on failover / silence / deadline itself
        self._subs: dict[str, TokenSubscription] = {}  # decode worker -> its Tokens stream
        # attempt id -> (its prefill worker, its Prefill call), until its first token: whom its silence blames
        self._prefills: dict[str, tuple[str, asyncio.Future]] = {}
        self.set_workers(workers)

    # ---- workers -------------------------------------------------------------------------------
    def set_workers(self, workers: list[WorkerInfo]) -> None:
        """Replace the worker list (a restarted actor may come back on a new address)."""
        new = {w.worker_id: w for w in workers}
        for wid, w in list(self._workers.items()):
            if wid not in new or new[wid].address != w.address:
                log.warning("worker %s: %s", wid, f"now at {new[wid].address} (was {w.address})" if wid in new
                            else "removed")
                self._subs.pop(wid, None)  # its stream ends with the channel: the requests on it fail over
                self._call_streams.pop(wid, None)  # likewise its Calls stream (its waiting calls fail over)
                ch = self._channels.pop(wid, None)
                if ch is not None and _loop_running():  # calls still on it end with CANCELLED -> failover
                    asyncio.ensure_future(ch.close())
        self._workers = new

    def workers(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    def _channel(self, worker_id: str) -> grpc.aio.Channel:
        ch = self._channels.get(worker_id)
        if ch is None:
            w = self._workers.get(worker_id)
            if w is None:
                raise WorkerFailed(worker_id, "unknown worker")
            opts = [("grpc.max_receive_message_length", self.max_message_bytes),
                    ("grpc.max_send_message_length", self.max_message_bytes)]
            ch = self._channels[worker_id] = grpc.aio.insecure_channel(w.address, options=opts)
        return ch

    def _md(self):
        return ((TOKEN_KEY, self.cluster_token),)

    def _decode(self, worker_id: str):
        return kv_pb2_grpc.DecodeWorkerStub(self._channel(worker_id))

    def _prefill(self, worker_id: str):
        return kv_pb2_grpc.PrefillWorkerStub(self._channel(worker_id))

    def _stub(self, worker_id: str):
        w = self._workers.get(worker_id)
        return self._prefill(worker_id) if w is not None and w.role == "prefill" else self._decode(worker_id)

    def _unary(self, worker_id: str, method: str, request, reply_cls: type, timeout: float):
        """``stub.<method>(request, timeout=timeout)``, sent now: on the worker's Calls stream (``worker_calls``
        "stream") unless the worker has none, else as a call of its own. The awaitable raises
        ``grpc.aio.AioRpcError`` as the call would; cancelling it cancels the call."""
        if self.worker_calls == "stream":
            cs = self._call_streams.get(worker_id)
            if cs is None:
                stub = self._stub(worker_id)
                cs = self._call_streams[worker_id] = CallStream(lambda: stub.Calls(metadata=self._md()))
            if not cs.unsupported:  # a task: its message goes out before what the caller sends after this
                return asyncio.ensure_future(self._on_stream(cs, worker_id, method, request, reply_cls, timeout))
        return getattr(self._stub(worker_id), method)(request, metadata=self._md(), timeout=timeout)

    async def _on_stream(self, cs: CallStream, worker_id: str, method: str, request, reply_cls: type, timeout: float):
        try:
            return await cs.call(method, request, reply_cls, timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.info("worker %s: %s not on its Calls stream (%s); sending calls", worker_id, method, e.details())
        return await getattr(self._stub(worker_id), method)(request, metadata=self._md(), timeout=timeout)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        if self._aborts:  # let pending aborts of failed attempts finish (each bounded by its timeouts)
            await asyncio.wait(set(self._aborts), timeout=15.0)
        for s in list(self._subs.values()):
            await s.close()
        self._subs.clear()
        for cs in list(self._call_streams.values()):
            await cs.close()
        self._call_streams.clear()
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def poll(self, worker_id: str) -> WorkerReport:
        w = self._workers[worker_id]
        if w.role == "decode":
            s = await self._decode(worker_id).Stats(kv_pb2.DecodeStatsRequest(), metadata=self._md(),
                                                    timeout=STATS_TIMEOUT_S)
            self._host_ids[worker_id] = s.host_id
            self._cuda[worker_id] = s.cuda_kv
            self._transports[worker_id] = tuple(s.transports)
            return WorkerReport.of_decode(worker_id, s)
        s = await self._prefill(worker_id).Stats(kv_pb2.PrefillStatsRequest(), metadata=self._md(),
                                                 timeout=STATS_TIMEOUT_S)
        self._host_ids[worker_id] = s.host_id
        self._cuda[worker_id] = s.cuda
        nbytes, seconds, tokens = self._transfer.get(worker_id, (0, 0.0, 0))
        return WorkerReport.of_prefill(worker_id, s, transfer_bytes=nbytes, transfer_s=seconds,
                                       transfer_ms_per_mtoken=seconds * 1e9 / tokens if tokens else None)

    # ---- one request ---------------------------------------------------------------------------
    async def generate(self, req: EngineRequest, prefill_id: str, decode_id: str) -> AsyncIterator[EngineToken]:
        p = req.params
        timeout = max(0.05, req.timeout_s)
        decode = self._decode(decode_id)
        md = self._md()
        finished = False
        reserved = None  # None: unknown (the call broke); False: decode refused it, nothing of ours to abort
        prefill_task = None
        next_tok = None
        # Reserve / Start (which reserves on a colocated worker) while in flight: a cancelled request does not cancel
        # it but aborts once it has answered; an abort sent at once could reach the worker first, find nothing, and the
        # reservation made after it would hold its blocks until the request's deadline
        placing: list = []

        def start_prefill(same_host: bool, path: str, decode_cuda: bool, decode_transports=()):
            task = asyncio.ensure_future(self._unary(prefill_id, "Prefill", kv_pb2.PrefillRequest(
                request_id=req.request_id, token_ids_u32=pack_token_ids(req.prompt_ids),
                decode_address=self._workers[decode_id].address, same_host=same_host, timeout_s=timeout, path=path,
                decode_cuda=decode_cuda, decode_transports=decode_transports), kv_pb2.PrefillReply, timeout))
            task.add_done_callback(lambda t: self._count_transfer(prefill_id, t, req))
            self._prefills[req.request_id] = (prefill_id, task)
            return task

        colocated = prefill_id == decode_id  # the decode worker prefills the prompt itself (Start carries it)
        try:
            early = None if colocated else self._early_transport(prefill_id, decode_id)
            if early is not None:  # decode's grant waits for the reservation: Prefill goes out with Reserve
                prefill_task = start_prefill(early[1].same_host, early[0], early[1].decode_cuda,
                                             list(early[1].decode_transports))
            if not colocated:  # a colocated worker reserves with the Start (``_start_request``): one call fewer
                try:
                    reply = await _unabandoned(placing, self._unary(decode_id, "Reserve", kv_pb2.ReserveRequest(
                        request_id=req.request_id, prompt_len=len(req.prompt_ids), max_new_tokens=p.max_new_tokens,
                        timeout_s=timeout), kv_pb2.ReserveReply, min(timeout, 10.0)))
                except grpc.aio.AioRpcError as e:
                    if e.code() in _REFUSED:
                        reserved = False
                    raise self._failure(e, decode_id) from None
            reserved = True
            if prefill_task is None and not colocated:
                same_host = bool(reply.host_id) and reply.host_id == self._host_ids.get(prefill_id)
                prefill_task = start_prefill(same_host, self.kv_path, reply.cuda_kv, list(reply.transports))
            if self.token_stream == "batched":
                ended: list = []  # set before the finishing token is handed on: a consumer may stop right there
                try:
                    async for tok in self._batched_tokens(req, decode_id, timeout, prefill_task, prefill_id, ended,
                                                          placing):
                        yield tok
                finally:
                    finished = bool(ended)
                return
            call = decode.StartGeneration(_start_request(req, timeout, prompt=colocated), metadata=md, timeout=timeout)
            it = call.__aiter__()
            streaming = False  # a token came: the KV is all on the decode worker, the prefill's outcome no longer matters
            while True:
                next_tok = asyncio.ensure_future(anext(it))
                waits = {next_tok} if streaming or prefill_task is None or prefill_task.done() else {next_tok, prefill_task}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if (not streaming and prefill_task is not None and prefill_task.done() and not prefill_task.cancelled()
                        and prefill_task.exception() is not None):
                    next_tok.cancel()
                    raise await self._prefill_failure(prefill_task.exception(), prefill_id, decode_id)
                try:
                    ev = await next_tok
                except StopAsyncIteration:
                    finished = True
                    return
                except grpc.aio.AioRpcError as e:
                    raise self._failure(e, decode_id) from None
                if not streaming:
                    self._prefills.pop(req.request_id, None)
                streaming = True
                report_timeline(req, "decode", ev.monotonic_s, ev.timeline_ms)  # the first event carries it
                finished = bool(ev.finish_reason)  # before the yield: the consumer may stop at the finishing token
                yield EngineToken(ev.token_id, ev.scale, ev.logprob, ev.drafted, _tops(ev))
                if finished:
                    return
        finally:
            self._prefills.pop(req.request_id, None)
            if prefill_task is not None:  # a prefill that failed after the decode side did: its error is not news
                if not prefill_task.done():
                    prefill_task.cancel()
                prefill_task.add_done_callback(_retrieve)
            if next_tok is not None:  # left behind by a cancellation or a failed prefill: its error is not news
                next_tok.cancel()
                next_tok.add_done_callback(_retrieve)
            if not finished and reserved is not False:
                self._abort_in_background(decode_id, req.request_id,
                                          after=next((c for c in placing if not c.done()), None))

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
            await sub.ensure_open(min(timeout, 10.0))
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
            try:
                await _unabandoned(placing, self._unary(
                    decode_id, "Start", _start_request(req, timeout, sub.subscriber, prefill_task is None),
                    kv_pb2.StartGenerationReply, min(timeout, 10.0)))
            except grpc.aio.AioRpcError as e:
                raise self._failure(e, decode_id) from None
            streaming = False  # a token came: the KV is all on the decode worker, the prefill's outcome no longer matters
            while True:
                item = await q.get()
                if item is _PREFILL_DONE:
                    if not streaming and not prefill_task.cancelled() and prefill_task.exception() is not None:
                        raise await self._prefill_failure(prefill_task.exception(), prefill_id, decode_id)
                    continue
                if item is _DEADLINE:
                    from colm.router.core import DeadlineExceeded

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

    def silence(self, request_id: str, decode_id: str, idle_s: float) -> WorkerFailed:
        """The failure of attempt ``request_id`` after ``idle_s`` without a token (either token stream): its prefill
        worker's while no token has come and its Prefill call is still out (the decode worker waits for the K/V: the
        prefill worker is the silent one), else its decode worker's. Ask before the attempt's stream is closed."""
        prefill = self._prefills.get(request_id)
        if prefill is not None and not prefill[1].done():
            return WorkerFailed(prefill[0], f"no token for {idle_s} s: its prefill has not finished")
        return WorkerFailed(decode_id, f"no token for {idle_s} s")

    def _early_transport(self, prefill_id: str, decode_id: str):
        """(transport name, the pair's facts) when Reserve and Prefill may go out at once: the transport the
        registry picks for the pair (facts from the workers' last Stats) says so (cuda_pool, nixl: decode's grant
        waits for the reservation). None: Prefill waits for Reserve's reply."""
        from colm.kv import registry

        host = self._host_ids.get(decode_id)
        facts = registry.PairFacts(bool(host) and host == self._host_ids.get(prefill_id),
                                   self._cuda.get(prefill_id, False), self._cuda.get(decode_id, False),
                                   self._transports.get(decode_id, ()))
        try:
            name = registry.choose(self.kv_path, facts)
            t = registry.get(name)
        except ValueError:  # a transport the prefill worker itself must judge
            return None
        return (name, facts) if t.reserve_with_prefill and t.unmet(facts) is None else None

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
                    return
                except (grpc.aio.AioRpcError, WorkerFailed) as e:
                    if isinstance(e, WorkerFailed) or e.code() == grpc.StatusCode.UNAUTHENTICATED or i == attempts - 1:
                        why = " ".join(str(e).split()) if isinstance(e, WorkerFailed) else error_line(e)
                        log.warning("abort of %s on %s failed: %s", request_id, decode_id, why)
                        return
                    await asyncio.sleep(0.2 * (i + 1))

        task = asyncio.ensure_future(run())
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    def _count_transfer(self, prefill_id: str, task: asyncio.Future, req: EngineRequest) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        r = task.result()  # PrefillReply: the hand-off is what the total holds beyond queueing and compute
        report_timeline(req, "prefill", r.monotonic_s, r.timeline_ms)
        t = self._transfer.setdefault(prefill_id, [0, 0.0, 0])
        t[0] += r.num_bytes
        t[1] += max(0.0, r.total_ms - r.queue_ms - r.compute_ms) / 1e3
        t[2] += r.num_tokens

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

    def _failure(self, e: grpc.aio.AioRpcError, worker_id: str) -> Exception:
        return self._failure_of(e.code(), e.details(), worker_id)

    def _failure_of(self, code: grpc.StatusCode, details: str, worker_id: str) -> Exception:
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return ValueError(details)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            from colm.router.placement import NoWorker

            return NoWorker(f"{worker_id}: {details}", full=True)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            from colm.router.core import DeadlineExceeded

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

    async def set_scale(self, decode_id: str, request_id: str, scale: int) -> None:
        try:
            await self._unary(decode_id, "SetScale", kv_pb2.SetScaleRequest(request_id=request_id, scale=scale),
                              kv_pb2.SetScaleReply, 2.0)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # the worker holds no such request (not yet, or no more)
                raise UnknownRequestError(e.details()) from None
            raise

    async def abort(self, decode_id: str, request_id: str) -> None:
        await self._unary(decode_id, "Abort", kv_pb2.AbortRequest(request_id=request_id), kv_pb2.AbortReply, 2.0)

    async def reset_prefix_cache(self, decode_id: str) -> int:
        r = await self._decode(decode_id).ResetPrefixCache(kv_pb2.ResetPrefixCacheRequest(), metadata=self._md(),
                                                           timeout=10.0)
        return r.num_freed_blocks

    async def prompt_logprobs(self, decode_id: str, prompt_ids: list[int], scale: int):
        if self.scorer is not None:  # optional local copy: scores without loading a decode worker
            return await asyncio.get_running_loop().run_in_executor(None, prompt_logprobs, self.scorer, prompt_ids, scale)
        try:
            r = await self._decode(decode_id).Score(kv_pb2.ScoreRequest(token_ids=list(prompt_ids), scale=scale),
                                                    metadata=self._md(), timeout=60.0)
        except grpc.aio.AioRpcError as e:
            raise self._failure(e, decode_id) from None
        return list(zip(r.logprobs, r.top_token_ids, r.top_logprobs))


# Reserve answers that say the decode worker holds nothing for the request: an abort would hit nothing of
# ours, or (a reused id) another request's reservation.
_REFUSED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED)


def _start_request(req: EngineRequest, timeout: float, subscriber: str = "", prompt: bool = False):
    """The decode worker's StartGenerationRequest for ``req`` (``subscriber``: the Tokens stream, for ``Start``;
    ``prompt``: a colocated worker, which reserves the request and prefills the prompt itself)."""
    return kv_pb2.StartGenerationRequest(request_id=req.request_id, last_token_id=req.prompt_ids[-1],
                                         sampling=sampling_to_decode(req.params), scale=req.scale, kv_timeout_s=timeout,
                                         subscriber=subscriber, speculative=req.speculative,
                                         prompt_token_ids_u32=pack_token_ids(req.prompt_ids[:-1]) if prompt else b"",
                                         reserve_max_new_tokens=req.params.max_new_tokens if prompt else 0,
                                         cache_salt=req.cache_salt if prompt else "",
                                         context_token_ids_u32=(pack_token_ids(req.prompt_ids[:-1])
                                                                if reads_prompt(req.params, req.prior_output)
                                                                and not prompt else b""),
                                         prior_output_tokens=req.prior_output)


def _tops(ev) -> tuple[tuple[int, float], ...]:
    """A TokenEvent's top log-probs as (token id, log-prob) pairs (empty unless the request asked for them)."""
    return tuple(zip(ev.top_token_ids, ev.top_logprobs)) if ev.top_token_ids else ()


async def _unabandoned(placing: list, call):
    """``await call`` (a worker call that may reserve KV blocks), except that the caller's cancellation leaves the call
    running: it is kept in ``placing`` for the abort to wait for."""
    task = asyncio.ensure_future(call)
    placing.append(task)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # marks it retrieved: no "Task exception was never retrieved" at garbage collection


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False
