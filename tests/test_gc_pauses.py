"""colm.gc_pauses: every collection timed by generation, the start-up heap frozen unless COLM_GC_FREEZE=0, and the
pauses exposed on the router's and the workers' metrics."""

from __future__ import annotations

import gc

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from colm.gc_pauses import GcPauses, GcPausesCollector, freeze_start_heap


def _samples(registry, name: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(generate_latest(registry).decode()) if fam.name == name
            for s in fam.samples}


def test_each_collection_is_timed_by_generation():
    pauses = GcPauses.install()
    assert GcPauses.install() is pauses and gc.callbacks.count(pauses._callback) == 1  # once per process
    before = pauses.snapshot()
    for generation in (0, 1, 2, 2):
        gc.collect(generation)
    after = pauses.snapshot()
    assert after[2]["count"] - before[2]["count"] >= 2
    assert after[0]["count"] > before[0]["count"] and after[1]["count"] > before[1]["count"]
    assert after[2]["sum_s"] > before[2]["sum_s"] and after[2]["max_s"] > 0


def test_worker_and_router_registries_expose_the_pauses():
    from prometheus_client import CollectorRegistry

    from colm.router.metrics import RouterMetrics

    reg = CollectorRegistry()
    reg.register(GcPausesCollector("decode", {"worker": "decode-0"}))
    gc.collect(2)
    hist = _samples(reg, "colm_decode_gc_pause_seconds")
    count = hist[("colm_decode_gc_pause_seconds_count", (("generation", "2"), ("worker", "decode-0")))]
    inf = hist[("colm_decode_gc_pause_seconds_bucket", (("generation", "2"), ("le", "+Inf"), ("worker", "decode-0")))]
    assert count >= 1 and inf == count
    longest = _samples(reg, "colm_decode_gc_pause_max_seconds")
    assert longest[("colm_decode_gc_pause_max_seconds", (("generation", "2"), ("worker", "decode-0")))] > 0
    router = _samples(RouterMetrics().registry, "colm_router_gc_pause_seconds")
    assert ("colm_router_gc_pause_seconds_count", (("generation", "0"),)) in router


def test_freeze_moves_the_heap_out_of_later_collections(monkeypatch):
    monkeypatch.setenv("COLM_GC_FREEZE", "0")
    assert freeze_start_heap() == 0 and gc.get_freeze_count() == 0
    monkeypatch.setenv("COLM_GC_FREEZE", "maybe")
    with pytest.raises(ValueError, match="COLM_GC_FREEZE='maybe'"):
        freeze_start_heap()
    monkeypatch.delenv("COLM_GC_FREEZE")
    try:
        frozen = freeze_start_heap()
        assert frozen > 1000 and gc.get_freeze_count() == frozen
        assert len(gc.get_objects(2)) < frozen / 10  # a full collection now visits a small part of what it did
    finally:
        gc.unfreeze()  # back to the test process's usual collector


@pytest.mark.parametrize("freeze", ["1", "0"])
def test_a_worker_process_freezes_its_heap_before_it_serves(tmp_path, freeze):
    import os
    import signal
    import subprocess
    import sys

    from _engine_helpers import save_tiny_air

    save_tiny_air(tmp_path)
    env = {**os.environ, "COLM_CLUSTER_TOKEN": "gc-pauses-test-token-0123456789", "COLM_GC_FREEZE": freeze}
    p = subprocess.Popen([sys.executable, "-m", "colm.deploy.worker_main", "--role", "decode", "--model", str(tmp_path),
                          "--config", '{"num_blocks": 16, "block_size": 4}'], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().split()[:2] == ["READY", "decode"]
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    froze = [line for line in err.splitlines() if "froze the start-up heap" in line]
    if freeze == "1":
        assert len(froze) == 1 and int(froze[0].split("heap: ")[1].split()[0]) > 10_000, err[-2000:]
    else:
        assert not froze, err[-2000:]
