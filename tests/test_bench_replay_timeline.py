"""The decode profile's graph-replay timeline: marginal times per kernel class from profiler kernel records."""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _timing import kernel_class, timeline_from_trace  # noqa: E402


def _replay(t0: float, kernels: list) -> list:
    """Kernel records of one replay starting at t0: (name, start offset, duration)."""
    return [{"cat": "kernel", "name": n, "ts": t0 + s, "dur": d} for n, s, d in kernels]


def test_marginal_times_add_up_to_the_span_with_overlapping_kernels():
    rng = random.Random(7)
    names = ["_rmsnorm_equal_kernel", "_chain_gemv_kernel", "_paged_decode_kernel", "_merge_splits_kernel",
             "_chain_gemv_kernel", "_partial_kernel"]
    events, spans = [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}], []
    for r in range(5):
        t, ks = 0.0, []
        for n in names:  # each kernel starts up to 2 us before the previous one ends (early launch)
            start = max(t - rng.uniform(0, 2), 0.0)
            dur = (t - start) + rng.uniform(1, 10)
            ks.append((n, start, dur))
            t = start + dur
        spans.append(t)
        events += _replay(1000.0 * r, ks)
    tl = timeline_from_trace(events, 5)
    assert tl["kernels_per_replay"] == len(names)
    med = sorted(spans)[2]
    assert abs(tl["replay_span_us_median"] - med) < 1e-9
    total = sum(c["marginal_us"] for c in tl["classes"].values())
    assert abs(total - med) < 1e-6
    assert tl["classes"]["gemv"]["count"] == 2
    assert {r["class"] for r in tl["median_replay_kernels"]} == {"norm", "gemv", "attention", "merge", "head"}
    # spans overlap, so their sum exceeds the wall time the marginals account for
    assert sum(c["span_us"] for c in tl["classes"].values()) > total


def test_uneven_records_are_reported_not_split():
    events = _replay(0, [("a", 0, 1), ("b", 1, 1), ("c", 2, 1)])
    assert "error" in timeline_from_trace(events, 2)


def test_kernel_classes():
    assert kernel_class("_chain_gemv_kernel") == "gemv"
    assert kernel_class("_merge_splits_kernel") == "merge"
    assert kernel_class("_merge_kernel") == "head"
    assert kernel_class("_rope_qk_to_pool_kernel") == "rope"
    assert kernel_class("sm90_xmma_gemm_bf16") == "gemm"
