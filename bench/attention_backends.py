"""Prefill attention: which SDPA backend is fastest at the 1B model's head shapes, and what it does to
chain-1 vs full-model prefill.

Part 1 times causal SDPA (bf16, head_dim 64, 8 K/V heads) for 32 / 16 / 8 query heads (the full model,
chain 1 of {16,16}, chain 1 of {8,8,8,8}) per backend: SDPA's default choice, flash, cuDNN (grouped
queries passed as is, and with K/V repeated), memory-efficient. Part 2 times ``CoLM.hidden`` of the
full model and of the chain-1 sub-model at the same length with SDPA's default and with cuDNN first
(``colm.attention_backend`` priority), side by side.

    python bench/attention_backends.py [--out FILE] [--lengths 8192,32768]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _results import run_meta, write_result  # bench/ is sys.path[0] when a bench runs as a script
from _timing import cuda_ms


def attn_cases(T, res):
    dev, dt = "cuda", torch.bfloat16
    for hq in (32, 16, 8):
        q = torch.randn(1, hq, T, 64, device=dev, dtype=dt)
        k = torch.randn(1, 8, T, 64, device=dev, dtype=dt)
        v = torch.randn_like(k)
        flops = 2 * 2 * hq * T * T * 64 / 2  # QKᵀ and PV, causal half
        gqa = hq != 8
        kr, vr = k.repeat_interleave(hq // 8, 1), v.repeat_interleave(hq // 8, 1)
        variants = {
            "default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
            "flash": (SDPBackend.FLASH_ATTENTION, False),
            "cudnn": (SDPBackend.CUDNN_ATTENTION, False),
            "cudnn_repeat_kv": (SDPBackend.CUDNN_ATTENTION, True),
            "efficient": (SDPBackend.EFFICIENT_ATTENTION, False),
        }
        row = {}
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa).float()
        for name, spec in variants.items():
            if callable(spec):
                fn = spec
            else:
                backend, rep = spec

                def fn(backend=backend, rep=rep):
                    with sdpa_kernel([backend]):
                        if rep:
                            return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            try:
                out = fn().float()
                err = ((out - ref).norm() / ref.norm()).item()
                ms = cuda_ms(fn)
                row[name] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_err_vs_default": err}
            except Exception as exc:  # noqa: BLE001 - a backend that refuses the shape is reported
                row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
        res[f"T{T}_hq{hq}"] = row
        print(f"T={T} Hq={hq}: " + ", ".join(f"{n} {r['ms']:.2f} ms ({r['tflops']:.0f} TF/s)" if "ms" in r
                                              else f"{n} failed" for n, r in row.items()))
        del q, k, v, kr, vr


@torch.no_grad()
def prefill_cases(T, res):
    import colm.attention_backend as ab
    from colm.model import CoLM
    from colm.presets import preset

    for name in ("llama-3.2-1b-16-16-air", "llama-3.2-1b-8-8-8-8-air"):
        full = CoLM(preset(name), device="cuda", dtype=torch.bfloat16).reset_parameters(std=0.02, seed=0).eval()
        tokens = torch.randint(0, 128000, (1, T), device="cuda")
        row = {}
        for label, prio in (("default", None), ("cudnn_first", [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                                                SDPBackend.EFFICIENT_ATTENTION])):
            ab._SDPA_PRIORITY = prio
            row[label] = {"full_ms": cuda_ms(lambda: full.hidden(tokens), reps=3, warmup=1),
                          "chain1_ms": cuda_ms(lambda: full.hidden(tokens, scale=1), reps=3, warmup=1)}
            row[label]["speedup_chain1_vs_full"] = row[label]["full_ms"] / row[label]["chain1_ms"]
        ab._SDPA_PRIORITY = None
        res[f"{name}_T{T}"] = row
        print(name, T, {k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in row.items()})
        del full
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--lengths", default="8192,32768")
    args = ap.parse_args()
    res = {**run_meta("attention_backends"), "cudnn": torch.backends.cudnn.version(), "attention": {}, "prefill": {}}
    lengths = [int(x) for x in args.lengths.split(",")]
    for T in lengths:
        attn_cases(T, res["attention"])
    for T in lengths:
        prefill_cases(T, res["prefill"])
    write_result(res, "attention_backends", res["device"], res["date"], args.out)


if __name__ == "__main__":
    main()
