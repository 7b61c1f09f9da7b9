"""Decode graphs' static buffers on any device (CPU here): filled for a padded batch bucket, they give the
eager step's hidden states, logits and greedy picks. Graph and eager sum in different orders (the padded
bucket changes the GEMM's blocking), so float32 results agree to rounding: a tolerance of float32's eps
times the longest reduction, scaled by the values' size, holds on any CPU (an exact 1e-6 did not)."""

from __future__ import annotations

import torch

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.decode_worker.graphs import DecodeGraphs, _bucket, _Graph, head_outputs
from colm.decode_worker.step import _picks, _step_tensors
from colm.sampling import SamplingParams
from conftest import make_model


def three_running(model, **config):
    """A decode engine (not started) with random K/V in its pool and three running requests of 5, 17 and 30
    context tokens at scale 2; returns (engine, its running batch)."""
    de = DecodeEngine(model, DecodeConfig(num_blocks=64, block_size=4, max_batch_size=8, **config))
    de.pool.k.normal_()
    de.pool.v.normal_()
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    for i, n in enumerate((5, 17, 30)):
        de.reserve(f"q{i}", n, 4)
        de._requests[f"q{i}"].kv_done = True
        de.start_generation(f"q{i}", 7 + i, params, scale=2)
    de._housekeep()
    batch = list(de._running)
    return de, batch


def assert_rounding_close(got: torch.Tensor, want: torch.Tensor, reduction: int) -> None:
    """Equal up to float32 rounding of sums over ``reduction`` terms (a wrong input differs by O(1))."""
    eps = torch.finfo(torch.float32).eps
    atol = eps * reduction * float(want.abs().max())
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=0)


def staged_graph():
    """The tiny Air model, the rounding bound of its step (every layer sums over the model width, the FFN width and
    the context, <= 30 tokens; errors add per layer), ``three_running``'s engine and batch, its graphs and the
    CPU buffers of the batch's bucket: (model, reduction, engine, batch, graphs, graph buffers)."""
    model = make_model("tiny-air")
    c = model.cfg
    reduction = c.n_layers * max(c.dim, c.ffn_hidden, 32)
    de, batch = three_running(model)
    graphs = DecodeGraphs(model, de.pool, 8)
    g = _Graph(_bucket(len(batch)), _bucket(max(len(r.blocks) for r in batch), 16), "cpu")
    return model, reduction, de, batch, graphs, g


def test_static_buffers_of_a_padded_bucket_give_the_eager_step():
    model, reduction, de, batch, graphs, g = staged_graph()
    c = model.cfg
    graphs._fill(g, batch)
    assert g.tokens[:, 0].tolist() == [7, 8, 9, 0] and g.positions[:, 0].tolist() == [4, 16, 29, 0]
    assert g.dev_ints[2].tolist() == [5, 17, 30, 1] and g.slots[3] == -1 and not g.tables[3].any()
    g.slots[3] = de.pool.num_blocks * 4 - 1  # the CPU reference write has no "skip" for -1: an unused slot
    with torch.no_grad():
        tokens, positions, cache = _step_tensors(batch, de.pool, torch.device("cpu"))
        eager = model.hidden(tokens, scale=2, cache=cache, positions=positions)[:, 0]
        assert_rounding_close(graphs._forward(g, 2)[:3], eager, reduction)
        h = graphs._forward(g, 1, head=True)  # the head as a head graph captures it
        ref = head_outputs(model, model.hidden(tokens, scale=1, cache=_step_tensors(batch, de.pool, torch.device("cpu"))[2],
                                               positions=positions)[:, 0], 1)
        assert_rounding_close(g.head.logits[:3], ref.logits, reduction + c.dim)
        assert g.head.greedy[:3].tolist() == ref.greedy.tolist() and h.shape[0] == 4
        picks = _picks(g.head._replace(packed=g.head.packed[:, :3]), batch)  # greedy rows: one read of packed
        assert [t for t, _ in picks] == ref.greedy[:, 0].tolist()
        assert_rounding_close(torch.tensor([lp for _, lp in picks], dtype=torch.float64), ref.packed[1],
                              reduction + c.dim + c.vocab_size)
    assert graphs.hidden(batch, 2) is None  # no CUDA: the step runs eager


def test_a_mixed_scale_graph_gives_each_row_its_own_scales_head():
    """The mixed-scale graph's step (forward at the widest scale, every scale's head, each row's picked by the
    scale staged for it), run from its static buffers on the CPU: each row's logits, log-sum-exp and greedy pick
    are those of the eager head at that row's scale; padding rows do not disturb them."""
    model, reduction, de, batch, graphs, g = staged_graph()
    c = model.cfg
    scales = [1, 2, 1]
    graphs._fill(g, batch, row_scales=scales)
    assert g.dev_ints[5].tolist() == [1, 2, 1, 1]  # the padding row at scale 1
    g.slots[3] = de.pool.num_blocks * 4 - 1
    with torch.no_grad():
        graphs._forward(g, 2, head="mixed")
        tokens, positions, cache = _step_tensors(batch, de.pool, torch.device("cpu"))
        hidden = model.hidden(tokens, scale=2, cache=cache, positions=positions)[:, 0]  # the widest forward
        for i, s in enumerate(scales):
            ref = head_outputs(model, hidden[i : i + 1], s)
            assert_rounding_close(g.head.logits[i : i + 1], ref.logits, reduction + c.dim)
            assert_rounding_close(g.head.lse[i : i + 1], ref.lse, reduction + c.dim + c.vocab_size)
            assert g.head.greedy[i].tolist() == ref.greedy[0].tolist()
            assert g.head.packed[0, i].item() == ref.packed[0, 0].item()
