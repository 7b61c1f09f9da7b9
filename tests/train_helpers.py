"""Helpers shared by the training tests: a small pydoc token file and config builders."""

from __future__ import annotations

from pathlib import Path

from colm.tokenizer import ByteTokenizer
from colm.train.config import TrainConfig
from colm.train.data import prepare_token_files


def pydoc_data(directory: Path, max_docs: int = 40) -> dict:
    """Byte-tokenized pydoc topics (the text the demo trains on), train + val files."""
    if not (directory / "train.bin").exists():
        prepare_token_files(["pydoc:topics"], directory, ByteTokenizer(), val_fraction=0.1, seed=0, max_docs=max_docs)
    return {"train": str(directory / "train.bin"), "val": str(directory / "val.bin")}


def make_config(data: dict, out_dir: Path, steps: int = 4, seq_len: int = 32, micro_batch: int = 4, **sections) -> TrainConfig:
    d = {
        "model": {"preset": "tiny-air"},
        "data": {"train": data["train"], "val": data["val"], "seq_len": seq_len, "micro_batch": micro_batch},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "steps": steps, "weight_decay": 0.1},
        "run": {"out_dir": str(out_dir), "progress": False, "plot": False, "eval_batches": 2, "device": "cpu"},
    }
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return TrainConfig.from_dict(d)
