"""Checkpoint I/O: ``model.safetensors`` + ``config.json`` (+ tokenizer files) in one directory.

``load(path, scale=k)`` builds the scale-k sub-model and reads from the file only what it needs:
every tensor of the sub-model is a leading slice of the full model's tensor of the same name
(chain Linear weights of chains <= k whole, the embedding/head/norm columns of the first k chains),
so tensors of chains > k are never read and peak memory is that of the sub-model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from colm.config import ModelConfig
from colm.model import CoLM
from colm.rope import rope_inv_freq

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def save(model: CoLM, path: str | os.PathLike, tokenizer: dict | None = None, copy_tokenizer_from: str | None = None) -> Path:
    """Write ``model`` to directory ``path``. ``tokenizer`` is a spec such as ``{"kind": "byte"}``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "colm", "version": str(FORMAT_VERSION)})
    meta = {"format": "colm", "format_version": FORMAT_VERSION, "model": model.cfg.to_dict(),
            "tokenizer": tokenizer or {"kind": "byte"}, "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    if copy_tokenizer_from:
        for name in TOKENIZER_FILES:
            src = Path(copy_tokenizer_from) / name
            if src.exists() and src.resolve() != (path / name).resolve():
                shutil.copy(src, path / name)
    return path


def read_meta(path: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a colm checkpoint, with a clear error for anything else."""
    cfg_file = Path(path) / CONFIG_FILE
    if not cfg_file.is_file():
        raise ValueError(f"{path}: no {CONFIG_FILE}; not a colm checkpoint directory")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None
    if meta.get("format") != "colm":
        hint = " (a Hugging Face checkpoint? convert it with `colm convert-hf`)" if "model_type" in meta else ""
        raise ValueError(f"{cfg_file}: not a colm checkpoint{hint}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: format_version={meta.get('format_version')!r}, this colm reads {FORMAT_VERSION}")
    return meta


def load_config(path: str | os.PathLike) -> ModelConfig:
    return ModelConfig.from_dict(read_meta(path)["model"])


def check_weights(path: str | os.PathLike) -> None:
    """ValueError unless the checkpoint at ``path`` has every tensor its config needs, each of its full-scale
    shape, in a weights file that is whole (safetensors finds a truncated one from its header). Reads the header
    only: what a worker's ``load`` would fail on, found before any worker starts."""
    path = Path(path)
    full = load_config(path)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in CoLM(full).state_dict().items()}
    weights = path / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except OSError as e:
        raise ValueError(f"{weights}: cannot read it ({e})") from None
    except Exception as e:  # safetensors' own error: a truncated or corrupt file
        raise ValueError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    missing = sorted(set(shapes) - set(found))
    if missing:
        raise ValueError(f"{weights}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, want in shapes.items():
        if found[name] != want:
            raise ValueError(f"{weights}: tensor {name} has shape {found[name]}, the config needs {want}")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, or ValueError naming it: not a device string, or a CUDA device this torch
    build or machine does not have (torch's own failure is an AssertionError deep in the first allocation)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r}: not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible on this machine")
            raise ValueError(f"device={device!r}: CUDA is not available ({why}, torch {torch.__version__}); "
                             "use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return dev


def load(path: str | os.PathLike, scale: int | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None) -> CoLM:
    """Load the scale-k sub-model (all chains when ``scale`` is None), reading only its tensors."""
    check_device(device)
    path = Path(path)
    meta = read_meta(path)
    full = ModelConfig.from_dict(meta["model"])
    scale = full.check_scale(scale)
    sub = full.sub_config(scale)
    dtype = dtype or getattr(torch, meta.get("dtype", "float32"))
    with torch.device("meta"):
        model = CoLM(sub)
    model = model.to_empty(device=device).to(dtype)
    # Parameters are all overwritten below; only the (non-persistent) RoPE buffer needs computing.
    # It stays float32 whatever the weights' dtype, as in a freshly built model.
    model.inv_freq = rope_inv_freq(sub).to(device)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{path}: missing {WEIGHTS_FILE}")
    state = model.state_dict()
    with safe_open(str(weights), framework="pt", device="cpu") as f:
        available = set(f.keys())
        missing = sorted(set(state) - available)
        if missing:
            raise ValueError(f"{weights}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        for name, target in state.items():
            src = f.get_slice(name)
            src_shape = tuple(src.get_shape())
            want = tuple(target.shape)
            if len(src_shape) != len(want) or any(w > s for w, s in zip(want, src_shape)):
                raise ValueError(f"{weights}: tensor {name} has shape {src_shape}, the config needs {want}")
            if scale == full.num_chains and src_shape != want:
                raise ValueError(f"{weights}: tensor {name} has shape {src_shape}, the config needs {want}")
            part = src[tuple(slice(0, w) for w in want)] if src_shape != want else f.get_tensor(name)
            target.copy_(part.to(dtype))
    return model
