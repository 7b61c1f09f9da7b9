"""Invariant 2, generality: a HF Llama converted with `colm convert-hf` gives transformers' logits
and greedy continuation."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from colm import checkpoint  # noqa: E402
from colm.cli import main  # noqa: E402
from colm.generate import generate  # noqa: E402
from colm.sampling import SamplingParams  # noqa: E402


def make_hf(tmp_path, tie: bool, rope_scaling: bool, seed: int):
    cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        initializer_range=0.15, rope_theta=50000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64} if rope_scaling else None,
    )
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    return hf, src


@pytest.mark.parametrize("tie, rope_scaling", [(False, True), (True, False)])
def test_convert_hf_logits_and_greedy(tmp_path, tie, rope_scaling):
    hf, src = make_hf(tmp_path, tie, rope_scaling, seed=7 + tie)
    dst = tmp_path / "colm"
    assert main(["convert-hf", str(src), str(dst)]) == 0
    model = checkpoint.load(dst).eval()
    assert model.cfg.chains == (8,) and model.cfg.tie_embeddings == tie
    tokens = torch.randint(0, 320, (2, 300))  # past original_max_position so llama3 scaling matters
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = model(tokens)
    assert ref.abs().max() > 1.0, "logits this small would make the comparison vacuous"
    assert (ours - ref).abs().max().item() <= 1e-4

    prompt = tokens[0, :20].tolist()
    with torch.no_grad():
        # explicit mask: otherwise HF infers one from pad_token_id and masks any prompt token equal to it
        hf_out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 20, dtype=torch.long),
                             max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 20:].tolist()
    ours_out = generate(model, prompt, SamplingParams(max_new_tokens=12)).token_ids
    assert ours_out == hf_out


def test_convert_hf_rejects_what_it_cannot_represent(tmp_path):
    _, src = make_hf(tmp_path, tie=False, rope_scaling=False, seed=1)
    cfg = json.loads((src / "config.json").read_text())
    cfg["attention_bias"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="attention_bias=true"):
        from colm.hf_import import load_hf_llama
        load_hf_llama(src)
    assert main(["convert-hf", str(src), str(tmp_path / "out")]) == 2
