"""A shared-memory KV push whose request ends mid-copy: the sender's segment outlives the copy thread.

Closing the segment under the stream's copy thread unmapped the memory mid-copy and killed the prefill
worker with SIGSEGV. The end-to-end check runs many pushes that fail at random moments in a child process
(a crash there must not take pytest with it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from colm.kv_wire import SenderSegment, shm_name_for

CHILD = textwrap.dedent('''
    import os, random, sys, threading, time
    import torch
    from colm.kv_wire import KVLayout
    from colm.prefill_worker.kv_push import GrpcKVSink

    class Future:  # consumes the request stream like gRPC's sender thread, slower than the producer
        def __init__(self, it):
            self.it, self.cancelled = it, False
            self.thread = threading.Thread(target=self.run, daemon=True)
            self.thread.start()
        def run(self):
            try:
                for _ in self.it:
                    if self.cancelled:
                        return
                    time.sleep(0.001)
            except Exception:
                pass
        def cancel(self):
            self.cancelled = True

    class Stub:
        class PushKVRaw:
            @staticmethod
            def future(it, timeout=None, metadata=None):
                return Future(it)

    rng = random.Random(int(sys.argv[1]))
    names = []
    for i in range(int(sys.argv[2])):
        sink = GrpcKVSink(Stub(), f"lifetime-{sys.argv[1]}-{i}", "token", shm=True)
        sink.begin(KVLayout(4, 4096, 8, 64, "float32"))  # 32 MiB: each put's copy takes milliseconds
        for layer in range(4):
            sink.put(layer, layer + 1, 0, 4096, torch.randn(1, 4096, 2, 8, 64))
        time.sleep(rng.random() * 0.004)
        sink.fail(RuntimeError("the request ended"))
        names.append(sink._segment.name)
    time.sleep(0.3)
    print("left:", [n for n in names if os.path.exists("/dev/shm/" + n)])
''')


def test_segment_outlives_its_last_view_and_its_name_goes_at_once():
    seg = SenderSegment(shm_name_for("lifetime-unit", str(os.getpid())), 4096)
    path = "/dev/shm/" + seg.name
    with seg.view() as view:
        seg.release()
        assert not os.path.exists(path)  # nobody can attach any more
        view.fill_(7)  # still mapped: the view's owner finishes its copy
        assert int(view.sum()) == 7 * 4096
    with pytest.raises(ValueError, match="released"):
        with seg.view():
            pass
    seg.release()  # idempotent


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs POSIX shared memory in /dev/shm")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_request_ending_mid_copy_does_not_crash_or_leak(seed):
    r = subprocess.run([sys.executable, "-c", CHILD, str(seed), "30"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"push child died with {r.returncode}: {r.stderr[-2000:]}"
    assert "left: []" in r.stdout, r.stdout
