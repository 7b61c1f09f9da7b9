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


def run_interpreter_cases(test_file: str) -> None:
    """Run ``test_file``'s interpreter cases in a child pytest and assert they all passed."""
    if IN_INTERPRETER:
        pytest.skip("this process is the interpreter run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file, "-k", "interpreter"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-6000:] + r.stderr[-3000:]
