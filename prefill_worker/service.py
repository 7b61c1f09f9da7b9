"""gRPC front of the prefill engine: service ``colm.v1.PrefillWorker`` (see ``proto/colm/v1/kv.proto``).

``Prefill`` picks the request's hand-off path (``colm.prefill_worker.paths.choose_path``: bytes over
``PushKV``, shared memory, CUDA IPC of a staging tensor, or writes into decode's pool), builds that
remote sink to the named decode worker, submits the prompt to the engine and waits within the
request's deadline. Channels to decode workers are
cached per address.
"""

from __future__ import annotations

import threading
import time

from colm.errors import RequestAbortedError
from colm.proto import load_proto
from colm.proto.rpc import EngineServer
from colm.proto.token_ids import request_token_ids

from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.ipc_sink import IpcKVSink
from colm.prefill_worker.kv_push import GrpcKVSink, decode_stub
from colm.prefill_worker.paths import choose_path
from colm.prefill_worker.pool_sink import PoolKVSink

kv_pb2, kv_pb2_grpc = load_proto("kv")


class PrefillService(kv_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, engine: PrefillEngine, cluster_token: str) -> None:
        self.engine = engine
        self.cluster_token = cluster_token
        self._stubs: dict[str, object] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str):
        if not address:
            raise ValueError("decode_address is empty")
        with self._lock:
            if address not in self._stubs:
                self._stubs[address] = decode_stub(address)
            return self._stubs[address]

    def Prefill(self, request, context):
        received = time.monotonic()
        token_ids = request_token_ids(request)  # before any sink opens a stream: a bad field fails alone
        timeout = request.timeout_s or self.engine.config.default_timeout_s
        cfg = self.engine.config
        path = choose_path(request.path, request.same_host, self.engine.device.type == "cuda", request.decode_cuda)
        stub = self._stub(request.decode_address)
        if path == "cuda_pool":
            sink = PoolKVSink(stub, request.request_id, self.cluster_token, timeout)
            # The router sends Reserve and Prefill at once on this path; if its Reserve fails it cancels this call,
            # and the grant will never come: fail the sink, so the request ends now (not after the grant wait) and
            # the K/V it kept for the grant are dropped.
            context.add_callback(lambda: sink.fail(RequestAbortedError(f"request {request.request_id}: Prefill "
                                                                       "cancelled by the caller")))
        elif path == "cuda_ipc":
            sink = IpcKVSink(stub, request.request_id, self.cluster_token, self.engine.device, cfg.ipc_checksum, timeout,
                             cfg.ipc_chunk_layers)
        else:
            sink = GrpcKVSink(stub, request.request_id, self.cluster_token, cfg.kv_chunk_bytes,
                              cfg.shm_checksum if path == "shm" else cfg.checksum, timeout, shm=path == "shm")
        r = self.engine.submit(request.request_id, token_ids, sink, timeout, received).result(timeout=timeout)
        return kv_pb2.PrefillReply(request_id=r.request_id, num_tokens=r.num_tokens, num_bytes=r.num_bytes,
                                   queue_ms=r.queue_ms, compute_ms=r.compute_ms, total_ms=r.total_ms, path=r.path,
                                   timeline_ms=r.timeline_ms, monotonic_s=r.monotonic_s)

    def Stats(self, request, context):
        s = self.engine.stats()
        return kv_pb2.PrefillStats(host_id=s.host_id, num_queued=s.num_queued, num_queued_tokens=s.num_queued_tokens,
                                   num_done=s.num_done, num_failed=s.num_failed, tokens_per_s=s.tokens_per_s,
                                   num_params=s.num_params, cuda=self.engine.device.type == "cuda")


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
            PrefillService(engine, cluster_token), server), max_workers)
