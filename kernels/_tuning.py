"""A tiny per-shape autotuner shared by the Triton kernels of ``colm.kernels``.

Triton's ``@triton.autotune`` cannot help when a launch needs host-side tables built for the block
size it will run with (the chain-linear tile tables), so the kernels here pick their configuration
themselves: on the first call for a key, every candidate is launched on the real arguments and timed
with CUDA events (median), failures (e.g. too much shared memory) are skipped, and the fastest is
remembered for the process. Under Triton's interpreter, or with ``COLM_KERNEL_TUNE=0``, the first
candidate is used without timing.
"""

from __future__ import annotations

import os
from typing import Callable, Hashable, Sequence

_BEST: dict[Hashable, object] = {}
_LOG: list[dict] = []


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tuning_enabled() -> bool:
    return not interpreting() and os.environ.get("COLM_KERNEL_TUNE", "1") not in ("", "0")


def pick(key: Hashable, candidates: Sequence[object], launch: Callable[[object], None]) -> object:
    """The fastest of ``candidates`` for ``key``; ``launch(cfg)`` runs the kernel once with ``cfg``."""
    best = _BEST.get(key)
    if best is not None:
        return best
    if not tuning_enabled() or len(candidates) == 1:
        _BEST[key] = candidates[0]
        return candidates[0]
    import triton.testing

    timings = []
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception as exc:  # a config the chip cannot run (shared memory, registers)
            timings.append((float("inf"), cfg, repr(exc)[:120]))
            continue
        timings.append((ms, cfg, ""))
    ms, best, _ = min(timings, key=lambda t: t[0])
    if ms == float("inf"):
        raise RuntimeError(f"no kernel configuration ran for {key}: {timings[0][2]}")
    _BEST[key] = best
    _LOG.append({"key": repr(key), "best": repr(best), "timings_ms": [(repr(c), t) for t, c, _ in timings]})
    return best


def tuning_log() -> list[dict]:
    """Every tuning decision of this process (key, chosen config, each candidate's median ms)."""
    return list(_LOG)
