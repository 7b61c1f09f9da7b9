"""CUDA-graph plumbing shared by the decode and prefill engines (``decode_worker.graphs``,
``prefill_worker.graphs``): power-of-two shape buckets and the warm-up-then-capture sequence.

``warm_and_capture(fn, device, pool)`` runs ``fn`` a few times on a side stream first (as
``torch.cuda.graphs`` asks; it compiles and tunes every Triton kernel for these shapes, which must not
happen inside a capture), then captures one call thread-locally with Python's GC paused
(``colm.kernels._tuning.capture_without_gc``), all while holding ``DEVICE_WIDE_LOCK``: a capture must
not meet a kernel tuning's device-wide sync in another thread of the process. Each capture counts as progress of
the engine loop it runs on (``colm.loop_thread.progress``: a step that captures is slow, not stalled).
``GraphSet`` is the state a set of graphs keyed by shape keeps (prefill's and ``colm.graphed_forward``'s).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, TypeVar

import torch

from colm.kernels._tuning import DEVICE_WIDE_LOCK, capture_without_gc
from colm.loop_thread import progress

T = TypeVar("T")
log = logging.getLogger("colm.cuda_graphs")


def bucket(n: int, least: int = 1) -> int:
    """The smallest ``least * 2**i`` >= ``n``."""
    b = least
    while b < n:
        b *= 2
    return b


def buckets(n: int, least: int = 1) -> list[int]:
    """Every value ``bucket`` gives for sizes up to ``n``: least, 2 least, ..., ``bucket(n, least)``."""
    out = [least]
    while out[-1] < n:
        out.append(out[-1] * 2)
    return out


class GraphSet:
    """Graphs of one model keyed by shape, sharing one memory pool; replays under one lock. Enabled on CUDA with
    ``max_tokens`` > 0 (the most tokens a graph may take)."""

    def __init__(self, device, max_tokens: int) -> None:
        self.device = device
        self.max_tokens = max_tokens
        self.enabled = device.type == "cuda" and max_tokens > 0
        self._graphs: dict = {}  # shape key (the subclass's) -> its captured graph
        self._pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self._lock = threading.Lock()
        self.num_replays = 0

    @property
    def num_captures(self) -> int:
        return len(self._graphs)

    def _graph_for(self, key, capture: Callable[[], object], what: str):
        """The graph for ``key``, captured by ``capture()`` on first use; None once graphs are off: a failed capture
        turns them off for good (logged), and the caller runs eager. Call under ``self._lock``."""
        g = self._graphs.get(key)
        if g is None and self.enabled:
            try:
                g = self._graphs[key] = capture()
            except Exception as e:  # noqa: BLE001 - the eager forward still works
                log.warning("CUDA graph capture of %s failed (%s): it runs eager from now", what, e)
                self.enabled = False
                torch.cuda.synchronize(self.device)
                return None
        return g


def warm_and_capture(fn: Callable[[], T], device, pool=None, warmup: int = 2) -> tuple[torch.cuda.CUDAGraph, T]:
    """(graph, what the captured ``fn()`` returned): ``warmup`` eager runs on a side stream, then the capture
    (into ``pool``, a ``torch.cuda.graph_pool_handle()`` shared by related graphs)."""
    with DEVICE_WIDE_LOCK:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with capture_without_gc(graph, pool=pool):
            out = fn()
    progress()  # a capture inside an engine loop's step (on first use) is that loop's progress, not a stall
    return graph, out
