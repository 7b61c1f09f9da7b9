"""The training step captured in one CUDA graph (``colm.train.graphed_step``): where it refuses to run and why, the
learning rate it reads from a tensor, a saved state with such a rate loading into a plain run; on CUDA, its
losses and weights against the plain step's."""

from __future__ import annotations

import os

import pytest
import torch

from colm.model import CoLM
from colm.presets import preset
from colm.train.graphed_step import GraphedTrainStep, graphable, set_lr
from colm.train.step import TrainModule, build_optimizer, train_step

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _opt(module, capturable=False):
    return build_optimizer(list(module.named_parameters()), 1e-3, 0.1, (0.9, 0.95), 1e-8, capturable=capturable)


def test_graphable_names_what_stops_a_capture():
    opt = _opt(torch.nn.Linear(4, 4))
    assert "not on a CUDA device" in graphable(opt, 1, fsdp=False)
    if torch.cuda.is_available():
        gopt = _opt(torch.nn.Linear(4, 4).cuda(), capturable=True)
        assert graphable(gopt, 1, fsdp=False) is None
        assert "micro-batches" in graphable(gopt, 2, fsdp=False)
        assert "FSDP" in graphable(gopt, 1, fsdp=True)
        assert "capturable" in graphable(_opt(torch.nn.Linear(4, 4).cuda()), 1, fsdp=False)


def test_capturable_optimizer_needs_cuda_parameters():
    with pytest.raises(ValueError, match="capturable AdamW"):
        _opt(torch.nn.Linear(4, 4), capturable=True)


def test_set_lr_fills_tensors_in_place_and_sets_numbers():
    opt = _opt(torch.nn.Linear(4, 4))
    held = torch.tensor(0.5)
    opt.param_groups[0]["lr"] = held
    set_lr(opt, 0.25)
    assert opt.param_groups[0]["lr"] is held and float(held) == 0.25  # the tensor a captured step reads
    assert all(g["lr"] == 0.25 for g in opt.param_groups[1:])


def test_cuda_graph_config_refused_on_cpu(tmp_path):
    from colm.train.loop import train
    from tests.train_helpers import make_config, pydoc_data

    data = pydoc_data(tmp_path / "pydoc", max_docs=4)
    cfg = make_config(data, tmp_path / "run", steps=2, run={"cuda_graph": True})
    with pytest.raises(ValueError, match="run.cuda_graph=true: the step cannot be captured: the parameters are not"):
        train(cfg)


def test_state_saved_with_a_tensor_learning_rate_loads_into_a_plain_run(tmp_path):
    """A captured step's learning rate is a tensor; the saved state holds a number, as every other run's does, so
    a run without ``cuda_graph`` (or a graphed one, before it makes its tensor) resumes from it."""
    from colm.train import state
    from colm.train.distributed import DistInfo

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 4)
    opt = _opt(a)
    for g in opt.param_groups:
        g["lr"] = torch.tensor(0.5)
    a(torch.randn(2, 4)).sum().backward()
    opt.step()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    state.save_state(tmp_path, a, opt, 1, info)
    b = torch.nn.Linear(4, 4)
    opt_b = _opt(b)
    assert state.load_state(tmp_path, b, opt_b)["step"] == 1
    assert [g["lr"] for g in opt_b.param_groups] == [0.5, 0.5]
    assert torch.equal(a.weight, b.weight)


def _tiny(device):
    cfg = preset("tiny")
    torch.manual_seed(0)
    return TrainModule(CoLM(cfg, device=device).reset_parameters(seed=0), "final", log_all_scales=False)


@cuda
@pytest.mark.parametrize("autocast_bf16", [False, True])
def test_cuda_graphed_steps_match_plain_steps(autocast_bf16):
    """Eight steps with a changing learning rate, plainly and graphed (two warm-up steps, then a capture and
    replays): the same losses and, in float32, the same weights up to rounding; under bf16 autocast close."""
    g = torch.Generator().manual_seed(1)
    vocab = preset("tiny").vocab_size
    batches = [torch.randint(0, vocab, (2, 33), generator=g).cuda() for _ in range(8)]
    runs = {}
    for mode in ("plain", "graphed"):
        module = _tiny("cuda")
        opt = _opt(module, capturable=mode == "graphed")
        stepper = GraphedTrainStep(module, opt, autocast_bf16=autocast_bf16, warmup=2) if mode == "graphed" else None
        losses = []
        for i, tok in enumerate(batches):
            set_lr(opt, 1e-3 * (1 + i) / 8)
            b = [(tok[:, :-1], tok[:, 1:])]
            loss, _, norm = (stepper(b, 1.0) if stepper else train_step(module, opt, b, 1.0, autocast_bf16=autocast_bf16))
            losses.append((float(loss), norm))
        if stepper is not None:
            assert stepper.graph is not None and stepper.calls == 8
        runs[mode] = (losses, [p.detach().clone() for p in module.parameters()])
    (lp, wp), (lg, wg) = runs["plain"], runs["graphed"]
    tol = 2e-2 if autocast_bf16 else 1e-4
    for (a, na), (b, nb) in zip(lp, lg):
        assert abs(a - b) <= tol * abs(a) and abs(na - nb) <= tol * max(abs(na), 1e-6) * 10
    for p, q in zip(wp, wg):
        assert torch.allclose(p, q, rtol=tol, atol=tol * 1e-2), (p - q).abs().max()


@cuda
def test_cuda_graphed_step_refuses_another_batch_shape():
    module = _tiny("cuda")
    stepper = GraphedTrainStep(module, _opt(module, capturable=True), autocast_bf16=False, warmup=1)
    vocab = preset("tiny").vocab_size
    tok = torch.randint(0, vocab, (2, 17), device="cuda")
    for _ in range(2):
        stepper([(tok[:, :-1], tok[:, 1:])], 1.0)
    tok = torch.randint(0, vocab, (2, 9), device="cuda")
    with pytest.raises(ValueError, match="captured for batches of"):
        stepper([(tok[:, :-1], tok[:, 1:])], 1.0)
