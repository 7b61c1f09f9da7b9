"""Invariant: incremental decoding with the KV cache equals a full recompute at every scale,
including scale changes between steps (Air), chunked prefill, and refusal of impossible switches."""

import pytest
import torch

from colm.kv_cache import ContiguousKVCache
from tests.conftest import make_model


def full_recompute_logits(model, seq, scales_per_pos):
    """Logits for each position p computed from scratch at the scale used at p."""
    with torch.no_grad():
        return [model(torch.tensor([seq[: p + 1]]), scale=s)[0, -1] for p, s in scales_per_pos]


@pytest.mark.parametrize("name, schedule", [
    ("tiny-air", [2, 1, 2, 2, 1, 1, 2]),
    ("tiny-air-3chain", [3, 1, 2, 3, 2, 1, 3]),
    ("tiny", [2, 2, 1, 1, 1, 1, 1]),        # non-Air: the scale may only go down
    ("tiny-1chain", [1] * 7),
])
def test_incremental_equals_recompute(name, schedule):
    model = make_model(name, seed=10)
    torch.manual_seed(0)
    seq = torch.randint(0, 260, (12,)).tolist()
    prompt_len = 6
    cache = ContiguousKVCache(model.cfg, 1, 32)
    got = []
    with torch.no_grad():
        # prefill in two chunks, then one token per step
        model(torch.tensor([seq[:3]]), scale=schedule[0], cache=cache)
        got.append(model(torch.tensor([seq[3:prompt_len]]), scale=schedule[0], cache=cache)[0, -1])
        for i, p in enumerate(range(prompt_len, len(seq))):
            got.append(model(torch.tensor([[seq[p]]]), scale=schedule[i + 1], cache=cache)[0, -1])
    positions = list(range(prompt_len - 1, len(seq)))
    want = full_recompute_logits(model, seq, list(zip(positions, schedule)))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert cache.length == len(seq)


def test_non_air_refuses_scale_increase_and_overflow():
    model = make_model("tiny", seed=11)
    cache = ContiguousKVCache(model.cfg, 1, 8)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), scale=1, cache=cache)
        with pytest.raises(ValueError, match="scale cannot grow"):
            model(torch.tensor([[4]]), scale=2, cache=cache)
    air = make_model("tiny-air", seed=11)
    cache = ContiguousKVCache(air.cfg, 1, 4)
    with torch.no_grad():
        air(torch.tensor([[1, 2, 3]]), scale=1, cache=cache)
        with pytest.raises(ValueError, match="cache overflow"):
            air(torch.tensor([[4, 5]]), scale=2, cache=cache)


def test_batched_prefill_matches_single():
    model = make_model("tiny-air", seed=12)
    tokens = torch.randint(0, 260, (3, 9))
    with torch.no_grad():
        batch = model(tokens, scale=1)
        for b in range(3):
            torch.testing.assert_close(batch[b], model(tokens[b : b + 1], scale=1)[0], rtol=1e-5, atol=1e-5)
