"""The receiving halves of the KV transports: what a decode worker runs for each KV stream it is sent.

The decode engine is only the target (``DecodeEngine``'s ``kv_intake`` interface: begin / write / finish / fail for
bytes, grant / mark / finish / end_external_writes for senders that write its blocks themselves); every transport
detail of the receive side is here, behind the decode worker's two KV calls:

* ``BytesReceiver`` (``PushKV``; grpc, shm, cuda_ipc): header -> ``begin_kv`` -> per chunk the payload is found the
  transport's way (inline bytes; a range of the sender's POSIX shm segment, ``KVHeader.shm_name``; a range of the
  sender's CUDA staging tensor, opened through its IPC handle and copied on a side stream, synchronised before
  the ack so the sender may free it), its size and checksum checked, then ``write_kv`` -> ``KVEnd`` ->
  ``finish_kv`` and an ack. A checksum mismatch, a gap, or a stream that ends or breaks before ``KVEnd`` fails the
  request (its blocks are freed); the worker goes on serving.
* ``GrantReceiver`` (``WriteKV``; cuda_pool, nixl): header -> ``grant_kv`` (waiting up to
  ``DecodeConfig.grant_wait_s`` for a Reserve sent at the same time) -> a grant naming the blocks and how to reach
  the pool (its CUDA IPC handle; or its NIXL registration, ``colm.kv.nixl.pool_grant_fields``) -> each chunk marks a
  range the sender has written (nixl: checked against the pool's slots first) -> ``KVEnd`` (cuda_pool: with the
  sender's ready event, opened here) -> ``finish_kv`` and an ack. The grant comes with this transport's
  ``colm.kv.lease.WriterLease`` (the grace and ready timeout of ``DecodeConfig``; nixl: cancel the sender's stream
  if the request ends elsewhere first, ``_StreamStopper``), which decides when the blocks of an ended request go
  back. However the stream ends, ``end_external_writes`` follows (at once after a clean end, after the grace if it
  broke).
"""

from __future__ import annotations

import contextlib
import threading

import grpc
import torch

from colm.errors import PeerUnavailableError, TransferError
from colm.kernels._tuning import DEVICE_WIDE_LOCK
from colm.kv.lease import WriterLease
from colm.kv_ipc import StagingOpener
from colm.kv_wire import CHECKSUMS, KVLayout, bytes_to_tensor, checksum, open_segment, prefetch, tensor_bytes
from colm.proto import load_proto

kv_pb2, _ = load_proto("kv")


def layout_of(header) -> KVLayout:
    return KVLayout(header.num_layers, header.num_tokens, header.num_kv_heads, header.head_dim, header.dtype)


class _Receiver:
    def __init__(self, engine) -> None:
        self.engine = engine

    def _stream_failed(self, rid: str | None, e: Exception, context, fail: bool) -> Exception:
        """What a failed KV stream raises: its request (``rid``, when ``fail``: its KV is not complete yet) fails and
        frees its blocks; a stream whose peer is gone says UNAVAILABLE, anything else keeps its own error."""
        if rid and fail:
            self.engine.fail_kv(rid, e if isinstance(e, TransferError) else TransferError(str(e)))
        if isinstance(e, grpc.RpcError) or not context.is_active():
            return PeerUnavailableError(f"request {rid}: KV stream broke")
        return e


class BytesReceiver(_Receiver):
    def __init__(self, engine) -> None:
        super().__init__(engine)
        self.ipc = StagingOpener()
        self._copy_stream = None  # cuda_ipc copies: off the step loop's stream, so a sync waits only for them

    def receive(self, request_iterator, context):
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
                else:  # KVMarks: bytes already in decode's blocks, which PushKV does not grant
                    raise TransferError(f"request {header.request_id}: a {kind!r} message on a PushKV stream (only "
                                        "header, chunk and end are accepted)")
            raise TransferError(f"request {state['rid']}: KV stream ended without KVEnd (truncated)")
        except Exception as e:
            raise self._stream_failed(state["rid"], e, context, fail=not state["done"]) from None
        finally:
            if segment is not None:
                try:
                    segment.close()
                except BufferError:  # a view is still alive somewhere; the mapping goes with the process
                    pass

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


class _StreamStopper:
    """A nixl grant's ``stop_writer``: cancel the sender's stream when its request ended elsewhere first (deadline,
    abort), never when this receiver itself fails the request (a checksum, range or order error): that stream ends with
    the receiver's own status (DATA_LOSS and why), which a cancel racing it would replace with a bare CANCELLED.

    The engine calls the stop off its lock on a thread of its own, so a failure inside one of the receiver's engine
    calls (``busy``) would race the status; a stop that comes while the receiver is in such a call waits for the
    call's outcome (failed: the receiver's status ends the stream; returned: the stream is cancelled then)."""

    def __init__(self, context) -> None:
        self._context = context
        self._lock = threading.Lock()
        self._busy = self._pending = self._failing = False

    def __call__(self) -> None:
        with self._lock:
            if self._failing:
                return
            if self._busy:
                self._pending = True
                return
        self._context.cancel()

    def failing(self) -> None:
        """The receiver ends the stream with its own error from now on."""
        with self._lock:
            self._failing = True

    @contextlib.contextmanager
    def busy(self):
        """Around the receiver's engine calls that may fail the request."""
        with self._lock:
            self._busy = True
        try:
            yield
        except BaseException:
            with self._lock:
                self._busy, self._failing = False, True
            raise
        with self._lock:
            self._busy = False
            stop, self._pending = self._pending and not self._failing, False
        if stop:
            self._context.cancel()


class GrantReceiver(_Receiver):
    def receive(self, request_iterator, context):
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
            cfg = self.engine.config
            stopper = state["stopper"] = _StreamStopper(context) if nixl else None
            lease = WriterLease(cfg.external_write_grace_s, cfg.kv_timeout_s, stop_writer=stopper)
            grant = state["grant"] = self.engine.grant_kv(rid, layout, cfg.grant_wait_s, lease=lease)
            busy = stopper.busy if nixl else contextlib.nullcontext
            pool = self.engine.pool
            if nixl:
                from colm.kv import nixl as kv_nixl

                fields = kv_nixl.pool_grant_fields(self.engine)
                verify = header.checksum not in ("", "none")
            else:
                fields = self.engine.pool_export().header_fields()
                fields["accepts_ready_event"] = self.engine.accepts_ready_events()
            pending: list = []  # nixl on a device pool: (chunk, the pool's words it covers), checked at KVEnd
            yield kv_pb2.KVPoolReply(grant=kv_pb2.KVPoolGrant(
                request_id=rid, block_ids=grant.blocks, block_size=pool.block_size, num_blocks=pool.num_blocks,
                dtype=self.engine.kv_dtype(), **fields))
            for msg in messages:
                kind = msg.WhichOneof("kind")
                end = None
                if kind in ("chunk", "marks"):  # one range, or the ranges of one write (the last one may end it)
                    if getattr(msg, "payload", None):
                        raise TransferError(f"request {rid}: inline bytes on the {header.transport or 'cuda_pool'} path")
                    for c in (msg.chunk,) if kind == "chunk" else msg.marks.chunks:
                        if c.data:
                            raise TransferError(f"request {rid}: inline bytes on the {header.transport or 'cuda_pool'} "
                                                "path")
                        if nixl and verify:  # the range's bytes as they landed in the blocks
                            with DEVICE_WIDE_LOCK if pool.kv.is_cuda else contextlib.nullcontext():
                                # a device pool's wsum32: its ranges noted here, all summed at KVEnd in one launch
                                got = kv_nixl.verify_range(pool, grant.blocks, layout, c, header.checksum, rid,
                                                           pending=pool.kv.is_cuda)
                            if got is not None:
                                pending.append((c, got))
                        with busy():
                            self.engine.mark_kv(rid, c.layer_start, c.layer_end, c.token_start, c.token_end, seq=c.seq)
                    if kind == "marks" and msg.marks.HasField("end"):
                        end = msg.marks.end
                elif kind == "end":
                    end = msg.end
                else:
                    raise TransferError(f"request {rid}: second KV header in one stream")
                if end is not None:
                    if pending:  # before the K/V count as complete: a mismatch fails the request (DATA_LOSS)
                        with DEVICE_WIDE_LOCK:
                            kv_nixl.check_pending(pool, grant.blocks, pending, rid)
                    ready = end.ready_event_ipc
                    with busy():
                        self.engine.finish_kv(rid, header.num_tokens,
                                              ready=self.engine.open_ready_event(bytes(ready)) if ready else None)
                    state["clean"] = True
                    self.engine.end_external_writes(grant, clean=True)
                    yield kv_pb2.KVPoolReply(ack=kv_pb2.KVAck(request_id=rid, num_chunks=end.num_chunks,
                                                              num_bytes=end.num_bytes))
                    return
            raise TransferError(f"request {rid}: KV stream ended without KVEnd (truncated)")
        except Exception as e:
            if state.get("stopper") is not None:
                state["stopper"].failing()  # this stream ends with e's status, not a cancel
            raise self._stream_failed(rid, e, context, fail=not state["clean"]) from None
        finally:
            if state["grant"] is not None and not state["clean"]:
                self.engine.end_external_writes(state["grant"], clean=False)
