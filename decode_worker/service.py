"""gRPC front of the decode engine: service ``colm.v1.DecodeWorker`` (see ``proto/colm/v1/kv.proto``).

``PushKV`` is where the KV hand-off lands: header -> ``engine.begin_kv`` (attaching the sender's
shared-memory segment on the same-host path) -> per chunk: size and checksum check, then
``engine.write_kv`` into the reserved blocks -> ``KVEnd`` -> ``engine.finish_kv`` and an ack. A
checksum mismatch, gap, or a stream that ends or breaks before ``KVEnd`` fails that request (its
blocks are freed); the worker goes on serving. Errors map to status codes in ``colm.proto.rpc``.

On the cuda_ipc path the header carries a CUDA IPC handle of the sender's device staging tensor
(``colm.kv_ipc``): it is opened once per stream (mappings cached per handle), each chunk names only
a range of it, copied into the blocks on a side stream and synchronised before the next message,
so the ack means decode is done reading the sender's memory.

``WriteKV`` is the cuda_pool path: the sender writes into the request's blocks itself. Header ->
``engine.grant_kv`` (waiting up to ``DecodeConfig.grant_wait_s`` for a Reserve sent at the same time) ->
the reply names the blocks and the pool's IPC handle (and whether a ready event is accepted) -> each
chunk only marks a range the sender has written or queued (``engine.mark_kv``) -> ``KVEnd`` (with the
sender's ready event's IPC handle, opened here) -> ``engine.finish_kv`` and an ack. However the stream
ends, ``engine.end_external_writes`` follows (so blocks held back from an ended request go back, after
a grace period if the stream broke).

``WriteKV`` with ``KVHeader.transport = "nixl"`` is the NIXL transport's control stream, the same grant and
marks (``colm.kv.nixl``): the grant adds the pool's NIXL registration (``pool_grant_fields``), the sender
WRITEs straight into the blocks, and each mark's checksum is checked against the pool's slots before
``mark_kv``; if the request ends while the stream is open, the stream is cancelled (the blocks then wait
out the grace).

``PushKV`` messages are deserialised by ``read_kv_message``: a chunk's payload stays a view of the
received buffer (``colm.kv_wire.split_chunk_message``) and only its metadata goes through protobuf.
"""

from __future__ import annotations

import contextlib

import grpc
import numpy as np
import torch

from colm.errors import PeerUnavailableError, TransferError
from colm.kernels._tuning import DEVICE_WIDE_LOCK
from colm.kv_ipc import StagingOpener
from colm.kv_wire import (CHECKSUMS, KVLayout, bytes_to_tensor, checksum, open_segment, prefetch, split_chunk_message,
                          tensor_bytes)
from colm.proto import load_proto
from colm.proto.convert import sampling_from_decode
from colm.proto.rpc import EngineServer, status_for

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
                            finish_reason=ev.finish_reason, time_ms=ev.time_ms, logprob=ev.logprob, drafted=ev.drafted)
    if ev.timeline_ms:  # the first event only
        msg.timeline_ms.update(ev.timeline_ms)
        msg.monotonic_s = ev.monotonic_s
    return msg


def layout_of(header) -> KVLayout:
    return KVLayout(header.num_layers, header.num_tokens, header.num_kv_heads, header.head_dim, header.dtype)


class DecodeService(kv_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine
        self.ipc = StagingOpener()
        self._copy_stream = None  # cuda_ipc copies: off the step loop's stream, so a sync waits only for them
        self._transports = None  # ReserveReply.transports (colm.kv.registry.receivable), made on the first Reserve

    def Reserve(self, request, context):
        r = self.engine.reserve(request.request_id, int(request.prompt_len), int(request.max_new_tokens),
                                request.timeout_s or None)
        cuda = self.engine.device.type == "cuda"
        if self._transports is None:
            from colm.kv.registry import receivable

            self._transports = receivable(cuda)
        return kv_pb2.ReserveReply(request_id=r.request_id, num_blocks=r.num_blocks, block_size=r.block_size,
                                   host_id=r.host_id, cuda_kv=cuda, transports=self._transports)

    def PushKV(self, request_iterator, context):
        state = {"rid": None, "done": False}

        def on_end():  # the peer vanished mid-stream: free the request's blocks
            if state["rid"] and not state["done"]:
                self.engine.fail_kv(state["rid"], PeerUnavailableError(f"request {state['rid']}: KV stream broke"))

        context.add_callback(on_end)
        segment = None
        staging = None  # cuda_ipc: the sender's [layers, tokens, 2, kv_heads, head_dim], mapped here
        header = None
        try:
            for msg in prefetch(request_iterator, name="colm-kv-receive"):  # receive the next while this one is written
                kind = msg.WhichOneof("kind")
                if kind == "header":
                    if header is not None:
                        raise TransferError("second KV header in one stream")
                    header = msg.header
                    layout = layout_of(header)
                    state["rid"] = header.request_id
                    if header.checksum not in CHECKSUMS + ("",):  # "" (field unset) = none
                        raise TransferError(f"request {header.request_id}: checksum {header.checksum!r} unknown")
                    self.engine.begin_kv(header.request_id, layout)
                    if header.shm_name:
                        segment = open_segment(header.shm_name)
                    elif header.ipc_process and layout.num_tokens:
                        with DEVICE_WIDE_LOCK:  # opens a CUDA IPC mapping: not during a capture or tuning
                            staging = self.ipc.open(header, layout)
                elif header is None:
                    raise TransferError("KV stream does not start with a header")
                elif kind == "chunk":
                    self._write_chunk(header, msg.chunk, segment, getattr(msg, "payload", None), staging)
                elif kind == "end":
                    self.engine.finish_kv(header.request_id, header.num_tokens)
                    state["done"] = True
                    return kv_pb2.KVAck(request_id=header.request_id, num_chunks=msg.end.num_chunks,
                                        num_bytes=msg.end.num_bytes)
            raise TransferError(f"request {state['rid']}: KV stream ended without KVEnd (truncated)")
        except Exception as e:
            raise self._stream_failed(state["rid"], e, context, fail=not state["done"]) from None
        finally:
            if segment is not None:
                try:
                    segment.close()
                except BufferError:  # a view is still alive somewhere; the mapping goes with the process
                    pass

    def WriteKV(self, request_iterator, context):
        state = {"grant": None, "clean": False}

        def on_end():  # the peer vanished: the request fails; its blocks wait out the grace if it already ended
            grant = state["grant"]
            if grant is not None and not state["clean"]:
                self.engine.fail_kv(grant.request_id, PeerUnavailableError(f"request {grant.request_id}: KV stream broke"))
                self.engine.end_external_writes(grant, clean=False)

        context.add_callback(on_end)
        rid = None
        try:
            messages = iter(request_iterator)
            msg = next(messages, None)
            if msg is None or msg.WhichOneof("kind") != "header":
                raise TransferError("KV stream does not start with a header")
            header = msg.header
            rid = header.request_id
            layout = layout_of(header)
            if header.transport not in ("", "cuda_pool", "nixl"):
                raise TransferError(f"request {rid}: transport {header.transport!r} is not received by WriteKV")
            nixl = header.transport == "nixl"
            # nixl: a sender that may be on another host; if the request ends first, its stream is cancelled, so its
            # blocks wait out the grace instead of the sender's deadline
            grant = state["grant"] = self.engine.grant_kv(rid, layout, self.engine.config.grant_wait_s,
                                                          stop_writer=context.cancel if nixl else None)
            pool = self.engine.pool
            if nixl:
                from colm.kv import nixl as kv_nixl

                fields = kv_nixl.pool_grant_fields(self.engine)
                verify = header.checksum not in ("", "none")
            else:
                fields = self.engine.pool_export().header_fields()
                fields["accepts_ready_event"] = self.engine.accepts_ready_events()
            yield kv_pb2.KVPoolReply(grant=kv_pb2.KVPoolGrant(
                request_id=rid, block_ids=grant.blocks, block_size=pool.block_size, num_blocks=pool.num_blocks,
                dtype=self.engine.kv_dtype(), **fields))
            for msg in messages:
                kind = msg.WhichOneof("kind")
                if kind == "chunk":
                    c = msg.chunk
                    if c.data or getattr(msg, "payload", None):
                        raise TransferError(f"request {rid}: inline bytes on the {header.transport or 'cuda_pool'} path")
                    if nixl and verify:  # the range's bytes as they landed in the blocks (a device pool: a D2H copy)
                        with DEVICE_WIDE_LOCK if pool.kv.is_cuda else contextlib.nullcontext():
                            kv_nixl.verify_range(pool, grant.blocks, layout, c, header.checksum, rid)
                    self.engine.mark_kv(rid, c.layer_start, c.layer_end, c.token_start, c.token_end, seq=c.seq)
                elif kind == "end":
                    ready = msg.end.ready_event_ipc
                    self.engine.finish_kv(rid, header.num_tokens,
                                          ready=self.engine.open_ready_event(bytes(ready)) if ready else None)
                    state["clean"] = True
                    self.engine.end_external_writes(grant, clean=True)
                    yield kv_pb2.KVPoolReply(ack=kv_pb2.KVAck(request_id=rid, num_chunks=msg.end.num_chunks,
                                                              num_bytes=msg.end.num_bytes))
                    return
                else:
                    raise TransferError(f"request {rid}: second KV header in one stream")
            raise TransferError(f"request {rid}: KV stream ended without KVEnd (truncated)")
        except Exception as e:
            raise self._stream_failed(rid, e, context, fail=not state["clean"]) from None
        finally:
            if state["grant"] is not None and not state["clean"]:
                self.engine.end_external_writes(state["grant"], clean=False)

    def _stream_failed(self, rid: str | None, e: Exception, context, fail: bool) -> Exception:
        """What a failed KV stream raises: its request (``rid``, when ``fail``: its KV is not complete yet) fails and
        frees its blocks; a stream whose peer is gone says UNAVAILABLE, anything else keeps its own error."""
        if rid and fail:
            self.engine.fail_kv(rid, e if isinstance(e, TransferError) else TransferError(str(e)))
        if isinstance(e, grpc.RpcError) or not context.is_active():
            return PeerUnavailableError(f"request {rid}: KV stream broke")
        return e

    def _write_chunk(self, header, c, segment, inline=None, staging=None) -> None:
        rid = header.request_id
        if c.dtype != header.dtype:
            raise TransferError(f"request {rid}: chunk dtype {c.dtype!r}, header {header.dtype!r}")
        if staging is not None:
            self._write_ipc_chunk(header, c, staging, inline)
            return
        if segment is not None:
            if c.data or inline:
                raise TransferError(f"request {rid}: inline bytes on the shared-memory path")
            if c.shm_offset + c.nbytes > segment.size:
                raise TransferError(f"request {rid}: chunk [{c.shm_offset}, +{c.nbytes}) outside the segment")
            payload = segment.buf[c.shm_offset : c.shm_offset + c.nbytes]
        else:
            payload = inline if inline is not None else memoryview(c.data)
        if len(payload) != c.nbytes:
            raise TransferError(f"request {rid}: chunk {c.seq} has {len(payload)} bytes, says {c.nbytes}")
        if header.checksum not in ("none", "") and checksum(payload, header.checksum) != c.crc32:
            raise TransferError(f"request {rid}: checksum mismatch in chunk {c.seq}")
        try:
            kv = bytes_to_tensor(payload, c.dtype, tuple(c.shape))
        except ValueError as e:
            raise TransferError(f"request {rid}: chunk {c.seq}: {e}") from None
        self.engine.write_kv(rid, c.layer_start, c.layer_end, c.token_start, c.token_end, kv, seq=c.seq)
        del kv, payload, inline

    def _write_ipc_chunk(self, header, c, staging, inline) -> None:
        rid = header.request_id
        if c.data or inline:
            raise TransferError(f"request {rid}: inline bytes on the cuda_ipc path")
        kv = staging[c.layer_start : c.layer_end, c.token_start : c.token_end]  # ranges checked by write_kv
        if c.nbytes != kv.numel() * kv.element_size():
            raise TransferError(f"request {rid}: chunk {c.seq} says {c.nbytes} bytes, its ranges hold "
                                f"{kv.numel() * kv.element_size()}")
        if header.checksum not in ("none", ""):
            with DEVICE_WIDE_LOCK:  # a device->host copy (a sync): not during a capture or tuning
                host = kv.contiguous().cpu()
            if checksum(tensor_bytes(host), header.checksum) != c.crc32:
                raise TransferError(f"request {rid}: checksum mismatch in chunk {c.seq}")
        with self._ipc_stream(kv):
            self.engine.write_kv(rid, c.layer_start, c.layer_end, c.token_start, c.token_end, kv, seq=c.seq, sync=True)

    def _ipc_stream(self, kv):
        if not (kv.is_cuda and self.engine.device.type == "cuda"):
            return contextlib.nullcontext()
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.engine.device)
        return torch.cuda.stream(self._copy_stream)

    def _start(self, request, subscriber: str | None):
        """``engine.start_generation`` for a StartGenerationRequest; sampling the engine refuses frees the
        reservation (never a running request of the same id)."""
        try:
            params = sampling_from_decode(request.sampling)
        except ValueError:
            self.engine.abort(request.request_id, unstarted_only=True)
            raise
        if request.prompt_token_ids_u32:  # colocated: the prompt instead of a KV stream
            packed = request.prompt_token_ids_u32
            if len(packed) % 4:
                self.engine.abort(request.request_id, unstarted_only=True)
                raise ValueError(f"prompt_token_ids_u32 has {len(packed)} bytes; it must hold 4 bytes (a "
                                 "little-endian uint32) per token")
            self.engine.prefill_kv(request.request_id, np.frombuffer(packed, dtype="<u4"))
        return self.engine.start_generation(request.request_id, int(request.last_token_id), params,
                                            int(request.scale) or None, request.kv_timeout_s or None,
                                            subscriber=subscriber, speculative=int(request.speculative))

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
                                  prefill_tokens_per_s=s.prefill_tokens_per_s)

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
                         lambda server: add_decode_service(DecodeService(engine), server), max_workers)


