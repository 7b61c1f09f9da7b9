"""Training configuration: one frozen dataclass per concern, read once from a YAML file.

A YAML file has the sections ``model``, ``data``, ``optim``, ``loss``, ``tuning`` and ``run``; each
maps onto the dataclass of the same name below, and every field is checked in ``__post_init__``
(integer, number or true/false as annotated, then its range or choices) with a message naming the
field, its value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from colm.config import ModelConfig
from colm.config_types import check_fields, section_name

MODES = ("pretrain", "heads", "expand", "chain_tune")
LOSSES = ("final", "multi_chain")
SCHEDULES = ("cosine", "linear", "constant")


def _label(obj, name: str) -> str:
    return f"{section_name(obj)}.{name}"


def _positive(obj, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            raise ValueError(f"{_label(obj, name)}={value!r}: must be {'>= 0' if allow_zero else '> 0'}")


@dataclass(frozen=True)
class ModelSection:
    """Where the model comes from: a preset (random init) or a colm checkpoint directory."""

    preset: str | None = None
    checkpoint: str | None = None
    overrides: dict = field(default_factory=dict)  # ModelConfig fields replacing the preset's
    init_std: float = 0.02
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.preset is None) == (self.checkpoint is None):
            raise ValueError(f"model: give exactly one of preset ({self.preset!r}) or checkpoint ({self.checkpoint!r})")
        _positive(self, "init_std")
        if self.overrides:
            if self.checkpoint is not None:  # a checkpoint's shape is its weights': nothing would apply them
                raise ValueError(f"model.overrides={self.overrides!r}: override a preset's fields only, not those "
                                 f"of model.checkpoint={self.checkpoint!r}")
            known = {f.name for f in dataclasses.fields(ModelConfig)}
            if unknown := sorted(set(self.overrides) - known):
                raise ValueError(f"model.overrides has unknown fields {unknown}; allowed: {sorted(known)}")


@dataclass(frozen=True)
class DataSection:
    """Token files written by ``colm prepare-data`` and the packing loader's shape."""

    train: str = ""
    val: str | None = None
    seq_len: int = 256
    micro_batch: int = 8  # sequences per process per micro-step
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.train:
            raise ValueError("data.train='': path of a token file (.bin) is required")
        _positive(self, "seq_len", "micro_batch")
        _positive(self, "seed", allow_zero=True)  # the loader's numpy generator takes no negative seed


@dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    warmup_steps: int = 10
    schedule: str = "cosine"
    steps: int = 100
    grad_accum: int = 1

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _positive(self, "lr", "steps", "grad_accum", "eps")
        _positive(self, "weight_decay", "grad_clip", "warmup_steps", "min_lr_ratio", allow_zero=True)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}: allowed are {list(SCHEDULES)}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)}: need two values in [0, 1)")
        if self.min_lr_ratio > 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio}: must be <= 1")


@dataclass(frozen=True)
class LossSection:
    """``final``: cross-entropy of the full scale; ``multi_chain``: sum_k weight_k * CE(scale-k logits)."""

    kind: str = "final"
    weights: tuple[float, ...] | None = None  # one per scale; None = all 1.0

    def __post_init__(self) -> None:
        check_fields(self)
        if self.kind not in LOSSES:
            raise ValueError(f"loss.kind={self.kind!r}: allowed are {list(LOSSES)}")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if not self.weights or any(w < 0 for w in self.weights) or sum(self.weights) == 0:
                raise ValueError(f"loss.weights={list(self.weights)}: need non-negative weights, not all zero")


@dataclass(frozen=True)
class TuningSection:
    """What is trained.

    ``pretrain``: everything. ``heads``: stage 2 of the paper's recipe, backbone frozen, the LM head
    trained (with the multi-chain loss). ``expand``: chain 1 frozen (training after ``colm expand``).
    ``chain_tune``: the first ``freeze_chains`` chains frozen. ``lora_rank`` > 0 (``expand``, ``chain_tune``):
    LoRA adapters on the trainable chains instead of their full weights, trained with those chains' columns
    of the LM head (a new chain's head columns start at zero; through a frozen head its adapters get no gradient).
    """

    mode: str = "pretrain"
    freeze_chains: int = 0
    lora_rank: int = 0  # 0 = full fine-tuning of the trainable chains
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.mode not in MODES:
            raise ValueError(f"tuning.mode={self.mode!r}: allowed are {list(MODES)}")
        _positive(self, "freeze_chains", "lora_rank", allow_zero=True)
        if self.mode == "expand" and self.freeze_chains not in (0, 1):
            raise ValueError(f"tuning.freeze_chains={self.freeze_chains}: mode 'expand' always freezes chain 1 only")
        if self.mode == "chain_tune" and self.freeze_chains < 1:
            raise ValueError(f"tuning.freeze_chains={self.freeze_chains}: mode 'chain_tune' needs at least 1 frozen chain")
        if self.lora_rank and self.mode not in ("chain_tune", "expand"):
            raise ValueError(f"tuning.lora_rank={self.lora_rank}: LoRA applies to modes 'chain_tune' and 'expand' only")

    @property
    def num_frozen_chains(self) -> int:
        return 1 if self.mode == "expand" else self.freeze_chains


@dataclass(frozen=True)
class RunSection:
    out_dir: str = "runs/demo"
    seed: int = 0
    device: str = "auto"  # auto = cuda if available else cpu
    precision: str = "auto"  # auto = bf16 on cuda, fp32 on cpu
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end (when data.val is set)
    eval_batches: int = 4
    save_every: int = 0  # 0 = only at the end
    resume: bool = True  # continue from out_dir/state if present
    max_seconds: float = 0.0  # > 0: stop after this much training time, state saved (a later run resumes); 0: none
    progress: bool = True
    plot: bool = True
    # capture the whole step (forward, backward, clipping, AdamW) in one CUDA graph after 3 plain steps and replay
    # it (colm.train.graphed_step): one GPU, no FSDP, optim.grad_accum 1
    cuda_graph: bool = False
    # RMSNorm, RoPE and the SwiGLU product through torch.compile'd forms on CUDA (colm.kernels.compiled): one fused
    # kernel forward and one backward each instead of 5-15 eager ones; the first step compiles them (a 1B step on an
    # H100: 1.17x faster dense, 1.09x CoLM; docs/results.md). CPU training never takes the path
    compile_elementwise: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"run.precision={self.precision!r}: allowed are 'auto', 'fp32', 'bf16'")
        _positive(self, "log_every", "eval_batches")
        _positive(self, "eval_every", "save_every", "max_seconds", allow_zero=True)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelSection
    data: DataSection
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    tuning: TuningSection = field(default_factory=TuningSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        if self.tuning.mode == "heads" and self.loss.kind != "multi_chain":
            raise ValueError(f"loss.kind={self.loss.kind!r}: mode 'heads' trains all scales' heads, use 'multi_chain'")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(sections))
        if unknown:
            raise ValueError(f"train config has unknown sections {unknown}; allowed: {sorted(sections)}")
        built = {}
        for f in dataclasses.fields(cls):
            klass = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "loss": LossSection,
                     "tuning": TuningSection, "run": RunSection}[f.name]
            raw = d.get(f.name) or {}
            if not isinstance(raw, dict):
                raise ValueError(f"train config section {f.name!r} must be a mapping, got {type(raw).__name__}")
            known = {g.name for g in dataclasses.fields(klass)}
            bad = sorted(set(raw) - known)
            if bad:
                raise ValueError(f"train config section {f.name!r} has unknown fields {bad}; allowed: {sorted(known)}")
            built[f.name] = klass(**raw)
        return cls(**built)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Read ``path``; ``overrides`` maps dotted keys ("optim.steps") to values applied on top."""
        d = yaml.safe_load(Path(path).read_text()) or {}
        for key, value in (overrides or {}).items():
            section, _, name = key.partition(".")
            if not name:
                raise ValueError(f"override {key!r}: use section.field, e.g. optim.steps=10")
            d.setdefault(section, {})[name] = value
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
