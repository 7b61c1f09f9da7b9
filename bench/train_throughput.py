"""Training throughput (tokens/s, MFU) of the 1B-shape CoLM {16,16} against a {32} model (= Llama).

Every variant runs the same step (``colm.train.step.train_step``: forward, loss, backward, grad
clip, AdamW) on the same random token batches, side by side in one process, timed with CUDA events
(median over the timed steps after warm-up). Two precision paths are measured:

* ``autocast``: fp32 master weights, ``torch.autocast(bf16)`` (what ``colm train`` does on one GPU;
  chain Linears run the Triton kernel on autocast's casts, ``chain_linear_autocast``);
* ``autocast-ref``: the same with ``COLM_CHAIN_LINEAR=ref``: chain Linears as per-chain cuBLAS GEMMs, how
  autocast training ran them before the kernel took autocast's casts (the {16,16} models only);
* ``autocast-compile``: ``autocast`` with RMSNorm, RoPE and the SwiGLU product through their torch.compile'd forms
  (``colm.kernels.compiled``, what ``run.compile_elementwise: true`` runs) instead of eager autograd ops;
* ``autocast-graph``: ``autocast-compile`` with the whole step captured in one CUDA graph after two plain steps and
  replayed (``colm.train.graphed_step``, what ``run.cuda_graph: true`` runs): no Python per operation;
* ``fsdp-bf16``: FSDP2 over a 1-rank process group with bf16 parameters and fp32 reduction (what
  several GPUs run; chain Linears with more than one chain use the Triton block-sparse kernel).

MFU uses the PaLM / nanoGPT count: 6 x (matmul parameters, block-sparse counted exactly, head
included) + 12 x layers x dim x seq per token, over the dense bf16 peak of the GPU.

With ``--profile`` each variant also runs one more step under ``torch.profiler``: its GPU kernel time by kind
(cuBLAS GEMMs, the chain-Linear Triton kernels, attention, the optimizer, the rest), the kernel count and the
step's wall time, so a ratio can be traced to where the time goes.

    python bench/train_throughput.py --out bench/results/train_throughput_h100.json
    python bench/train_throughput.py --precisions autocast,autocast-ref --profile --out ...
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def flops_per_token(cfg, seq_len: int, loss_kind: str) -> float:
    norms = cfg.n_layers * 2 * cfg.dim + cfg.dim
    matmul = cfg.num_params() - norms - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    if loss_kind == "multi_chain":  # one extra head product per smaller scale
        matmul += sum(cfg.vocab_size * cfg.scale_dim(k) for k in range(1, cfg.num_chains))
    return 6 * matmul + 12 * cfg.n_layers * cfg.dim * seq_len


# bytes per trainable parameter per step that no kernel design avoids on the autocast path: fused AdamW reads the
# fp32 weight, its gradient and both moments and writes the weight and the moments (7 x 4 B); autocast reads each
# fp32 weight once and writes its bf16 copy (4 + 2 B)
STEP_BYTES_PER_PARAM = 7 * 4 + 4 + 2
LOGIT_BYTES = 3 * 2  # the bf16 logits written, read by the loss, their gradient written


def step_bound_ms(cfg, tokens: int, seq_len: int, loss_kind: str, rates: dict) -> dict:
    """The step's lower bound at this GPU's measured rates: every matmul (attention's included) at the 8192^3
    GEMM's TFLOP/s, the optimizer's and autocast's parameter traffic and the logits' traffic at the copy rate.
    Norms, RoPE, SwiGLU and residual adds are left out (a kernel design could fold them into the GEMMs), so
    the bound favours neither model: both share those activations' shapes."""
    flop_ms = flops_per_token(cfg, seq_len, loss_kind) * tokens / (rates["matmul_tflops"] * 1e12) * 1e3
    heads = 1 + (cfg.num_chains - 1 if loss_kind == "multi_chain" else 0)
    byte_count = cfg.num_params() * STEP_BYTES_PER_PARAM + heads * tokens * cfg.vocab_size * LOGIT_BYTES
    bytes_ms = byte_count / (rates["copy_gbs"] * 1e9) * 1e3
    return {"matmul_ms": flop_ms, "bytes_ms": bytes_ms, "total_ms": flop_ms + bytes_ms}


def peak_flops(name: str) -> float:
    for key, value in PEAK_BF16.items():
        if key in name:
            return value
    return float("nan")


KERNEL_KINDS = (  # (kind, name fragments), first match wins
    ("chain_linear_triton", ("chain",)),
    ("gemm_cublas", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "sm80_")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    # Inductor's generated kernels (run.compile_elementwise): triton_poi_fused_*, triton_red_fused_*, ... ("fused_"
    # below would count them as the optimizer's)
    ("elementwise_compiled", ("triton_poi_", "triton_red_", "triton_per_")),
    ("optimizer", ("adam", "foreach", "multi_tensor", "fused_", "clip")),
    ("softmax_loss", ("softmax", "nll", "cross_entropy", "logsumexp")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, frags in KERNEL_KINDS:
        if any(f in low for f in frags):
            return kind
    return "other"


def profile_step(step) -> dict:
    """One ``step()`` under the profiler: wall ms, GPU kernel ms by kind, kernel count, the top kernels."""
    from _timing import kernel_table

    t0 = time.perf_counter()
    prof, rows = kernel_table(step)
    wall = (time.perf_counter() - t0) * 1e3
    ka = prof.key_averages()
    host_ops = sorted((e for e in ka if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)[:20]
    # the host's waits on the GPU: what leaves it launching nothing while the GPU drains
    waits = [e for e in ka if "Synchronize" in e.key or e.key.startswith(("cudaMemcpy", "cudaStreamWait"))]
    # record_function spans (e.g. "Optimizer.step#AdamW.step") show on the GPU timeline too: not kernels
    rows = [r for r in rows if "#" not in r["name"]]
    kinds: dict[str, float] = {}
    for r in rows:
        r["kind"] = kernel_kind(r["name"])
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["gpu_ms"]
    gpu = sum(kinds.values())
    return {"wall_ms_profiled": wall, "gpu_kernel_ms": gpu, "kernels": sum(r["count"] for r in rows),
            "gpu_ms_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
            "top_kernels": rows[:20],
            "host_self_ms_total": sum(e.self_cpu_time_total for e in ka) / 1e3,
            "host_top_ops": [{"name": e.key[:90], "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3}
                             for e in host_ops],
            "host_waits": [{"name": e.key[:90], "count": e.count, "cpu_ms": e.cpu_time_total / 1e3} for e in waits]}


def variant_env(precision: str) -> dict[str, str]:
    """The environment a variant runs under: the chain Linear's per-chain GEMMs (autocast-ref), the compiled
    elementwise ops (autocast-compile, and autocast-graph unless the caller's environment says otherwise)."""
    if precision == "autocast-ref":
        return {"COLM_CHAIN_LINEAR": "ref"}
    if precision == "autocast-compile":
        return {"COLM_COMPILE_ELEMENTWISE": "1"}
    if precision == "autocast-graph":
        return {"COLM_COMPILE_ELEMENTWISE": os.environ.get("COLM_COMPILE_ELEMENTWISE", "1")}
    return {}


def run_variant(name, cfg, precision, loss_kind, batches, steps, warmup, device="cuda", profile=False):
    from unittest import mock

    from colm.model import CoLM
    from colm.train.step import TrainModule, build_optimizer, train_step

    with mock.patch.dict(os.environ, variant_env(precision)):  # the caller's environment back afterwards
        torch.manual_seed(0)
        cuda = device == "cuda"
        model = CoLM(cfg, device=device).reset_parameters(seed=0)
        module = TrainModule(model, loss_kind, log_all_scales=False)
        fsdp = precision == "fsdp-bf16"
        if fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32)
            for block in model.layers:
                fully_shard(block, mp_policy=mp)
            fully_shard(module, mp_policy=mp, reshard_after_forward=False)
        graph, stepper = precision == "autocast-graph", None
        opt = build_optimizer(list(module.named_parameters()), 3e-4, 0.1, (0.9, 0.95), 1e-8, capturable=graph)
        if graph:
            from colm.train.graphed_step import GraphedTrainStep

            stepper = GraphedTrainStep(module, opt, autocast_bf16=True, warmup=max(1, warmup - 1))
            run_step = lambda b: stepper([b], 1.0)  # noqa: E731 - captured on the last warm-up call, replayed after
        else:
            run_step = lambda b: train_step(module, opt, [b], 1.0, autocast_bf16=cuda and not fsdp)  # noqa: E731
        times, losses = [], []
        for i in range(warmup + steps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            loss, _, _ = run_step(batches[i % len(batches)])
            if cuda:
                end.record()
                torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3 if cuda else time.perf_counter() - t0
            losses.append(float(loss))
            if i >= warmup:
                times.append(elapsed)
        mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        prof = None
        if profile and cuda:
            prof = profile_step(lambda: run_step(batches[0]))
        module = model = opt = run_step = stepper = None  # noqa: F841 - frees the model (and a graph) before the next
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return times, losses, mem, prof


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="bench/results/train_throughput.json")
    ap.add_argument("--smoke", action="store_true", help="CPU check of the script on tiny models (no figures)")
    ap.add_argument("--precisions", default="autocast,autocast-ref,autocast-compile,autocast-graph,fsdp-bf16",
                    help="comma list of the paths to run (autocast, autocast-ref, autocast-compile, autocast-graph, "
                         "fsdp-bf16)")
    ap.add_argument("--profile", action="store_true", help="profile one more step of every variant (GPU only)")
    args = ap.parse_args()
    from colm.presets import preset

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        dev_name = "cpu (smoke run, not a measurement)"
        models = {"{32} (Llama)": preset("tiny-1chain"), "{16,16}": preset("tiny"), "{16,16} Air": preset("tiny-air")}
    else:
        torch.distributed.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        torch.backends.cuda.matmul.allow_tf32 = True
        dev_name = torch.cuda.get_device_name(0)
        models = {"{32} (Llama)": preset("llama-3.2-1b"), "{16,16}": preset("llama-3.2-1b-16-16"),
                  "{16,16} Air": preset("llama-3.2-1b-16-16-air")}
    peak = peak_flops(dev_name)
    if args.smoke:
        rates = {"matmul_tflops": float("nan"), "copy_gbs": float("nan")}
    else:
        from _timing import measure_gpu

        rates = measure_gpu("cuda")
        print(f"measured: bf16 GEMM {rates['matmul_tflops']:.0f} TFLOP/s, copy {rates['copy_gbs']:.0f} GB/s", flush=True)
    g = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).vocab_size
    batches = []
    for _ in range(4):
        tok = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g).to(device)
        batches.append((tok[:, :-1], tok[:, 1:]))
    variants = [(m, p, "final") for p in ("autocast", "fsdp-bf16") for m in models]
    variants[len(models):len(models)] = ([("{16,16}", "autocast-ref", "final"), ("{16,16} Air", "autocast-ref", "final")]
                                         + [(m, p, "final") for p in ("autocast-compile", "autocast-graph") for m in models])
    variants += [("{16,16}", "fsdp-bf16", "multi_chain"), ("{16,16} Air", "fsdp-bf16", "multi_chain")]
    wanted = set(args.precisions.split(","))
    if args.smoke and args.precisions == ap.get_default("precisions"):
        wanted.discard("autocast-graph")  # CUDA graphs: GPU only
    if (wanted - {"autocast", "autocast-ref", "autocast-compile", "autocast-graph", "fsdp-bf16"}
            or (args.smoke and "autocast-graph" in wanted)):
        ap.error(f"--precisions: {sorted(wanted)}: allowed are autocast, autocast-ref, autocast-compile, autocast-graph "
                 f"(GPU only), fsdp-bf16")
    # the dense model's autocast row is autocast-ref's baseline too
    variants = [v for v in variants if v[1] in wanted or (v[1] == "autocast" and "autocast-ref" in wanted
                                                           and v[0] == "{32} (Llama)")]
    rows = []
    tokens = args.batch * args.seq

    def report() -> None:
        """The ratios over the rows so far, and the JSON written (after every row: a call cut short keeps them)."""
        base = {r["precision"]: r for r in rows if r.get("model") == "{32} (Llama)" and "error" not in r}
        base["autocast-ref"] = base.get("autocast")  # the dense model has no chain Linears: one autocast run serves both
        for r in rows:
            if "error" not in r and base.get(r["precision"]):
                r["tokens_per_s_vs_llama"] = r["tokens_per_s"] / base[r["precision"]]["tokens_per_s"]
                # what the ratio could be with both steps at their bounds, and how near each step is to its bound
                r["bound_ratio_vs_llama"] = base[r["precision"]]["bound"]["total_ms"] / r["bound"]["total_ms"]
            if "error" not in r:
                r["step_over_bound"] = r["step_ms_median"] / r["bound"]["total_ms"]
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        result = {"bench": "train_throughput", "device": dev_name, "torch": torch.__version__, "triton": triton_version,
                  "batch": args.batch, "seq_len": args.seq, "tokens_per_step": tokens, "timed_steps": args.steps,
                  "warmup_steps": args.warmup, "peak_bf16_flops": peak, "measured_rates": rates,
                  "bound_convention": f"matmul FLOPs (MFU count) at the measured GEMM rate + {STEP_BYTES_PER_PARAM} B per "
                                      f"parameter (fused AdamW, autocast casts) + {LOGIT_BYTES} B per logit at the "
                                      f"measured copy rate; elementwise activations left out",
                  "mfu_convention": "6*matmul_params + 12*layers*dim*seq per token (PaLM/nanoGPT), dense bf16 peak",
                  "rows": rows}
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    for mname, precision, loss_kind in variants:
        cfg = models[mname]
        t0 = time.perf_counter()
        try:
            times, losses, mem, prof = run_variant(mname, cfg, precision, loss_kind, batches, args.steps, args.warmup,
                                                   device, args.profile)
        except Exception as e:  # an out-of-memory or a failed capture costs its row, not the others
            if args.smoke:
                raise
            kind = "OOM" if isinstance(e, torch.OutOfMemoryError) else type(e).__name__
            rows.append({"model": mname, "precision": precision, "loss": loss_kind, "error": f"{kind}: {e}"[:300]})
            print(f"{mname:14s} {precision:14s} {loss_kind:11s} failed: {kind}: {str(e)[:200]}", flush=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            report()
            continue
        med = statistics.median(times)
        fpt = flops_per_token(cfg, args.seq, loss_kind)
        rows.append({"model": mname, "precision": precision, "loss": loss_kind, "chains": list(cfg.chains),
                     "kv_sharing": cfg.kv_sharing, "params": cfg.num_params(), "step_ms_median": med * 1e3,
                     "step_ms_all": [round(t * 1e3, 3) for t in times], "tokens_per_s": tokens / med,
                     "flops_per_token": fpt, "tflops": fpt * tokens / med / 1e12, "mfu": fpt * tokens / med / peak,
                     "peak_mem_gib": mem, "losses": losses, "wall_s": time.perf_counter() - t0,
                     "bound": step_bound_ms(cfg, tokens, args.seq, loss_kind, rates),
                     **({"profile": prof} if prof else {})})
        print(f"{mname:14s} {precision:14s} {loss_kind:11s} {med * 1e3:8.1f} ms  {tokens / med:9.0f} tok/s  "
              f"MFU {rows[-1]['mfu']:.3f}  mem {mem:.1f} GiB", flush=True)
        if prof:
            kinds = "  ".join(f"{k} {v:.1f}" for k, v in prof["gpu_ms_by_kind"].items())
            print(f"    profiled step: wall {prof['wall_ms_profiled']:.1f} ms, kernels {prof['gpu_kernel_ms']:.1f} ms "
                  f"({prof['kernels']}): {kinds}", flush=True)
            waits = "  ".join(f"{w['name']} x{w['count']} {w['cpu_ms']:.1f}" for w in prof["host_waits"])
            tops = "  ".join(f"{o['name'][:40]} x{o['count']} {o['self_cpu_ms']:.1f}" for o in prof["host_top_ops"][:8])
            print(f"    host waits: {waits or 'none'}\n    host top: {tops}", flush=True)
        report()
    print(f"\n{'model':14s} {'precision':14s} {'loss':11s} {'ms/step':>8s} {'tok/s':>9s} {'MFU':>6s} {'vs {32}':>8s} "
          f"{'bound ms':>8s} {'x bound':>7s} {'bound vs {32}':>13s}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:14s} {r['precision']:14s} {r['loss']:11s} {r['error'][:60]}")
            continue
        print(f"{r['model']:14s} {r['precision']:14s} {r['loss']:11s} {r['step_ms_median']:8.1f} {r['tokens_per_s']:9.0f} "
              f"{r['mfu']:6.3f} {r.get('tokens_per_s_vs_llama', float('nan')):8.3f} {r['bound']['total_ms']:8.1f} "
              f"{r['step_over_bound']:7.2f} {r.get('bound_ratio_vs_llama', float('nan')):13.3f}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
