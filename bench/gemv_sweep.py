"""Few-row chain-Linear configurations timed as a decode step meets them: weights cold in L2.

The forward tuner times each candidate replaying one call from a CUDA graph, so the same weights sit
in L2 (50 MB on an H100) from the second replay on, while a real decode step reads ~1.4 GB of weights
and finds none of them cached. Here each shape of the 1B {16,16} CoLM-Air layer gets 16 weight sets
(one per layer, as in the model); one graph runs the chain Linear over all 16 and the time per call is
replay time / 16 (CUDA events, median). The decode step's fused launches (q's chains with the K/V weight,
gate with up) are timed the same way through ``fused_linear``. Candidates: a grid of few-row (GEMV) configurations, the
tuner's own ``GEMV_CONFIGS``, and per-chain cuBLAS. Prints a table per shape and writes JSON.

    python bench/gemv_sweep.py [--rows 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from _results import run_meta, write_result  # bench/ is sys.path[0] when a bench runs as a script

SHAPES = {  # name: per-chain weight shapes [out_i, P_i] of the 1B {16,16} Air model at full scale
    "q_or_o": [(1024, 1024), (1024, 2048)],
    "gate_or_up": [(4096, 1024), (4096, 2048)],
    "down": [(1024, 4096), (1024, 8192)],
}
FUSED = {  # the decode step's fused launches (colm.kernels.fused_linear): segment shapes [out, P]
    "q_kv_fused": [(1024, 1024), (1024, 2048), (1024, 1024)],
    "gate_up_fused": [(4096, 1024), (4096, 2048), (4096, 1024), (4096, 2048)],
}
LAYERS = 16


def candidates():
    import importlib

    cl = importlib.import_module("colm.kernels.chain_linear")  # the module (the package re-exports a function)
    from colm.kernels.chain_linear_gemv import GEMV_CONFIGS

    grid = [cl.GemmConfig(0, bn, bk, w, s, gemv=True)
            for bn, bk, w, s in itertools.product((2, 4, 8, 16, 32), (256, 512, 1024), (2, 4, 8), (1, 3))]
    seen, out = set(), []
    for c in list(GEMV_CONFIGS) + grid + [cl.PER_CHAIN_CUBLAS]:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def time_config(xs, layers, cfg, reps=30, fused=False):
    from colm.kernels import fused_linear as fl
    from colm.kernels._tuning import graph_time_ms
    from colm.kernels.chain_linear import chain_linear_triton

    # fused: each layer's weights as segments side by side in y
    segs = [[fl.Segment(w, c) for w, c in zip(ws, itertools.accumulate([0] + [w.shape[0] for w in ws[:-1]]))]
            for ws in layers] if fused else None

    def run():
        for i, (x, ws) in enumerate(zip(xs, layers)):
            if fused:
                fl.fused_linear_forward(x, segs[i], cfg)
            else:
                chain_linear_triton(x, ws, configs={"fwd": cfg})

    return graph_time_ms(run, replays=reps, calls=1) / len(layers)  # one graph of all layers' calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cands = candidates()
    res = {**run_meta("gemv_sweep"), "rows": args.rows, "layers": LAYERS, "shapes": {}}
    for name, shapes in {**SHAPES, **FUSED}.items():
        fused = name in FUSED
        layers = [[torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02 for s in shapes] for _ in range(LAYERS)]
        xs = [torch.randn(args.rows, max(p for _, p in shapes), device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        nbytes = sum(o * p for o, p in shapes) * 2
        rows = []
        for cfg in cands:
            try:
                ms = time_config(xs, layers, cfg, fused=fused)
            except Exception as e:  # noqa: BLE001 - a config the chip cannot run
                rows.append({"config": repr(cfg), "error": repr(e)[:120]})
                continue
            rows.append({"config": repr(cfg), "us": ms * 1e3, "gb_s": nbytes / ms / 1e6})
        ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        res["shapes"][name] = {"weights": shapes, "bytes": nbytes, "results": rows, "best": ok[0] if ok else None}
        print(f"\n{name}: {nbytes / 1e6:.1f} MB per call, {len(ok)} configs ran")
        for r in ok[:8]:
            print(f"  {r['us']:7.2f} us {r['gb_s']:7.0f} GB/s  {r['config']}")
        del layers, xs
        torch.cuda.empty_cache()
    write_result(res, f"gemv_sweep_m{args.rows}", res["device"], res["date"], args.out)


if __name__ == "__main__":
    main()
