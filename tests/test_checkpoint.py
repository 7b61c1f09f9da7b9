"""Checkpoint I/O: round trips and clear errors for bad checkpoints (invariant 7)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from colm import checkpoint
from tests.conftest import make_model


def test_roundtrip_bfloat16(tmp_path):
    model = make_model("tiny-air", seed=15).to(torch.bfloat16)
    checkpoint.save(model, tmp_path)
    loaded = checkpoint.load(tmp_path)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def corrupt(tmp_path, fn):
    model = make_model("tiny-air", seed=16)
    checkpoint.save(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    fn(tensors)
    save_file(tensors, tmp_path / "model.safetensors")


def test_missing_tensor(tmp_path):
    corrupt(tmp_path, lambda t: t.pop("layers.1.ffn.w2.weights.0"))
    with pytest.raises(ValueError, match=r"missing tensors \['layers.1.ffn.w2.weights.0'\]"):
        checkpoint.load(tmp_path)


def test_wrong_shape(tmp_path):
    def shrink(t):
        t["layers.0.attn.wq.weights.1"] = t["layers.0.attn.wq.weights.1"][:, :10].contiguous()
    corrupt(tmp_path, shrink)
    with pytest.raises(ValueError, match=r"layers.0.attn.wq.weights.1 has shape \(32, 10\), the config needs \(32, 64\)"):
        checkpoint.load(tmp_path)
    checkpoint.load(tmp_path, scale=1)  # chain 2's tensor is never read at scale 1


def test_bad_config_files(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        checkpoint.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        checkpoint.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="colm convert-hf"):
        checkpoint.load(tmp_path)
    model = make_model("tiny-air", seed=17)
    checkpoint.save(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["chains"] = [3, 2]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"chains=\[3, 2\] sum to 5, but n_heads=4"):
        checkpoint.load(tmp_path)
    with pytest.raises(ValueError, match="scale=3"):
        meta["model"]["chains"] = [2, 2]
        (tmp_path / "config.json").write_text(json.dumps(meta))
        checkpoint.load(tmp_path, scale=3)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing model.safetensors"):
        checkpoint.load(tmp_path)
