"""Model configuration: one frozen dataclass, validated against every constraint of the paper.

Chains are given in units of attention heads (``chains=(16, 16)`` for a 32-head model), so chain
``i`` owns ``chains[i]`` query heads and ``chains[i] * head_dim`` hidden features; every Linear of
the model splits its input and output features in the same ratio.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from itertools import accumulate
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``kind`` is "llama3" (Llama 3.1/3.2) or "linear"."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("llama3", "linear"):
            raise ValueError(f"rope_scaling.kind={self.kind!r}: allowed are 'llama3' and 'linear'")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor={self.factor}: must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a CoLM / CoLM-Air language model (Llama architecture with chains)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    chains: tuple[int, ...]
    kv_sharing: bool = False
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        object.__setattr__(self, "chains", tuple(int(c) for c in self.chains))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if not self.chains:
            raise ValueError("chains=(): need at least one chain")
        if any(c <= 0 for c in self.chains):
            raise ValueError(f"chains={list(self.chains)}: every chain needs at least one head")
        if sum(self.chains) != self.n_heads:
            raise ValueError(
                f"chains={list(self.chains)} sum to {sum(self.chains)}, but n_heads={self.n_heads}: "
                "chains are head counts and must sum to n_heads"
            )
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (dim/n_heads) must be even for rotary embeddings")
        for i, c in enumerate(self.chains):
            if (self.ffn_hidden * c) % self.n_heads:
                raise ValueError(
                    f"ffn_hidden={self.ffn_hidden} cannot be split by chains={list(self.chains)}: "
                    f"chain {i} ({c} heads) would get {self.ffn_hidden * c / self.n_heads} hidden units"
                )
            if self.kv_sharing:
                if c % self.n_kv_heads:
                    raise ValueError(
                        f"chains[{i}]={c} is not a multiple of n_kv_heads={self.n_kv_heads}: with kv_sharing "
                        "(CoLM-Air) every chain's query heads share chain 1's K/V heads"
                    )
            elif (c * self.n_kv_heads) % self.n_heads:
                raise ValueError(
                    f"chains[{i}]={c} x n_kv_heads={self.n_kv_heads} is not divisible by n_heads={self.n_heads}: "
                    "with grouped-query attention each chain must own a whole number of K/V heads"
                )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta}: must be > 0")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps={self.norm_eps}: must be > 0")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def num_chains(self) -> int:
        return len(self.chains)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def split(self, total: int) -> list[int]:
        """Split ``total`` features over the chains in the chains' ratio."""
        return [total * c // self.n_heads for c in self.chains]

    @property
    def chain_dims(self) -> list[int]:
        return self.split(self.dim)

    @property
    def ffn_dims(self) -> list[int]:
        return self.split(self.ffn_hidden)

    @property
    def kv_heads_per_chain(self) -> list[int]:
        """K/V heads owned by each chain (CoLM-Air: all by chain 1)."""
        if self.kv_sharing:
            return [self.n_kv_heads] + [0] * (self.num_chains - 1)
        return [c * self.n_kv_heads // self.n_heads for c in self.chains]

    def check_scale(self, scale: int | None) -> int:
        """Resolve ``None`` to the full scale and validate an explicit one."""
        if scale is None:
            return self.num_chains
        if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= self.num_chains:
            raise ValueError(f"scale={scale!r}: must be an integer in 1..{self.num_chains} (number of active chains)")
        return scale

    def scale_dim(self, scale: int) -> int:
        return sum(self.chain_dims[:scale])

    def scale_kv_heads(self, scale: int) -> int:
        return self.n_kv_heads if self.kv_sharing else sum(self.kv_heads_per_chain[:scale])

    def sub_config(self, scale: int) -> "ModelConfig":
        """The config of the scale-k sub-model: the first k chains as a model of their own."""
        scale = self.check_scale(scale)
        heads = sum(self.chains[:scale])
        return dataclasses.replace(
            self,
            dim=self.scale_dim(scale),
            n_heads=heads,
            n_kv_heads=self.scale_kv_heads(scale),
            ffn_hidden=sum(self.ffn_dims[:scale]),
            chains=self.chains[:scale],
        )

    def num_params(self, scale: int | None = None) -> int:
        """Parameter count of the scale-k sub-model (embedding and head included, tied counted once)."""
        c = self.sub_config(self.check_scale(scale))
        cum = list(accumulate(c.chain_dims))
        cum_ffn = list(accumulate(c.ffn_dims))
        hd = c.head_dim
        q = sum(d * cin for d, cin in zip(c.chain_dims, cum))
        if c.kv_sharing:
            kv = 2 * c.chain_dims[0] * c.n_kv_heads * hd
        else:
            kv = 2 * sum(h * hd * cin for h, cin in zip(c.kv_heads_per_chain, cum))
        ffn = 2 * sum(f * cin for f, cin in zip(c.ffn_dims, cum)) + sum(d * cf for d, cf in zip(c.chain_dims, cum_ffn))
        per_layer = 2 * q + kv + ffn + 2 * c.dim
        emb = c.vocab_size * c.dim * (1 if c.tie_embeddings else 2)
        return c.n_layers * per_layer + emb + c.dim

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["chains"] = list(self.chains)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config has unknown fields {unknown}; allowed: {sorted(known)}")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise ValueError(f"model config is missing required fields {missing}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def servable(cfg: ModelConfig) -> str | None:
    """Why the disaggregated service cannot serve ``cfg``, or None when it can.

    The prefill engine runs chain 1 only and hands its K/V to decode, which runs every chain; that is exact
    when chain 1's K/V are the whole model's: with KV sharing (CoLM-Air, every layer's K/V come from chain 1)
    or with one chain (chain 1 is the whole model, e.g. a Llama straight from ``colm convert-hf``). Without
    KV sharing, a model of several chains has K/V that depend on every chain. The prefill and decode engines
    and the launcher's ``prepare`` all ask this one function.
    """
    if cfg.kv_sharing or cfg.num_chains == 1:
        return None
    return (f"not a CoLM-Air model (kv_sharing=false with chains={list(cfg.chains)}): the service's chain-1 "
            "prefill gives the full model's K/V only with KV sharing or with a single chain; serve an Air "
            "checkpoint (`colm expand --kv-sharing`, an Air preset: colm info --presets) or a one-chain model")
