"""Where a colocated engine's loop iteration spends its time: decode step alone vs decode step + prompt chunk.

In one process, no gRPC: a ``DecodeEngine`` with ``colocated_prefill`` keeps ``--batch`` requests decoding while
new prompts arrive, and its ``step()`` is called directly. Reported per iteration kind: wall time (host), and with
``--torch-profile`` the top operators by CPU and by CUDA time (torch.profiler), written as JSON.

    python bench/colocated_profile.py --preset llama-3.2-1b-16-16-air --batch 64 --prompt-len 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_goodput import build_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b-16-16-air")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--torch-profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.sampling import SamplingParams

    dtype = getattr(torch, args.dtype)
    ckpt = build_checkpoint(args.preset, dtype, args.device)
    cuda = args.device.startswith("cuda")
    de = DecodeEngine.from_checkpoint(ckpt, DecodeConfig(num_blocks=16384 if cuda else 4096, block_size=16,
                                                         colocated_prefill=True, max_batch_size=max(64, args.batch),
                                                         max_batched_tokens=args.max_batched_tokens,
                                                         warmup_context=2200 if cuda else 0), device=args.device,
                                      dtype=dtype)
    de.start()
    de._runner.stop()  # the loop thread is not wanted: step() is driven here
    rng = np.random.default_rng(0)
    params = SamplingParams(max_new_tokens=1000, ignore_eos=True)
    n = [0]

    def submit(plen: int) -> None:
        rid = f"r{n[0]}"
        n[0] += 1
        p = rng.integers(0, 256, plen).tolist()
        de.reserve(rid, plen, min(1000, de.cfg.max_seq_len - plen))
        de.prefill_kv(rid, p[:-1])
        de.start_generation(rid, p[-1], SamplingParams(max_new_tokens=min(params.max_new_tokens,
                                                                          de._requests[rid].max_new_tokens),
                                                       ignore_eos=True))

    for _ in range(args.batch):
        submit(args.prompt_len)
    while len(de._running) < args.batch:  # prefill them all (chunks only, then decode joins)
        de.step()

    def timed(kind: str, k: int) -> list[float]:
        out = []
        for _ in range(k):
            if kind == "decode+chunk":
                submit(args.max_batched_tokens - args.batch + 1)  # one chunk's worth of prompt per iteration
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            de.step()
            if cuda:
                torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1e3)
            if kind == "decode+chunk":  # keep the batch size fixed: the new request is aborted once prefilled
                for rid, r in list(de._requests.items()):
                    if r.kv_done and not r.running:
                        de.abort(rid)
        return out

    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "preset": args.preset, "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
              "max_batched_tokens": args.max_batched_tokens}
    for kind in ("decode", "decode+chunk"):
        timed(kind, 5)
        ms = timed(kind, args.iterations)
        result[kind] = {"median_ms": statistics.median(ms), "p90_ms": sorted(ms)[int(0.9 * len(ms))]}
        print(f"{kind:<14} median {result[kind]['median_ms']:.2f} ms  p90 {result[kind]['p90_ms']:.2f} ms", flush=True)
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            timed("decode+chunk", 10)
        ka = prof.key_averages()
        for key, attr in (("top_cpu", "self_cpu_time_total"), ("top_cuda", "self_device_time_total")):
            rows = sorted(ka, key=lambda e: getattr(e, attr, 0), reverse=True)[:25]
            result[key] = [{"op": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                            "self_cuda_ms": getattr(e, "self_device_time_total", 0) / 1e3} for e in rows]
            print(f"-- {key}")
            for r in result[key][:18]:
                print(f"  {r['op'][:60]:<60} n={r['count']:<5} cpu {r['self_cpu_ms']:8.2f} ms  cuda {r['self_cuda_ms']:8.2f} ms")
    de.stop()
    out = args.out or os.path.join(os.environ.get("OUT", "bench/results"), "colocated_profile")
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}.json")


if __name__ == "__main__":
    main()
