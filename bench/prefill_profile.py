"""Where a short prefill's time goes (GPU): host launch time vs GPU time, and the host's hottest functions.

At 2K tokens the 1B-shape CoLM-Air full-model prefill took as long as at 8K on an H100 (23-34 ms vs
36-43 ms) and longer than HF's LlamaModel (17-18 ms): the forward is host-bound there. This measures,
for each model and length, side by side:
* wall time of one forward (synchronised), the host time to issue it (no sync) and the GPU time of its
  kernels (``torch.profiler``), with the kernel count;
* a ``cProfile`` of a few forwards: the functions with the most own host time.

    python bench/prefill_profile.py [--out FILE] [--lengths 2048,8192] [--models llama-3.2-1b-16-16-air,...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

from _results import run_meta, write_result  # bench/ is sys.path[0] when a bench runs as a script
from _timing import kernel_table


def _wall_and_host_ms(fn, reps: int = 5) -> tuple[float, float]:
    walls, hosts = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
        hosts.append((t1 - t0) * 1e3)
    return statistics.median(walls), statistics.median(hosts)


def _gpu_ms(fn) -> tuple[float, int]:
    """(GPU time of the kernels of one ``fn()`` in ms, how many kernels)."""
    _, rows = kernel_table(fn)
    return sum(r["gpu_ms"] for r in rows), sum(r["count"] for r in rows)


def _hot_functions(fn, reps: int = 3, top: int = 25) -> list[dict]:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    st = pstats.Stats(pr, stream=io.StringIO())
    rows = []
    for (file, line, name), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"function": f"{file.split('/')[-1]}:{line}:{name}", "calls_per_fwd": nc / reps,
                     "own_ms_per_fwd": tt * 1e3 / reps, "cum_ms_per_fwd": ct * 1e3 / reps})
    return sorted(rows, key=lambda r: -r["own_ms_per_fwd"])[:top]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", default="2048,8192")
    ap.add_argument("--models", default="llama-3.2-1b-16-16-air,llama-3.2-1b-8-8-8-8-air")
    args = ap.parse_args()
    from colm.model import CoLM
    from colm.presets import preset

    res = {**run_meta("prefill_profile"), "cases": []}
    for name in args.models.split(","):
        model = CoLM(preset(name), device="cuda", dtype=torch.bfloat16).reset_parameters(std=0.02, seed=0).eval()
        for T in (int(t) for t in args.lengths.split(",")):
            ids = torch.randint(0, 128000, (1, T), device="cuda")
            for scale in (None, 1):
                fn = lambda: model.hidden(ids, scale=scale)  # noqa: E731
                fn(), fn()  # tuning and compilation
                wall, host = _wall_and_host_ms(fn)
                gpu, kernels = _gpu_ms(fn)
                case = {"model": name, "tokens": T, "scale": scale or model.cfg.num_chains, "wall_ms": wall,
                        "host_issue_ms": host, "gpu_kernel_ms": gpu, "kernels": kernels,
                        "hot": _hot_functions(fn) if T == 2048 else []}
                res["cases"].append(case)
                print(f"{name:28s} T={T:6d} scale={case['scale']}  wall {wall:7.2f} ms  host {host:7.2f} ms  "
                      f"GPU {gpu:7.2f} ms  kernels {kernels}")
                for h in case["hot"][:18]:
                    print(f"    {h['own_ms_per_fwd']:7.3f} ms own {h['cum_ms_per_fwd']:7.3f} cum "
                          f"{h['calls_per_fwd']:6.0f}x  {h['function']}")
        del model
        torch.cuda.empty_cache()
    write_result(res, "prefill_profile", res["device"], res["date"], args.out)


if __name__ == "__main__":
    main()
