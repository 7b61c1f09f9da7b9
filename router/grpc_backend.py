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

``GrpcBackend`` holds the state its parts share and the calls that are not a request's path (Stats polls, scale
switches, aborts, prefix-cache resets, prompt scoring); the rest is mixed in from modules of their own:
``router/grpc_channels.py`` (channels, stubs, the Calls stream), ``router/grpc_request.py`` (a request's calls and its
per-request token stream), ``router/grpc_tokens.py`` (the batched token stream) and ``router/grpc_failures.py`` (what a
failed call means, aborting a failed attempt).
"""

from __future__ import annotations

import asyncio

import grpc

from colm.errors import UnknownRequestError
from colm.proto import load_proto
from colm.router.backend import WorkerInfo
from colm.router.call_stream import CallStream
from colm.router.config import TOKEN_STREAMS, WORKER_CALLS
from colm.router.grpc_channels import WorkerChannels, on_channel
from colm.router.grpc_failures import CallFailures
from colm.router.grpc_request import RequestCalls
from colm.router.grpc_tokens import BatchedTokens
from colm.router.policy import WorkerReport
from colm.router.token_subscription import TokenSubscription
from colm.scoring import prompt_logprobs

kv_pb2, _ = load_proto("kv")
STATS_TIMEOUT_S = 60.0  # the call's own bound; the router's poll gives up sooner (router.poll_timeout_s)


class GrpcBackend(WorkerChannels, CallFailures, RequestCalls, BatchedTokens):
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
        self._aborts_quiet: set[str] = set()  # decode workers whose failed aborts are logged at debug (one warned)
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
            s = await on_channel(worker_id, self._decode(worker_id).Stats(
                kv_pb2.DecodeStatsRequest(), metadata=self._md(), timeout=STATS_TIMEOUT_S))
            self._host_ids[worker_id] = s.host_id
            self._cuda[worker_id] = s.cuda_kv
            self._transports[worker_id] = tuple(s.transports)
            return WorkerReport.of_decode(worker_id, s)
        s = await on_channel(worker_id, self._prefill(worker_id).Stats(
            kv_pb2.PrefillStatsRequest(), metadata=self._md(), timeout=STATS_TIMEOUT_S))
        self._host_ids[worker_id] = s.host_id
        self._cuda[worker_id] = s.cuda
        nbytes, seconds, tokens = self._transfer.get(worker_id, (0, 0.0, 0))
        return WorkerReport.of_prefill(worker_id, s, transfer_bytes=nbytes, transfer_s=seconds,
                                       transfer_ms_per_mtoken=seconds * 1e9 / tokens if tokens else None)

    async def set_scale(self, decode_id: str, request_id: str, scale: int) -> None:
        try:
            await self._unary(decode_id, "SetScale", kv_pb2.SetScaleRequest(request_id=request_id, scale=scale),
                              kv_pb2.SetScaleReply, 2.0)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:  # the worker holds no such request (not yet, or no more)
                raise UnknownRequestError(e.details()) from None
            raise self._failure(e, decode_id) from None  # a worker gone: WorkerFailed, as a request's calls raise

    async def abort(self, decode_id: str, request_id: str) -> None:
        await self._unary(decode_id, "Abort", kv_pb2.AbortRequest(request_id=request_id), kv_pb2.AbortReply, 2.0)

    async def reset_prefix_cache(self, decode_id: str) -> int:
        r = await on_channel(decode_id, self._decode(decode_id).ResetPrefixCache(
            kv_pb2.ResetPrefixCacheRequest(), metadata=self._md(), timeout=10.0))
        return r.num_freed_blocks

    async def prompt_logprobs(self, decode_id: str, prompt_ids: list[int], scale: int):
        if self.scorer is not None:  # optional local copy: scores without loading a decode worker
            return await asyncio.get_running_loop().run_in_executor(None, prompt_logprobs, self.scorer, prompt_ids, scale)
        try:
            r = await on_channel(decode_id, self._decode(decode_id).Score(
                kv_pb2.ScoreRequest(token_ids=list(prompt_ids), scale=scale), metadata=self._md(), timeout=60.0))
        except grpc.aio.AioRpcError as e:
            raise self._failure(e, decode_id) from None
        return list(zip(r.logprobs, r.top_token_ids, r.top_logprobs))
