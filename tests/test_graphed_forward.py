"""``colm.graphed_forward.GraphedForward``: the full forward of a short prompt from CUDA graphs.

On CUDA (float32 tiny Air model): the graph's hidden states equal the eager forward of the same right-padded
prompt exactly and the unpadded one within float rounding, at every scale; one graph per (length bucket,
scale); more than one row or a prompt beyond ``max_tokens`` runs eager; the decode engine's Score with
``score_graph_tokens`` gives the eager Score's log-probabilities and greedy ids. Everywhere: off CUDA it is
the eager forward, and bad settings name the field.
"""

from __future__ import annotations

import pytest
import torch

from colm.cuda_graphs import bucket
from colm.decode_worker.config import DecodeConfig
from colm.graphed_forward import GraphedForward
from colm.scoring import prompt_logprobs
from conftest import make_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_off_cuda_it_is_the_eager_forward():
    model = make_model("tiny-air")
    g = GraphedForward(model, max_tokens=64, least=16)
    tokens = torch.randint(0, 256, (1, 21))
    assert not g.enabled
    for scale in (1, 2):
        assert torch.equal(g.hidden(tokens, scale), model.hidden(tokens, scale))
    assert g.num_captures == 0 and g.num_replays == 0


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="max_tokens=-1"):
        GraphedForward(make_model("tiny-air"), max_tokens=-1)
    with pytest.raises(ValueError, match="score_graph_tokens=-5"):
        DecodeConfig(score_graph_tokens=-5)


@cuda
def test_graphs_match_the_eager_forward():
    model = make_model("tiny-air").cuda()
    g = GraphedForward(model, max_tokens=128, least=16)
    gen = torch.Generator().manual_seed(3)
    for t in (5, 16, 37, 100):
        tokens = torch.randint(1, 256, (1, t), generator=gen).cuda()
        padded = torch.zeros((1, bucket(t, 16)), dtype=torch.long, device="cuda")
        padded[:, :t] = tokens
        for scale in (1, 2):
            out = g.hidden(tokens, scale)
            assert out.shape == (1, t, model.cfg.scale_dim(scale))
            assert torch.equal(out, model.hidden(padded, scale)[:, :t]), (t, scale)
            torch.testing.assert_close(out, model.hidden(tokens, scale), rtol=1e-4, atol=1e-4)
    assert g.num_captures == 2 * len({bucket(t, 16) for t in (5, 16, 37, 100)}) and g.num_replays == 8
    replays = g.num_replays
    two_rows = torch.randint(0, 256, (2, 9), device="cuda")
    assert torch.equal(g.hidden(two_rows, 2), model.hidden(two_rows, 2))
    long = torch.randint(0, 256, (1, 129), device="cuda")
    assert torch.equal(g.hidden(long, 2), model.hidden(long, 2))
    assert g.num_replays == replays  # both ran eager


@cuda
def test_score_from_graphs_matches_eager():
    model = make_model("tiny-air").cuda()
    g = GraphedForward(model, max_tokens=64, least=16)
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    for scale in (1, 2):
        eager = prompt_logprobs(model, ids, scale)
        graphed = prompt_logprobs(model, ids, scale, g)
        assert [r[1] for r in graphed] == [r[1] for r in eager]
        torch.testing.assert_close(torch.tensor([r[0] for r in graphed]), torch.tensor([r[0] for r in eager]),
                                   rtol=1e-4, atol=1e-4)
    assert g.num_replays == 2
