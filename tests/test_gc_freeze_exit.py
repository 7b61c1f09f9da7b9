"""A process that froze its start-up heap (``colm.gc_pauses.freeze_start_heap``: ``colm serve``, the router replicas,
the workers) exits quietly. Left frozen at exit, the objects were never collected by the interpreter's shutdown, and
Triton's nanobind bindings printed some 30 lines of "nanobind: leaked 514 functions! ... likely caused by a reference
counting issue" as `colm serve` exited on SIGTERM, the last lines of its log."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.timeout(60)
def test_a_process_that_froze_its_heap_exits_without_leak_reports():
    pytest.importorskip("triton")
    code = "import triton\nfrom colm.gc_pauses import freeze_start_heap\nassert freeze_start_heap() > 0\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50,
                         env={**os.environ, "COLM_GC_FREEZE": "1"})
    assert out.returncode == 0, out.stderr
    assert "leaked" not in out.stderr, out.stderr[:2000]
