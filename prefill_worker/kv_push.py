"""Remote KV sinks: push a request's K/V to a decode worker with ``DecodeWorker.PushKV``.

``GrpcKVSink`` (cross-host) puts the raw bytes in the chunk messages; with ``shm=True`` (same host)
the bytes go into a POSIX shared-memory segment this side creates and the messages only say where
(offset, size, checksum). Path of one request: ``begin`` opens the client stream (header first) ->
each ``put`` is staged to host memory (``StagedKVSink``) and the stream's generator, run by gRPC's
sender thread, cuts it into chunks of at most ``chunk_bytes`` (bytes path; one chunk per ``put`` on
the shared-memory path, where a chunk is only an offset) -> ``finish`` sends ``KVEnd`` and waits
for the ack within the deadline -> the segment is unlinked. ``fail`` ends the stream without
``KVEnd`` and cancels it, so decode frees the request's blocks.

Copies per payload byte: bytes path, one into the message (``encode_chunk_message``, through
``decode_stub``'s ``PushKVRaw``; a plain stub falls back to protobuf messages, two copies); shared
memory, one into the segment (``torch`` copy, off the GIL).
"""

from __future__ import annotations

import grpc
import torch

from colm.errors import PeerUnavailableError, TransferError
from colm.kv_wire import KVLayout, SenderSegment, checksum, encode_chunk_message, prefetch, shm_name_for, tensor_bytes
from colm.proto import load_proto
from colm.proto.rpc import auth_metadata, error_line, make_channel

from colm.prefill_worker.sinks import StagedKVSink

kv_pb2, kv_pb2_grpc = load_proto("kv")

PUSH_KV_METHOD = "/colm.v1.DecodeWorker/PushKV"


def _serialize(msg) -> bytes:
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def kv_header(request_id: str, layout: KVLayout, checksum_kind: str, **fields):
    """The ``KVHeader`` of a request's stream (``fields``: the path's own, e.g. ``shm_name`` or ``ipc_*``)."""
    return kv_pb2.KVHeader(request_id=request_id, num_layers=layout.num_layers, num_tokens=layout.num_tokens,
                           num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim, dtype=layout.dtype,
                           checksum=checksum_kind, **fields)


def decode_stub(target):
    """A ``DecodeWorkerStub`` (``target``: address or channel) plus ``PushKVRaw``: ``PushKV`` whose request
    stream may hold pre-serialised chunk messages (bytes), so payloads skip protobuf."""
    channel = make_channel(target) if isinstance(target, str) else target
    stub = kv_pb2_grpc.DecodeWorkerStub(channel)
    stub.PushKVRaw = channel.stream_unary(PUSH_KV_METHOD, request_serializer=_serialize,
                                          response_deserializer=kv_pb2.KVAck.FromString)
    return stub


class GrpcKVSink(StagedKVSink):
    def __init__(self, stub, request_id: str, cluster_token: str, chunk_bytes: int = 4 << 20,
                 checksum_kind: str = "crc32", timeout_s: float = 60.0, shm: bool = False) -> None:
        super().__init__()
        self.stub = stub
        self.request_id = request_id
        self.metadata = auth_metadata(cluster_token)
        self.chunk_bytes = chunk_bytes
        self.checksum_kind = checksum_kind
        self.timeout_s = timeout_s
        self.shm = shm
        self.path = "shm" if shm else "grpc"
        self.num_bytes = 0
        self._num_chunks = 0
        self._segment = None
        self._future = None
        self._layout: KVLayout | None = None
        self._raw = False

    def begin(self, layout: KVLayout) -> None:
        self._layout = layout
        shm_name = ""
        if self.shm:
            shm_name = shm_name_for(self.request_id, str(id(self)))
            self._segment = SenderSegment(shm_name, layout.num_bytes)
        header = kv_header(self.request_id, layout, self.checksum_kind, shm_name=shm_name)
        raw = getattr(self.stub, "PushKVRaw", None)
        self._raw = raw is not None
        call = raw if raw is not None else self.stub.PushKV
        # encoding runs a message or two ahead of gRPC's sender thread, which waits for each write
        self._future = call.future(prefetch(self._messages(header), name="colm-kv-encode"), timeout=self.timeout_s,
                                   metadata=self.metadata)

    def _messages(self, header):
        yield kv_pb2.KVMessage(header=header)
        if self._segment is None:
            yield from self._chunks(None)
        else:  # the segment stays mapped while this stream writes into it, whenever the request ends
            with self._segment.view() as seg:  # [num_bytes] uint8: torch copies into it release the GIL
                yield from self._chunks(seg)
        yield self._end_message()

    def _chunks(self, seg):
        per_token = self._layout.bytes_per_token_layer
        for (l0, l1, t0, t1), host in self._staged():
            # bytes path: chunks of at most chunk_bytes (message size limit); shm path: one chunk per put
            step = t1 - t0 if seg is not None else max(1, self.chunk_bytes // (per_token * (l1 - l0)))
            for a in range(t0, t1, step):
                b = min(t1, a + step)
                piece = host[:, a - t0 : b - t0]  # [layers, tokens, 2, Hkv, hd]
                if not piece.is_contiguous():  # a token slice of a put of several layers
                    piece = piece.contiguous()
                payload = tensor_bytes(piece)
                chunk = kv_pb2.KVChunk(seq=self._num_chunks, layer_start=l0, layer_end=l1, token_start=a,
                                       token_end=b, dtype=self._layout.dtype, shape=list(piece.shape),
                                       nbytes=len(payload), crc32=checksum(payload, self.checksum_kind))
                if seg is not None:
                    chunk.shm_offset = self.num_bytes
                    seg[self.num_bytes : self.num_bytes + len(payload)].copy_(torch.frombuffer(payload, dtype=torch.uint8))
                    msg = kv_pb2.KVMessage(chunk=chunk)
                elif self._raw:
                    msg = encode_chunk_message(chunk.SerializeToString(), payload)
                else:
                    chunk.data = payload.tobytes()
                    msg = kv_pb2.KVMessage(chunk=chunk)
                self.num_bytes += len(payload)
                self._num_chunks += 1
                del payload, piece
                yield msg

    def finish(self, timeout_s: float) -> int:
        self._close_queue()
        try:
            ack = self._future.result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            self._future.cancel()
            raise TimeoutError(f"request {self.request_id}: KV push not acknowledged in {timeout_s:.1f} s") from None
        except grpc.RpcError as e:
            raise _peer_error(self.request_id, e) from None
        finally:
            self._release()
        return self._checked(ack)

    def _checked(self, ack) -> int:
        """The bytes sent, once decode's ``KVAck`` agrees with what this side sent."""
        if ack.num_chunks != self._num_chunks or ack.num_bytes != self.num_bytes:
            raise TransferError(f"request {self.request_id}: decode acknowledged {ack.num_chunks} chunks / "
                                f"{ack.num_bytes} bytes, sent {self._num_chunks} / {self.num_bytes}")
        return self.num_bytes

    def _range_chunk(self, l0: int, l1: int, t0: int, t1: int, crc: int = 0):
        """A ``KVChunk`` naming layers [l0, l1) x tokens [t0, t1) without their bytes (the cuda_ipc, cuda_pool and
        nixl paths: the K/V are already where decode reads them), counted as sent."""
        lay = self._layout
        nbytes = (l1 - l0) * (t1 - t0) * lay.bytes_per_token_layer
        chunk = kv_pb2.KVChunk(seq=self._num_chunks, layer_start=l0, layer_end=l1, token_start=t0, token_end=t1,
                               dtype=lay.dtype, nbytes=nbytes, crc32=crc,
                               shape=[l1 - l0, t1 - t0, 2, lay.num_kv_heads, lay.head_dim])
        self.num_bytes += nbytes
        self._num_chunks += 1
        return chunk

    def _range_message(self, l0: int, l1: int, t0: int, t1: int, crc: int = 0):
        """``_range_chunk`` as a message of its own."""
        return kv_pb2.KVMessage(chunk=self._range_chunk(l0, l1, t0, t1, crc))

    def _marks_message(self, ranges, end: bool = False):
        """One ``KVMarks`` message for ``ranges`` [(l0, l1, t0, t1, crc)], in order (the puts one write carried);
        ``end``: it also carries the stream's ``KVEnd`` (the last one). A single range without the end goes as a
        plain chunk."""
        chunks = [self._range_chunk(*r) for r in ranges]
        if end:
            return kv_pb2.KVMessage(marks=kv_pb2.KVMarks(chunks=chunks, end=self._end_message().end))
        if len(chunks) == 1:
            return kv_pb2.KVMessage(chunk=chunks[0])
        return kv_pb2.KVMessage(marks=kv_pb2.KVMarks(chunks=chunks))

    def _end_message(self):
        return kv_pb2.KVMessage(end=kv_pb2.KVEnd(num_chunks=self._num_chunks, num_bytes=self.num_bytes))

    def fail(self, exc: BaseException) -> None:
        self._close_queue(_Stop())
        if self._future is not None:
            self._future.cancel()
        self._release()

    def _release(self) -> None:
        if self._segment is not None:
            self._segment.release()


class _Stop(Exception):
    """Ends the request stream without KVEnd (decode sees a truncated stream)."""


class PeerStatus(grpc.RpcError):
    """The decode worker's own answer to a KV stream, passed on with its status code (a refusal keeps its meaning:
    NOT_FOUND, DATA_LOSS, INVALID_ARGUMENT, ...) and a one-line message (a gRPC error's own text is a multi-line
    dump)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self._code, self._message = code, message

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def __str__(self) -> str:
        return self._message


def _peer_error(request_id: str, e: grpc.RpcError) -> Exception:
    code = e.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return PeerUnavailableError(f"request {request_id}: decode worker unavailable ({e.details()})")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(f"request {request_id}: KV push deadline exceeded")
    return PeerStatus(code, f"request {request_id}: the decode worker answered {error_line(e)}")
