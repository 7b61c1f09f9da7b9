"""Invariant 4, CoLM-Air: K/V identical at every scale; a chain-1-only model prefills exactly the
full model's K/V."""

import pytest
import torch

from colm import checkpoint
from colm.kv_cache import ContiguousKVCache
from tests.conftest import make_model


@pytest.mark.parametrize("name", ["tiny-air", "tiny-air-3chain"])
def test_air_kv_same_at_every_scale_and_from_chain1_only_load(name, tmp_path):
    model = make_model(name, seed=8)
    cfg = model.cfg
    checkpoint.save(model, tmp_path)
    chain1 = checkpoint.load(tmp_path, scale=1)
    assert chain1.cfg.num_chains == 1 and chain1.cfg.n_kv_heads == cfg.n_kv_heads
    tokens = torch.randint(0, cfg.vocab_size, (2, 13))
    caches = {}
    with torch.no_grad():
        for k in range(1, cfg.num_chains + 1):
            caches[k] = ContiguousKVCache(cfg, 2, 13)
            model(tokens, scale=k, cache=caches[k])
        only1 = ContiguousKVCache(chain1.cfg, 2, 13)
        chain1(tokens, cache=only1)
    for layer in range(cfg.n_layers):
        k_ref, v_ref = caches[cfg.num_chains].layer_kv(layer)
        assert k_ref.abs().sum() > 0
        for k in range(1, cfg.num_chains):
            kk, vv = caches[k].layer_kv(layer)
            assert torch.equal(kk, k_ref) and torch.equal(vv, v_ref)
        kk, vv = only1.layer_kv(layer)
        assert torch.equal(kk, k_ref) and torch.equal(vv, v_ref)


@pytest.mark.parametrize("seed", range(6))
def test_air_kv_same_at_every_scale_with_odd_widths(seed):
    """FFN chain widths (and widths times tokens) that are not multiples of the CPU's vector width: the gate
    product of chain 1 must not depend on how many chains run (the CPU's elementwise kernels round by position)."""
    from colm.config import ModelConfig
    from colm.model import CoLM

    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=3, n_heads=4, n_kv_heads=1, ffn_hidden=24, chains=(2, 2),
                      kv_sharing=True)
    model = CoLM(cfg).reset_parameters(std=0.3, seed=seed).eval()
    torch.manual_seed(seed)
    tokens = torch.randint(0, 100, (1, 7))
    caches = {k: ContiguousKVCache(cfg, 1, 7) for k in (1, 2)}
    with torch.no_grad():
        for k, cache in caches.items():
            model(tokens, scale=k, cache=cache)
    for layer in range(cfg.n_layers):
        assert all(torch.equal(a, b) for a, b in zip(caches[1].layer_kv(layer), caches[2].layer_kv(layer))), layer


def test_non_air_kv_differs_by_scale_only_in_later_chains():
    model = make_model("tiny", seed=9)
    tokens = torch.randint(0, 260, (1, 6))
    c1, c2 = ContiguousKVCache(model.cfg, 1, 6), ContiguousKVCache(model.cfg, 1, 6)
    with torch.no_grad():
        model(tokens, scale=1, cache=c1)
        model(tokens, scale=2, cache=c2)
    k1, _ = c1.layer_kv(0)
    k2, _ = c2.layer_kv(0)
    assert k1.shape[1] == 1 and k2.shape[1] == 2  # chain 1 owns one K/V head, chain 2 another
    assert torch.equal(k1, k2[:, :1])


def test_fused_kv_projection_same_outputs_and_parameters():
    """Engines fuse each layer's K and V weights into one GEMM: same hidden states at every scale, same
    parameters and state_dict (views of the fused tensor), and a no-op for a model without KV sharing."""
    torch.manual_seed(5)
    model = make_model("tiny-air")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        ref = [model.hidden(tokens, scale=s) for s in range(1, model.cfg.num_chains + 1)]
        model.fuse_kv_projections()
        fused = [model.hidden(tokens, scale=s) for s in range(1, model.cfg.num_chains + 1)]
    attn = model.layers[0].attn
    assert attn.__dict__["_wkv"].data_ptr() == attn.wk.weights[0].data_ptr()
    assert attn.wv.weights[0].data_ptr() == attn.wk.weights[0].data_ptr() + attn.wk.weights[0].numel() * 4
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    for r, f in zip(ref, fused):
        torch.testing.assert_close(f, r, atol=1e-5, rtol=1e-5)
    plain = make_model("tiny")
    plain.fuse_kv_projections()
    assert plain.layers[0].attn.__dict__.get("_wkv") is None
