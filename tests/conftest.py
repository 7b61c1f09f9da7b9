"""Shared fixtures: tiny random models (std 0.2 so logits and attention are far from uniform)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def make_model(name: str, seed: int = 0, std: float = 0.2, **overrides):
    from colm.model import CoLM
    from colm.presets import preset

    return CoLM(preset(name, **overrides)).reset_parameters(std=std, seed=seed).eval()


@pytest.fixture
def model_factory():
    return make_model
