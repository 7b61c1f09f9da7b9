"""CUDA-event timing shared by the GPU benchmarks, and the GPU's own rates to hold figures against."""

from __future__ import annotations

import time

import torch


def cuda_ms(fn, reps: int = 5, warmup: int = 2) -> float:
    """Mean milliseconds per call of ``fn`` over ``reps`` back-to-back calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def kernel_table(fn):
    """(profiler, rows) of one ``fn()`` under ``torch.profiler`` (CPU and CUDA activity): rows are
    {name (90 characters), count, gpu_ms} per kernel name, most GPU time first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(ev.name[:90], [0, 0.0])
            k[0] += 1
            k[1] += ev.device_time_total / 1000 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1000
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    return prof, [{"name": n, "count": c, "gpu_ms": t} for n, (c, t) in rows]


def measure_gpu(device: str) -> dict:
    """This GPU's bf16 matmul TFLOP/s (8192^3) and device-to-device copy GB/s (1 GiB, read + write)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    tflops = 2 * 8192 ** 3 * n / (time.perf_counter() - t0) / 1e12
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        y.copy_(x)
    torch.cuda.synchronize()
    gbs = 2 * x.numel() * n / (time.perf_counter() - t0) / 1e9
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"matmul_tflops": tflops, "copy_gbs": gbs}


KERNEL_CLASSES = (  # (class, substrings of a kernel's name), first match wins
    ("gemv", ("_chain_gemv_kernel",)),
    ("gemm", ("_chain_fwd_kernel", "gemm", "gemv", "cutlass", "sm90_xmma")),
    ("attention", ("paged", "attn", "attention")),
    ("head", ("_partial_kernel", "_merge_kernel", "greedy", "argmax", "softmax", "reduce")),
    ("merge", ("merge",)),
    ("norm", ("rms", "norm")),
    ("rope", ("rope",)),
    ("glu", ("silu", "swiglu", "glu")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def replay_timeline(fn, reps: int = 20) -> dict:
    """Where a graph replay's wall time goes, kernel by kernel: ``fn()`` (one replay) ``reps`` times under
    ``torch.profiler``, the GPU's kernel records of each replay in order. A kernel's *marginal* time is its end
    minus the previous kernel's end (its own start for the first): with programmatic dependent launch a kernel's
    span includes waiting for its predecessor, so spans overlap and only the marginal times add up to the replay.
    Returns the median replay's span, per-class counts / marginal / span sums, and that replay's kernels."""
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
            torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    return timeline_from_trace(events, reps)


def timeline_from_trace(events: list, reps: int) -> dict:
    """``replay_timeline``'s figures from chrome-trace events (kernel records: cat "kernel", ts, dur, name) of
    ``reps`` identical replays run one after another."""
    import statistics

    kernels = sorted((e for e in events if e.get("cat") == "kernel" and "dur" in e), key=lambda e: e["ts"])
    if not kernels or len(kernels) % reps:
        return {"error": f"{len(kernels)} kernel records for {reps} replays"}
    n = len(kernels) // reps
    replays = []
    for r in range(reps):
        ks = kernels[r * n:(r + 1) * n]
        rows, prev_end = [], None
        for e in ks:
            end = e["ts"] + e["dur"]
            marginal = end - (e["ts"] if prev_end is None else prev_end)
            rows.append({"name": e["name"][:80], "class": kernel_class(e["name"]), "span_us": e["dur"],
                         "marginal_us": marginal})
            prev_end = max(end, prev_end or end)
        replays.append((prev_end - ks[0]["ts"], rows))
    spans = [s for s, _ in replays]
    med = statistics.median(spans)
    span, rows = min(replays, key=lambda sr: abs(sr[0] - med))
    classes: dict[str, dict] = {}
    for r in rows:
        c = classes.setdefault(r["class"], {"count": 0, "marginal_us": 0.0, "span_us": 0.0})
        c["count"] += 1
        c["marginal_us"] += r["marginal_us"]
        c["span_us"] += r["span_us"]
    return {"replays": reps, "kernels_per_replay": n, "replay_span_us_median": med,
            "replay_span_us_min": min(spans), "classes": classes, "median_replay_kernels": rows}
