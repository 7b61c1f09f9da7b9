"""Invariant 6: after chain expansion the full-scale logits equal the original model's, and the
original chains' logits never change."""

import pytest
import torch

from colm import checkpoint
from colm.cli import main
from colm.expand import expand, expanded_config
from colm.presets import preset
from tests.conftest import make_model


@pytest.mark.parametrize("name, add, air", [
    ("tiny-1chain", 4, False), ("tiny-1chain", 2, True), ("tiny-air", 2, None), ("tiny", 2, None),
])
def test_expand_keeps_logits(name, add, air):
    model = make_model(name, seed=13)
    new = expand(model, add, kv_sharing=air, std=0.3, seed=1).eval()
    n_old = model.cfg.num_chains
    assert new.cfg.num_chains == n_old + 1
    tokens = torch.randint(0, 260, (2, 15))
    with torch.no_grad():
        ref = model(tokens)
        torch.testing.assert_close(new(tokens), ref, rtol=0, atol=1e-6)
        for k in range(1, n_old + 1):
            assert torch.equal(new(tokens, scale=k), model(tokens, scale=k))
        # the new chain is live: its hidden features are not zero
        assert new.hidden(tokens)[..., model.cfg.dim:].abs().sum() > 0


def test_expanded_config_matches_table9():
    llama = preset("llama-3.2-1b")
    assert expanded_config(llama, 8) == preset("expansion-llama3.2-1b")
    tiny_llama = preset("expansion-tinyllama")
    src = tiny_llama.sub_config(1)
    assert expanded_config(src, 8) == tiny_llama


def test_expand_rejects_bad_requests():
    with pytest.raises(ValueError, match="add_chain=0"):
        expanded_config(preset("tiny-1chain"), 0)
    with pytest.raises(ValueError, match="fractional number of K/V heads"):
        expanded_config(preset("tiny-1chain"), 1)
    with pytest.raises(ValueError, match="kv_sharing=True differs"):
        expanded_config(preset("tiny"), 2, kv_sharing=True)
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads"):
        expanded_config(preset("tiny-1chain"), 1, kv_sharing=True)


def test_expand_cli_roundtrip(tmp_path):
    model = make_model("tiny-1chain", seed=14)
    checkpoint.save(model, tmp_path / "src")
    assert main(["expand", str(tmp_path / "src"), str(tmp_path / "dst"), "--add-chain", "2", "--kv-sharing"]) == 0
    new = checkpoint.load(tmp_path / "dst")
    assert new.cfg.kv_sharing and new.cfg.chains == (4, 2)
    tokens = torch.randint(0, 260, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(new(tokens), model(tokens), rtol=0, atol=1e-6)
