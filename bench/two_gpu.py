"""Two GPUs of one host: prefill and decode on their own GPUs against two colocated replicas, one harness; FSDP2 on
two GPUs against one.

Parts (``--parts``, each a whole ``colm serve`` on the embedded Ray cluster, which gives each worker one GPU):
  tokens    disaggregated, one prefill worker and one decode worker, the model in float32: greedy tokens of
            ``--check-prompts`` prompts at every scale through the service equal ``colm.generate`` in this
            process (the K/V crossing devices through the transport ``auto`` picks; the serve log's tail is kept);
  pd        the same deployment in bfloat16 under an open-loop rate sweep (``colm loadtest --rates``);
  replicas  two colocated decode workers (one per GPU) behind one router, the same sweep;
  fsdp      ``torchrun --nproc-per-node 2 -m colm.train`` against one process accumulating two micro-batches (the
            same global batch): tokens/s per GPU (scaling efficiency) and the loss of every step side by side.
Per sweep the JSON keeps ``colm loadtest``'s figures per rate; the report adds each deployment's highest goodput at
the SLO and PD's over the replicas'. NVLink multicast stays off (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).

    python bench/two_gpu.py --parts tokens,pd,replicas,fsdp --out bench/results/two_gpu_h200x2.json
    python bench/two_gpu.py --parts tokens,pd --preset tiny-air --device cpu --rates 1,2 --num-requests 8   # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _service import ColmServe  # noqa: E402

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def serve_config(path: Path, ckpt: Path, dtype: str, device: str, mode: str, num_decode: int, port: int) -> Path:
    gpus = 0 if device == "cpu" else 1
    path.write_text(f"""
model: {{path: {ckpt}, dtype: {dtype}, device: {device}}}
workers: {{mode: {mode}, num_prefill: 1, num_decode: {num_decode}, num_gpus_per_worker: {gpus}}}
decode: {{block_size: 16, num_blocks: {0 if gpus else 2048}, warmup_context: {2200 if gpus else 0}, max_batched_tokens: 4096,
          max_batch_size: 160}}
router: {{grpc_port: {port}, http_port: null, metrics_port: null, max_running: 512, max_queued: 4096, replicas: auto}}
transport: auto
""")
    return path


def check_tokens(addr: str, ckpt: Path, device: str, prompts: int, max_new: int) -> dict:
    """Greedy tokens through the service against ``colm.generate`` of the same checkpoint here, every scale."""
    import random

    import torch

    from colm import checkpoint
    from colm.client import Client
    from colm.generate import generate
    from colm.sampling import SamplingParams

    model = checkpoint.load(ckpt, scale=None, device="cuda:0" if device != "cpu" else "cpu", dtype=torch.float32)
    rng = random.Random(0)
    cases, equal = [], 0
    with Client(addr) as c:
        for i in range(prompts):
            prompt = [rng.randrange(3, min(model.cfg.vocab_size, 256)) for _ in range(rng.choice((7, 130, 700)))]
            for scale in range(1, model.cfg.num_chains + 1):
                got = c.complete(prompt, max_new_tokens=max_new, scale=scale, ignore_eos=True)["token_ids"]
                want = generate(model, prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True),
                                scale=scale).token_ids
                equal += got == want
                cases.append({"prompt_len": len(prompt), "scale": scale, "equal": got == want})
    return {"cases": cases, "equal": equal, "total": len(cases)}


def sweep(addr: str, out: Path, args) -> dict:
    """``colm loadtest`` open-loop rates against ``addr``; its JSON, with the highest goodput at the SLO."""
    cmd = [sys.executable, "-m", "colm.cli", "loadtest", "--addr", addr, "--rates", args.rates, "--num-requests",
           str(args.num_requests), "--prompt-len", args.prompt_len, "--output-len", args.output_len, "--processes",
           str(args.client_processes), "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
           "--timeout-s", "120", "--prefix-len", str(args.prefix_len), "--num-prefixes", str(args.num_prefixes),
           "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    res = json.loads(out.with_suffix(".json").read_text())
    rates = [{k: r[k] for k in ("rate", "throughput_rps", "goodput_rps", "slo_attainment", "ttft_ms", "tpot_ms")}
             for r in res["rates"]]
    return {"rates": rates, "max_goodput_rps": max(r["goodput_rps"] for r in rates)}


def fsdp(args, scratch: Path) -> dict:
    """Steps of the same config on 2 processes and on 1: tokens/s per GPU and both loss trajectories."""
    from colm.tokenizer import ByteTokenizer
    from colm.train.data import prepare_token_files

    data = scratch / "data"
    prepare_token_files(["pydoc:topics"], data, ByteTokenizer(), val_fraction=0.05)
    runs = {}
    for n in (1, 2):
        out = scratch / f"fsdp{n}"
        overrides = [f"model.preset={args.fsdp_preset}", f"data.train={data / 'train.bin'}", "data.val=null",
                     f"data.seq_len={args.fsdp_seq_len}", f"data.micro_batch={args.fsdp_micro_batch}",
                     f"optim.steps={args.fsdp_steps}", f"optim.grad_accum={3 - n}",  # one global batch for both
                     f"run.out_dir={out}", "run.progress=false", "run.plot=false",
                     f"run.device={args.device if args.device == 'cpu' else 'auto'}"]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "-m", "colm.train"]
               + ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "train" / "demo.yaml")] + overrides)
        subprocess.run(cmd, check=True, env={**os.environ, **ENV}, timeout=1800)
        summary = json.loads((out / "summary.json").read_text())
        losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()
                  if json.loads(line)["kind"] == "train"]
        runs[n] = {"tokens_per_s": summary["tokens_per_s"], "tokens_per_s_per_gpu": summary["tokens_per_s"] / n,
                   "loss": losses}
    one, two = runs[1], runs[2]
    return {"runs": runs, "scaling_efficiency": two["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"],
            "max_loss_gap": max(abs(a - b) for a, b in zip(one["loss"], two["loss"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="tokens,pd,replicas,fsdp")
    ap.add_argument("--preset", default="llama-3.2-1b-16-16-air")
    ap.add_argument("--device", default="cuda", help="cuda (one GPU per worker) | cpu (a dry run of the harness)")
    ap.add_argument("--rates", default="40,80,160,240,320,400")
    ap.add_argument("--num-requests", type=int, default=1500)
    ap.add_argument("--prompt-len", default="512,2048")
    ap.add_argument("--output-len", default="32,96")
    ap.add_argument("--prefix-len", type=int, default=0,
                    help="prompts open with one of --num-prefixes shared prefixes of this many tokens (colm loadtest): "
                         "the replicas' prefix caches and the router's prefix affinity against PD, which caches none")
    ap.add_argument("--num-prefixes", type=int, default=8)
    ap.add_argument("--client-processes", type=int, default=8)
    ap.add_argument("--slo-ttft-ms", type=float, default=200.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=10.0)
    ap.add_argument("--check-prompts", type=int, default=4)
    ap.add_argument("--check-new-tokens", type=int, default=16)
    ap.add_argument("--fsdp-preset", default="llama-3.2-1b-16-16-air")
    ap.add_argument("--fsdp-steps", type=int, default=30)
    ap.add_argument("--fsdp-seq-len", type=int, default=2048)
    ap.add_argument("--fsdp-micro-batch", type=int, default=4)
    ap.add_argument("--port", type=int, default=50051)
    ap.add_argument("--out", default="bench/results/two_gpu.json")
    args = ap.parse_args()
    parts = args.parts.split(",")
    scratch = Path(tempfile.mkdtemp(prefix="colm-two-gpu-"))
    out: dict = {"benchmark": "two_gpu", "parts": parts, "preset": args.preset, "device": args.device,
                 "env": ENV, "load": {k: getattr(args, k) for k in ("rates", "num_requests", "prompt_len", "output_len",
                                                                     "prefix_len", "num_prefixes",
                                                                     "slo_ttft_ms", "slo_tpot_ms")}}
    try:
        import torch

        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        out["gpus"] = []

    def ckpt(dtype: str) -> Path:
        path = scratch / f"ckpt-{dtype}"
        if not path.exists():
            subprocess.run([sys.executable, "-m", "colm.cli", "init", "--preset", args.preset, "--out", str(path),
                            "--dtype", dtype], check=True, stdout=subprocess.DEVNULL)
        return path

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))

    deployments = {"tokens": ("disaggregated", 1, "float32"), "pd": ("disaggregated", 1, "bfloat16"),
                   "replicas": ("colocated", 2, "bfloat16")}
    dtype_cpu = "float32"
    for part in parts:
        if part in deployments:
            mode, num_decode, dtype = deployments[part]
            dtype = dtype if args.device != "cpu" else dtype_cpu
            path = ckpt(dtype)
            cfg = serve_config(scratch / f"{part}.yaml", path, dtype, args.device, mode, num_decode, args.port)
            svc = ColmServe(cfg, scratch / f"{part}_serve.log", env=ENV)
            try:
                svc.wait_ready(600)
                res = {"mode": mode, "num_decode": num_decode, "dtype": dtype, "ready_s": round(svc.ready_s, 1)}
                if part == "tokens":
                    res.update(check_tokens(svc.addr, path, args.device, args.check_prompts, args.check_new_tokens))
                else:
                    res.update(sweep(svc.addr, scratch / f"{part}_sweep", args))
            finally:
                svc.stop()
            res["serve_log_tail"] = (scratch / f"{part}_serve.log").read_text().splitlines()[-8:]
            out[part] = res
        elif part == "fsdp":
            out["fsdp"] = fsdp(args, scratch)
        else:
            raise SystemExit(f"--parts: {part!r} is not one of tokens, pd, replicas, fsdp")
        save()
        print(part, json.dumps({k: v for k, v in out[part].items() if k not in ("cases", "serve_log_tail")})[:400],
              flush=True)
    if "pd" in out and "replicas" in out:
        out["pd_over_replicas_max_goodput"] = out["pd"]["max_goodput_rps"] / max(out["replicas"]["max_goodput_rps"], 1e-9)
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
