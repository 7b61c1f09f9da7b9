"""The router's end of a decode worker's batched token stream (``DecodeWorker.Tokens``).

One ``TokenSubscription`` per decode worker: it opens the stream once (the worker answers with an empty batch:
subscribed), then reads one ``TokenBatch`` per decode step and puts each event, or a request's failure, into
the queue its request registered before sending ``Start``. When the stream breaks (the worker died or
restarted), every registered request gets the error and the next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid

import grpc


class StreamBroken(Exception):
    """The worker's Tokens stream ended under a request (``cause``: the RPC error, or None at a clean end)."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__(f"the token stream ended: {cause}")
        self.cause = cause


class TokenSubscription:
    def __init__(self, open_stream, subscriber: str | None = None) -> None:
        """``open_stream(subscriber)``: starts the worker's Tokens call (an async iterator of ``TokenBatch``)."""
        self.subscriber = subscriber or f"router-{uuid.uuid4().hex[:16]}"
        self._open_stream = open_stream
        self._queues: dict[str, asyncio.Queue] = {}
        self._call = None
        self._reader: asyncio.Task | None = None
        self._opening: asyncio.Future | None = None

    async def ensure_open(self, timeout_s: float) -> None:
        """Open the stream unless it is open; wait for the worker's first (empty) batch. Raises the RPC error."""
        if self._reader is not None and not self._reader.done():
            return
        if self._opening is None or self._opening.done():
            self._opening = asyncio.ensure_future(self._open())
        await asyncio.wait_for(asyncio.shield(self._opening), timeout_s)

    async def _open(self) -> None:
        call = self._open_stream(self.subscriber)
        it = call.__aiter__()
        await anext(it)  # subscribed
        self._call = call
        self._reader = asyncio.ensure_future(self._read(it))

    def register(self, request_id: str) -> asyncio.Queue:
        q = self._queues[request_id] = asyncio.Queue()
        return q

    def unregister(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def _read(self, it) -> None:
        cause: BaseException | None = None
        try:
            async for batch in it:
                queues = self._queues
                for item in itertools.chain(batch.events, batch.failures):  # TokenEvent / TokenFailure
                    q = queues.get(item.request_id)
                    if q is not None:
                        q.put_nowait(item)
        except asyncio.CancelledError:
            cause = ConnectionError("the router closed the token stream")
            raise
        except grpc.aio.AioRpcError as e:
            cause = e
        finally:
            self._reader = None
            err = StreamBroken(cause)
            for q in self._queues.values():
                q.put_nowait(err)

    async def close(self) -> None:
        call, reader = self._call, self._reader
        self._call = None
        if call is not None:
            call.cancel()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
