"""The gRPC backend's connections to its workers: the worker list, one channel per worker, the stubs, and the short
calls (Reserve, Prefill, Start, SetScale, Abort) sent over one ``Calls`` stream per worker.

``_unary`` sends a short call on the worker's ``Calls`` stream (``worker_calls="stream"``, ``router/call_stream.py``):
no per-call set-up on either side; a worker without it (UNIMPLEMENTED) gets the call as a unary call, and so does
every call with ``worker_calls="unary"``. Every call carries the cluster token (``_md``). A worker whose address
changes or that is removed (``set_workers``: a restarted actor) loses its channel, its Calls stream and its Tokens
stream; the calls still on them end with CANCELLED and their requests fail over. grpc.aio ends a call whose channel
is closed by raising ``asyncio.CancelledError`` in the task awaiting it, which was not cancelled itself; the calls
here go through ``on_channel``, which turns that into the ``AioRpcError`` CANCELLED of a failed call (a task that
read it as its own cancellation ended: the health poll loop did, and the router stopped serving after a restart).

A mixin of ``GrpcBackend`` (``router/grpc_backend.py``), which sets up the state it uses.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from colm.proto import load_proto
from colm.proto.rpc import auth_metadata
from colm.router.backend import WorkerFailed, WorkerInfo, cancelled_itself
from colm.router.call_stream import CallStream, rpc_error

log = logging.getLogger("colm.router")
kv_pb2, kv_pb2_grpc = load_proto("kv")


class WorkerChannels:
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
        return auth_metadata(self.cluster_token)

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
        return asyncio.ensure_future(on_channel(worker_id, getattr(self._stub(worker_id), method)(
            request, metadata=self._md(), timeout=timeout)))

    async def _on_stream(self, cs: CallStream, worker_id: str, method: str, request, reply_cls: type, timeout: float):
        try:
            return await cs.call(method, request, reply_cls, timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.info("worker %s: %s not on its Calls stream (%s); sending calls", worker_id, method, e.details())
        return await on_channel(worker_id, getattr(self._stub(worker_id), method)(request, metadata=self._md(),
                                                                                  timeout=timeout))


def channel_closed(worker_id: str) -> grpc.aio.AioRpcError:
    return rpc_error(grpc.StatusCode.CANCELLED,
                     f"worker {worker_id}: the call's channel was closed (the worker moved or was removed)")


async def on_channel(worker_id: str, call):
    """``await call`` (a call on ``worker_id``'s channel); the channel closed under it raises ``channel_closed``."""
    try:
        return await call
    except asyncio.CancelledError:
        if cancelled_itself():
            raise
        raise channel_closed(worker_id) from None


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False
