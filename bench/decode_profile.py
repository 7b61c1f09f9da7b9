"""Where a decode step's time goes (GPU): graph replay vs host work, kernels per step, per-op GPU time.

For the 1B-shape CoLM-Air {16,16} model at batch B and context C (random weights, random K/V), for each
variant of the step in one run (``fused_pdl``: the engines' default, q|K/V and gate|up as one launch each,
the gate product formed inside the down projection's launch, one-chain projections through the matrix-vector
kernel, and the step's Triton kernels launched with programmatic dependent launch (at most 8 rows), attention
reading its first K/V tile before the launch's wait;
``fused_pdl_noglu``: the same with the gate product as its own launch, ``COLM_DECODE_GLU=0``;
``fused_pdl_nopreload``: the default without attention's early read of its first K/V tile
(``COLM_ATTN_PRELOAD=0``); ``fused``: the
default without PDL, ``COLM_PDL=0``; ``unfused``: also ``COLM_DECODE_FUSION=0``, the step as it was before any):
* the engine's whole step (``DecodeEngine.step``), the captured forward's replay alone (CUDA events),
  and the eager forward, side by side;
* a ``torch.profiler`` table of one eager forward: GPU time per kernel name, kernel count;
* the graph replay's kernels in order (``_timing.replay_timeline``): each kernel's marginal time (its end after
  the previous kernel's end), summed per class (matrix-vector, attention, norm, ...), which with programmatic
  dependent launch is what each class adds to the step;
* the chain-linear tuner's choices for the step's shapes;
* the weight-read floor: the model's parameter bytes plus the context's K/V bytes at the device-to-device
  copy rate measured in the same run (as ``bench/engines.py`` computes it), and each step over it.

    python bench/decode_profile.py [--out FILE] [--batch 1] [--context 2048] [--scale 2]
                                   [--variants unfused,fused,fused_pdl_noglu,fused_pdl]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from _results import run_meta, write_result  # bench/ is sys.path[0] when a bench runs as a script
from _timing import cuda_ms, kernel_table, replay_timeline

_DEFAULT = {"COLM_DECODE_FUSION": "1", "COLM_PDL": "1", "COLM_DECODE_GLU": "1", "COLM_ATTN_PRELOAD": "1"}
VARIANTS = {"unfused": dict(_DEFAULT, COLM_DECODE_FUSION="0", COLM_PDL="0", COLM_DECODE_GLU="0"),
            "fused": dict(_DEFAULT, COLM_PDL="0"),
            "fused_pdl_noglu": dict(_DEFAULT, COLM_DECODE_GLU="0"),
            "fused_pdl": dict(_DEFAULT),
            "fused_pdl_nopreload": dict(_DEFAULT, COLM_ATTN_PRELOAD="0")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--model", default="llama-3.2-1b-16-16-air")
    ap.add_argument("--variants", default="unfused,fused,fused_pdl_noglu,fused_pdl")
    args = ap.parse_args()
    import colm.kernels._tuning as tuning
    from colm.model import CoLM
    from colm.presets import preset

    model = CoLM(preset(args.model), device="cuda", dtype=torch.bfloat16).reset_parameters(std=0.02, seed=0).eval()
    res = {**run_meta("decode_profile"), "model": args.model, "batch": args.batch, "context": args.context,
           "scale": args.scale, "variants": {}}
    buf = torch.randn(256 << 20, device="cuda")  # 1 GiB
    copy_ms = cuda_ms(buf.clone, reps=10, warmup=2)
    bw = 2 * buf.numel() * 4 / (copy_ms / 1000)  # read + write
    del buf
    cfg = model.cfg
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = args.batch * cfg.n_layers * args.context * 2 * cfg.n_kv_heads * cfg.head_dim * 2
    res.update(measured_copy_gb_s=bw / 1e9, weight_bytes=weight_bytes, kv_bytes=kv_bytes,
               floor_ms=(weight_bytes + kv_bytes) / bw * 1000)
    for name in args.variants.split(","):
        os.environ.update(VARIANTS[name])
        before = len(tuning.tuning_log())
        v = profile(model, args.batch, args.context, args.scale)
        v["tuning"] = tuning.tuning_log()[before:]
        v["step_over_floor"] = v["engine_step_ms"] / res["floor_ms"]
        res["variants"][name] = v
    for key in VARIANTS["unfused"]:
        os.environ.pop(key, None)
    names = list(res["variants"])
    if len(names) > 1:
        base_name = "unfused" if "unfused" in names else names[-1]
        base = res["variants"][base_name]
        keys = ("engine_step_ms", "graph_replay_ms")
        res["ratios_to_" + base_name] = {n: {k: res["variants"][n][k] / base[k] for k in keys
                                            if k in base and k in res["variants"][n]} for n in names}
    print(f"floor {res['floor_ms']:.3f} ms ({weight_bytes / 1e9:.2f} GB weights + {kv_bytes / 1e9:.3f} GB K/V at "
          f"{bw / 1e9:.0f} GB/s)")
    for n in names:
        v = res["variants"][n]
        print(f"{n:8s} engine step {v['engine_step_ms']:.3f} ms ({v['step_over_floor']:.2f}x floor) | graph replay "
              f"{v.get('graph_replay_ms', float('nan')):.3f} ms | kernels {v['kernels_per_forward']} "
              f"({v['kernel_gpu_ms_total']:.3f} ms)")
    write_result(res, f"decode_profile_b{args.batch}_s{args.scale}", res["device"], res["date"], args.out)


@torch.no_grad()
def profile(model, B: int, ctx: int, scale: int) -> dict:
    """One variant's figures (the current COLM_DECODE_FUSION, COLM_PDL): a fresh engine, its graphs captured here."""
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.decode_worker.step import _step_tensors
    from colm.sampling import SamplingParams

    de = DecodeEngine(model, DecodeConfig(num_blocks=B * (ctx + 256) // 16 + 8, block_size=16, max_batch_size=B))
    de.pool.k.normal_()
    de.pool.v.normal_()
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    for i in range(B):
        de.reserve(f"q{i}", ctx, 200)
        de._requests[f"q{i}"].kv_done = True
        de.start_generation(f"q{i}", 1, params, scale=scale)
    for _ in range(4):
        de.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        de.step()
        times.append((time.perf_counter() - t0) * 1000)
    res = {"engine_step_ms": statistics.median(times)}
    batch = list(de._running)
    graphs = de.graphs
    g = next(iter(graphs._graphs.values())) if graphs is not None and graphs._graphs else None
    if g is not None:
        res["graph_replay_ms"] = cuda_ms(g.graph.replay, reps=50, warmup=5)
        res["replay_timeline"] = replay_timeline(g.graph.replay)
        h = g.out[:B]
        res["logits_logsoftmax_argmax_ms"] = cuda_ms(
            lambda: torch.log_softmax(model.logits(h, scale).float(), -1).argmax(-1), reps=50, warmup=5)
    tokens, positions, cache = _step_tensors(batch, de.pool, "cuda")
    res["eager_forward_ms"] = cuda_ms(lambda: model.hidden(tokens, scale=scale, cache=cache, positions=positions), reps=10, warmup=5)
    t0 = time.perf_counter()
    for _ in range(5):
        model.hidden(tokens, scale=scale, cache=cache, positions=positions)
    res["eager_forward_host_ms"] = (time.perf_counter() - t0) * 1000 / 5
    torch.cuda.synchronize()

    from colm.decode_worker.graphs import head_outputs

    prof, res["kernels"] = kernel_table(lambda: model.hidden(tokens, scale=scale, cache=cache, positions=positions))
    res["kernels_per_forward"] = sum(r["count"] for r in res["kernels"])
    res["kernel_gpu_ms_total"] = sum(r["gpu_ms"] for r in res["kernels"])
    h = model.hidden(tokens, scale=scale, cache=cache, positions=positions)[:, 0]
    _, res["head_kernels"] = kernel_table(lambda: head_outputs(model, h, scale))  # what the graph's head runs
    res["cpu_ops"] = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    de.stop()
    print(f"engine step {res['engine_step_ms']:.3f} ms | graph replay {res.get('graph_replay_ms', float('nan')):.3f} ms"
          f" | eager fwd {res['eager_forward_ms']:.3f} ms (host {res['eager_forward_host_ms']:.3f}) | logits "
          f"{res.get('logits_logsoftmax_argmax_ms', float('nan')):.3f} ms")
    tl_ = res.get("replay_timeline", {})
    if "classes" in tl_:
        print(f"graph replay under the profiler: {tl_['replay_span_us_median']:.1f} us median span, "
              f"{tl_['kernels_per_replay']} kernels; per class: count, marginal us (adds up to the span), span us")
        for c, v in sorted(tl_["classes"].items(), key=lambda kv: -kv[1]["marginal_us"]):
            print(f"  {c:10s} {v['count']:4d} {v['marginal_us']:9.1f} {v['span_us']:9.1f}")
    elif tl_:
        print(f"graph replay timeline: {tl_.get('error')}")
    print(f"kernels per forward {res['kernels_per_forward']}, their GPU time {res['kernel_gpu_ms_total']:.3f} ms")
    print(f"{'kernel':90s} {'n':>5s} {'ms':>8s}")
    for r in res["kernels"][:40]:
        print(f"{r['name']:90s} {r['count']:5d} {r['gpu_ms']:8.3f}")
    print("head (inside the graph for single-scale batches):")
    for r in res["head_kernels"]:
        print(f"{r['name']:90s} {r['count']:5d} {r['gpu_ms']:8.3f}")
    return res


if __name__ == "__main__":
    main()
