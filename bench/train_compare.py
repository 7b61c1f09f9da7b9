"""Quality per scale of CoLM, CoLM-Air and a dense Llama trained with the same budget: the paper's elastic-inference
table in miniature, on text that ships with Python.

Data: the standard library's sources (the running interpreter's, site-packages left out) plus
``pydoc_data.topics``, byte-level (``colm.tokenizer.ByteTokenizer``): bits per byte are then the loss itself over
ln 2, with no tokenizer artifact to train, ship or compare across models, and the serving stack's byte tokenizer
reads the checkpoints as they are. A BPE would give each model about 3x fewer tokens per byte (more text per FLOP);
the comparison is between models on one tokenization, so it does not need one. 5 % of the files are held out
(``colm prepare-data``'s split is by document: one file is one document).

Models (``colm.presets.compare_model``, all the same shape, the chains splitting it): ``compare-dense`` (one chain,
about 180M parameters), ``compare-16-16``, ``compare-16-16-air``, ``compare-8-8-8-8-air``. Same optimizer, schedule,
batch, sequence length and steps for all; CoLM models train with the multi-chain loss (every scale's loss, equal
weights), the dense one with its only scale's.

Runs are resumable: ``--max-seconds`` bounds this call's training time over all models; a model not finished when it
runs out saves its state and the next call of the same command continues it (``run.max_seconds`` of ``colm
train``). Each model's calls are logged in ``RUNS/<model>/calls.jsonl``; training tokens/s counts every call. Where
the state cannot stay between calls (a lent machine starts bare), train and score one model per call and join the
reports with ``--merge``.

Report (JSON + PNG): per model and scale the parameters and the held-out loss in bits per byte (and perplexity per
byte); the dense model's; each CoLM model's full scale over the dense model's perplexity (target for
``compare-16-16-air``: at most 1.05) and whether its scales are ordered (each smaller scale worse); training tokens/s
and MFU (6 x parameters + attention FLOPs per token, against ``--peak-tflops``, the GPU's dense bf16 peak).

    python bench/train_compare.py --data data/compare --runs runs/compare --steps 3000 --max-seconds 480
    python bench/train_compare.py --data data/compare --runs runs/compare --report-only --json bench/results/train_compare_h200.json
    python bench/train_compare.py --models compare-dense --json dense.json   # one model per call, then:
    python bench/train_compare.py --merge dense.json,air.json,... --json bench/results/train_compare_h200.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

MODELS = ("compare-dense", "compare-16-16", "compare-16-16-air", "compare-8-8-8-8-air")
H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA's H200 SXM datasheet figure for dense bf16 (no sparsity)


def stdlib_sources() -> list[str]:
    """The running interpreter's standard library (``.py`` files; site-packages and dist-packages are not in it
    when they lie outside, and are skipped when they lie inside) plus the pydoc topics."""
    return [sysconfig.get_paths()["stdlib"], "pydoc:topics"]


def prepare(data: Path, sources: list[str]) -> dict:
    """Byte-level ``train.bin`` / ``val.bin`` under ``data`` (made once; 5 % of the documents held out). A source may
    be a directory, a file, ``pydoc:topics`` or a tar archive (``.tar``, ``.tar.gz``, ``.tar.xz``) of ``.py`` files,
    unpacked under ``data/sources``: a machine whose Python lacks part of the standard library (the GPU image has no
    ``test/`` package: 10.5 MB of sources against 31.5 MB) can be given another's, packed (4.8 MB as ``.tar.xz``)."""
    import tarfile

    from colm.tokenizer import ByteTokenizer
    from colm.train.data import prepare_token_files

    if (data / "train.bin").exists():
        return json.loads((data / "prepared.json").read_text())
    files = []
    for src in sources:
        if src.endswith((".tar", ".tar.gz", ".tgz", ".tar.xz")) and Path(src).is_file():
            dest = data / "sources" / Path(src).name.split(".tar")[0].split(".tgz")[0]
            with tarfile.open(src) as t:
                t.extractall(dest, filter="data")  # the data filter refuses links and paths outside dest
            src = str(dest)
        if Path(src).is_dir():
            files += sorted(str(f) for f in Path(src).rglob("*.py")
                            if f.is_file() and not {"site-packages", "dist-packages"} & set(f.parts))
        else:
            files.append(src)
    summary = prepare_token_files(files, data, ByteTokenizer(), val_fraction=0.05, seed=0, suffixes=(".py",))
    summary["sources"] = sources
    (data / "prepared.json").write_text(json.dumps(summary, indent=2))
    return summary


def train_config(model: str, data: Path, runs: Path, args, max_seconds: float):
    from colm.presets import preset
    from colm.train.config import TrainConfig

    overrides = {k: v for k, v in (("dim", args.dim), ("n_layers", args.layers), ("ffn_hidden", args.ffn)) if v}
    chains = preset(model).num_chains
    d = {"model": {"preset": model, "overrides": overrides},
         "data": {"train": str(data / "train.bin"), "val": str(data / "val.bin"), "seq_len": args.seq_len,
                  "micro_batch": args.micro_batch},
         "optim": {"lr": args.lr, "warmup_steps": max(1, args.steps // 50), "steps": args.steps, "schedule": "cosine",
                   "weight_decay": 0.1, "grad_clip": 1.0, "grad_accum": args.grad_accum},
         "loss": {"kind": "multi_chain" if chains > 1 else "final", **({"weights": [1.0] * chains} if chains > 1 else {})},
         "run": {"out_dir": str(runs / model), "eval_every": 0, "eval_batches": 4, "save_every": args.save_every,
                 "max_seconds": max_seconds, "progress": args.progress, "seed": 0, "device": args.device}}
    return TrainConfig.from_dict(d)


def complete(out: Path) -> bool:
    """A model's run directory holds a finished run (``colm train`` wrote its summary and no pause since)."""
    return (out / "summary.json").exists() and not (out / "paused.json").exists()


def train_models(models: list[str], data: Path, runs: Path, args) -> None:
    """Train each model in turn until it is complete or this call's time is spent."""
    from colm.train.loop import train

    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
    for model in models:
        out = runs / model
        if complete(out):
            continue
        left = deadline - time.monotonic() if deadline else 0.0
        if deadline and left < 30:
            print(f"{model}: not started, this call's time is spent")
            continue
        t0 = time.perf_counter()
        s = train(train_config(model, data, runs, args, max(left, 1.0) if deadline else 0.0))
        with (out / "calls.jsonl").open("a") as f:
            f.write(json.dumps({"from_step": s["resumed_from"], "to_step": s["steps"], "elapsed_s": s["elapsed_s"],
                                "tokens_per_step": s["tokens_per_step"], "wall_s": round(time.perf_counter() - t0, 1),
                                "device": device_name(), "date": datetime.date.today().isoformat()}) + "\n")


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the full model's parameters (forward and backward of every weight) plus the
    attention scores and their weighted sum, 6 x 2 x layers x seq_len x (all heads' width) / 2 (causal)."""
    return 6 * cfg.num_params(cfg.num_chains) + 6 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"


def report(models: list[str], data: Path, runs: Path, args) -> dict:
    from colm import checkpoint
    from colm.eval.perplexity import perplexity_per_scale

    dev = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    rows = {}
    for model in models:
        out = runs / model
        if not complete(out):
            rows[model] = {"complete": False}
            continue
        m = checkpoint.load(out / "model", device=dev, dtype=torch.float32)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda"):
            ppl = perplexity_per_scale(m, str(data / "val.bin"), seq_len=args.seq_len, batch_size=args.eval_batch,
                                       max_batches=args.eval_batches, device=dev)
        calls = [json.loads(line) for line in (out / "calls.jsonl").read_text().splitlines()]
        tokens = sum((c["to_step"] - c["from_step"]) * c["tokens_per_step"] for c in calls)
        seconds = sum(c["elapsed_s"] for c in calls)
        tps = tokens / seconds if seconds else None
        fpt = flops_per_token(m.cfg, args.seq_len)
        scales = [{"scale": r["scale"], "chains": r["chains"], "params": r["params"], "loss_nats_per_byte": r["loss"],
                   "bits_per_byte": r["loss"] / math.log(2), "perplexity_per_byte": math.exp(r["loss"])}
                  for r in ppl["scales"]]
        rows[model] = {"complete": True, "scales": scales, "eval_tokens": ppl["tokens"], "train_tokens": tokens,
                       "train_seconds": seconds, "train_tokens_per_s": tps, "flops_per_token": fpt,
                       "mfu": tps * fpt / (args.peak_tflops * 1e12) if tps and args.peak_tflops else None,
                       "scales_ordered": all(a["bits_per_byte"] > b["bits_per_byte"] for a, b in zip(scales, scales[1:])),
                       "calls": calls}
        del m
    add_ratios(rows)
    prepared = json.loads((data / "prepared.json").read_text())
    return {"benchmark": "train_compare", "device": device_name(), "date": datetime.date.today().isoformat(),
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "data": {"sources": prepared.get("sources"), "train": prepared.get("train"), "val": prepared.get("val"),
                     "tokenizer": "byte-level (1 token = 1 byte; documents joined by EOS)"},
            "recipe": {"steps": args.steps, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                       "grad_accum": args.grad_accum, "lr": args.lr, "schedule": "cosine, 2 % warm-up",
                       "weight_decay": 0.1, "grad_clip": 1.0, "precision": "bf16 autocast on CUDA, fp32 on CPU",
                       "shape_overrides": {"dim": args.dim, "n_layers": args.layers, "ffn_hidden": args.ffn}},
            "peak_tflops": args.peak_tflops, "target": "compare-16-16-air full scale within 1.05x of the dense "
            "model's perplexity; every model's scales ordered", "models": rows}


def add_ratios(rows: dict) -> None:
    """Each complete CoLM model's full-scale perplexity and training tokens/s over the dense model's."""
    dense = rows.get("compare-dense", {})
    if not dense.get("complete"):
        return
    d_full = dense["scales"][-1]
    for model, r in rows.items():
        if r.get("complete") and model != "compare-dense":
            r["full_ppl_over_dense"] = r["scales"][-1]["perplexity_per_byte"] / d_full["perplexity_per_byte"]
            r["train_tokens_per_s_over_dense"] = (r["train_tokens_per_s"] / dense["train_tokens_per_s"]
                                                  if r["train_tokens_per_s"] and dense["train_tokens_per_s"] else None)


def merge(paths: list[str]) -> dict:
    """One report from several (a machine lent per call trains and scores one model per call: a 180M model's
    training state does not travel between calls). The recipes and data must be the same."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    for q in parts[1:]:
        for key in ("recipe", "data"):
            if q[key] != parts[0][key]:
                raise SystemExit(f"--merge: {key} differs between the reports; they do not compare")
    res = dict(parts[0])
    res["models"] = {m: r for q in parts for m, r in q["models"].items() if r.get("complete")}
    res["merged_from"] = [{"device": q["device"], "date": q["date"], "models": sorted(q["models"])} for q in parts]
    add_ratios(res["models"])
    return res


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, r in res["models"].items():
        if r.get("complete"):
            xs = [s["params"] / 1e6 for s in r["scales"]]
            ys = [s["bits_per_byte"] for s in r["scales"]]
            ax.plot(xs, ys, marker="o", label=model)
    ax.set_xlabel("parameters at the scale (M)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"Quality per scale, same training budget ({res['device']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/compare")
    ap.add_argument("--runs", default="runs/compare")
    ap.add_argument("--sources", default=None, help="comma-separated files/dirs (and pydoc:topics); default: the "
                    "running Python's standard library and pydoc:topics")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=0.0, help="this call's training time over all models (0: none)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dim", type=int, default=0, help="shape overrides (tests): model dim")
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--ffn", type=int, default=0)
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--eval-batches", type=int, default=None, help="held-out batches scored (default: all)")
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS if torch.cuda.is_available() else 0.0)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--prepare-only", action="store_true", help="write the token files under --data and stop")
    ap.add_argument("--merge", default=None, help="comma-separated report JSONs of single models: one report of them")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--json", default=None, help="default: bench/results/train_compare_<device>.json")
    args = ap.parse_args()
    if args.merge:
        res = merge(args.merge.split(","))
        path = args.json or "train_compare.json"
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        plot(res, path[: -len(".json")] + ".png")
        print(f"wrote {path}")
        return
    data, runs = Path(args.data), Path(args.runs)
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: {unknown} are not among {list(MODELS)}")
    sources = args.sources.split(",") if args.sources else stdlib_sources()
    prepared = prepare(data, sources)
    print(f"data: {prepared['train']['num_tokens']:,} training bytes, {prepared['val']['num_tokens']:,} held out")
    if args.prepare_only:
        return
    if not args.report_only:
        train_models(models, data, runs, args)
    res = report(models, data, runs, args)
    word = res["device"].split()[1].lower() if torch.cuda.is_available() else "cpu"
    path = args.json or os.path.join("bench", "results", f"train_compare_{word}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    plot(res, path[: -len(".json")] + ".png" if path.endswith(".json") else path + ".png")
    for model, r in res["models"].items():
        if not r.get("complete"):
            print(f"{model:22} not complete (run again to continue)")
            continue
        bpb = " ".join(f"s{s['scale']}={s['bits_per_byte']:.3f}" for s in r["scales"])
        extra = f" ppl/dense {r['full_ppl_over_dense']:.3f}" if "full_ppl_over_dense" in r else ""
        print(f"{model:22} bits/byte {bpb}{extra} ordered={r['scales_ordered']} tok/s {r['train_tokens_per_s']:.0f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
