"""Programmatic dependent launch (PDL) for the decode step's chain of small kernels (Hopper and later).

A batch-1 decode step is ~170 kernels in a row, most of them a few microseconds long, and each one's blocks
start only after the one before has drained: a fixed ramp per kernel that no single kernel can remove
(measured on an H200: a 6 MB projection takes ~4.5 us against 1.4 us of bytes). With PDL -- CUDA's
programmatic stream serialization, which a graph capture keeps as a programmatic edge -- a kernel's blocks
may be scheduled while its predecessor still runs. The kernels of ``colm.kernels`` launched with it:

* read only what no kernel writes (weights, host-built tables) before ``wait``, or what only kernels before
  their predecessor wrote: a kernel lets its successor launch only after its own wait, so when a kernel starts,
  every kernel before its predecessor is complete (decode attention reads its first K/V tile early, and again
  after the wait when that tile holds the token its predecessor writes);
* ``wait`` (``griddepcontrol.wait``: the predecessor grid complete and its memory visible) before they touch
  anything an earlier kernel wrote or may still read, then let their own successor launch
  (``griddepcontrol.launch_dependents``).

That is correct for any mix of kernels: one launched without PDL starts after its predecessor as usual; the
wait is a no-op in a kernel launched normally; and since every PDL kernel waits before it ends, a kernel
that waited has every earlier kernel of the stream complete behind it. ``COLM_PDL=0`` turns it off.

Only launches of at most ``MAX_ROWS`` rows (sequences or tokens) use it: on an H200 the 1B Air decode step's
graph replay went 0.97 -> 0.88 ms at batch 1, was unchanged at batch 8, and went 2.46 -> 2.78 ms at batch 64
(``bench/decode_profile.py``), where the kernels are long enough that nothing is left to overlap and the
early-launched grids only compete for the SMs.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from colm.kernels import _tuning

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False


@functools.lru_cache(maxsize=None)
def _triton_supports() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    names = {f.name for f in dataclasses.fields(CUDAOptions)}
    cuda = getattr(getattr(tl, "extra", None), "cuda", None)
    return "launch_pdl" in names and hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


MAX_ROWS = 8


def use(t: torch.Tensor, rows: int) -> bool:
    """Whether a launch of ``rows`` rows whose operands live with ``t`` should use PDL (CUDA sm_90+, compiled,
    at most ``MAX_ROWS`` rows, not disabled)."""
    if not (HAS_TRITON and t.is_cuda) or rows > MAX_ROWS or _tuning.interpreting():
        return False
    if os.environ.get("COLM_PDL", "1") in ("", "0"):
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _triton_supports() and _device_supports(index)


def launch_options(on: bool) -> dict:
    """Extra launch keywords: ``launch_pdl`` where ``on`` (absent otherwise, for Tritons without it)."""
    return {"launch_pdl": True} if on else {}


def kernel_kwargs(t: torch.Tensor, rows: int) -> dict:
    """A launch's PDL keywords: the kernel's ``USE_PDL`` and, where ``use``, ``launch_pdl``."""
    on = use(t, rows)
    return {"USE_PDL": on, **launch_options(on)}


if HAS_TRITON:

    @triton.jit
    def wait(USE_PDL: tl.constexpr):
        """Wait for the predecessor grid (complete, memory visible), then let the successor launch."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
