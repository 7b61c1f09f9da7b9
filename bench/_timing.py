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
