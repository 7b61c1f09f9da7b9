"""Named model presets: plain functions returning a ``ModelConfig``.

``preset(name, **overrides)`` looks one up by name. The Llama-3.2-1B shape and the paper's Table 9
rows are here, plus tiny models for tests and demos.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from colm.config import ModelConfig, RopeScaling

LLAMA32_ROPE = RopeScaling(kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)


def tiny(chains=(2, 2), kv_sharing: bool = False) -> ModelConfig:
    """A 2-layer model small enough for unit tests (byte-level vocabulary)."""
    return ModelConfig(vocab_size=260, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                       chains=tuple(chains), kv_sharing=kv_sharing, max_seq_len=512)


def tiny_air() -> ModelConfig:
    """Tiny CoLM-Air with two chains: the default model of tests and the local demo service."""
    return tiny(chains=(2, 2), kv_sharing=True)


def small_air() -> ModelConfig:
    """A few-million-parameter CoLM-Air {4,4} used by the CPU training demo."""
    return ModelConfig(vocab_size=260, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=768,
                       chains=(4, 4), kv_sharing=True, max_seq_len=1024, tie_embeddings=True)


def python_air() -> ModelConfig:
    """A 7.2M-parameter CoLM-Air {4,4} for the bundled demo trained on a GPU on Python's sources (13.7 MiB in
    bf16): wide enough that each scale writes readable code, small enough to ship and to serve on a laptop CPU."""
    return ModelConfig(vocab_size=260, dim=384, n_layers=6, n_heads=8, n_kv_heads=4, ffn_hidden=1024,
                       chains=(4, 4), kv_sharing=True, max_seq_len=1024, tie_embeddings=True)


def llama32_1b(chains=(32,), kv_sharing: bool = False, dim: int = 2048, n_layers: int = 16) -> ModelConfig:
    """Llama-3.2-1B shape (Table 9 'Llama' row when chains=(32,))."""
    return ModelConfig(vocab_size=128256, dim=dim, n_layers=n_layers, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                       chains=tuple(chains), kv_sharing=kv_sharing, rope_theta=500000.0, rope_scaling=LLAMA32_ROPE,
                       norm_eps=1e-5, tie_embeddings=True, max_seq_len=131072)


def paper_1b(chains, dim: int = 2048, kv_sharing: bool = False) -> ModelConfig:
    """The paper's pre-training models (Table 9): Llama-2 tokenizer (32000), 16 layers, 32 heads, 8 KV heads."""
    return ModelConfig(vocab_size=32000, dim=dim, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192,
                       chains=tuple(chains), kv_sharing=kv_sharing, rope_theta=10000.0, max_seq_len=4096)


def expansion_llama32_1b() -> ModelConfig:
    """Table 9 'expansion-llama3.2-1B' (1.93B): Llama-3.2-1B as chain 1 plus an 8-head chain, head untied."""
    return dataclasses.replace(llama32_1b(), dim=2560, ffn_hidden=10240, n_heads=40, n_kv_heads=10, chains=(32, 8),
                               tie_embeddings=False)


def expansion_tinyllama() -> ModelConfig:
    """Table 9 'expansion-tinyllama': TinyLlama-1.1B (22 layers, 4 KV heads) plus an 8-head chain."""
    return ModelConfig(vocab_size=32000, dim=2560, n_layers=22, n_heads=40, n_kv_heads=5, ffn_hidden=7040,
                       chains=(32, 8), rope_theta=10000.0, max_seq_len=2048)


def compare_model(chains=(32,), kv_sharing: bool = False) -> ModelConfig:
    """The quality comparison's models (``bench/train_compare.py``): byte-level, dim 1024 in 32 heads of 32, 8 KV
    heads, 16 layers, FFN 2816, 1024-token context; one chain is the dense Llama (about 180M parameters), {16,16}
    and {8,8,8,8} split the same shape (about 135M and 110M: chain causality drops the upper blocks)."""
    return ModelConfig(vocab_size=260, dim=1024, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=2816,
                       chains=tuple(chains), kv_sharing=kv_sharing, max_seq_len=1024, tie_embeddings=True)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "tiny-air": tiny_air,
    "tiny-1chain": lambda: tiny(chains=(4,)),
    "tiny-air-3chain": lambda: ModelConfig(vocab_size=260, dim=96, n_layers=2, n_heads=6, n_kv_heads=2,
                                           ffn_hidden=192, chains=(2, 2, 2), kv_sharing=True, max_seq_len=512),
    "small-air": small_air,
    "python-air": python_air,
    "llama-3.2-1b": llama32_1b,
    "llama-3.2-1b-16-16": lambda: llama32_1b(chains=(16, 16)),
    "llama-3.2-1b-8-8-8-8": lambda: llama32_1b(chains=(8, 8, 8, 8)),
    "llama-3.2-1b-16-16-air": lambda: llama32_1b(chains=(16, 16), kv_sharing=True),
    "llama-3.2-1b-8-8-8-8-air": lambda: llama32_1b(chains=(8, 8, 8, 8), kv_sharing=True),
    # the quality comparison (bench/train_compare.py)
    "compare-dense": compare_model,
    "compare-16-16": lambda: compare_model((16, 16)),
    "compare-16-16-air": lambda: compare_model((16, 16), kv_sharing=True),
    "compare-8-8-8-8-air": lambda: compare_model((8, 8, 8, 8), kv_sharing=True),
    # Table 9 rows
    "expansion-llama3.2-1b": expansion_llama32_1b,
    "expansion-tinyllama": expansion_tinyllama,
    "llama": lambda: paper_1b((32,)),
    "colm-16-16": lambda: paper_1b((16, 16)),
    "colm-8-24": lambda: paper_1b((8, 24)),
    "colm-8-8-16": lambda: paper_1b((8, 8, 16)),
    "colm-8-8-8-8": lambda: paper_1b((8, 8, 8, 8)),
    "colm-16-16-same-params": lambda: paper_1b((16, 16), dim=2560),
    "colm-8-8-8-8-same-params": lambda: paper_1b((8, 8, 8, 8), dim=3072),
}


def preset(name: str, **overrides) -> ModelConfig:
    """Look up a preset by name; keyword overrides replace fields (e.g. ``kv_sharing=True``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name]()
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
