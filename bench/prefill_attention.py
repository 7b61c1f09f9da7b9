"""The colocated chunk's attention: the paged prefill kernel vs PyTorch SDPA per segment, against the FLOP limit.

One chunk as the colocated engine packs it under load: a long prompt's later chunk (its earlier keys in the pool)
plus whole prompts filling ``--tokens``; 1B-shape chain-1 heads (16 query, 8 K/V heads of 64). Timed per layer
call (``_timing.cuda_ms``: CUDA events, the mean of ``--iters`` back-to-back calls): ``kernels.prefill_attention``
at each launch configuration of the sweep, and SDPA (cuDNN / flash on Hopper) per segment over contiguous K/V, the
way the chunk ran before the kernel (no gather from the pool counted for it). The limit is the causal attention's FLOPs at the GPU's measured bf16
matmul rate.

    python bench/prefill_attention.py --tokens 2048
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _results import run_meta, write_result  # noqa: E402
from _timing import cuda_ms, measure_gpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefix", type=int, default=1500, help="earlier keys of the chunk's first (continued) prompt")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None, help="output prefix (default: bench/_results' name)")
    args = ap.parse_args()

    from colm.kernels import prefill_attention as pf

    dev, dt = "cuda", torch.bfloat16
    hq, hkv, d, bs = 16, 8, 64, 16
    # segments: (pos0, rows): a continuation, then whole prompts of 700, 500, rest
    first = min(600, args.tokens)
    specs = [(args.prefix, first)]
    left = args.tokens - first
    for n in (700, 500):
        if left > 0:
            specs.append((0, min(n, left)))
            left -= min(n, left)
    if left > 0:
        specs.append((0, left))
    ends = [p + n for p, n in specs]
    blocks = [-(-e // bs) for e in ends]
    num_blocks = sum(blocks) + 8
    perm = torch.randperm(num_blocks)
    pages, page0, at = [], [], 0
    for b in blocks:
        page0.append(len(pages))
        pages += perm[at : at + b].tolist()
        at += b
    kp = torch.randn(num_blocks, bs, hkv, d, device=dev, dtype=dt)
    vp = torch.randn_like(kp)
    n = sum(r for _, r in specs)
    q = torch.randn(n, hq, d, device=dev, dtype=dt)
    offs = [0]
    for _, r in specs[:-1]:
        offs.append(offs[-1] + r)
    segments = torch.tensor([[o, r, p, p0] for o, (p, r), p0 in zip(offs, specs, page0)], device=dev)
    pages_t = torch.tensor(pages, device=dev, dtype=torch.int64)
    flops = sum(4 * r * (p + (r + 1) / 2) * d * hq for p, r in specs)  # causal: QK^T and PV

    peak = measure_gpu(dev)["matmul_tflops"]

    ref = pf.paged_prefill_attention_ref(q.float(), kp.float(), vp.float(), pages_t, segments.cpu())
    rows = []
    for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
        launch = {"block_m": bm, "block_n": bn, "num_warps": warps, "num_stages": stages}
        tiles = torch.from_numpy(pf.plan_tiles([r for _, r in specs], pf.max_tiles(n, len(specs), bm), bm)).to(dev)
        try:
            out = pf.paged_prefill_attention_triton(q, kp, vp, pages_t, segments, tiles, launch=launch)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            ms = cuda_ms(lambda: pf.paged_prefill_attention_triton(q, kp, vp, pages_t, segments, tiles, launch=launch),
                         args.iters, warmup=3)
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile (shared memory) is skipped
            rows.append({**launch, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        rows.append({**launch, "ms": ms, "tflops": flops / (ms / 1e3) / 1e12, "rel_err": err})
        print(f"kernel bm={bm:<4} bn={bn:<4} warps={warps} stages={stages}: {ms:.4f} ms "
              f"{rows[-1]['tflops']:.0f} TFLOP/s (rel err {err:.1e})", flush=True)

    # SDPA per segment over contiguous K/V (the K/V heads expanded, as the chunk did), keys gathered beforehand
    ks, vs_ = [], []
    for (p, r), p0, b in zip(specs, page0, blocks):
        idx = pages_t[p0 : p0 + b]
        ks.append(kp[idx].reshape(-1, hkv, d)[: p + r].transpose(0, 1)[None].repeat_interleave(hq // hkv, 1).contiguous())
        vs_.append(vp[idx].reshape(-1, hkv, d)[: p + r].transpose(0, 1)[None].repeat_interleave(hq // hkv, 1).contiguous())
    qs = [q[o : o + r].transpose(0, 1)[None].contiguous() for o, (_, r) in zip(offs, specs)]

    from torch.nn.attention.bias import causal_lower_right

    def sdpa():
        for qq, kk, vv in zip(qs, ks, vs_):
            F.scaled_dot_product_attention(qq, kk, vv, attn_mask=causal_lower_right(qq.shape[2], kk.shape[2]))

    sdpa_ms = cuda_ms(sdpa, args.iters, warmup=3)
    print(f"SDPA per segment: {sdpa_ms:.4f} ms {flops / (sdpa_ms / 1e3) / 1e12:.0f} TFLOP/s")
    best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    default = next(r for r in rows if r.get("block_m") == pf.BLOCK_M and r.get("block_n") == 128
                   and r.get("num_warps") == 4 and r.get("num_stages") == 2)
    result = {**run_meta("prefill_attention"), "segments": specs, "tokens": n, "heads": [hq, hkv, d],
              "flops": flops, "matmul_tflops": peak, "sdpa_per_segment_ms": sdpa_ms, "sweep": rows,
              "best": best, "default": default,
              "ratios": {"best_vs_sdpa": sdpa_ms / best["ms"], "default_vs_sdpa": sdpa_ms / default.get("ms", 1e9),
                         "best_of_matmul_peak": best["tflops"] / peak}}
    print(json.dumps({k: result[k] for k in ("best", "default", "ratios", "matmul_tflops")}, indent=1))
    write_result(result, "prefill_attention", result["device"], result["date"], args.out and args.out + ".json")


if __name__ == "__main__":
    main()
