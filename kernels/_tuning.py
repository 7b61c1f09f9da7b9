"""A tiny per-shape autotuner shared by the Triton kernels of ``colm.kernels``.

Triton's ``@triton.autotune`` cannot help when a launch needs host-side tables built for the block
size it will run with (the chain-linear tile tables), so the kernels here pick their configuration
themselves: on the first call for a key, every candidate is launched on the real arguments and timed
with CUDA events (median), failures (e.g. too much shared memory) are skipped, and the fastest is
remembered for the process. Under Triton's interpreter, or with ``COLM_KERNEL_TUNE=0``, the first
candidate is used without timing.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from typing import Callable, Hashable, Sequence

_BEST: dict[Hashable, object] = {}
# called after each tuning ends (the serving engines' loops count a tuning inside a step as progress:
# colm.loop_thread registers its hook when a loop starts)
TUNED_HOOKS: list[Callable[[], None]] = []
# Held while a CUDA graph is captured (colm.decode_worker.graphs) and while candidates are timed here:
# timing synchronises the whole device, which fails -- and invalidates the capture -- if another thread
# of the process (e.g. a colocated prefill engine meeting a new shape) captures at the same moment.
DEVICE_WIDE_LOCK = threading.RLock()
_LOG: list[dict] = []


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tuning_enabled() -> bool:
    return not interpreting() and os.environ.get("COLM_KERNEL_TUNE", "1") not in ("", "0")


def pick(key: Hashable, candidates: Sequence[object], launch: Callable[[object], None], graph: bool = False) -> object:
    """The fastest of ``candidates`` for ``key``; ``launch(cfg)`` runs the kernel once with ``cfg``.

    ``graph``: time each candidate replayed from a CUDA graph, cold. For kernels of a few microseconds (decode
    steps) an eager timing measures the host's launch path, not the kernel, and decode replays graphs. Each
    call follows a write of twice the L2 cache, so the operands come from memory as in a decode step, which
    reads far more weights than L2 holds (replaying one call alone finds them in L2 from the second replay on,
    and the configurations that win warm are not those that win cold: bench/gemv_sweep.py).
    Every candidate is timed once; the best three are timed again, longer, and the best of those wins
    (one noisy sample must not decide a shape for the whole process).
    """
    best = _BEST.get(key)
    if best is not None:
        return best
    if not tuning_enabled() or len(candidates) == 1:
        _BEST[key] = candidates[0]
        return candidates[0]
    import triton.testing

    def time_one(cfg, rep):
        fn = lambda: launch(cfg)  # noqa: E731
        if graph:
            fn()  # compile outside the capture
            return graph_time_ms(fn, replays=rep, cold=True)
        return triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median")

    with DEVICE_WIDE_LOCK:
        return _tune(key, candidates, time_one, graph)


@contextlib.contextmanager
def capture_without_gc(graph, **kwargs):
    """``torch.cuda.graph(graph, capture_error_mode="thread_local", **kwargs)`` with Python's cyclic GC off
    meanwhile: a collected Triton kernel unloads its CUDA module, which is illegal during a capture."""
    import torch

    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local", **kwargs):
            yield graph
    finally:
        if enabled:
            gc.enable()


_FLUSH: dict = {}  # device -> the buffer a cold timing writes to evict L2


def _flush_buffer(device):
    import torch

    buf = _FLUSH.get(device)
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
        buf = _FLUSH[device] = torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.float32, device=device)
    return buf


def graph_time_ms(fn: Callable[[], None], replays: int, calls: int = 10, cold: bool = False) -> float:
    """Median ms of one ``fn()`` replayed from a CUDA graph of ``calls`` calls, over ``replays`` replays.

    ``cold``: every call in the graph follows a write of twice the L2 cache; a graph of those writes alone is
    replayed alternately and its time taken off (per replay pair, then the median).

    The capture is thread-local (``triton.testing.do_bench_cudagraph`` captures in CUDA's global mode):
    in global mode a synchronising call from any other thread of the process while the capture runs
    fails, and inside torch such a failure can abort the whole process. A decode worker's gRPC threads
    copy and synchronise KV while its step loop meets a new shape and tunes it (measured: the decode
    worker died that way under load on an H100)."""
    import statistics

    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up on a side stream, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.current_stream().synchronize()
    flush = _flush_buffer(torch.cuda.current_device()) if cold else None

    def captured(with_fn: bool):
        graph = torch.cuda.CUDAGraph()
        with capture_without_gc(graph):
            for _ in range(calls):
                if flush is not None:
                    flush.zero_()
                if with_fn:
                    fn()
        graph.replay()
        return graph

    def replay_ms(graph) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    graph = captured(True)
    base = captured(False) if cold else None
    times = []
    for _ in range(max(3, replays)):
        ms = replay_ms(graph)
        if base is not None:
            ms -= replay_ms(base)
        times.append(ms / calls)
    del graph, base
    return statistics.median(times)


def _tune(key, candidates, time_one, graph):
    if key in _BEST:  # another thread tuned it while this one waited for the lock
        return _BEST[key]
    timings = []
    for cfg in candidates:
        try:
            ms = time_one(cfg, 20)
        except Exception as exc:  # a config the chip cannot run (shared memory, registers)
            timings.append((float("inf"), cfg, repr(exc)[:120]))
            continue
        timings.append((ms, cfg, ""))
    ranked = sorted((t for t in timings if t[0] != float("inf")), key=lambda t: t[0])
    if not ranked:
        raise RuntimeError(f"no kernel configuration ran for {key}: {timings[0][2]}")
    finals = [(time_one(cfg, 60), cfg) for _, cfg, _ in ranked[:3]]
    ms, best = min(finals, key=lambda t: t[0])
    _BEST[key] = best
    for hook in TUNED_HOOKS:
        hook()
    _LOG.append({"key": repr(key), "best": repr(best), "graph_timing": graph,
                 "timings_ms": [(repr(c), t) for t, c, _ in timings], "final_ms": [(repr(c), t) for t, c in finals]})
    return best


def num_tuned() -> int:
    """How many tuning decisions this process has made (a step during which it grew paid for one)."""
    return len(_LOG)


def tuning_log() -> list[dict]:
    """Every tuning decision of this process (key, chosen config, each candidate's median ms)."""
    return list(_LOG)
