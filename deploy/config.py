"""ClusterConfig: the whole service's configuration, read once from ``deploy/serve.yaml``.

It composes one section per part (``model``, ``workers``, ``prefill``, ``decode``, ``router``,
``security``, ``ray``); each part later receives only its own section. The engines' sections are
validated by their own config classes (``PrefillConfig``, ``DecodeConfig``) when those are
installed. ``env:NAME`` as a string value reads the environment variable NAME; an unset or empty
NAME is an error naming the field (a secret such as ``router.api_key`` must never turn into "off").
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from colm.config_types import check_types, env_value
from colm.router.config import RouterConfig

SECTIONS = ("model", "workers", "prefill", "decode", "router", "security", "ray", "transport")


def _expand_env(v, where: str = ""):
    """``v`` with every ``env:NAME`` string replaced by NAME's value; ``where`` is the field's dotted name."""
    if isinstance(v, str):
        return env_value(v, where)
    if isinstance(v, dict):
        return {k: _expand_env(x, f"{where}.{k}" if where else str(k)) for k, x in v.items()}
    if isinstance(v, list):
        return [_expand_env(x, f"{where}[{i}]") for i, x in enumerate(v)]
    return v


def _from_dict(cls, section: str, d: dict | None):
    if d is not None and not isinstance(d, dict):
        raise ValueError(f"{section}: must be a mapping of fields, got {type(d).__name__} {d!r:.80}")
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{section}: unknown fields {unknown}; allowed: {sorted(known)}")
    check_types(cls, d, section)
    return cls(**d)


@dataclass(frozen=True)
class ModelSection:
    path: str | None = None  # colm checkpoint directory or "demo"; None = the demo model below
    preset: str = "demo"  # with no path: "demo" = the bundled trained CoLM-Air {4,4}; a preset name = random weights
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto = cuda when the worker has a GPU, else cpu
    score_prompts: bool = False  # the router keeps its own model copy for echo/logprobs (else a decode worker scores)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype={self.dtype!r}: allowed are float32, bfloat16, float16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"model.device={self.device!r}: allowed are auto, cpu, cuda")


MODES = ("auto", "disaggregated", "colocated")


def resolve_mode(workers, cluster_gpus: float) -> str:
    """``workers.mode`` with ``auto`` decided by the cluster's GPUs: "colocated" | "disaggregated"."""
    if workers.mode != "auto":
        return workers.mode
    gpus = int(cluster_gpus)
    return "colocated" if 1 <= gpus < workers.num_prefill + workers.num_decode else "disaggregated"


@dataclass(frozen=True)
class WorkersSection:
    num_prefill: int = 1
    num_decode: int = 1
    num_gpus_per_worker: float | str = "auto"  # auto = 1 when the cluster has GPUs, else 0
    num_cpus_per_worker: float = 1.0
    prefill_resources: dict = field(default_factory=dict)  # e.g. {"prefill": 1} to pin to a node pool
    decode_resources: dict = field(default_factory=dict)
    max_restarts: int = 3  # Ray restarts a dead worker actor this many times
    start_timeout_s: float = 300.0  # every worker must report its address within this at start (model load included)
    host: str = "auto"  # workers' gRPC bind host: auto = the node's IP (colm.deploy.addresses), 0.0.0.0, or an address
    # disaggregated: prefill workers (chain 1) hand the K/V to decode workers; colocated: decode workers prefill
    # their own prompts in their step loop (no prefill workers: num_prefill is not used); auto: colocated where the
    # workers would share GPUs (fewer GPUs than workers, e.g. one GPU: two processes would time-slice it),
    # disaggregated with a GPU per worker or without GPUs. The default stays disaggregated: on one H200 the
    # colocated service has not yet measured faster (docs/results.md)
    mode: str = "disaggregated"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"workers.mode={self.mode!r}: allowed are {list(MODES)}")
        for name in ("num_prefill", "num_decode"):
            v = getattr(self, name)
            least = 0 if name == "num_prefill" and self.mode == "colocated" else 1  # colocated: no prefill workers
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise ValueError(f"workers.{name}={v!r}: must be an integer >= {least}"
                                 + (" (0 only with workers.mode: colocated)" if name == "num_prefill" else ""))
        g = self.num_gpus_per_worker
        if g != "auto" and (not isinstance(g, (int, float)) or g < 0):
            raise ValueError(f"workers.num_gpus_per_worker={g!r}: must be 'auto' or a number >= 0")
        if self.num_cpus_per_worker < 0:
            raise ValueError(f"workers.num_cpus_per_worker={self.num_cpus_per_worker}: must be >= 0")
        if not self.host.strip():
            raise ValueError(f"workers.host={self.host!r}: give 'auto', a wildcard (0.0.0.0) or an address of this node")
        if not self.start_timeout_s > 0:
            raise ValueError(f"workers.start_timeout_s={self.start_timeout_s}: must be > 0")
        if self.max_restarts < -1:
            raise ValueError(f"workers.max_restarts={self.max_restarts}: must be >= -1 (-1 = forever)")
        for name in ("prefill_resources", "decode_resources"):
            res = getattr(self, name)
            if not isinstance(res, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in res.values()):
                raise ValueError(f"workers.{name}={res!r}: must map resource names to positive amounts")


@dataclass(frozen=True)
class SecuritySection:
    cluster_token: str | None = None  # None = a random token per launch (workers get it from the launcher)

    def __post_init__(self) -> None:
        if self.cluster_token is not None and len(self.cluster_token) < 16:
            raise ValueError("security.cluster_token: must be at least 16 characters")


@dataclass(frozen=True)
class RaySection:
    address: str | None = None  # None = start an embedded local Ray cluster; "auto" = join the running one
    namespace: str = "colm"
    num_cpus: int | None = None  # embedded cluster only

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"ray.num_cpus={self.num_cpus}: must be >= 1")


def _transport(v) -> str:
    if v is None:
        return "auto"
    if not isinstance(v, str):
        raise ValueError(f"transport={v!r}: must be a string, 'auto' or a transport's name")
    return v


@dataclass(frozen=True)
class ClusterConfig:
    model: ModelSection = field(default_factory=ModelSection)
    workers: WorkersSection = field(default_factory=WorkersSection)
    prefill: dict = field(default_factory=dict)  # -> colm.prefill_worker PrefillConfig
    decode: dict = field(default_factory=dict)  # -> colm.decode_worker DecodeConfig
    router: RouterConfig = field(default_factory=RouterConfig)
    security: SecuritySection = field(default_factory=SecuritySection)
    ray: RaySection = field(default_factory=RaySection)
    # the KV transport between prefill and decode workers (colm.kv.registry): "auto" picks by each pair's facts; a
    # name forces that transport (the router asks prefill workers for it)
    transport: str = "auto"

    def __post_init__(self) -> None:
        try:
            from colm.kv.registry import config_names
        except ImportError:  # the router-only install: the engines validate it
            config_names = None
        if config_names is not None and self.transport not in config_names():
            raise ValueError(f"transport={self.transport!r}: allowed are {list(config_names())}")
        # Validate the engines' sections with their own classes when they are importable.
        for name, mod, cls in (("prefill", "colm.prefill_worker.config", "PrefillConfig"),
                               ("decode", "colm.decode_worker.config", "DecodeConfig")):
            try:
                klass = getattr(__import__(mod, fromlist=[cls]), cls)
            except (ImportError, AttributeError):
                continue
            _from_dict(klass, name, getattr(self, name))

    @classmethod
    def from_dict(cls, d: dict | None) -> "ClusterConfig":
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"serve config: must be a mapping of sections {list(SECTIONS)}, got "
                             f"{type(d).__name__} {d!r:.80}")
        d = _expand_env(dict(d or {}))
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ValueError(f"serve config: unknown sections {unknown}; allowed: {list(SECTIONS)}")
        for name in ("prefill", "decode"):
            if not isinstance(d.get(name) or {}, dict):
                raise ValueError(f"{name}: must be a mapping")
        return cls(model=_from_dict(ModelSection, "model", d.get("model")),
                   workers=_from_dict(WorkersSection, "workers", d.get("workers")),
                   prefill=dict(d.get("prefill") or {}), decode=dict(d.get("decode") or {}),
                   router=RouterConfig.from_dict(d.get("router") or {}),
                   security=_from_dict(SecuritySection, "security", d.get("security")),
                   ray=_from_dict(RaySection, "ray", d.get("ray")),
                   transport=_transport(d.get("transport")))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "ClusterConfig":
        with open(path) as f:
            return cls.from_dict(yaml.safe_load(f))

    def token(self) -> str:
        return self.security.cluster_token or secrets.token_urlsafe(24)


def bundled_serve_yaml() -> Path:
    return Path(__file__).resolve().parent / "serve.yaml"
