"""The training loop behind ``colm train`` and ``python -m colm.train`` (torchrun-ready).

Path of a run: read the config -> start the process group (if torchrun) -> lock ``out_dir`` (one run
per directory) -> look at ``out_dir/state``: a state past ``optim.steps`` is refused, a run already
complete at ``optim.steps`` ends there and then -> build the model (preset or checkpoint) -> freeze
chains / add LoRA per ``tuning.mode`` -> wrap in ``TrainModule`` -> FSDP2 (several processes) -> AdamW
-> resume from ``out_dir/state`` if present -> steps (progress bar, ``log.jsonl``, periodic eval and
state saves) -> final state, plain checkpoint in ``out_dir/model``, ``loss.png`` with one curve per
scale and a summary line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from colm import checkpoint
from colm.kernels import compiled
from colm.model import CoLM
from colm.presets import preset
from colm.train import state as train_state
from colm.train.config import TrainConfig
from colm.train.data import PackedLoader, TokenFile
from colm.train.distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed, shard_model
from colm.train.freeze import ChainFreezer
from colm.train.graphed_step import GraphedTrainStep, graphable, set_lr
from colm.train.lock import out_dir_lock
from colm.train.lora import apply_lora
from colm.train.step import TrainModule, build_optimizer, lr_at, train_step


def build_model(cfg: TrainConfig) -> tuple[CoLM, dict, str | None]:
    """fp32 CPU model, its tokenizer spec and the directory to copy tokenizer files from."""
    m = cfg.model
    if m.checkpoint:
        model = checkpoint.load(m.checkpoint, dtype=torch.float32)
        tok = checkpoint.read_meta(m.checkpoint).get("tokenizer", {"kind": "byte"})
        return model, tok, m.checkpoint
    model_cfg = preset(m.preset, **m.overrides) if m.overrides else preset(m.preset)
    model = CoLM(model_cfg).reset_parameters(std=m.init_std, seed=cfg.run.seed)
    return model, None, None


@torch.no_grad()
def evaluate(module: TrainModule, loader: PackedLoader, num_batches: int, info: DistInfo, bf16: bool) -> list[float]:
    """Mean per-scale cross-entropy over the first ``num_batches`` validation batches."""
    saved = module.loss_kind, module.log_all_scales
    module.loss_kind, module.log_all_scales = "final", True
    total, count = None, 0
    try:
        for x, y in loader.sequential_batches(num_batches, device=info.device):
            with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and not info.distributed else torch.autocast("cpu", enabled=False):
                _, per = module(x, y)
            total = per if total is None else total + per
            count += 1
    finally:
        module.loss_kind, module.log_all_scales = saved
    return all_reduce_mean(total / count, info).tolist()


def _plot(log_path: Path, png: Path, num_scales: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    for k in range(num_scales):
        pts = [(r["step"], r["scale_loss"][k]) for r in train if r["scale_loss"][k] is not None]
        color = f"C{k}"  # one colour per scale, train solid and val dashed
        if pts:
            ax.plot(*zip(*pts), label=f"train scale {k + 1}", lw=1.2, color=color, alpha=0.8)
        vpts = [(r["step"], r["scale_loss"][k]) for r in val]
        if vpts:
            ax.plot(*zip(*vpts), "o--", label=f"val scale {k + 1}", ms=4, color=color)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("CoLM training loss per scale")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _nan_to_none(values: list[float]) -> list[float | None]:
    return [None if v != v else round(v, 6) for v in values]


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns the summary (also written to summary.json)."""
    info = init_distributed(cfg.run.device)
    try:
        with out_dir_lock(cfg.run.out_dir, info):
            return _train(cfg, info)
    finally:
        cleanup(info)


def _finished_summary(out: Path, steps: int) -> dict | None:
    """The summary of a run in ``out`` that completed at ``steps`` steps (None if it did not, or stopped before
    its summary: then the resumed run evaluates and exports again)."""
    path = out / "summary.json"
    if not path.is_file() or (out / "paused.json").exists():
        return None
    summary = json.loads(path.read_text())
    return {**summary, "history": []} if summary.get("complete") and summary.get("steps") == steps else None


def _train(cfg: TrainConfig, info: DistInfo) -> dict:
    out = Path(cfg.run.out_dir)
    saved = train_state.resume_step(out, cfg.optim.steps) if cfg.run.resume else None
    if saved == cfg.optim.steps and (finished := _finished_summary(out, saved)) is not None:
        if info.is_main:
            print(f"{out}: already complete at optim.steps={saved}, nothing to do (raise optim.steps to train "
                  "further; a fresh run.out_dir or run.resume=false starts over)")
        return finished
    torch.manual_seed(cfg.run.seed)
    bf16 = cfg.run.precision == "bf16" or (cfg.run.precision == "auto" and info.device.type == "cuda")
    model, tok_spec, tok_dir = build_model(cfg)
    mcfg = model.cfg
    if cfg.data.seq_len > mcfg.max_seq_len:  # else the first step fails, after the run's files are written
        raise ValueError(f"data.seq_len={cfg.data.seq_len}: longer than the model's max_seq_len={mcfg.max_seq_len}")
    train_file = TokenFile(cfg.data.train)
    if train_file.meta["vocab_size"] > mcfg.vocab_size:
        raise ValueError(f"data.train={cfg.data.train}: tokenizer vocab {train_file.meta['vocab_size']} exceeds "
                         f"the model's vocab_size={mcfg.vocab_size}")
    tok_spec = tok_spec or train_file.meta.get("tokenizer", {"kind": "byte"})
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    t = cfg.tuning
    lora = None
    freezer = None
    if t.lora_rank:
        lora = {"first_chain": t.num_frozen_chains, "rank": t.lora_rank, "alpha": t.lora_alpha, "targets": t.lora_targets}
        apply_lora(model, **lora, train_head=True)  # the freezer below keeps the frozen chains' head columns
    if t.mode != "pretrain" or t.num_frozen_chains:
        freezer = ChainFreezer(model, t.num_frozen_chains, freeze_backbone=t.mode == "heads")
    model.to(info.device)
    module = TrainModule(model, cfg.loss.kind, cfg.loss.weights, hidden_grad=t.mode != "heads")
    shard_model(module, model.layers, info, bf16)
    if freezer is not None:
        freezer.snapshot()
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = build_optimizer(trainable, o.lr, o.weight_decay, o.betas, o.eps,
                                capturable=cfg.run.cuda_graph and info.device.type == "cuda")
    if cfg.run.cuda_graph and (why := graphable(optimizer, o.grad_accum, info.distributed)):
        raise ValueError(f"run.cuda_graph=true: the step cannot be captured: {why}")
    loader = PackedLoader(train_file, cfg.data.seq_len, cfg.data.micro_batch, o.grad_accum, info.rank,
                          info.world_size, cfg.data.seed)
    val_loader = (PackedLoader(TokenFile(cfg.data.val), cfg.data.seq_len, cfg.data.micro_batch, 1, info.rank,
                               info.world_size, cfg.data.seed) if cfg.data.val else None)

    start = 0
    log_path = out / "log.jsonl"
    if saved is not None:
        start = train_state.load_state(out, module, optimizer)["step"]
        if freezer is not None:
            freezer.snapshot()
    if info.is_main:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
        _truncate_log(log_path, start, o.steps)
    barrier(info)

    tokens_per_step = loader.windows_per_step * cfg.data.seq_len
    num_trainable = sum(p.numel() for _, p in trainable)
    bar = None
    if cfg.run.progress and info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=o.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    history = []
    compiled.set_enabled(cfg.run.compile_elementwise)
    graphed = (GraphedTrainStep(module, optimizer, autocast_bf16=bf16, freezer=freezer)
               if cfg.run.cuda_graph else None)
    t0 = time.perf_counter()
    step = start
    for step in range(start, o.steps):
        lr = lr_at(step, o.lr, o.warmup_steps, o.steps, o.schedule, o.min_lr_ratio)
        set_lr(optimizer, lr)
        batches = [loader.batch(step, micro, info.device) for micro in range(o.grad_accum)]
        if graphed is not None:
            loss, per, gnorm = graphed(batches, o.grad_clip)
        else:
            loss, per, gnorm = train_step(module, optimizer, batches, o.grad_clip,
                                          autocast_bf16=bf16 and not info.distributed, freezer=freezer,
                                          fsdp=info.distributed)
        loss = all_reduce_mean(loss, info)
        per = all_reduce_mean(per, info)
        row = {"kind": "train", "step": step, "loss": round(float(loss), 6), "scale_loss": _nan_to_none(per.tolist()),
               "lr": lr, "grad_norm": round(gnorm, 6)}
        history.append(row)
        if info.is_main and (step % cfg.run.log_every == 0 or step == o.steps - 1):
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}")
        done = step + 1
        if val_loader is not None and cfg.run.eval_every and done % cfg.run.eval_every == 0 and done < o.steps:
            _log_val(module, val_loader, cfg, info, bf16, done - 1, log_path)
        if cfg.run.save_every and done % cfg.run.save_every == 0 and done < o.steps:
            train_state.save_state(out, module, optimizer, done, info, {"tokens_seen": done * tokens_per_step})
        if cfg.run.max_seconds and done < o.steps and _out_of_time(t0, cfg.run.max_seconds, info):
            if bar is not None:
                bar.close()
            return _pause(out, module, optimizer, done, start, tokens_per_step, t0, info)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    val = _log_val(module, val_loader, cfg, info, bf16, o.steps - 1, log_path) if val_loader is not None else None
    if start < o.steps:  # else the state at o.steps is the one just loaded
        train_state.save_state(out, module, optimizer, o.steps, info, {"tokens_seen": o.steps * tokens_per_step})
    full = train_state.full_model_state(module)
    if info.is_main:
        (out / "paused.json").unlink(missing_ok=True)  # a run that paused earlier is complete now
    summary = {**_progress(o.steps, start, tokens_per_step, elapsed, info, complete=True), "num_trainable": num_trainable,
               "final_train_scale_loss": history[-1]["scale_loss"] if history else None, "val_scale_loss": val,
               "history": [r["loss"] for r in history], "model_dir": str(out / "model")}
    if info.is_main:
        train_state.export_model(full, mcfg, out / "model", tok_spec, copy_tokenizer_from=tok_dir, lora=lora)
        if cfg.run.plot:
            _plot(log_path, out / "loss.png", mcfg.num_chains)
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
        print(_summary_line(summary, val, out))
    barrier(info)
    return summary


def _truncate_log(log_path: Path, start: int, steps: int) -> None:
    """Keep the log consistent with the state: drop entries past the resumed step, and the final evaluation's
    row (a run that saved its last state but stopped before its summary evaluates again)."""
    old = log_path.read_text().splitlines() if log_path.exists() and start else []
    rows = [json.loads(line) for line in old]
    log_path.write_text("".join(line + "\n" for line, r in zip(old, rows)
                                if r["step"] < start and not (r["kind"] == "val" and r["step"] == steps - 1)))


def _summary_line(summary: dict, val: list[float] | None, out: Path) -> str:
    start, steps = summary["resumed_from"], summary["steps"]
    scales = " ".join(f"s{k + 1}={v:.4f}" for k, v in enumerate(val or summary["final_train_scale_loss"] or []) if v is not None)
    speed = f", {summary['tokens_per_s']} tok/s" if summary["tokens_per_s"] is not None else ""
    losses = f"; {'val' if val else 'train'} loss per scale: {scales}" if scales else ""
    return (f"trained {steps - start} steps ({start}->{steps}) on {summary['world_size']} process(es){speed}"
            f"{losses}; model -> {out / 'model'}")


def _out_of_time(t0: float, max_seconds: float, info: DistInfo) -> bool:
    """``run.max_seconds`` passed (every process stops at the same step: the first process's clock decides; one
    process reads its clock alone, with no device round trip in its step loop)."""
    late = time.perf_counter() - t0 > max_seconds
    if not info.distributed:
        return late
    import torch.distributed as dist

    flag = torch.tensor([float(late)], device=info.device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _progress(done: int, start: int, tokens_per_step: int, elapsed: float, info: DistInfo, complete: bool) -> dict:
    """What a run's summary says of its steps, whether it ended or paused at ``done``."""
    return {"steps": done, "complete": complete, "resumed_from": start, "world_size": info.world_size,
            "tokens_per_step": tokens_per_step, "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round((done - start) * tokens_per_step / elapsed, 1) if elapsed > 0 and done > start else None}


def _pause(out: Path, module, optimizer, done: int, start: int, tokens_per_step: int, t0: float, info: DistInfo) -> dict:
    """Stop before ``optim.steps`` (``run.max_seconds``): the state at ``done`` saved for the next run to resume;
    no final evaluation or model export."""
    elapsed = time.perf_counter() - t0
    train_state.save_state(out, module, optimizer, done, info, {"tokens_seen": done * tokens_per_step})
    summary = _progress(done, start, tokens_per_step, elapsed, info, complete=False)
    if info.is_main:
        (out / "paused.json").write_text(json.dumps(summary, indent=2))
        print(f"paused at step {done} after {elapsed:.0f} s (run.max_seconds); run again to resume from {out}")
    barrier(info)
    return summary


def _log_val(module, val_loader, cfg, info, bf16, step, log_path) -> list[float]:
    val = evaluate(module, val_loader, cfg.run.eval_batches, info, bf16)
    if info.is_main:
        with log_path.open("a") as f:
            f.write(json.dumps({"kind": "val", "step": step, "scale_loss": [round(v, 6) for v in val]}) + "\n")
    return val
