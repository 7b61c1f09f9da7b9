"""One request's calls to its workers over gRPC (``GrpcBackend.generate``).

A request's path: ``DecodeWorker.Reserve`` (KV blocks for prompt + max_new_tokens) -> ``PrefillWorker.Prefill``
(chain-1 forward, K/V pushed to the decode worker) running concurrently with the decode worker's start (waits for the
KV, then streams tokens): ``StartGeneration``, a stream of its own (``token_stream="per_request"``, read here), or
``Start`` with the tokens on the worker's shared Tokens stream (``"batched"``: ``router/grpc_tokens.py``). A colocated
decode worker reserves and prefills with the start itself. Where the transport the pair would use lets decode's grant
wait for the reservation (``_early_transport``), Prefill goes out together with Reserve, so the Reserve round trip
leaves the TTFT. Any exit other than a finished stream aborts the request on the decode worker so its blocks are
freed (``router/grpc_failures.py``); ``silence`` says whom a silent attempt blames.

A mixin of ``GrpcBackend`` (``router/grpc_backend.py``), which sets up the state it uses.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from colm.logits_adjust import reads_prompt
from colm.proto import load_proto
from colm.proto.convert import sampling_to_decode
from colm.proto.token_ids import pack_token_ids
from colm.router.backend import EngineRequest, EngineToken, WorkerFailed, silent_worker
from colm.router.grpc_channels import on_channel
from colm.router.grpc_failures import _REFUSED
from colm.router.metrics import report_timeline

kv_pb2, _ = load_proto("kv")
CALL_TIMEOUT_S = 10.0  # the bound of a request's Reserve and Start calls (and its token stream's opening)


class RequestCalls:
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
                bound = min(timeout, CALL_TIMEOUT_S)
                try:
                    reply = await _unabandoned(placing, self._unary(decode_id, "Reserve", kv_pb2.ReserveRequest(
                        request_id=req.request_id, prompt_len=len(req.prompt_ids), max_new_tokens=p.max_new_tokens,
                        timeout_s=timeout), kv_pb2.ReserveReply, bound), req.failover)
                except grpc.aio.AioRpcError as e:
                    if e.code() in _REFUSED:
                        reserved = False
                    raise self._capped_failure(e, decode_id, timeout, bound) from None
            reserved = True
            if not colocated and reply.transports:  # what decode receives, known before its next Stats poll
                self._transports[decode_id] = tuple(reply.transports)
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
                next_tok = asyncio.ensure_future(on_channel(decode_id, anext(it)))
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
                except grpc.aio.AioRpcError as e:  # a channel closed under the stream too (on_channel)
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

    def silence(self, request_id: str, decode_id: str, idle_s: float) -> WorkerFailed:
        """The failure of attempt ``request_id`` after ``idle_s`` without a token (either token stream): its prefill
        worker's while no token has come and its Prefill call is still out (the decode worker waits for the K/V: the
        prefill worker is the silent one), else its decode worker's. Ask before the attempt's stream is closed."""
        return silent_worker(self._prefills, request_id, decode_id, idle_s)

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

    def _count_transfer(self, prefill_id: str, task: asyncio.Future, req: EngineRequest) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        r = task.result()  # PrefillReply: the hand-off is what the total holds beyond queueing and compute
        report_timeline(req, "prefill", r.monotonic_s, r.timeline_ms)
        t = self._transfer.setdefault(prefill_id, [0, 0.0, 0])
        t[0] += r.num_bytes
        t[1] += max(0.0, r.total_ms - r.queue_ms - r.compute_ms) / 1e3
        t[2] += r.num_tokens


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


async def _unabandoned(placing: list, call, failover=None):
    """``await call`` (a worker call that may reserve KV blocks), except that the caller's cancellation leaves the call
    running: it is kept in ``placing`` for the abort to wait for. ``failover`` (the attempt's, a backend that watches
    its own streams): a health poll that takes one of the attempt's workers out meanwhile ends the wait with
    WorkerFailed, the call left running likewise (a hung worker's Reserve or Start held the request until the call's
    own timeout, which then failed it with DEADLINE_EXCEEDED instead of failing it over)."""
    task = asyncio.ensure_future(call)
    placing.append(task)
    task.add_done_callback(_retrieve)
    if failover is not None:
        await asyncio.wait({task, failover}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and not failover.cancelled():
            raise WorkerFailed(failover.result(), "failed its health check")
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # marks it retrieved: no "Task exception was never retrieved" at garbage collection
