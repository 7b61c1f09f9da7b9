"""Goodput of the colm service vs a colocated full-model server, same GPU, same load-test harness.

colm:      router (scale by budget) -> chain-1 PrefillEngine -> DecodeEngine (all chains), each
           request carrying the SLO as its budget (degrade when unmet).
baseline:  the same router over one colocated DecodeEngine whose prompts are prefilled by the FULL
           model in its own step loop (``prefill_scale`` 0: a dense model's cost) and every request
           pinned to the full scale: no chain-1 prefill, no scale choice.

Both run on one device. colm's engines are plain processes (``colm.deploy.worker_main``: gRPC,
KV over shared memory; Ray is not in the GPU image); the baseline is one process. The load
generator is a separate process (``colm loadtest``) speaking gRPC to the router. The SLO is set
from a calibration of the baseline at low load (``--slo-scale`` times its batch-1 TPOT and TTFT),
so the baseline meets it when idle. Writes PREFIX.json (both summaries + per-rate goodput ratio)
and PREFIX.png.

    python bench/serve_goodput.py --preset llama-3.2-1b-16-16-air --out bench/results/serve_goodput_h100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def build_checkpoint(preset_name: str, dtype, device: str) -> str:
    from colm import checkpoint
    from colm.model import CoLM
    from colm.presets import preset

    path = os.path.join(tempfile.gettempdir(), f"colm-bench-{preset_name}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        model = CoLM(preset(preset_name, max_seq_len=8192), device=device, dtype=torch.float32)
        model.reset_parameters(std=0.02, seed=0)
        checkpoint.save(model.to(dtype), path, tokenizer={"kind": "byte"})
        del model
    return path


def start_worker(role: str, ckpt: str, args, token: str, section: dict) -> tuple[subprocess.Popen, str]:
    """One engine as a plain process (colm.deploy.worker_main); returns (process, its gRPC address)."""
    cmd = [sys.executable, "-m", "colm.deploy.worker_main", "--role", role, "--model", ckpt, "--device", args.device,
           "--dtype", args.dtype, "--config", json.dumps(section)]
    with open(f"{args.out}_{role}.log", "w") as log:  # the worker's stderr (the child keeps its own handle)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "COLM_CLUSTER_TOKEN": token})
    line = proc.stdout.readline().split()
    if len(line) != 3 or line[0] != "READY":
        proc.kill()
        raise RuntimeError(f"{role} worker did not start: {line}")
    return proc, line[2]


MODES = ("baseline", "colm", "colm-full", "colm-graphs", "colm-graphs-ipc")
EXTRA_MODES = {"colm-full": "colm_full_scale", "colm-graphs": "colm_prefill_graphs",  # mode -> its key in the JSON
               "colm-graphs-ipc": "colm_prefill_graphs_cuda_ipc"}


def max_goodput(run: dict) -> float:
    return max(r["goodput_rps"] for r in run["rates"])


def make_router(mode: str, ckpt: str, dtype, args):
    """colm: router here, prefill and decode workers as processes (gRPC, KV over shared memory).
    baseline: router here with the full-model prefill and the decode engine in this process."""
    import secrets

    from colm import checkpoint
    from colm.decode_worker.config import DecodeConfig
    from colm.decode_worker.engine import DecodeEngine
    from colm.router.backend import WorkerInfo
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.engine_backend import EngineBackend
    from colm.router.grpc_backend import GrpcBackend
    from colm.router.server import ThreadedRouterServer
    from colm.tokenizer import ByteTokenizer

    overlap = {"auto": None, "on": True, "off": False}[args.overlap_steps]
    decode_section = {"num_blocks": args.num_blocks, "max_batch_size": 64, "overlap_steps": overlap,
                      "warmup_context": args.warmup_context}
    procs = []
    colm = mode != "baseline"
    # colm-graphs: colm with CUDA graphs for short prefills (captured at start), side by side with colm in one run
    graphs = mode.startswith("colm-graphs")
    graph_tokens = (args.prefill_graph_tokens or 4096) if graphs else args.prefill_graph_tokens
    prefill_section = {"cuda_graph_tokens": graph_tokens, "warmup_graphs": graph_tokens > 0}
    if colm and args.workers == "procs":
        token = secrets.token_urlsafe(24)
        d, daddr = start_worker("decode", ckpt, args, token, decode_section)
        p, paddr = start_worker("prefill", ckpt, args, token, prefill_section)
        procs = [d, p]
        # colm-graphs-ipc: the hand-off of before the cuda_pool path (staging tensor over CUDA IPC, Reserve first)
        backend = GrpcBackend([WorkerInfo("decode-0", "decode", daddr), WorkerInfo("prefill-0", "prefill", paddr)],
                              cluster_token=token, kv_path="cuda_ipc" if mode == "colm-graphs-ipc" else "auto")
    else:
        section = decode_section if colm else {**decode_section, "colocated_prefill": True, "prefill_scale": 0}
        de = DecodeEngine.from_checkpoint(ckpt, DecodeConfig(**section), device=args.device, dtype=dtype)
        if colm:
            from colm.prefill_worker.config import PrefillConfig
            from colm.prefill_worker.engine import PrefillEngine

            pe = PrefillEngine.from_checkpoint(ckpt, PrefillConfig(**prefill_section), device=args.device, dtype=dtype)
            backend = EngineBackend({"prefill-0": pe}, {"decode-0": de})
        else:
            backend = EngineBackend({}, {"decode-0": de})
    cfg = RouterConfig(grpc_port=0, http_port=None, max_running=512, max_queued=4096, poll_interval_s=0.1,
                       default_deadline_s=300, token_timeout_s=120, served_model_name=f"bench-{mode}")
    router = Router(cfg, checkpoint.load_config(ckpt), ByteTokenizer(), backend)
    return ThreadedRouterServer(router), procs


def decode_stats(server) -> dict:
    import asyncio

    backend = server.router.backend
    wid = next(w.worker_id for w in backend.workers() if w.role == "decode")
    rep = asyncio.run_coroutine_threadsafe(backend.poll(wid), server.loop).result(10)
    return {"free_blocks": rep.free_blocks, "total_blocks": rep.total_blocks, "step_ms": rep.step_ms}


def calibrate(addr: str, prompt_len: int, out_len: int, scale: int, n: int = 4) -> dict:
    from colm.client import Client

    ttft, tpot = [], []
    with Client(addr) as c:
        for i in range(n + 1):
            r = c.complete([7 + i] * prompt_len, max_new_tokens=out_len, scale=scale)
            if i:  # the first warms up
                t = r["times_ms"]
                ttft.append(t[0])
                tpot.append((t[-1] - t[0]) / (len(t) - 1))
    return {"ttft_ms": sorted(ttft)[len(ttft) // 2], "tpot_ms": sorted(tpot)[len(tpot) // 2]}


def loadtest(addr: str, args, budgets: str, slo: dict, out: str) -> dict:
    cmd = [sys.executable, "-m", "colm.cli", "loadtest", "--addr", addr, "--rates", args.rates,
           "--num-requests", str(args.num_requests), "--prompt-len", args.prompt_len, "--output-len", args.output_len,
           "--budgets", budgets, "--slo-ttft-ms", f"{slo['ttft_ms']:.3f}", "--slo-tpot-ms", f"{slo['tpot_ms']:.3f}",
           "--timeout-s", "300", "--warmup-requests", str(args.warmup_requests), "--out", out]
    subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    with open(out + ".json") as f:
        return json.load(f)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.2-1b-16-16-air")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rates", default="4,8,16,32")
    ap.add_argument("--num-requests", type=int, default=240)
    ap.add_argument("--prompt-len", default="512,2048")
    ap.add_argument("--output-len", default="32,96")
    ap.add_argument("--num-blocks", type=int, default=16384)
    ap.add_argument("--warmup-requests", type=int, default=16,
                    help="unmeasured requests before the first rate (kernel tuning, CUDA graphs)")
    ap.add_argument("--slo-scale", type=float, default=1.5, help="SLO = this x the baseline's idle TTFT and TPOT")
    ap.add_argument("--out", default="bench/results/serve_goodput")
    ap.add_argument("--modes", default="baseline,colm",
                    help="systems to run, in order (the first sets the SLO): baseline, colm (scale by budget), "
                         "colm-full (colm's engines, every request at the full scale), colm-graphs (colm with "
                         "CUDA graphs for short prefills, all captured at start: --prefill-graph-tokens, else 4096), "
                         "colm-graphs-ipc (the same with the cuda_ipc hand-off instead of the default cuda_pool)")
    ap.add_argument("--overlap-steps", choices=("auto", "on", "off"), default="auto",
                    help="DecodeConfig.overlap_steps in the decode engines (auto: on with CUDA graphs)")
    ap.add_argument("--prefill-graph-tokens", type=int, default=0,
                    help="PrefillConfig.cuda_graph_tokens of the colm prefill worker, captured at start when > 0 (an "
                         "earlier run used 4096, captured on first use; 0 = eager)")
    ap.add_argument("--warmup-context", type=int, default=0,
                    help="DecodeConfig.warmup_context (e.g. the longest prompt + output): capture graphs at start")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", choices=["procs", "inproc"], default="procs",
                    help="colm's engines as plain processes (gRPC + shared-memory KV) or threads of this process")
    args = ap.parse_args()
    device = args.device
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    ckpt = build_checkpoint(args.preset, dtype, device)
    plo, phi = (int(x) for x in args.prompt_len.split(","))
    olo, ohi = (int(x) for x in args.output_len.split(","))
    runs, calib, slo = {}, {}, None
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"--modes: {unknown} unknown; allowed are {', '.join(MODES)}")
    for mode in modes:
        server, procs = make_router(mode, ckpt, dtype, args)
        try:
            full = server.router.model_cfg.num_chains
            pinned = mode in ("baseline", "colm-full")  # every request at the full scale, not by budget
            calib[mode] = {str(k): calibrate(server.grpc_addr, (plo + phi) // 2, (olo + ohi) // 2, k)
                           for k in ((full,) if pinned else range(1, full + 1))}
            if slo is None:
                base = calib[mode][str(full)]  # the baseline's, unless only colm runs
                slo = {"ttft_ms": args.slo_scale * base["ttft_ms"], "tpot_ms": args.slo_scale * base["tpot_ms"]}
            # colm-full: colm's engines with every request pinned to the full scale (disaggregation alone)
            budgets = f"scale:{full}" if pinned else f"ttft:{slo['ttft_ms']:.3f}+tpot:{slo['tpot_ms']:.3f}"
            print(f"[{mode}] calibration {calib[mode]}; SLO {slo}", flush=True)
            runs[mode] = loadtest(server.grpc_addr, args, budgets, slo, os.path.join(tempfile.mkdtemp(), mode))
            runs[mode]["decode_stats_after"] = decode_stats(server)
            with open(f"{args.out}_{mode}.json", "w") as f:  # kept even if a later phase fails
                json.dump({"calibration": calib[mode], "slo": slo, **runs[mode]}, f, indent=2)
        finally:
            server.stop()
            for p in procs:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
            del server
            if device == "cuda":
                torch.cuda.empty_cache()
    if not {"baseline", "colm"} <= set(runs):
        return 0  # without both: each PREFIX_MODE.json is the result
    from colm.loadtest import plot

    ratio = [{"rate": c["rate"], "colm_goodput_rps": c["goodput_rps"], "baseline_goodput_rps": b["goodput_rps"],
              "ratio": (c["goodput_rps"] / b["goodput_rps"]) if b["goodput_rps"] else None}
             for c, b in zip(runs["colm"]["rates"], runs["baseline"]["rates"])]
    best_c = max(r["colm_goodput_rps"] for r in ratio)
    best_b = max(r["baseline_goodput_rps"] for r in ratio)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "preset": args.preset,
              "dtype": args.dtype, "args": vars(args), "slo": slo, "calibration": calib, "per_rate": ratio,
              "max_goodput_rps": {"colm": best_c, "baseline": best_b, "ratio": best_c / best_b if best_b else None},
              "colm": runs["colm"], "baseline": runs["baseline"], "wall_s": time.time() - t0,
              "setup": (f"one device; colm: router process + prefill and decode worker processes ({args.workers}); "
                        "baseline: router + full-model prefill + decode engine in one process; load generator in "
                        "another process")}
    for mode, key in EXTRA_MODES.items():  # e.g. "colm_full_scale" and "max_goodput_colm_full_scale_rps"
        result[key] = runs.get(mode)
        result[f"max_goodput_{key}_rps"] = max_goodput(runs[mode]) if mode in runs else None
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(runs["colm"], args.out + ".png", title=f"{args.preset} on {result['device']}: colm vs colocated full model "
         f"(SLO TTFT {slo['ttft_ms']:.0f} ms, TPOT {slo['tpot_ms']:.1f} ms)", baseline=runs["baseline"])
    print(f"{'rate':>6} {'colm goodput':>13} {'baseline':>9} {'ratio':>6}")
    for r in ratio:
        print(f"{r['rate']:6.1f} {r['colm_goodput_rps']:13.2f} {r['baseline_goodput_rps']:9.2f} "
              f"{r['ratio'] if r['ratio'] is None else round(r['ratio'], 2)!s:>6}")
    print(f"max goodput: colm {best_c:.2f} req/s, baseline {best_b:.2f} req/s; SLO {slo}; calib {calib}")
    for mode in EXTRA_MODES:
        if mode in runs:
            print(f"max goodput {mode}: {max_goodput(runs[mode]):.2f} req/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
