"""Invariant 1, chain causality: perturbing chains > i leaves outputs of chains <= i bit-identical."""

import pytest
import torch

from colm.attention import ChainAttention
from colm.chain_linear import ChainLinear
from colm.ffn import ChainFFN
from colm.model import Block
from colm.norm import ChainRMSNorm
from colm.presets import preset
from colm.rope import rope_cos_sin, rope_inv_freq
from tests.conftest import make_model

CONFIGS = ["tiny", "tiny-air", "tiny-air-3chain"]


def perturb_after(x: torch.Tensor, boundary: int) -> torch.Tensor:
    y = x.clone()
    y[..., boundary:] += torch.randn_like(y[..., boundary:]) * 3.0
    return y


def assert_prefix_identical(a, b, boundary):
    assert torch.equal(a[..., :boundary], b[..., :boundary])
    assert not torch.equal(a, b), "the perturbation must reach later chains, else the test proves nothing"


def test_chain_linear_unequal_chains():
    torch.manual_seed(0)
    lin = ChainLinear([8, 24, 16], [4, 12, 20])
    lin.reset_parameters(std=0.3)
    x = torch.randn(3, 5, 48)
    for i, (cin, cout) in enumerate(zip(lin.in_prefix[:-1], lin.out_prefix[:-1])):
        assert_prefix_identical(lin(x), lin(perturb_after(x, cin)), cout)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_layer_type(name):
    torch.manual_seed(1)
    cfg = preset(name)
    b, t = 2, 9
    bounds = [cfg.scale_dim(k) for k in range(1, cfg.num_chains)]
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), torch.arange(t).expand(b, t), torch.float32)
    norm = ChainRMSNorm(cfg.chain_dims)
    with torch.no_grad():
        norm.weight.normal_()
    attn = ChainAttention(cfg, 0)
    ffn = ChainFFN(cfg)
    block = Block(cfg, 0)
    for m in (attn, ffn, block):
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)
    layers = {
        "norm": lambda x: norm(x),
        "attention": lambda x: attn(x, cfg.num_chains, cos, sin),
        "ffn": lambda x: ffn(x, cfg.num_chains),
        "block": lambda x: torch.add(*block(x, cfg.num_chains, cos, sin)),  # stream + the block's FFN output
        "block_pending": lambda x: torch.add(*block(x, cfg.num_chains, cos, sin, pending=x.flip(1))),
    }
    x = torch.randn(b, t, cfg.dim)
    with torch.no_grad():
        for layer_name, f in layers.items():
            for bound in bounds:
                assert_prefix_identical(f(x), f(perturb_after(x, bound)), bound)


@pytest.mark.parametrize("name", CONFIGS)
def test_whole_model_hidden_and_weights(name):
    model = make_model(name, seed=2)
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model.hidden(tokens)
        for k in range(1, cfg.num_chains):
            bound = cfg.scale_dim(k)
            other = make_model(name, seed=2)
            # new embedding columns and new weights for every chain > k
            other.embed.weight[:, bound:] = torch.randn_like(other.embed.weight[:, bound:])
            for pname, p in other.named_parameters():
                if ".weights." in pname and int(pname.rsplit(".", 1)[1]) >= k:
                    p.copy_(torch.randn_like(p))
            assert_prefix_identical(ref, other.hidden(tokens), bound)
            # and the scale-k logits of both models agree exactly
            assert torch.equal(model(tokens, scale=k), other(tokens, scale=k))
