"""Running Triton kernel tests in the interpreter on CPU.

Triton fixes interpreter vs compiler when it is imported, so a kernel test module's CPU cases
(marked ``interp``, names containing "interpreter") run in a child pytest with TRITON_INTERPRET=1,
started by that module's ``test_interpreter_suite``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

IN_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
interp = pytest.mark.skipif(not IN_INTERPRETER, reason="runs inside test_interpreter_suite's child process")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _has_nvidia_tools() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


# offline sm_90 code generation: the compiler (not the interpreter) and Triton's NVIDIA tools
sm90 = pytest.mark.skipif(IN_INTERPRETER or not _has_nvidia_tools(),
                          reason="needs the compiler (not the interpreter) and Triton's NVIDIA tools")


# The kernel modules whose interpreter cases this session runs (conftest's collection hook fills it): their child
# pytests start at the first module's ``test_interpreter_suite``, two at a time. Each child is single-threaded
# Python for most of its run, so two use the machine's two cores where one in turn left a core idle.
SUITE_FILES: list[str] = []
PARALLEL_CHILDREN = 2
_children: dict[str, "concurrent.futures.Future"] = {}  # queued or running, not yet asked for
_queued: set[str] = set()
_running: set = set()
_pool = None
_stopped = False


def _child_pytest(test_file: str) -> tuple[int, str, str]:
    """The interpreter cases of ``test_file`` in a child pytest: (exit code, stdout, stderr)."""
    if _stopped:
        return -1, "", "the session ended before this child started"
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k",
                          "interpreter"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _running.add(p)
    try:
        out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        err += "\nchild pytest timed out after 600 s"
    finally:
        _running.discard(p)
    return p.returncode, out, err


def _start_children(first: str) -> None:
    """Queue a child for ``first`` and every other collected suite (collection order) on a pool of two."""
    import concurrent.futures

    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(PARALLEL_CHILDREN, thread_name_prefix="interp-suite")
    if first not in _children:  # asked again (a rerun): a fresh child
        _children[first] = _pool.submit(_child_pytest, first)
        _queued.add(first)
    for f in SUITE_FILES:
        if f not in _queued:
            _children[f] = _pool.submit(_child_pytest, f)
            _queued.add(f)


def stop_children() -> None:
    """End the session's children still queued or running (a session stopped early does not wait for them)."""
    global _stopped
    _stopped = True
    for p in list(_running):
        p.kill()
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)


def run_interpreter_cases(test_file: str) -> None:
    """Run ``test_file``'s interpreter cases in a child pytest and assert they all passed."""
    if IN_INTERPRETER:
        pytest.skip("this process is the interpreter run")
    test_file = os.path.realpath(test_file)
    _start_children(test_file)
    rc, out, err = _children.pop(test_file).result()
    assert rc == 0 and " passed" in out, out[-6000:] + err[-3000:]
