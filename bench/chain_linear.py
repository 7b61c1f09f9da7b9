"""Chain-linear speed: dense nn.Linear vs the paper's naive per-chain loop vs masked-dense vs our
block-sparse Triton kernel, for the forward, the weight gradient and the input gradient.

Every figure is a median of CUDA-event timings (``triton.testing.do_bench``, L2 flushed between runs)
on random bf16 data, measured side by side in one process. Each pass is reported as a ratio to the
dense Linear of the same in/out size and to the FLOP floor (dense time × nonzero fraction of the block
lower-triangular weight, (n+1)/2n for n equal chains).

    python bench/chain_linear.py [--out bench/results/chain_linear_<device>_<date>.json] [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _results import run_meta, write_result  # bench/ is sys.path[0] when a bench runs as a script
import colm.kernels._tuning as tuning
from colm.kernels.chain_linear import (_layout, _shape_key, chain_linear_backward_input, chain_linear_backward_weight,
                                       chain_linear_forward, chain_linear_ref)

# (name, in chains, out chains, tokens)
CASES = [
    ("{8,8,8,8}@4096 t4096", [1024] * 4, [1024] * 4, 4096),
    ("{8,8,8,8}@4096 t8192", [1024] * 4, [1024] * 4, 8192),
    ("8x@8192 t4096", [1024] * 8, [1024] * 8, 4096),
    ("8x@8192 t8192", [1024] * 8, [1024] * 8, 8192),
    ("1B {16,16} attn t8192", [1024] * 2, [1024] * 2, 8192),
    ("1B {16,16} ffn-up t8192", [1024] * 2, [4096] * 2, 8192),
    ("1B {16,16} ffn-down t8192", [4096] * 2, [1024] * 2, 8192),
    ("1B {8,8,8,8} attn t8192", [512] * 4, [512] * 4, 8192),
    ("1B {8,8,8,8} ffn-up t8192", [512] * 4, [2048] * 4, 8192),
    ("1B {8,8,8,8} ffn-down t8192", [2048] * 4, [512] * 4, 8192),
]
PASSES = ("fwd", "bwd_w", "bwd_i")
DEVICE = "cuda"  # tests of this script may point it at the CPU (with TRITON_INTERPRET=1)


def bench(fn, quick: bool) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 150, return_mode="median")


def run_case(name, ins, outs, tokens, quick, dtype=torch.bfloat16):
    dev = DEVICE
    prefix = [sum(ins[: i + 1]) for i in range(len(ins))]
    k_in, n_out = prefix[-1], sum(outs)
    ws = [torch.randn(o, p, device=dev, dtype=dtype) / p**0.5 for o, p in zip(outs, prefix)]
    x = torch.randn(tokens, k_in, device=dev, dtype=dtype)
    dy = torch.randn(tokens, n_out, device=dev, dtype=dtype)
    lay = _layout(ws)
    nonzero = sum(o * p for o, p in zip(outs, prefix)) / (n_out * k_in)

    # dense Linear of the same in/out size
    w_dense = torch.randn(n_out, k_in, device=dev, dtype=dtype) / k_in**0.5
    # masked-dense: the full matrix with the upper blocks zeroed by a mask in every pass
    mask = torch.zeros(n_out, k_in, device=dev, dtype=dtype)
    r = 0
    for o, p in zip(outs, prefix):
        mask[r:r + o, :p] = 1
        r += o
    w_full = torch.cat([F.pad(w, (0, k_in - w.shape[1])) for w in ws])

    # naive per-chain loop (paper Algorithm 1) through autograd, as the model's reference path runs it
    xr = x.clone().requires_grad_()
    wr = [w.clone().requires_grad_() for w in ws]
    yr = chain_linear_ref(xr, wr)

    impls = {
        "dense": {
            "fwd": lambda: F.linear(x, w_dense),
            "bwd_w": lambda: dy.t() @ x,
            "bwd_i": lambda: dy @ w_dense,
        },
        "naive": {
            "fwd": lambda: chain_linear_ref(x, ws),
            "bwd_w": lambda: torch.autograd.grad(yr, wr, dy, retain_graph=True),
            "bwd_i": lambda: torch.autograd.grad(yr, [xr], dy, retain_graph=True),
        },
        "masked": {
            "fwd": lambda: F.linear(x, w_full * mask),
            "bwd_w": lambda: (dy.t() @ x) * mask,
            "bwd_i": lambda: dy @ (w_full * mask),
        },
        "ours": {
            "fwd": lambda: chain_linear_forward(x, ws, None, lay),
            "bwd_w": lambda: chain_linear_backward_weight(dy, x, lay, list(range(len(ws)))),
            "bwd_i": lambda: chain_linear_backward_input(dy, ws, lay),
        },
    }
    # correctness of ours on this shape against float32 dense-masked math
    ref32 = {"fwd": x.float() @ (w_full.float()).t(), "bwd_i": dy.float() @ w_full.float()}
    got = {"fwd": impls["ours"]["fwd"](), "bwd_i": impls["ours"]["bwd_i"]()}
    errs = {p: ((got[p].float() - ref32[p]).norm() / ref32[p].norm()).item() for p in got}
    gw = impls["ours"]["bwd_w"]()
    ref_w = dy.float().t() @ x.float()
    r, num, den = 0, 0.0, 0.0
    for i, (o, p) in enumerate(zip(outs, prefix)):
        num += (gw[i].float() - ref_w[r:r + o, :p]).norm().item() ** 2
        den += ref_w[r:r + o, :p].norm().item() ** 2
        r += o
    errs["bwd_w"] = (num / den) ** 0.5

    times = {impl: {p: bench(fn, quick) for p, fn in passes.items()} for impl, passes in impls.items()}
    chosen = {"fwd": tuning._BEST.get(_shape_key("fwd", x, lay, (False, True))),
              "bwd_i": tuning._BEST.get(_shape_key("bwd_i", dy, lay)),
              "bwd_w": tuning._BEST.get(_shape_key("bwd_w", x, lay, (tuple(range(len(ws))),)))}
    flops_dense = 2 * tokens * n_out * k_in
    res = {"name": name, "in_chains": ins, "out_chains": outs, "tokens": tokens, "dtype": str(dtype),
           "nonzero_fraction": nonzero, "rel_err_vs_fp32": errs, "ms": times,
           "chosen_config": {p: (c._asdict() if c is not None else None) for p, c in chosen.items()},
           "dense_tflops": {p: flops_dense / times["dense"][p] / 1e9 for p in PASSES},
           "ours_tflops": {p: flops_dense * nonzero / times["ours"][p] / 1e9 for p in PASSES},
           "vs_dense": {impl: {p: times[impl][p] / times["dense"][p] for p in PASSES} for impl in impls},
           "vs_floor": {impl: {p: times[impl][p] / (times["dense"][p] * nonzero) for p in PASSES} for impl in impls}}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--cases", default=None, help="comma-separated case indices")
    args = ap.parse_args()
    torch.manual_seed(0)
    cases = CASES if args.cases is None else [CASES[int(i)] for i in args.cases.split(",")]
    results = []
    for case in cases:
        results.append(run_case(*case, quick=args.quick))
        r = results[-1]
        print(f"{r['name']:30s} ours/floor " + " ".join(f"{p}={r['vs_floor']['ours'][p]:.3f}" for p in PASSES), flush=True)
    out = {**run_meta("chain_linear"),
           "timing": "triton.testing.do_bench median, L2 flushed, CUDA events", "cases": results,
           "tuning": tuning.tuning_log()}
    print(f"\n{'case':30s} {'pass':6s} {'dense ms':>9s} {'naive':>7s} {'masked':>7s} {'ours':>7s}   (ratio to dense) "
          f"{'ours/floor':>10s} {'naive/floor':>11s} {'ours TF/s':>9s} {'err':>8s}")
    for r in results:
        for p in PASSES:
            vd = r["vs_dense"]
            print(f"{r['name']:30s} {p:6s} {r['ms']['dense'][p]:9.3f} {vd['naive'][p]:7.3f} {vd['masked'][p]:7.3f} "
                  f"{vd['ours'][p]:7.3f}   {'':15s} {r['vs_floor']['ours'][p]:10.3f} {r['vs_floor']['naive'][p]:11.3f} "
                  f"{r['ours_tflops'][p]:9.1f} {r['rel_err_vs_fp32'][p]:8.1e}  {tuple(r['chosen_config'][p].values()) if r['chosen_config'][p] else ''}")
    write_result(out, "chain_linear", out["device"], out["date"], args.out)


if __name__ == "__main__":
    main()
