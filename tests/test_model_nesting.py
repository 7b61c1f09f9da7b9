"""Invariant 3, nesting: the full model at scale k equals the model of the first k chains alone,
and the scale-k path reads only those weights and does only their FLOPs."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from colm import checkpoint
from colm.model import CoLM
from tests.conftest import make_model

CONFIGS = ["tiny", "tiny-air", "tiny-air-3chain"]


def sub_model_from_weights(model: CoLM, k: int) -> CoLM:
    """Build the scale-k model independently: slice every tensor to the sub-config's shape."""
    sub = CoLM(model.cfg.sub_config(k))
    full = model.state_dict()
    state = {name: full[name][tuple(slice(0, s) for s in t.shape)].clone() for name, t in sub.state_dict().items()}
    sub.load_state_dict(state)
    return sub.eval()


class ParamTouches(TorchDispatchMode):
    """Records, per parameter storage, the largest view of it that a computing (non-view) op read."""

    def __init__(self, model):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}
        self.touched = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:  # a view reads nothing; the op that consumes it does
            return func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(t, torch.Tensor):
                name = self.storages.get(t.untyped_storage().data_ptr())
                if name is not None:
                    self.touched[name] = max(self.touched.get(name, 0), t.numel())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", CONFIGS)
def test_scale_k_equals_sub_model(name):
    model = make_model(name, seed=3)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 10))
    with torch.no_grad():
        for k in range(1, model.cfg.num_chains + 1):
            sub = sub_model_from_weights(model, k)
            assert torch.equal(model(tokens, scale=k), sub(tokens))


@pytest.mark.parametrize("name", CONFIGS)
def test_scale_k_touches_only_its_weights(name):
    model = make_model(name, seed=4)
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        for k in range(1, cfg.num_chains + 1):
            probe = ParamTouches(model)
            with probe:
                model(tokens, scale=k)
            assert sum(probe.touched.values()) == cfg.num_params(k)
            # untouched chains can hold NaN without effect
            poisoned = make_model(name, seed=4)
            for pname, p in poisoned.named_parameters():
                if ".weights." in pname and int(pname.rsplit(".", 1)[1]) >= k:
                    p.fill_(float("nan"))
            d = cfg.scale_dim(k)
            poisoned.embed.weight[:, d:] = float("nan")
            poisoned.norm.weight[d:] = float("nan")
            assert torch.equal(poisoned(tokens, scale=k), model(tokens, scale=k))


def test_flops_shrink_with_scale():
    model = make_model("tiny-air-3chain", seed=5)
    tokens = torch.randint(0, 260, (1, 32))
    flops = []
    with torch.no_grad():
        for k in (1, 2, 3):
            counter = FlopCounterMode(display=False)
            with counter:
                model(tokens, scale=k)
            sub_counter = FlopCounterMode(display=False)
            with sub_counter:
                sub_model_from_weights(model, k)(tokens)
            assert counter.get_total_flops() == sub_counter.get_total_flops()
            flops.append(counter.get_total_flops())
    assert flops[0] < flops[1] < flops[2]


@pytest.mark.parametrize("name", CONFIGS)
def test_checkpoint_load_at_scale_reads_only_sub_model(name, tmp_path):
    model = make_model(name, seed=6)
    checkpoint.save(model, tmp_path)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 7))
    with torch.no_grad():
        for k in range(1, model.cfg.num_chains + 1):
            loaded = checkpoint.load(tmp_path, scale=k)
            assert loaded.cfg == model.cfg.sub_config(k)
            n = sum(p.numel() for p in loaded.parameters())
            assert n == model.cfg.num_params(k)
            assert sum(p.numel() * p.element_size() for p in loaded.parameters()) == n * 4
            assert torch.equal(loaded(tokens), model(tokens, scale=k))
