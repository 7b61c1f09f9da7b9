"""Serving throughput of each deployment on one device, same load, one run: its host cost and the GPU's limit.

Modes (``--modes``), each its own workers as plain processes (``colm.deploy.worker_main``) and a router in this
process serving a closed-loop load from ``colm loadtest`` (another process):
  per_request, batched  disaggregated: a chain-1 prefill worker hands the K/V to a decode worker; the router's
                        token streams per request or batched per decode step (``router.token_stream``);
  colocated             one decode worker that prefills its own prompts in chunks inside its step loop
                        (``DecodeConfig.colocated_prefill``: one process, one CUDA context, no hand-off);
  baseline              the same colocated engine serving the model as a dense one would be served: the FULL
                        model prefills every prompt (``prefill_scale`` 0) and every request runs at full scale;
  dense                 the same colocated engine (chunked prefill in the decode loop, CUDA graphs, prefix cache)
                        serving the dense-equivalent model: the dense Llama of the model's full-scale shape (one
                        chain, no K/V sharing, random weights; ``dense_checkpoint``), the baseline of a deployment
                        that serves a dense model with colm's best one-GPU design;
  colocated_nocache     colocated with prefix caching off (``DecodeConfig.prefix_caching``): beside ``colocated``
                        under ``--prefix-len`` (prompts opening with shared prefixes), what the cache saves;
  hf_dense              an engine colm did not write: transformers' continuous batching (``bench/_hf_backend.py``)
                        serving the dense Llama of the model's full-scale shape (random weights), in the router's
                        process (one router; the engine is a thread there, as ``transformers serve`` runs it).
Per mode: requests/s, output tokens/s, TTFT / TPOT percentiles, goodput at the SLO, and the CPU seconds the
router, each worker (from /proc) and the load test's client process (rusage) spent per 1000 output tokens, with
the GPU's busy fraction sampled by nvidia-smi where there is one.

On a GPU the run also states the workload's physical limit: FLOPs and bytes per request from the model
config (chain-1 prefill FLOPs; per decode step the full model's weights once for the batch plus each row's
K/V, and the full model's FLOPs per token), against this GPU's measured bf16 matmul TFLOP/s and device copy
GB/s; every throughput is also given as a fraction of that limit.

    python bench/serve_path.py --preset llama-3.2-1b-16-16-air --concurrency 64 --num-requests 1500
    python bench/serve_path.py --preset demo --device cpu --concurrency 32 --num-requests 400 \\
        --prompt-len 16,64 --output-len 32,96      # the host cost alone, on a CPU
    python bench/serve_path.py --modes colocated_nocache,colocated --prefix-len 1024 --num-prefixes 4 ...
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import secrets
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gpu_busy import GpuSampler  # noqa: E402
from _proc_stats import CpuSampler  # noqa: E402
from _pyspy import Profile  # noqa: E402
from _timing import measure_gpu  # noqa: E402
from serve_goodput import build_checkpoint, start_worker  # noqa: E402

from colm.loadtest import load_window  # noqa: E402

MODES = ("batched", "colocated", "baseline")
# nocache: prefix caching off; hf_dense: the independent engine
ALL_MODES = ("per_request", "batched", "colocated", "baseline", "colocated_nocache", "dense", "hf_dense")


# ------------------------------------------------------------------------------------------- the limit
def linear_params(cfg, scale: int) -> int:
    """Weights of the Linear layers (and the head) a token passes through at ``scale``: chain-causal blocks (output
    chain j reads input chains <= j); CoLM-Air's K/V from chain 1 only."""
    dims = cfg.chain_dims[:scale]
    ffn = cfg.ffn_dims[:scale]
    kv = cfg.n_kv_heads * cfg.head_dim
    tri = lambda outs, ins: sum(o * sum(ins[: j + 1]) for j, o in enumerate(outs))  # noqa: E731
    per_layer = (tri(dims, dims)  # q
                 + 2 * kv * dims[0]  # k, v (Air: chain 1)
                 + tri(dims, dims)  # o
                 + 2 * tri(ffn, dims)  # gate, up
                 + tri(dims, ffn))  # down
    return cfg.n_layers * per_layer + cfg.vocab_size * sum(dims)


def request_cost(cfg, prompt: float, out: float, dtype_bytes: int = 2) -> dict:
    """FLOPs and bytes of one request of ``prompt`` prompt and ``out`` output tokens (means)."""
    full, one = cfg.num_chains, 1
    d1 = cfg.chain_dims[0]
    body1 = linear_params(cfg, one) - cfg.vocab_size * d1  # chain-1 prefill needs no logits: decode runs the last token
    prefill_flops = 2 * body1 * prompt + 2 * cfg.n_layers * prompt * prompt * d1  # + causal attention
    kv_per_token = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes
    ctx = prompt + out / 2  # mean context over the request's steps
    decode_flops = out * (2 * linear_params(cfg, full) + 4 * cfg.n_layers * ctx * cfg.dim)
    return {"prefill_flops": prefill_flops, "decode_flops": decode_flops,
            "decode_kv_bytes": out * ctx * kv_per_token,
            "weight_bytes": linear_params(cfg, full) * dtype_bytes, "out_tokens": out}


def dense_config(cfg):
    """The dense Llama of ``cfg``'s full-scale shape (one chain of every head, no KV sharing): what ``dense`` and
    ``hf_dense`` serve."""
    return dataclasses.replace(cfg, chains=(sum(cfg.chains),), kv_sharing=False)


def dense_checkpoint(ckpt: str, dtype, device: str) -> str:
    """A colm checkpoint of ``dense_config`` of ``ckpt``'s model (random weights, the presets' init: std 0.02, seed
    0) with ``ckpt``'s tokenizer, in the temporary directory (made once per shape and dtype): what ``dense``
    serves."""
    from colm import checkpoint
    from colm.model import CoLM

    cfg = dense_config(checkpoint.load_config(ckpt))
    name = "x".join(str(v) for v in (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden,
                                       cfg.vocab_size, cfg.max_seq_len))
    path = os.path.join(tempfile.gettempdir(), f"colm-bench-dense-{name}-{str(dtype).removeprefix('torch.')}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        model = CoLM(cfg, device=device, dtype=torch.float32)
        model.reset_parameters(std=0.02, seed=0)
        checkpoint.save(model.to(dtype), path, tokenizer=checkpoint.read_meta(ckpt).get("tokenizer"),
                        copy_tokenizer_from=ckpt)
        del model
    return path


def limit_rps(cost: dict, gpu: dict, batch: int) -> dict:
    """Requests/s the GPU allows: prefill and decode time-share it; a decode step reads the weights once for
    ``batch`` rows and each row's K/V; compute and bandwidth bounds of each phase add up per request."""
    f, bw = gpu["matmul_tflops"] * 1e12, gpu["copy_gbs"] * 1e9
    prefill_s = cost["prefill_flops"] / f
    decode_bytes_s = (cost["out_tokens"] * cost["weight_bytes"] / batch + cost["decode_kv_bytes"]) / bw
    decode_flops_s = cost["decode_flops"] / f
    per_request_s = prefill_s + max(decode_bytes_s, decode_flops_s)
    return {"limit_rps": 1.0 / per_request_s, "prefill_s": prefill_s, "decode_bandwidth_s": decode_bytes_s,
            "decode_compute_s": decode_flops_s, "batch": batch}


# ------------------------------------------------------------------------------------------- the run
def start_workers(mode: str, ckpt: str, wargs, token: str, decode_section: dict) -> dict:
    """{role: (process, address)} of one mode's deployment (none for ``hf_dense``: its engine is the router's)."""
    if mode == "hf_dense":
        return {}
    if mode in ("colocated", "baseline", "colocated_nocache", "dense"):
        section = {**decode_section, "colocated_prefill": True, "max_batched_tokens": wargs.max_batched_tokens,
                   "prefill_scale": 0 if mode == "baseline" else 1, "prefix_caching": mode != "colocated_nocache"}
        return {"decode": start_worker("decode", ckpt, wargs, token, section)}
    return {"decode": start_worker("decode", ckpt, wargs, token, decode_section),
            "prefill": start_worker("prefill", ckpt, wargs, token, {})}


def stop_workers(workers: dict) -> None:
    for p, _ in workers.values():
        p.terminate()
    for p, _ in workers.values():
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:  # a worker busy tearing down its CUDA context
            p.kill()
            p.wait(30)


def hf_backend(model_cfg, args):
    """``hf_dense``'s backend: the dense Llama of ``model_cfg``'s full-scale shape under transformers' continuous
    batching, on ``args.device``; its per-iteration token budget is colm's (``--max-batched-tokens``), its batch
    the clients' number, its K/V cache and CUDA graphs the library's defaults (``--hf-compile-level``: its
    torch.compile level)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from _hf_backend import HFContinuousBackend, dense_llama

    cuda = args.device.startswith("cuda")
    model = dense_llama(model_cfg, args.device, getattr(torch, args.dtype))
    longest = int(args.prompt_len.split(",")[1]) + int(args.output_len.split(",")[1]) + args.prefix_len
    cb = ContinuousBatchingConfig(max_batch_tokens=args.max_batched_tokens,
                                  max_requests_per_batch=max(64, args.concurrency),
                                  # on a GPU from free memory; on a CPU every client's longest request (256-token
                                  # blocks), not a size from host memory that each step's mask would span
                                  num_blocks=None if cuda else -(-args.concurrency * longest // 256) + 4,
                                  default_compile_level=args.hf_compile_level)
    return HFContinuousBackend(model, cb, warmup=cuda)


def make_router(mode: str, ckpt: str, workers: list[tuple[str, str]], token: str, replicas: int, port: int = 0,
                args=None, worker_calls: str = "stream"):
    """A router (ThreadedRouterServer) of ``mode`` over ``workers`` [(role, address)] on ``port``."""
    from colm import checkpoint
    from colm.router.backend import WorkerInfo
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.grpc_backend import GrpcBackend
    from colm.router.server import ThreadedRouterServer
    from colm.tokenizer import load_checkpoint_tokenizer

    stream = "per_request" if mode == "per_request" else "batched"
    model_cfg = checkpoint.load_config(ckpt)
    if mode == "hf_dense":
        backend = hf_backend(model_cfg, args)
    else:
        backend = GrpcBackend([WorkerInfo(f"{role}-0", role, addr) for role, addr in workers], cluster_token=token,
                              token_stream=stream, worker_calls=worker_calls)
    cfg = RouterConfig(grpc_port=port, http_port=None, max_running=1024, max_queued=8192, poll_interval_s=0.1,
                       default_deadline_s=300, token_timeout_s=120, served_model_name=f"bench-{mode}",
                       token_stream=stream, worker_calls=worker_calls,
                       fixed_scale=model_cfg.num_chains if mode in ("baseline", "dense", "hf_dense") else None,
                       replicas=replicas)
    return ThreadedRouterServer(Router(cfg, model_cfg, load_checkpoint_tokenizer(ckpt), backend))


def _router_process(mode: str, ckpt: str, workers: list, token: str, replicas: int, port: int, ready,
                    worker_calls: str = "stream") -> None:
    """Another router on the same port (SO_REUSEPORT), in a process of its own, until terminated."""
    server = make_router(mode, ckpt, workers, token, replicas, port,  # referenced: a collected server stops serving
                         worker_calls=worker_calls)
    ready.set()
    threading.Event().wait()
    server.stop()


def start_routers(mode: str, ckpt: str, workers: dict, token: str, n: int, args=None):
    """(the router in this process, the other n - 1 as spawned processes on its port; ``hf_dense``: one router)."""
    import multiprocessing as mp

    if mode == "hf_dense":
        n = 1
    addrs = [(role, addr) for role, (_, addr) in workers.items()]
    calls = args.worker_calls if args is not None else "stream"
    server = make_router(mode, ckpt, addrs, token, n, args=args, worker_calls=calls)
    port = int(server.grpc_addr.rsplit(":", 1)[1])
    ctx = mp.get_context("spawn")
    procs = []
    for _ in range(n - 1):
        ready = ctx.Event()
        p = ctx.Process(target=_router_process, args=(mode, ckpt, addrs, token, n, port, ready, calls), daemon=True)
        p.start()
        if not ready.wait(120):
            raise RuntimeError("a router process did not start")
        procs.append(p)
    return server, procs


def decode_engine_stats(addr: str, token: str) -> dict:
    """The decode worker's running totals (steps, steps queued ahead and dropped, prompt chunks) from its Stats."""
    import grpc

    from colm.proto import load_proto
    from colm.proto.rpc import TOKEN_KEY

    kv_pb2, kv_grpc = load_proto("kv")
    with grpc.insecure_channel(addr) as ch:
        s = kv_grpc.DecodeWorkerStub(ch).Stats(kv_pb2.DecodeStatsRequest(), metadata=((TOKEN_KEY, token),), timeout=30)
    return {k: getattr(s, k) for k in ("num_steps", "num_steps_launched_ahead", "num_steps_dropped",
                                       "num_prefill_chunks", "num_finished", "num_failed", "num_cached_blocks",
                                       "num_prefix_query_tokens", "num_prefix_hit_tokens")}


def phase_totals(registry) -> dict[str, tuple[float, int]]:
    """{phase: (seconds summed, requests)} of a router's ``colm_request_phase_seconds``, plus its own "ttft"."""
    out: dict[str, list] = {}
    for metric in registry.collect():
        if metric.name not in ("colm_request_phase_seconds", "colm:time_to_first_token_seconds"):
            continue
        for smp in metric.samples:
            key = smp.labels.get("phase", "ttft")
            if smp.name.endswith("_sum"):
                out.setdefault(key, [0.0, 0])[0] += smp.value
            elif smp.name.endswith("_count"):
                out.setdefault(key, [0.0, 0])[1] += int(smp.value)
    return {k: (v[0], v[1]) for k, v in out.items()}


def phase_means_ms(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per request of each phase between two ``phase_totals`` (the measured window only)."""
    out = {}
    for k, (s1, n1) in after.items():
        s0, n0 = before.get(k, (0.0, 0))
        if n1 > n0:
            out[k] = round((s1 - s0) / (n1 - n0) * 1000.0, 2)
    return out


def run_mode(mode: str, ckpt: str, workers: dict, token: str, args, sampler: "GpuSampler", scratch: str) -> dict:
    server, router_procs = start_routers(mode, ckpt, workers, token, args.routers, args)
    pids = {"router": os.getpid(), **{f"router{i + 1}": p.pid for i, p in enumerate(router_procs)},
            **{role: proc.pid for role, (proc, _) in workers.items()}}
    out = os.path.join(scratch, mode)  # colm loadtest's own JSON/PNG: read here, not kept
    try:
        base = [sys.executable, "-m", "colm.cli", "loadtest", "--addr", server.grpc_addr,
                "--prompt-len", args.prompt_len, "--output-len", args.output_len, "--slo-ttft-ms", str(args.slo_ttft_ms),
                "--slo-tpot-ms", str(args.slo_tpot_ms), "--timeout-s", "300", "--budgets", args.budgets,
                "--prefix-len", str(args.prefix_len), "--num-prefixes", str(args.num_prefixes),
                "--temperature", str(args.temperature), "--top-p", str(args.top_p)]
        measured = ["--processes", str(args.client_processes), "--connections", str(args.connections),
                    "--ramp-s", str(args.ramp_s)]
        env = {**os.environ, "TQDM_DISABLE": "1"}
        # warm-up (kernels tuned, graphs captured per shape) outside the measured window
        subprocess.run(base + ["--concurrency", str(args.concurrency), "--num-requests", str(args.warmup_requests),
                               "--out", out + "_warmup"], check=True, env=env, stdout=subprocess.DEVNULL)
        cpu_sampler = CpuSampler(pids)  # the server processes' CPU seconds, read with times (cores over the window)
        phases0 = phase_totals(server.router.metrics.registry)
        g0 = sampler.mark()
        prof = None
        if args.profile_s and mode in args.profile_modes.split(","):
            prof = Profile(pids, args.profile_s, 2.0, f"{args.out}_profile_{mode}", args.profile_gil)
        t0 = time.perf_counter()
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(base + measured + ["--concurrency", str(args.concurrency), "--num-requests",
                                          str(args.num_requests), "--out", out], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        cpu_sampler.stop()
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the load test's processes, waited for above
        cpu = cpu_sampler.seconds()
        cpu["client"] = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
        gpu_busy_run = sampler.mean_since(g0)  # the client command's whole run: its start-up and report included
        phases = phase_means_ms(phases0, phase_totals(server.router.metrics.registry))
        engine = decode_engine_stats(workers["decode"][1], token) if "decode" in workers else None
        if prof is not None:
            prof = prof.result(30)
    finally:
        server.stop()
        for p in router_procs:
            p.terminate()
            p.join(10)
    routers = [k for k in cpu if k.startswith("router")]
    per_router = [round(cpu[k] / wall, 3) for k in routers]  # cores busy in each router process (the first: this one)
    if len(per_router) > 1 and min(per_router) < 0.1 * max(per_router):
        print(f"warning: {mode}: a router process served (almost) nothing: cores busy per router {per_router}")
    for k in routers[1:]:  # every router process, as one
        cpu["router"] += cpu.pop(k)
    with open(out + ".json") as f:
        summary = json.load(f)
    tot = summary["total"]
    # GPU busy over the measured load only (first send to last answer), not the client command's start-up (its 8
    # processes' imports and spawn) and report (summary, plot): 2-3 s of an idle GPU in a 20 s run
    window = load_window(summary)
    gpu_busy = sampler.mean_between(*window) if window else gpu_busy_run
    # cores of the server processes over the same window (every router process as one); the client's own cores
    # stay over its whole run (its processes' CPU comes from rusage once they have ended: start-up and report in)
    cores_run = {k: v / wall for k, v in cpu.items()}
    cores = dict(cores_run)
    if window:
        in_window = cpu_sampler.cores_between(*window)
        if in_window:
            cores.update({k: v for k, v in in_window.items() if not k.startswith("router")})
            cores["router"] = sum(v for k, v in in_window.items() if k.startswith("router"))
    out_tokens = tot["output_tokens_per_s"] * tot["num_ok"] / max(tot["throughput_rps"], 1e-9)  # the OK requests'
    return {"mode": mode, "summary": tot, "wall_s": wall, "gpu_busy_pct": gpu_busy,
            "gpu_busy_pct_client_run": gpu_busy_run, "load_window_s": window[1] - window[0] if window else None,
            "profile": prof,
            "decode_engine": engine,
            "router_phase_ms": phases,  # this process's router: mean ms per request of each phase, and its TTFT
            "scale_mix": summary["rates"][0].get("scale_mix") if summary.get("rates") else None,
            "cpu_s": cpu, "cpu_s_per_1k_tokens": {k: 1000 * v / max(out_tokens, 1) for k, v in cpu.items()},
            "cpu_cores_busy": cores, "cpu_cores_busy_client_run": cores_run, "router_cores_busy_each": per_router}


def table(results: list[dict], limit: dict | None) -> str:
    """One row per mode (``hf_dense``'s router columns include its engine, a thread of the router's process)."""
    rows = [f"{'mode':<12} {'req/s':>7} {'tok/s':>8} {'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>16} {'good/s':>7} "
            f"{'router cpu/1k':>13} {'decode cpu/1k':>13} {'cores r/d/c':>14} {'GPU %':>6}" + ("  of limit" if limit else "")]
    for r in results:
        s, c = r["summary"], r["cpu_s_per_1k_tokens"]
        g = f"{r['gpu_busy_pct']:.0f}" if r["gpu_busy_pct"] is not None else "-"
        cores = "/".join(f"{r['cpu_cores_busy'].get(k, 0.0):.2f}" for k in ("router", "decode", "client"))
        frac = f"  {s['throughput_rps'] / limit['limit_rps']:.3f}" if limit else ""
        rows.append(f"{r['mode']:<12} {s['throughput_rps']:7.1f} {s['output_tokens_per_s']:8.0f} "
                    f"{s['ttft_ms']['p50']:8.0f}/{s['ttft_ms']['p99']:<8.0f} {s['tpot_ms']['p50']:7.2f}/{s['tpot_ms']['p99']:<8.2f}"
                    f"{s['goodput_rps']:7.1f} {c['router']:13.3f} {c.get('decode', 0.0):13.3f} {cores:>14} {g:>6}{frac}")
        if r.get("scale_mix"):
            rows[-1] += f"  scales {r['scale_mix']}"
    return "\n".join(rows)


def plot(results: list[dict], limit: dict | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["mode"] for r in results]
    a.bar(names, [r["summary"]["throughput_rps"] for r in results], color=["#36c"] * len(names))
    if limit:
        a.axhline(limit["limit_rps"], color="r", ls="--", label=f"GPU limit {limit['limit_rps']:.0f} req/s")
        a.legend()
    a.set_ylabel("requests/s (closed loop)")
    for i, role in enumerate(("router", "decode", "prefill")):
        b.bar([j + 0.25 * (i - 1) for j in range(len(names))], [r["cpu_s_per_1k_tokens"].get(role, 0.0) for r in results],
              width=0.25, label=role)
    b.set_xticks(range(len(names)), names)
    b.set_ylabel("CPU seconds per 1000 output tokens")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b-16-16-air", help="a preset (random weights) or 'demo'")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default=",".join(MODES), help=f"any of {','.join(ALL_MODES)}")
    ap.add_argument("--budgets", default="none", help="colm loadtest --budgets: the budget mix (none = full scale)")
    ap.add_argument("--max-batched-tokens", type=int, default=2048, help="colocated modes: tokens per loop iteration")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--client-processes", type=int, default=1,
                    help="colm loadtest --processes: the clients split over this many processes")
    ap.add_argument("--connections", type=int, default=1, help="colm loadtest --connections (per client process)")
    ap.add_argument("--ramp-s", type=float, default=0.0, help="colm loadtest --ramp-s: the clients start over this "
                    "many seconds (0: all at once)")
    ap.add_argument("--worker-calls", default="stream", choices=("stream", "unary"),
                    help="router.worker_calls: the routers' short calls to workers on one stream each, or a call each")
    ap.add_argument("--routers", type=int, default=1,
                    help="router processes sharing the port (router.replicas): this one and n - 1 spawned")
    ap.add_argument("--num-requests", type=int, default=1500)
    ap.add_argument("--warmup-requests", type=int, default=128)
    ap.add_argument("--prompt-len", default="512,2048")
    ap.add_argument("--output-len", default="32,96")
    ap.add_argument("--prefix-len", type=int, default=0,
                    help="shared prompt prefixes (colm loadtest --prefix-len): tokens before each prompt's own; the "
                         "limit counts them as prefilled (the limit without a prefix cache)")
    ap.add_argument("--num-prefixes", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0, help="sampled requests (colm loadtest --temperature)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--slo-ttft-ms", type=float, default=200.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=10.0)
    ap.add_argument("--num-blocks", type=int, default=0, help="decode pool blocks (0: from free GPU memory)")
    ap.add_argument("--hf-compile-level", type=int, default=0,
                    help="hf_dense: transformers' continuous batching default_compile_level (0: no torch.compile)")
    ap.add_argument("--profile-s", type=float, default=0,
                    help="py-spy the router and the workers this long during the load of --profile-modes (0: off)")
    ap.add_argument("--profile-modes", default="colocated")
    ap.add_argument("--profile-gil", action="store_true", help="py-spy --gil: only the thread holding the GIL")
    ap.add_argument("--out", default=None, help="output prefix (default: $OUT or bench/results, serve_path_<device>)")
    args = ap.parse_args()

    from colm import checkpoint
    from colm.assets import demo_model_dir

    cuda = args.device.startswith("cuda")
    dev_name = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})"
    dev_word = dev_name.split()[1].lower() if cuda else "cpu"
    date = datetime.date.today().isoformat()
    if args.out is None:
        args.out = os.path.join(os.environ.get("OUT", "bench/results"), f"serve_path_{dev_word}_{date}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    dtype = getattr(torch, args.dtype)
    if args.preset == "demo":
        ckpt = str(demo_model_dir())
        args.dtype = "float32"
    else:
        ckpt = build_checkpoint(args.preset, dtype, args.device)
    cfg = checkpoint.load_config(ckpt)
    gpu = measure_gpu(args.device) if cuda else None
    lo, hi = (int(x) for x in args.prompt_len.split(","))
    olo, ohi = (int(x) for x in args.output_len.split(","))
    mean_prompt, mean_out = args.prefix_len + (lo + hi) / 2, (olo + ohi) / 2
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    cost = request_cost(cfg, mean_prompt, mean_out, dtype_bytes=dtype_bytes)
    limit = limit_rps(cost, gpu, args.concurrency) if gpu else None
    # the same workload's limit for the dense model (full-model prefill, dense weights): the independent engine's
    dense_limit = limit_rps(request_cost(dense_config(cfg), mean_prompt, mean_out, dtype_bytes=dtype_bytes), gpu,
                            args.concurrency) if gpu else None
    run = dict(device=dev_name, date=date, cfg=cfg, gpu=gpu, cost=cost, dense_limit=dense_limit)

    scratch = tempfile.mkdtemp(prefix="colm-serve-path-")
    wargs = argparse.Namespace(**{**vars(args), "out": os.path.join(scratch, "worker")})  # worker logs there
    token = secrets.token_urlsafe(24)
    blocks = args.num_blocks or (0 if cuda else 4096)
    need = int(args.concurrency * (mean_prompt + mean_out) / 16)  # every client's mean request, 16-token blocks
    if blocks and blocks < need:
        raise SystemExit(f"--num-blocks {blocks}: {args.concurrency} clients of requests of {lo}-{hi} + {olo}-{ohi} "
                         f"tokens hold about {need} blocks at once; give more (or 0: sized from free GPU memory), or "
                         "the decode worker refuses requests (RESOURCE_EXHAUSTED) and the run measures refusals")
    # as deploy/serve.yaml: on CUDA, decode graphs (and a colocated engine's prefill chunk sizes) warmed at start
    decode_section = {"num_blocks": blocks, "max_batch_size": max(64, args.concurrency),
                      "warmup_context": 4096 if cuda else 0}
    sampler = GpuSampler()
    results = []
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in ALL_MODES:
            raise SystemExit(f"--modes: {mode!r} is not one of {ALL_MODES}")
    ckpts = {m: dense_checkpoint(ckpt, dtype, args.device) if m == "dense" else ckpt for m in modes}
    try:
        for mode in modes:
            workers = start_workers(mode, ckpts[mode], wargs, token, decode_section)
            try:
                results.append(run_mode(mode, ckpts[mode], workers, token, args, sampler, scratch))
            except BaseException:
                for role in workers:  # what the workers said, when a mode failed
                    with open(os.path.join(scratch, f"worker_{role}.log")) as f:
                        print(f"--- {role} worker log (tail)\n" + "".join(f.readlines()[-30:]), file=sys.stderr)
                raise
            finally:
                stop_workers(workers)
            print(table(results[-1:], limit), flush=True)
            if len(results) < len(modes):  # the modes done so far, kept should a later one not finish
                write_payload(args, results, limit, run, complete=False)
    finally:
        sampler.stop()
    payload = write_payload(args, results, limit, run)
    plot(results, limit, args.out + ".png")
    print(table(results, limit))
    print(json.dumps({"vs_disaggregated": payload[next(k for k in payload if k.startswith("ratio_vs_") and
                                                           k not in ("ratio_vs_baseline", "ratio_vs_dense",
                                                                     "ratio_vs_hf_dense"))],
                      "vs_baseline": payload["ratio_vs_baseline"],
                      "vs_dense": payload.get("ratio_vs_dense", {}),
                      "vs_hf_dense": payload.get("ratio_vs_hf_dense", {})}, indent=1))
    print(f"wrote {args.out}.json and .png")


def write_payload(args, results: list, limit, run: dict, complete: bool = True) -> dict:
    """The run's JSON (``args.out``.json) for the modes in ``results``: every figure, the ratios between modes and to
    the limit. ``complete`` False: written after each mode but the last (a run cut short keeps what it measured)."""
    base = next((r for r in results if r["mode"] == ("batched" if "batched" in args.modes else "per_request")), None)
    ratios = {}
    baseline = next((r for r in results if r["mode"] == "baseline"), None)
    if base is not None:
        for r in results:
            ratios[r["mode"]] = {"throughput": r["summary"]["throughput_rps"] / base["summary"]["throughput_rps"],
                                 "router_cpu_per_token": r["cpu_s_per_1k_tokens"]["router"] /
                                 max(base["cpu_s_per_1k_tokens"]["router"], 1e-12),
                                 "decode_cpu_per_token": r["cpu_s_per_1k_tokens"].get("decode", 0.0) /
                                 max(base["cpu_s_per_1k_tokens"]["decode"], 1e-12)}
    def versus(ref):
        return {r["mode"]: {"throughput": r["summary"]["throughput_rps"] / ref["summary"]["throughput_rps"],
                            "goodput": r["summary"]["goodput_rps"] / max(ref["summary"]["goodput_rps"], 1e-9)}
                for r in results} if ref else {}

    ratios_vs_baseline = versus(baseline)
    dense = next((r for r in results if r["mode"] == "dense"), None)
    hf = next((r for r in results if r["mode"] == "hf_dense"), None)
    if limit:
        for r in results:
            r["fraction_of_limit"] = r["summary"]["throughput_rps"] / limit["limit_rps"]
    dense_limit = run.get("dense_limit")
    if dense_limit:  # the modes serving the dense model: also against that model's own limit
        for r in results:
            if r["mode"] in ("dense", "hf_dense"):
                r["fraction_of_dense_limit"] = r["summary"]["throughput_rps"] / dense_limit["limit_rps"]
    cfg = run["cfg"]
    payload = {"benchmark": "serve_path", "device": run["device"], "date": run["date"], "torch": torch.__version__,
               "python": platform.python_version(), "complete": complete,
               "model": {"preset": args.preset, "dtype": args.dtype, "chains": list(cfg.chains),
                         "n_layers": cfg.n_layers, "dim": cfg.dim},
               "load": {"concurrency": args.concurrency, "num_requests": args.num_requests,
                        "client_processes": args.client_processes, "connections": args.connections, "ramp_s": args.ramp_s,
                        "prompt_len": args.prompt_len, "output_len": args.output_len,
                        "prefix_len": args.prefix_len, "num_prefixes": args.num_prefixes,
                        "temperature": args.temperature, "top_p": args.top_p,
                        "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms},
               "workers": "plain processes (colm.deploy.worker_main), router in the benchmark process",
               "routers": args.routers, "worker_calls": args.worker_calls,
               "max_batched_tokens": args.max_batched_tokens, "budgets": args.budgets,
               "gpu_measured": run["gpu"], "request_cost": run["cost"], "limit": limit,
               "dense_limit": dense_limit, "results": results,
               f"ratio_vs_{base['mode'] if base else 'none'}": ratios, "ratio_vs_baseline": ratios_vs_baseline}
    if hf is not None:  # the independent engine: what it is, and every mode against it
        import transformers

        payload["hf_dense"] = {"engine": "transformers ContinuousBatchingManager", "transformers": transformers.__version__,
                               "model": "LlamaForCausalLM of the full-scale shape, random weights",
                               "compile_level": args.hf_compile_level, "router_processes": 1}
        payload["ratio_vs_hf_dense"] = versus(hf)
    if dense is not None:  # every mode against colm's own engine serving the dense-equivalent model
        payload["ratio_vs_dense"] = versus(dense)
    with open(args.out + ".json", "w") as f:
        json.dump(payload, f, indent=1)
    return payload


if __name__ == "__main__":
    main()
