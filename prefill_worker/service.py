"""gRPC front of the prefill engine: service ``colm.v1.PrefillWorker`` (see ``proto/colm/v1/kv.proto``).

``Prefill`` asks the transport registry which transport the request takes (``colm.kv.registry.choose``
with the pair's facts: bytes over ``PushKV``, shared memory, CUDA IPC of a staging tensor, writes into
decode's pool, NIXL), has that transport make its sink to the named decode worker, submits the prompt to
the engine and waits within the request's deadline; a call whose caller is gone takes its prompt out of the
queue if it is still there (``PrefillEngine.cancel``). Channels to decode workers are cached per address.
"""

from __future__ import annotations

import threading
import time

from colm.errors import RequestAbortedError
from colm.kv import registry
from colm.proto import load_proto
from colm.proto.call_stream import serve_calls
from colm.proto.rpc import EngineServer
from colm.proto.token_ids import request_token_ids

from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.kv_push import decode_stub

kv_pb2, kv_pb2_grpc = load_proto("kv")


class PrefillService(kv_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, engine: PrefillEngine, cluster_token: str, max_calls: int = 64) -> None:
        self.engine = engine
        self.cluster_token = cluster_token
        self.max_calls = max_calls  # Prefill calls running at once on one Calls stream
        self._stubs: dict[str, object] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str):
        if not address:
            raise ValueError("decode_address is empty")
        with self._lock:
            if address not in self._stubs:
                self._stubs[address] = decode_stub(address)
            return self._stubs[address]

    def Calls(self, request_iterator, context):
        """The router's Prefill calls as messages of one stream (``colm.proto.call_stream``)."""
        yield from serve_calls({"Prefill": (self.Prefill, kv_pb2.PrefillRequest)}, request_iterator, context,
                               self.max_calls)

    def Prefill(self, request, context):
        received = time.monotonic()
        token_ids = request_token_ids(request)  # before any sink opens a stream: a bad field fails alone
        timeout = request.timeout_s or self.engine.config.default_timeout_s
        facts = registry.PairFacts(request.same_host, self.engine.device.type == "cuda", request.decode_cuda,
                                   tuple(request.decode_transports))
        transport = registry.get(registry.choose(request.path, facts))
        sink = transport.make_sink(registry.SinkContext(
            self._stub(request.decode_address), request.request_id, self.cluster_token, self.engine.config,
            self.engine.device, timeout, request.decode_address, on_cancel=context.add_callback,
            same_host=request.same_host))
        job = self.engine.submit(request.request_id, token_ids, sink, timeout, received)
        # a caller that is gone (cancelled, deadline passed) takes its prompt out of the queue: it is not computed and
        # pushed to a reservation that has gone too, ahead of the prompts of callers still waiting
        def caller_gone() -> None:
            self.engine.cancel(job, RequestAbortedError(f"request {request.request_id}: Prefill cancelled by the "
                                                        "caller while queued"))

        if not context.add_callback(caller_gone):  # the call ended already
            caller_gone()
        r = job.result(timeout=timeout)
        return kv_pb2.PrefillReply(request_id=r.request_id, num_tokens=r.num_tokens, num_bytes=r.num_bytes,
                                   queue_ms=r.queue_ms, compute_ms=r.compute_ms, total_ms=r.total_ms, path=r.path,
                                   timeline_ms=r.timeline_ms, monotonic_s=r.monotonic_s)

    def Stats(self, request, context):
        self.engine.check_alive()  # a dead loop fails the router's health poll (UNAVAILABLE); a stuck one: stall_s
        s = self.engine.stats()
        return kv_pb2.PrefillStats(host_id=s.host_id, num_queued=s.num_queued, num_queued_tokens=s.num_queued_tokens,
                                   num_done=s.num_done, num_failed=s.num_failed, tokens_per_s=s.tokens_per_s,
                                   num_params=s.num_params, cuda=self.engine.device.type == "cuda",
                                   stall_s=s.stall_s, stall_requests=s.stall_requests)


class PrefillServer(EngineServer):
    """The prefill engine's loop plus ``colm.v1.PrefillWorker`` on ``address``.

    Threads: a Prefill call holds one from submission until its KV is delivered, so ``max_workers``
    defaults to the queue's bound plus two batches in flight (one computing, one delivering) and room
    for Stats, which the router's health checks need answered while the queue is full."""

    def __init__(self, engine: PrefillEngine, cluster_token: str, address: str = "127.0.0.1:0",
                 max_workers: int | None = None) -> None:
        c = engine.config
        max_workers = max_workers or c.max_queue + 2 * c.max_batch_size + 32
        super().__init__(engine, cluster_token, address, lambda server: kv_pb2_grpc.add_PrefillWorkerServicer_to_server(
            PrefillService(engine, cluster_token, max_workers), server), max_workers)
