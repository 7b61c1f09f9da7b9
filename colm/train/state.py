"""Resumable training state and the final model export.

``save_state`` writes model + optimizer with torch Distributed Checkpoint (DCP; every rank writes
its own shards, also for a single process) to ``out_dir/state/step_{N}`` together with
``train_state.json`` (step, data position, RNG seed) and then points ``out_dir/state/latest`` at it,
so a crash mid-save never leaves a broken "latest". ``resume_step`` says where a run resumes (and
refuses a state already past ``optim.steps``); ``load_state`` restores all of it in place, after
checking that the saved tensors fit this model.
``export_model`` gathers the full weights onto rank 0 and writes an ordinary colm checkpoint
(safetensors), with LoRA adapters merged into the base weights.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                      set_state_dict)

from colm import checkpoint
from colm.model import CoLM
from colm.train.distributed import DistInfo, barrier

STATE_DIR = "state"
LATEST = "latest"


def latest_step(out_dir: str | Path) -> int | None:
    marker = Path(out_dir) / STATE_DIR / LATEST
    return int(marker.read_text().strip()) if marker.is_file() else None


def _plain_hyperparameters(optim_sd: dict) -> None:
    """One-element tensors among the param groups' hyperparameters (a captured step's learning rate lives in a GPU
    tensor) saved as numbers, as every other run saves and loads them."""
    for group in optim_sd.get("param_groups", []):
        for k, v in group.items():
            if k != "params" and isinstance(v, torch.Tensor) and v.numel() == 1:
                group[k] = float(v)


def save_state(out_dir: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer, step: int,
               info: DistInfo, extra: dict | None = None) -> Path:
    root = Path(out_dir) / STATE_DIR
    path = root / f"step_{step}"
    model_sd, optim_sd = get_state_dict(module, optimizer)
    _plain_hyperparameters(optim_sd)
    with warnings.catch_warnings():  # a single process saves without a process group on purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    barrier(info)
    if info.is_main:
        (path / "train_state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
        previous = latest_step(out_dir)
        tmp = root / f"{LATEST}.tmp"
        tmp.write_text(str(step))
        tmp.replace(root / LATEST)
        if previous is not None and previous != step:
            shutil.rmtree(root / f"step_{previous}", ignore_errors=True)
    barrier(info)
    return path


def resume_step(out_dir: str | Path, steps: int) -> int | None:
    """Step of the saved state a run of ``steps`` steps resumes from (None: no state, start afresh).

    A state past ``steps`` is refused: resuming it would relabel its weights as an earlier step, and a later
    longer run would train those steps a second time.
    """
    saved = latest_step(out_dir)
    if saved is not None and saved > steps:
        raise ValueError(f"run.out_dir={out_dir}: its saved state is at step {saved}, past optim.steps={steps}; "
                         f"set optim.steps >= {saved} to continue that run, or use a fresh run.out_dir "
                         f"(or run.resume=false, which discards it) for a new {steps}-step run")
    return saved


def _mismatch(path: Path, model_sd: dict, optim_sd: dict | None = None) -> str | None:
    """First difference between the model tensors saved at ``path`` and ``model_sd``, or a parameter the saved
    optimizer trained that ``optim_sd`` (this run's) does not (None: they match). DCP loads a subset of what was
    saved without complaint, so a run that freezes more than the saved one would resume unnoticed, with chains
    it calls frozen already changed."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = {k[len("model."):]: v for k, v in metadata.items() if k.startswith("model.")}
    for name, t in model_sd.items():
        meta, short = saved.get(name), name.removeprefix("model.")  # model_sd is TrainModule's: model.<CoLM name>
        if meta is None or not hasattr(meta, "size"):
            return f"{short} is not in the saved state"
        if tuple(meta.size) != tuple(t.shape):
            return f"{short} is {list(meta.size)} there and {list(t.shape)} here"
    extra = sorted(set(saved) - set(model_sd))
    if extra:
        return f"the saved state has {extra[0].removeprefix('model.')}, which this model lacks"
    if optim_sd is not None:
        # keys optim.state.<parameter FQN>.<state name>; get_state_dict gives every trainable parameter a state
        trained = {k[len("optim.state."):].rsplit(".", 1)[0] for k in metadata if k.startswith("optim.state.")}
        if frozen := sorted(trained - set(optim_sd.get("state", {}))):
            return f"{frozen[0].removeprefix('model.')} was trained there and is frozen here"
    return None


def _refuse_mismatch(out_dir, path: Path, detail: str) -> ValueError:
    return ValueError(f"run.out_dir={out_dir}: the saved training state in {path} does not match this model, "
                      f"preset or tuning ({detail}); use a fresh run.out_dir, or run.resume=false to discard it")


def load_state(out_dir: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the latest state into ``module``/``optimizer``; returns its train_state.json.

    A state written for another model shape or trainable set is refused with a ValueError naming the
    first difference, before anything is restored.
    """
    step = latest_step(out_dir)
    if step is None:
        raise ValueError(f"{out_dir}: no saved training state")
    path = Path(out_dir) / STATE_DIR / f"step_{step}"
    model_sd, optim_sd = get_state_dict(module, optimizer)
    if (detail := _mismatch(path, model_sd, optim_sd)) is not None:
        raise _refuse_mismatch(out_dir, path, detail)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
    except CheckpointException as e:  # e.g. optimizer state of another trainable set (a BaseException)
        cause = next(iter(e.failures.values()), (e, None))[0]
        raise _refuse_mismatch(out_dir, path, f"{type(cause).__name__}: {cause}".splitlines()[0]) from None
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / "train_state.json").read_text())


def full_model_state(module: nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict of the wrapped CoLM (collective: every rank must call it)."""
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def export_model(state: dict[str, torch.Tensor], cfg, out: str | Path, tokenizer: dict | None,
                 copy_tokenizer_from: str | None = None, lora: dict | None = None) -> Path:
    """Write ``state`` (a CoLM state dict, LoRA keys allowed) as a plain fp32 colm checkpoint."""
    from colm.train.lora import apply_lora, merge_lora

    model = CoLM(cfg)
    if lora:
        apply_lora(model, **lora)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"export: state does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if lora:
        merge_lora(model)
    return checkpoint.save(model, out, tokenizer=tokenizer, copy_tokenizer_from=copy_tokenizer_from)
