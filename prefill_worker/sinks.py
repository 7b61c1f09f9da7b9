"""Where a prefill's K/V go: the ``KVSink`` protocol and the sinks that need no network.

The engine calls ``begin(layout)``, then ``put(layer_start, layer_end, token_start, token_end, kv)``
with ``kv [layers, tokens, 2, kv_heads, head_dim]`` as soon as a layer's K/V of a chunk exist (the
tensor is the sink's to keep; the engine never writes it again), then ``finish(timeout_s)`` once the
forward is done (waits until everything is delivered, returns the bytes sent) or ``fail(exc)``.

``StagedKVSink`` is the base of the remote sinks (``colm.prefill_worker.kv_push``): ``put`` starts
an asynchronous device->pinned-host copy and queues it, so the transfer of layer l overlaps the
compute of layer l+1; the consumer waits for the copy's event before reading the bytes.
"""

from __future__ import annotations

import queue
from typing import Protocol

import torch

from colm.kv_wire import KVLayout, drain


class KVSink(Protocol):
    path: str
    # optional, False when absent: ``put`` has queued its own copy of a device ``kv`` on the current stream (or keeps
    # nothing of it) when it returns, so the caller may overwrite ``kv`` with work queued after it (a prefill graph's
    # static buffer, on its next replay) and hands it a view instead of a fresh copy
    copies_at_put: bool

    def begin(self, layout: KVLayout) -> None: ...

    def put(self, layer_start: int, layer_end: int, token_start: int, token_end: int, kv: torch.Tensor) -> None: ...

    def finish(self, timeout_s: float) -> int: ...

    def fail(self, exc: BaseException) -> None: ...


class NullKVSink:
    """Counts and drops the K/V (prefill compute alone, for benchmarks)."""

    path = "none"
    copies_at_put = True  # keeps nothing

    def __init__(self) -> None:
        self.num_bytes = 0

    def begin(self, layout: KVLayout) -> None:
        self.num_bytes = 0

    def put(self, layer_start, layer_end, token_start, token_end, kv) -> None:
        self.num_bytes += kv.numel() * kv.element_size()

    def finish(self, timeout_s: float) -> int:
        return self.num_bytes

    def fail(self, exc: BaseException) -> None:
        pass


class LocalKVSink:
    """Writes straight into a ``DecodeEngine`` of the same process (device to device, no copy to host)."""

    path = "local"

    def __init__(self, decode_engine, request_id: str) -> None:
        self.engine = decode_engine
        self.request_id = request_id
        self.num_bytes = 0
        self._num_tokens = 0
        self._seq = 0

    def begin(self, layout: KVLayout) -> None:
        self._num_tokens = layout.num_tokens
        self.engine.begin_kv(self.request_id, layout)

    def put(self, layer_start, layer_end, token_start, token_end, kv) -> None:
        self.engine.write_kv(self.request_id, layer_start, layer_end, token_start, token_end, kv, seq=self._seq)
        self._seq += 1
        self.num_bytes += kv.numel() * kv.element_size()

    def finish(self, timeout_s: float) -> int:
        self.engine.finish_kv(self.request_id, self._num_tokens)
        return self.num_bytes

    def fail(self, exc: BaseException) -> None:
        self.engine.fail_kv(self.request_id, exc)


_END = object()


def queued_puts(q: queue.SimpleQueue):
    """Yields the items put on ``q`` until ``_END``; raises an exception put there (a sink's ``fail``)."""
    return drain(q, _END)


def ready_batches(q: queue.SimpleQueue, ready, wait=None, limit: int = 64):
    """Yields (list, last) of the items put on ``q`` (until ``_END``), in order: the next item (waited for, then
    passed to ``wait``), then those already queued behind it for which ``ready(item)`` holds, ``limit`` at most; the
    first one not ready starts the next list. ``last``: ``_END`` came right behind the list (nothing follows it; an
    end that comes later ends the iteration without a list). A sink whose puts come at once (a graphed forward's)
    sends them as one, and with its end."""
    it = queued_puts(q)
    held = None
    while True:
        item = held if held is not None else next(it, None)
        held = None
        if item is None:
            return
        if wait is not None:
            wait(item)
        batch = [item]
        last = False
        while len(batch) < limit and not q.empty():
            nxt = next(it, None)
            if nxt is None:
                last = True
                break
            if not ready(nxt):
                held = nxt
                break
            batch.append(nxt)
        yield batch, last
        if last:
            return


def copies_done_event(t: torch.Tensor):
    """An event recorded on ``t``'s device's current stream after the copies queued so far (None off CUDA): the
    consumer of a ``put`` waits for it before it signals or reads."""
    if not t.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(t.device))
    return event


class StagedKVSink:
    """Base of sinks that ship bytes from host memory: ``put`` stages to pinned host memory asynchronously."""

    path = "staged"

    def __init__(self) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, layer_start, layer_end, token_start, token_end, kv) -> None:
        if kv.is_cuda:
            host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)
            host.copy_(kv, non_blocking=True)
        else:
            host = kv.contiguous()
        self._q.put(((layer_start, layer_end, token_start, token_end), host, copies_done_event(kv)))

    def _staged(self):
        """Yields ((l0, l1, t0, t1), host tensor) in put order until ``finish``/``fail`` ends the stream."""
        for ranges, host, event in queued_puts(self._q):
            if event is not None:
                event.synchronize()
            yield ranges, host

    def _close_queue(self, exc: BaseException | None = None) -> None:
        self._q.put(_END if exc is None else exc)
