"""Chain tuning, LoRA, the heads stage, expansion training and exact resume, through the real loop."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from colm import checkpoint
from colm.expand import expand
from colm.kv_cache import ContiguousKVCache
from colm.model import CoLM
from colm.presets import preset
from colm.train.loop import train
from tests.train_helpers import make_config, pydoc_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pydoc_data(tmp_path_factory.mktemp("pydoc"))


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "model"
    checkpoint.save(CoLM(preset("tiny-air")).reset_parameters(std=0.1, seed=7), path)
    return path


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _kv_after_prefill(model, tokens):
    cache = ContiguousKVCache(model.cfg, 1, tokens.shape[1], device="cpu", dtype=torch.float32)
    logits = model(tokens, scale=model.cfg.num_chains, cache=cache)
    return cache, logits


def _assert_chain1_frozen(before, after, d1):
    for name, w in before.items():
        if ".weights.0" in name:
            assert torch.equal(after[name], w), name
        elif name in ("embed.weight", "head.weight"):
            assert torch.equal(after[name][:, :d1], w[:, :d1]), name
        elif name.endswith("norm.weight"):
            assert torch.equal(after[name][:d1], w[:d1]), name


def test_chain_tuning_keeps_chain1_and_air_kv(data, base_ckpt, tmp_path):
    cfg = make_config(data, tmp_path / "run", steps=5, model={"preset": None, "checkpoint": str(base_ckpt)},
                      tuning={"mode": "chain_tune", "freeze_chains": 1}, optim={"lr": 1e-2})
    train(cfg)
    before, after = _weights(base_ckpt), _weights(tmp_path / "run" / "model")
    d1 = preset("tiny-air").chain_dims[0]
    _assert_chain1_frozen(before, after, d1)
    changed = [n for n in before if ".weights.1" in n and not torch.equal(before[n], after[n])]
    assert len(changed) == sum(1 for n in before if ".weights.1" in n)  # every chain-2 matrix trained
    assert not torch.equal(before["head.weight"][:, d1:], after["head.weight"][:, d1:])
    old, new = checkpoint.load(base_ckpt).eval(), checkpoint.load(tmp_path / "run" / "model").eval()
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(old(tokens, scale=1), new(tokens, scale=1))  # chain-1 logits bit-identical
        cache_old, full_old = _kv_after_prefill(old, tokens)
        cache_new, full_new = _kv_after_prefill(new, tokens)
    for layer in range(old.cfg.n_layers):  # CoLM-Air: the tuned model's K/V serve the original model
        assert torch.equal(cache_old.k[layer], cache_new.k[layer]) and torch.equal(cache_old.v[layer], cache_new.v[layer])
    assert not torch.equal(full_old, full_new)


def test_lora_chain_tuning_merges_into_plain_checkpoint(data, base_ckpt, tmp_path):
    from colm.train.lora import apply_lora, merge_lora

    cfg = make_config(data, tmp_path / "run", steps=4, model={"preset": None, "checkpoint": str(base_ckpt)},
                      tuning={"mode": "chain_tune", "freeze_chains": 1, "lora_rank": 4}, optim={"lr": 1e-2})
    summary = train(cfg)
    before, after = _weights(base_ckpt), _weights(tmp_path / "run" / "model")
    assert set(before) == set(after)  # merged back: no adapter tensors, plain layout
    cfg_m = preset("tiny-air")
    d1 = cfg_m.chain_dims[0]
    expected_trainable = before["head.weight"].numel()  # the head trains beside the adapters (chain 2's columns)
    for n, w in before.items():
        if ".weights.1" in n:
            expected_trainable += 4 * (w.shape[0] + w.shape[1])
            assert not torch.equal(w, after[n]), n  # LoRA delta landed in chain 2
        elif n == "head.weight":
            assert torch.equal(w[:, :d1], after[n][:, :d1]) and not torch.equal(w[:, d1:], after[n][:, d1:])
        else:
            assert torch.equal(w, after[n]), n  # everything else untouched
    assert summary["num_trainable"] == expected_trainable
    # merge is exact: a LoRA model and its merged copy give the same logits
    model = checkpoint.load(base_ckpt)
    apply_lora(model, first_chain=1, rank=4, alpha=16.0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    tokens = torch.randint(0, 256, (2, 16), generator=g)
    with torch.no_grad():
        lora_logits = model(tokens)
        lora_s1 = model(tokens, scale=1)
        merged = merge_lora(model)
        torch.testing.assert_close(merged(tokens), lora_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(lora_s1, checkpoint.load(base_ckpt)(tokens, scale=1))
    assert cfg_m.num_chains == 2


def test_heads_stage_trains_only_the_head(data, base_ckpt, tmp_path):
    cfg = make_config(data, tmp_path / "run", steps=3, model={"preset": None, "checkpoint": str(base_ckpt)},
                      tuning={"mode": "heads"}, loss={"kind": "multi_chain"})
    summary = train(cfg)
    before, after = _weights(base_ckpt), _weights(tmp_path / "run" / "model")
    for n, w in before.items():
        assert torch.equal(w, after[n]) == (n != "head.weight"), n
    assert summary["num_trainable"] == before["head.weight"].numel()


def test_expansion_training_freezes_chain1(data, tmp_path):
    small = CoLM(preset("tiny-1chain")).reset_parameters(std=0.1, seed=3).eval()
    big = expand(small, 4, kv_sharing=True)
    checkpoint.save(big, tmp_path / "expanded")
    cfg = make_config(data, tmp_path / "run", steps=4, model={"preset": None, "checkpoint": str(tmp_path / "expanded")},
                      tuning={"mode": "expand"}, optim={"lr": 1e-2})
    train(cfg)
    before, after = _weights(tmp_path / "expanded"), _weights(tmp_path / "run" / "model")
    _assert_chain1_frozen(before, after, small.cfg.dim)
    assert not torch.equal(before["layers.0.attn.wq.weights.1"], after["layers.0.attn.wq.weights.1"])
    tuned = checkpoint.load(tmp_path / "run" / "model").eval()
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the original model lives on, exactly, as scale 1
        assert torch.equal(tuned(tokens, scale=1), small(tokens))


def test_resume_continues_exact_trajectory(data, tmp_path):
    straight = train(make_config(data, tmp_path / "a", steps=6, run={"save_every": 3}))
    first = train(make_config(data, tmp_path / "b", steps=3))
    resumed = train(make_config(data, tmp_path / "b", steps=6))
    assert resumed["resumed_from"] == 3
    assert first["history"] + resumed["history"] == straight["history"]  # bit-exact continuation
    a, b = _weights(tmp_path / "a" / "model"), _weights(tmp_path / "b" / "model")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_run_out_of_time_pauses_and_the_next_resumes_it(data, tmp_path, monkeypatch):
    """``run.max_seconds``: the run stops at a step boundary once its training time is spent, saves its state and
    exports nothing; the next run (same config) resumes there and ends on the trajectory of a run never paused."""
    import json

    import colm.train.loop as loop

    straight = train(make_config(data, tmp_path / "a", steps=6))
    clock = iter(range(1000))  # each call of the loop's clock advances one "second"
    monkeypatch.setattr(loop.time, "perf_counter", lambda: float(next(clock)))
    paused = train(make_config(data, tmp_path / "b", steps=6, run={"max_seconds": 2.5}))
    monkeypatch.undo()
    assert paused["complete"] is False and 0 < paused["steps"] < 6
    assert json.loads((tmp_path / "b" / "paused.json").read_text())["steps"] == paused["steps"]
    assert not (tmp_path / "b" / "model").exists()
    resumed = train(make_config(data, tmp_path / "b", steps=6, run={"max_seconds": 3600}))
    assert resumed["complete"] and resumed["resumed_from"] == paused["steps"]
    assert not (tmp_path / "b" / "paused.json").exists()
    a, b = _weights(tmp_path / "a" / "model"), _weights(tmp_path / "b" / "model")
    assert all(torch.equal(a[n], b[n]) for n in a)
