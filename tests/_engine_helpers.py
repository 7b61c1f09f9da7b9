"""Shared setup of the engine and KV hand-off tests: a tiny CoLM-Air checkpoint and prompts."""

from __future__ import annotations

import torch

from colm import checkpoint
from conftest import make_model

TOKEN = "test-cluster-token"


def save_tiny_air(path, name: str = "tiny-air"):
    model = make_model(name)
    checkpoint.save(model, path)
    return model


def prompts(lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
