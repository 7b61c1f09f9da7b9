"""What the chain-linear kernel buys end to end: forward+backward of a training step of the
Llama-3.2-1B-shape CoLM {8,8,8,8} (bf16 weights) with the Triton kernel vs the naive per-chain loop
(``COLM_CHAIN_LINEAR=ref``), measured alternately in one process.

    python bench/train_step_kernel.py [--batch 4] [--seq 2048] [--steps 10] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F

from _results import run_meta, write_result  # bench/ is sys.path[0] when a bench runs as a script
from colm.model import CoLM
from colm.presets import preset


def step(model, tokens) -> None:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    for p in model.parameters():
        p.grad = None


def timed(model, tokens, mode: str, steps: int) -> list[float]:
    if mode == "ref":
        os.environ["COLM_CHAIN_LINEAR"] = "ref"
    else:
        os.environ.pop("COLM_CHAIN_LINEAR", None)
    out = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(model, tokens)
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3.2-1b-8-8-8-8")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = CoLM(cfg, device="cuda", dtype=torch.bfloat16).reset_parameters(seed=0).train()
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device="cuda")
    for mode in ("kernel", "ref"):  # warm-up: compile and tune the kernels, allocator, cuBLAS
        timed(model, tokens, mode, 3)
    times = {"kernel": [], "ref": []}
    for _ in range(2):  # alternate to spread clock/thermal drift over both
        for mode in ("kernel", "ref"):
            times[mode] += timed(model, tokens, mode, args.steps // 2)
    med = {m: statistics.median(t) for m, t in times.items()}
    res = {**run_meta("train_step_kernel"), "preset": args.preset,
           "batch": args.batch, "seq": args.seq, "dtype": "bfloat16", "step": "forward + cross-entropy + backward",
           "ms_median": med, "ms_all": times, "kernel_over_naive": med["kernel"] / med["ref"],
           "speedup": med["ref"] / med["kernel"], "max_memory_gb": torch.cuda.max_memory_allocated() / 1e9}
    print(f"{args.preset} batch {args.batch} x seq {args.seq}: kernel {med['kernel']:.1f} ms, naive loop {med['ref']:.1f} ms,"
          f" ratio {res['kernel_over_naive']:.3f} (speedup {res['speedup']:.3f}x)")
    write_result(res, "train_step_kernel", res["device"], res["date"], args.out)


if __name__ == "__main__":
    main()
