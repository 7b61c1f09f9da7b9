"""Guards of the model library's CLI found by an adversarial pass: resuming a training state whose trainable set
differs from the run's, training fields checked before a run starts, and a Hugging Face checkpoint that does not
fit its own config.json refused with a ValueError (the CLI's clean error) instead of a traceback."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from colm import checkpoint
from colm.cli import main
from colm.model import CoLM
from colm.presets import preset
from colm.train.config import TrainConfig
from colm.train.loop import train
from tests.train_helpers import make_config, pydoc_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pydoc_data(tmp_path_factory.mktemp("pydoc"))


@pytest.mark.parametrize("first, second", [
    ({"mode": "pretrain"}, {"mode": "chain_tune", "freeze_chains": 1}),
    ({"mode": "chain_tune", "freeze_chains": 1}, {"mode": "chain_tune", "freeze_chains": 2}),
])
def test_resume_refuses_a_state_that_trained_chains_now_frozen(data, tmp_path, first, second):
    """A state whose optimizer trained chains that this run freezes is another trainable set: resumed, the
    'frozen' chains would come out changed from the source model (scale-1 logits and K/V no longer its own)."""
    src = tmp_path / "src"
    checkpoint.save(CoLM(preset("tiny-air-3chain")).reset_parameters(seed=3), src)
    out = tmp_path / "run"
    model = {"preset": None, "checkpoint": str(src)}
    train(make_config(data, out, steps=2, model=model, tuning=first))
    with pytest.raises(ValueError, match="does not match this model.*trained there"):
        train(make_config(data, out, steps=3, model=model, tuning=second))
    assert (out / "state" / "latest").read_text() == "2"
    # the same tuning resumes as before
    train(make_config(data, out, steps=3, model=model, tuning=first))


def test_training_fields_checked_before_a_run(data, tmp_path):
    base = {"model": {"preset": "tiny"}, "data": {"train": "x.bin"}}
    with pytest.raises(ValueError, match=r"^data\.seed=-1: must be >= 0"):
        TrainConfig.from_dict({**base, "data": {"train": "x.bin", "seed": -1}})
    with pytest.raises(ValueError, match=r"model\.overrides has unknown fields \['bogus'\]"):
        TrainConfig.from_dict({**base, "model": {"preset": "tiny", "overrides": {"bogus": 1}}})
    with pytest.raises(ValueError, match=r"model\.overrides.*preset"):
        TrainConfig.from_dict({**base, "model": {"checkpoint": "x", "overrides": {"max_seq_len": 64}}})
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"data\.seq_len=1024.*max_seq_len=512"):
        train(make_config(data, out, steps=1, seq_len=1024))
    for device in ("bogus", "cuda:99" if torch.cuda.is_available() else "cuda"):
        with pytest.raises(ValueError, match=rf"run\.device={device!r}"):
            train(make_config(data, out, steps=1, run={"device": device}))


def _hf_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    src = tmp_path / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    return src


def _edit_config(src, **fields):
    cfg = json.loads((src / "config.json").read_text())
    for k, v in fields.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (src / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, message", [
    ({"num_hidden_layers": 1}, r"model\.layers\.1\..* layer 1, config\.json num_hidden_layers=1"),
    ({"hidden_size": None}, r"config\.json has no hidden_size"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
     r"config\.json rope llama3 needs low_freq_factor"),
])
def test_convert_hf_refuses_checkpoints_that_do_not_fit_their_config(tmp_path, capsys, edit, message):
    from colm.hf_import import load_hf_llama

    src = _hf_llama(tmp_path)
    _edit_config(src, **edit)
    with pytest.raises(ValueError, match=message):
        load_hf_llama(src)
    assert main(["convert-hf", str(src), str(tmp_path / "out")]) == 2
    assert "colm convert-hf: error:" in capsys.readouterr().err


def test_convert_hf_refuses_a_broken_shard_index(tmp_path):
    from colm.hf_import import load_hf_llama

    src = _hf_llama(tmp_path)
    weights = load_file(src / "model.safetensors")
    index = src / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {name: "model-00001-of-00002.safetensors" for name in weights}}))
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors.*missing"):
        load_hf_llama(src)
    index.write_text("{")
    with pytest.raises(ValueError, match="model.safetensors.index.json: invalid JSON"):
        load_hf_llama(src)
