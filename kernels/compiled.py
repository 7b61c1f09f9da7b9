"""The training path's elementwise references compiled by ``torch.compile``: chain RMSNorm (with the residual add
before it), SwiGLU's gate product and RoPE of q and k.

Eager autograd runs each of these as 5-15 kernels forward and as many backward, every one a full pass over the
activations; a profiled autocast training step of the 1B shape spent 47 of its 116 ms of kernel time in such
kernels, as much as in its GEMMs. Inductor fuses each function into one forward and one backward kernel. The
hand-written Triton kernels beside the references (``rmsnorm``, ``swiglu``, ``rope``) have no backward, so they serve
inference only.

Used where autograd records (a tensor that requires grad, grad mode on) on a device in ``DEVICES`` (CUDA) and
``enabled()``: on where training sets ``run.compile_elementwise`` (true by default; ``set_enabled``) or the
environment has ``COLM_COMPILE_ELEMENTWISE=1`` (``=0`` keeps it off whatever the config says); off in a process that
never trains (inference has the Triton kernels). Measured on an H100 (``bench/train_throughput.py``'s
``autocast-compile`` rows): a 1B-shape step 1.17x faster dense, 1.09x CoLM. The compiled functions compute what the
references compute, but Inductor keeps fp32 across a fused expression where eager rounds each op's result to the
input dtype, so results agree with eager within the dtype's tolerance, not bit for bit. A function compiles once per
input signature (shapes, dtypes, chain widths; ``dynamic=False``), on its first call: a training run's first step
pays a few seconds per function. A compile that fails (no C compiler, an unsupported build) is logged once and the
eager references run from then on.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

log = logging.getLogger("colm.kernels")

DEVICES = ("cuda",)  # device types the compiled path serves (tests add "cpu")
BACKEND = "inductor"  # torch.compile's backend (tests use "aot_eager": the same graphs, not code-generated)
_compiled: dict[str, Callable] = {}
_failed: list[str] = []  # the first failure's message, once a compile has failed
_on = False  # set_enabled's choice


def set_enabled(on: bool) -> None:
    """Turn the compiled path on or off for this process (``run.compile_elementwise``)."""
    global _on
    _on = bool(on)


def enabled() -> bool:
    """Whether the compiled path is on: ``COLM_COMPILE_ELEMENTWISE`` (1 or 0) if set, else ``set_enabled``'s choice;
    never after a compile has failed."""
    env = os.environ.get("COLM_COMPILE_ELEMENTWISE")
    return (env != "0" if env is not None else _on) and not _failed


def wants(*tensors: torch.Tensor) -> bool:
    """Whether a call on these tensors takes the compiled path: autograd records it on a compiled device."""
    return (tensors[0].device.type in DEVICES and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors) and enabled())


def run(name: str, ref: Callable, *args):
    """``ref(*args)`` through its compiled form (compiled on the first call); the eager ``ref`` if compiling fails."""
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = torch.compile(ref, dynamic=False, fullgraph=True, backend=BACKEND)
    try:
        return fn(*args)
    except (torch._dynamo.exc.TorchDynamoException, RuntimeError, OSError, ImportError) as e:
        if isinstance(e, torch.OutOfMemoryError):  # the computation's own failure, not the compiler's
            raise
        _failed.append(f"{type(e).__name__}: {e}"[:500])
        log.warning("torch.compile of the training path's %s failed; eager elementwise ops from now on "
                    "(run.compile_elementwise: false skips the attempt): %s", name, _failed[0])
        return ref(*args)


def reset() -> None:
    """Forget the compiled functions, a recorded failure and set_enabled's choice (tests)."""
    global _on
    _compiled.clear()
    _failed.clear()
    _on = False
    torch._dynamo.reset()
