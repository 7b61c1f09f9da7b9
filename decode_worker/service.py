"""gRPC front of the decode engine: service ``colm.v1.DecodeWorker`` (see ``proto/colm/v1/kv.proto``).

The KV calls hand each stream to a transport's receiving half (``colm.kv.receivers``): ``PushKV`` to the
``BytesReceiver`` (grpc, shm, cuda_ipc), ``WriteKV`` to the ``GrantReceiver`` (cuda_pool, nixl); the engine is only
their target. ``PushKV`` messages are deserialised by ``read_kv_message``: a chunk's payload stays a view of the
received buffer (``colm.kv_wire.split_chunk_message``) and only its metadata goes through protobuf. The rest is
reservations, generation control (``StartGeneration`` per request, or ``Start`` + one batched ``Tokens`` stream per
router), stats and scoring. Errors map to status codes in ``colm.proto.rpc``.
"""

from __future__ import annotations

import grpc

from colm.kv.receivers import BytesReceiver, GrantReceiver
from colm.kv_wire import split_chunk_message
from colm.proto import load_proto
from colm.proto.call_stream import serve_calls
from colm.proto.convert import sampling_from_decode
from colm.proto.rpc import EngineServer, status_for
from colm.proto.token_ids import unpack_token_ids

from colm.decode_worker.engine import DecodeEngine

kv_pb2, kv_pb2_grpc = load_proto("kv")


class RawChunkMessage:
    """A ``KVMessage`` holding a chunk whose payload was left out of protobuf (``payload``: a memoryview)."""

    __slots__ = ("chunk", "payload")

    def __init__(self, chunk, payload: memoryview) -> None:
        self.chunk, self.payload = chunk, payload

    def WhichOneof(self, name: str) -> str:  # noqa: N802 - the protobuf message API the service loop uses
        return "chunk"


def read_kv_message(raw: bytes):
    split = split_chunk_message(raw)
    if split is None:
        return kv_pb2.KVMessage.FromString(raw)
    return RawChunkMessage(kv_pb2.KVChunk.FromString(split[0]), split[1])


def add_decode_service(servicer, server) -> None:
    """``add_DecodeWorkerServicer_to_server`` with ``PushKV`` requests read by ``read_kv_message``."""

    class _Capture:
        handlers: dict = {}

        def add_generic_rpc_handlers(self, handlers) -> None:
            pass

        def add_registered_method_handlers(self, name, handlers) -> None:
            self.name, self.handlers = name, dict(handlers)

    cap = _Capture()
    kv_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, cap)
    if "PushKV" not in cap.handlers:  # generated code of another grpc version: keep its handlers
        kv_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
        return
    handlers = dict(cap.handlers)
    handlers["PushKV"] = handlers["PushKV"]._replace(request_deserializer=read_kv_message)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(cap.name, handlers),))
    server.add_registered_method_handlers(cap.name, handlers)


def _event(ev) -> "kv_pb2.TokenEvent":
    msg = kv_pb2.TokenEvent(request_id=ev.request_id, token_id=ev.token_id, index=ev.index, scale=ev.scale,
                            finish_reason=ev.finish_reason, time_ms=ev.time_ms, logprob=ev.logprob, drafted=ev.drafted,
                            top_token_ids=[t for t, _ in ev.top_logprobs], top_logprobs=[lp for _, lp in ev.top_logprobs])
    if ev.timeline_ms:  # the first event only
        msg.timeline_ms.update(ev.timeline_ms)
        msg.monotonic_s = ev.monotonic_s
    return msg


class DecodeService(kv_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, engine: DecodeEngine, max_calls: int = 64) -> None:
        self.engine = engine
        self.max_calls = max_calls  # calls running at once on one Calls stream
        self.bytes_receiver = BytesReceiver(engine)  # PushKV: grpc, shm, cuda_ipc
        self.grant_receiver = GrantReceiver(engine)  # WriteKV: cuda_pool, nixl
        from colm.kv.registry import receivable

        # what this worker can receive (Stats and ReserveReply): known from the start, so the router may send the first
        # request's Prefill with its Reserve where the transport allows
        self._transports = receivable(engine.device.type == "cuda")

    def Calls(self, request_iterator, context):
        """The router's short calls as messages of one stream (``colm.proto.call_stream``)."""
        yield from serve_calls({"Reserve": (self.Reserve, kv_pb2.ReserveRequest),
                                "Start": (self.Start, kv_pb2.StartGenerationRequest),
                                "SetScale": (self.SetScale, kv_pb2.SetScaleRequest),
                                "Abort": (self.Abort, kv_pb2.AbortRequest)}, request_iterator, context, self.max_calls)

    def Reserve(self, request, context):
        r = self.engine.reserve(request.request_id, int(request.prompt_len), int(request.max_new_tokens),
                                request.timeout_s or None)
        cuda = self.engine.device.type == "cuda"
        return kv_pb2.ReserveReply(request_id=r.request_id, num_blocks=r.num_blocks, block_size=r.block_size,
                                   host_id=r.host_id, cuda_kv=cuda, transports=self._transports)

    def PushKV(self, request_iterator, context):
        return self.bytes_receiver.receive(request_iterator, context)

    def WriteKV(self, request_iterator, context):
        return self.grant_receiver.receive(request_iterator, context)

    def _start(self, request, subscriber: str | None):
        """``engine.start_generation`` for a StartGenerationRequest; sampling the engine refuses frees the
        reservation (never a running request of the same id)."""
        try:
            params = sampling_from_decode(request.sampling)
        except ValueError:
            self.engine.abort(request.request_id, unstarted_only=True)
            raise
        if request.prompt_token_ids_u32 or request.reserve_max_new_tokens:  # colocated: the prompt, not a KV stream
            try:
                prompt = unpack_token_ids(request.prompt_token_ids_u32, "prompt_token_ids_u32")
            except ValueError:
                self.engine.abort(request.request_id, unstarted_only=True)
                raise
            if request.reserve_max_new_tokens:  # the reservation comes with the Start: one call for the request
                self.engine.reserve(request.request_id, len(prompt) + 1, int(request.reserve_max_new_tokens),
                                    request.kv_timeout_s or None, prefill_tokens=prompt, cache_salt=request.cache_salt)
            if len(prompt):  # a one-token prompt has no K/V to compute before its first step
                self.engine.prefill_kv(request.request_id, prompt, cache_salt=request.cache_salt)
        try:
            context = (unpack_token_ids(request.context_token_ids_u32, "context_token_ids_u32")
                       if request.context_token_ids_u32 else None)
        except ValueError:
            self.engine.abort(request.request_id, unstarted_only=True)
            raise
        return self.engine.start_generation(request.request_id, int(request.last_token_id), params,
                                            int(request.scale) or None, request.kv_timeout_s or None,
                                            subscriber=subscriber, speculative=int(request.speculative),
                                            context_ids=context, prior_output=int(request.prior_output_tokens))

    def StartGeneration(self, request, context):
        rid = request.request_id
        stream = self._start(request, None)
        context.add_callback(lambda: self.engine.abort(rid))  # client gone: stop generating (no-op when finished)
        for ev in stream:
            yield _event(ev)

    def Tokens(self, request, context):
        """The caller's batched token stream: an empty batch once subscribed, then one batch per decode step with
        the events and failures of the requests it began with ``Start``. Ending it aborts those requests."""
        sub = self.engine.mux.open(request.subscriber)
        context.add_callback(lambda: self.engine.end_subscription(sub))
        yield kv_pb2.TokenBatch()
        for items in sub:
            events, failures = [], []
            for it in items:
                if isinstance(it, tuple):
                    rid, exc = it
                    failures.append(kv_pb2.TokenFailure(request_id=rid, code=status_for(exc).name,
                                                        message=f"{type(exc).__name__}: {exc}"))
                else:
                    events.append(_event(it))
            yield kv_pb2.TokenBatch(events=events, failures=failures)

    def Start(self, request, context):
        if not request.subscriber:
            raise ValueError("subscriber: Start needs the id of an open Tokens stream (or use StartGeneration)")
        self._start(request, request.subscriber)
        return kv_pb2.StartGenerationReply(request_id=request.request_id)

    def SetScale(self, request, context):
        return kv_pb2.SetScaleReply(request_id=request.request_id,
                                    scale=self.engine.set_scale(request.request_id, int(request.scale)))

    def Abort(self, request, context):
        return kv_pb2.AbortReply(request_id=request.request_id, found=self.engine.abort(request.request_id))

    def Stats(self, request, context):
        # a dead step loop fails the router's health poll (UNAVAILABLE); a stuck one answers with its stall_s
        self.engine.check_alive()
        s = self.engine.stats()
        return kv_pb2.DecodeStats(host_id=s.host_id, num_chains=s.num_chains, num_blocks=s.num_blocks,
                                  num_free_blocks=s.num_free_blocks, block_size=s.block_size,
                                  num_reserved=s.num_reserved, num_running=s.num_running, num_steps=s.num_steps,
                                  step_ms_by_scale=s.step_ms_by_scale, step_batch_by_scale=s.step_batch_by_scale,
                                  last_step_ms=s.last_step_ms,
                                  last_batch_size=s.last_batch_size, num_finished=s.num_finished,
                                  num_failed=s.num_failed, num_held_blocks=s.num_held_blocks,
                                  num_drafted=s.num_drafted, num_draft_accepted=s.num_draft_accepted,
                                  cuda_kv=self.engine.device.type == "cuda", prefills=s.prefills,
                                  num_prefill_queued_tokens=s.num_prefill_queued_tokens,
                                  prefill_tokens_per_s=s.prefill_tokens_per_s,
                                  num_prefill_chunks=s.num_prefill_chunks,
                                  round_ms_by_scale_gamma=s.round_ms_by_scale_gamma,
                                  round_batch_by_scale_gamma=s.round_batch_by_scale_gamma,
                                  num_steps_launched_ahead=s.num_steps_launched_ahead,
                                  num_steps_dropped=s.num_steps_dropped, transports=self._transports,
                                  num_cached_blocks=s.num_cached_blocks,
                                  num_prefix_query_tokens=s.num_prefix_query_tokens,
                                  num_prefix_hit_tokens=s.num_prefix_hit_tokens,
                                  stall_s=s.stall_s, stall_requests=s.stall_requests)

    def ResetPrefixCache(self, request, context):
        return kv_pb2.ResetPrefixCacheReply(num_freed_blocks=self.engine.reset_prefix_cache())

    def Score(self, request, context):
        rows = self.engine.score(list(request.token_ids), int(request.scale) or None)
        return kv_pb2.ScoreReply(logprobs=[r[0] for r in rows], top_token_ids=[r[1] for r in rows],
                                 top_logprobs=[r[2] for r in rows])


class DecodeServer(EngineServer):
    """The decode engine's loop plus ``colm.v1.DecodeWorker`` on ``address``.

    Threads: each reservation may hold a StartGeneration stream (waiting for its KV, then generating) and
    a PushKV stream at once, so ``max_workers`` defaults to two per ``DecodeConfig.max_reservations`` plus
    room for the short calls. With a fixed 64, 64 streams waiting for their KV took every thread: the PushKV
    streams that would have ended the wait queued behind them and Stats timed out (tests/test_rpc_threads.py)."""

    def __init__(self, engine: DecodeEngine, cluster_token: str, address: str = "127.0.0.1:0",
                 max_workers: int | None = None) -> None:
        max_workers = max_workers or 2 * engine.config.max_reservations + 32
        super().__init__(engine, cluster_token, address,
                         lambda server: add_decode_service(DecodeService(engine, max_workers), server), max_workers)


