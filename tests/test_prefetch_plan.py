"""The decode step's prefetch plan: each planned launch is keyed as the launch itself will look it up."""

import torch

from colm.kernels import prefetch_plan
from colm.model import CoLM
from colm.presets import preset


def _model(name):
    return CoLM(preset(name)).reset_parameters(seed=0).eval().fuse_projections()


def _ranges(w0, count):
    hit = prefetch_plan.lookup(w0, count)
    assert hit is not None
    table, n = hit
    return [tuple(r) for r in table.tolist()][:n]


def _expect(ws):
    return [(w.data_ptr(), w.numel() * w.element_size()) for w in ws]


def test_plan_of_every_layer_and_scale():
    prefetch_plan.clear()
    for name in ("tiny-air", "tiny"):
        m = _model(name)
        m.plan_prefetch()
        n = m.cfg.num_chains
        for s in range(1, n + 1):
            for i, layer in enumerate(m.layers):
                qkv = [seg.weight for seg in layer.attn._qkv_segments(s)]  # what project_qkv launches
                assert _ranges(qkv[0], len(qkv)) == _expect(layer.attn.wo.weights[:s])
                down = [seg.weight for seg in layer.ffn.w2.segments(s)]  # what the FFN's down launch reads
                if i + 1 < len(m.layers):
                    nxt = [seg.weight for seg in m.layers[i + 1].attn._qkv_segments(s)]
                    assert _ranges(down[0], len(down)) == _expect(nxt)
                else:
                    assert prefetch_plan.lookup(down[0], len(down)) is None
    prefetch_plan.clear()


def test_unsuitable_weights_are_left_out_and_ranges_capped():
    prefetch_plan.clear()
    src = torch.zeros(64, dtype=torch.bfloat16)
    odd = torch.zeros(3, dtype=torch.bfloat16)  # 6 bytes: no bulk prefetch takes it
    strided = torch.zeros(8, 16, dtype=torch.bfloat16)[:, ::2]
    many = [torch.zeros(16, dtype=torch.bfloat16) for _ in range(prefetch_plan.MAX_RANGES + 3)]
    prefetch_plan.add([src], [odd, strided] + many)
    assert _ranges(src, 1) == _expect(many[:prefetch_plan.MAX_RANGES])
    assert prefetch_plan.lookup(src, 2) is None  # another launch from the same first weight is not this one
    prefetch_plan.add([odd], [odd])
    assert prefetch_plan.lookup(odd, 1) is None
    prefetch_plan.clear()
