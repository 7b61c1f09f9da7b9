"""Where a colocated engine's loop iteration spends its time: decode step alone vs decode step + prompt chunk.

In one process, no gRPC: a ``DecodeEngine`` with ``colocated_prefill`` keeps ``--batch`` requests decoding while
prompts of ``--prompt-len lo,hi`` tokens keep its prefill queue over two budgets deep (so every iteration's chunk
fills the budget: whole prompts and cut ones, as under load), and its ``step()`` is called directly. Iteration
kinds: ``decode`` (no prompts), ``decode+chunk`` with the chunks replayed from CUDA graphs, and
``decode+eager_chunk`` (graphs off for the prefill: launched op by op). Reported: wall time per iteration (host),
the chunk's tokens, the chain-1 prefill's FLOPs per second it reaches, and with ``--torch-profile`` the top
operators by CPU and by CUDA time (torch.profiler), as JSON.

    python bench/colocated_profile.py --preset llama-3.2-1b-16-16-air --batch 64 --prompt-len 512,2048
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
    ap.add_argument("--prompt-len", default="512,2048")
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

    lo, hi = (int(x) for x in args.prompt_len.split(","))
    for _ in range(args.batch):
        submit(int(rng.integers(lo, hi + 1)))
    while len(de._running) < args.batch:  # prefill them all (chunks only, then decode joins)
        de.step()
    graphs = de.prefill_graphs

    def timed(kind: str, k: int) -> tuple[list[float], list[int]]:
        ms, tokens = [], []
        de.prefill_graphs = None if kind == "decode+eager_chunk" else graphs
        for _ in range(k):
            if kind != "decode":
                while de.stats().num_prefill_queued_tokens < 2 * args.max_batched_tokens:
                    submit(int(rng.integers(lo, hi + 1)))
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            de.step()
            if cuda:
                torch.cuda.synchronize()
            ms.append((time.perf_counter() - t0) * 1e3)
            tokens.append(de.iterations[-1][1])
            for rid, r in list(de._requests.items()):  # keep the batch size fixed: new requests end once prefilled
                if r.kv_done and not r.running:
                    de.abort(rid)
        return ms, tokens

    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "preset": args.preset, "dtype": args.dtype, "batch": args.batch, "prompt_len": args.prompt_len,
              "max_batched_tokens": args.max_batched_tokens, "graphs": graphs is not None}
    d1 = de.cfg.scale_dim(1)
    for kind in ("decode", "decode+chunk", "decode+eager_chunk"):
        if kind == "decode+eager_chunk" and graphs is None:
            continue
        timed(kind, 5)
        ms, tokens = timed(kind, args.iterations)
        med = statistics.median(ms)
        result[kind] = {"median_ms": med, "p90_ms": sorted(ms)[int(0.9 * len(ms))],
                        "prefill_tokens_mean": statistics.mean(tokens)}
        print(f"{kind:<20} median {med:.2f} ms  p90 {result[kind]['p90_ms']:.2f} ms  "
              f"prefill tokens/iteration {statistics.mean(tokens):.0f}", flush=True)
    if "decode+chunk" in result:
        extra = (result["decode+chunk"]["median_ms"] - result["decode"]["median_ms"]) / 1e3
        toks = result["decode+chunk"]["prefill_tokens_mean"]
        body = sum(p.numel() for p in de.model.layers.parameters()) * (d1 / de.cfg.dim) ** 2  # rough chain-1 share
        result["chunk_extra_ms"] = extra * 1e3
        result["chunk_tokens_per_s"] = toks / max(extra, 1e-9)
        result["chunk_tflops_rough"] = 2 * body * toks / max(extra, 1e-9) / 1e12
        print(f"chunk: +{extra * 1e3:.2f} ms for {toks:.0f} tokens = {toks / max(extra, 1e-9):.0f} tokens/s", flush=True)
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
