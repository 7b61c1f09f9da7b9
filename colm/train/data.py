"""Token files and the packing data loader.

``prepare_token_files`` tokenizes text files (or directories, or the ``pydoc_data`` topics that ship
with Python), joins the documents with EOS and writes ``train.bin`` / ``val.bin``: flat uint16 (or
uint32 for vocabularies >= 65536) token arrays, each with a ``.json`` sidecar (dtype, count,
tokenizer). ``TokenFile`` memory-maps one.

``PackedLoader`` cuts the token stream into windows of ``seq_len + 1`` tokens (inputs and shifted
targets), shuffles the window order once per epoch with a seeded generator, and hands out global
batches of ``micro_batch * world_size * grad_accum`` windows per optimizer step. Rank r takes its
own contiguous slice of each micro-step, so N processes see exactly the windows one process with N
times the micro-batch would see, and the position is a pure function of the step (resume = set step).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
PYDOC_SOURCE = "pydoc:topics"  # the help texts of pydoc_data.topics, shipped with CPython


def iter_documents(sources: Iterable[str], suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> Iterable[tuple[str, str]]:
    """(name, text) of every document: files, files under directories (sorted), or pydoc topics."""
    for src in sources:
        if src == PYDOC_SOURCE:
            from pydoc_data.topics import topics

            for name in sorted(topics):
                yield f"pydoc:{name}", topics[name]
            continue
        path = Path(src)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        elif path.is_file():
            files = [path]
        else:
            raise ValueError(f"input {src!r}: no such file or directory (or use {PYDOC_SOURCE!r})")
        for f in files:
            yield str(f), f.read_text(encoding="utf-8", errors="replace")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def write_token_file(path: str | Path, ids: np.ndarray, tokenizer_spec: dict, vocab_size: int, num_docs: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    ids.astype(dtype).tofile(path)
    meta = {"dtype": dtype.name, "num_tokens": int(ids.size), "vocab_size": vocab_size,
            "tokenizer": tokenizer_spec, "num_docs": num_docs}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


def prepare_token_files(sources: list[str], out_dir: str | Path, tokenizer, val_fraction: float = 0.05,
                        seed: int = 0, max_docs: int | None = None,
                        suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> dict:
    """Tokenize ``sources`` into ``out_dir/train.bin`` and ``out_dir/val.bin`` (documents split by seed)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: must be in [0, 1)")
    docs = [ids for _, text in iter_documents(sources, suffixes) if (ids := tokenizer.encode(text))]
    if max_docs is not None:
        docs = docs[:max_docs]
    if not docs:
        raise ValueError(f"inputs {sources}: no non-empty documents found")
    order = np.random.default_rng(seed).permutation(len(docs))
    num_val = int(round(len(docs) * val_fraction)) if val_fraction > 0 else 0
    if val_fraction > 0 and len(docs) > 1:
        num_val = max(1, num_val)
    parts = {"val": order[:num_val], "train": order[num_val:]}
    eos = tokenizer.eos_id
    summary = {}
    for split, idx in parts.items():
        if len(idx) == 0:
            continue
        # Documents joined by EOS, so the packer's windows cross documents the way nanoGPT's do.
        flat = np.fromiter((t for i in sorted(idx) for t in (*docs[i], eos)), dtype=np.int64)
        p = write_token_file(Path(out_dir) / f"{split}.bin", flat, tokenizer.spec(), tokenizer.vocab_size, len(idx))
        summary[split] = {"path": str(p), "num_tokens": int(flat.size), "num_docs": int(len(idx))}
    return summary


class TokenFile:
    """A read-only memory map of a token file written by ``write_token_file``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_path = self.path.with_suffix(".json")
        if not meta_path.is_file():
            raise ValueError(f"{self.path}: missing sidecar {meta_path.name} (write token files with `colm prepare-data`)")
        self.meta = json.loads(meta_path.read_text())
        self.tokens = np.memmap(self.path, dtype=np.dtype(self.meta["dtype"]), mode="r")
        if self.tokens.size != self.meta["num_tokens"]:
            raise ValueError(f"{self.path}: has {self.tokens.size} tokens, sidecar says {self.meta['num_tokens']}")

    def __len__(self) -> int:
        return int(self.tokens.size)


@dataclass
class PackedLoader:
    """Deterministic packed batches: ``batch(step, micro)`` -> (inputs, targets) [micro_batch, seq_len]."""

    file: TokenFile
    seq_len: int
    micro_batch: int
    grad_accum: int = 1
    rank: int = 0
    world_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("seq_len", "micro_batch", "grad_accum", "world_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: must be an integer >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank}: must be in 0..{self.world_size - 1}")
        self.num_windows = (len(self.file) - 1) // self.seq_len
        if self.num_windows < self.windows_per_micro_step:
            raise ValueError(f"{self.file.path}: {len(self.file)} tokens give {self.num_windows} windows of "
                             f"{self.seq_len + 1}, fewer than one micro-step needs ({self.windows_per_micro_step})")
        self._perm_epoch, self._perm = -1, None

    @property
    def windows_per_micro_step(self) -> int:
        return self.micro_batch * self.world_size

    @property
    def windows_per_step(self) -> int:
        return self.windows_per_micro_step * self.grad_accum

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_ids(self, step: int, micro: int) -> np.ndarray:
        """Window indices this rank reads at optimizer ``step``, micro-step ``micro``."""
        start = (step * self.grad_accum + micro) * self.windows_per_micro_step + self.rank * self.micro_batch
        # Epochs are whole passes over the windows; a tail that does not fill a micro-step is skipped.
        usable = self.num_windows - self.num_windows % self.windows_per_micro_step
        out = np.empty(self.micro_batch, dtype=np.int64)
        for j in range(self.micro_batch):
            g = start + j
            epoch, pos = divmod(g, usable)
            out[j] = self._permutation(epoch)[pos]
        return out

    def batch(self, step: int, micro: int = 0, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        rows = [np.asarray(self.file.tokens[w * self.seq_len: w * self.seq_len + self.seq_len + 1], dtype=np.int64)
                for w in self.window_ids(step, micro)]
        chunk = torch.from_numpy(np.stack(rows))  # [micro_batch, seq_len + 1]
        if device != "cpu":
            chunk = chunk.pin_memory().to(device, non_blocking=True) if torch.cuda.is_available() else chunk.to(device)
        return chunk[:, :-1], chunk[:, 1:]

    def sequential_batches(self, num_batches: int | None = None, device="cpu"):
        """Windows in file order (evaluation): yields (inputs, targets), this rank's share only."""
        per = self.windows_per_micro_step
        total = self.num_windows // per
        for b in range(total if num_batches is None else min(total, num_batches)):
            ids = np.arange(b * per + self.rank * self.micro_batch, b * per + (self.rank + 1) * self.micro_batch)
            rows = [np.asarray(self.file.tokens[w * self.seq_len: w * self.seq_len + self.seq_len + 1], dtype=np.int64) for w in ids]
            chunk = torch.from_numpy(np.stack(rows)).to(device)
            yield chunk[:, :-1], chunk[:, 1:]
