"""The training path's compiled elementwise functions (``colm.kernels.compiled``): taken only where autograd
records on a compiled device, the same losses and gradients as the eager references, a failed compile falls back
to eager once and for all. On the CPU the functions go through ``aot_eager`` (the graphs torch.compile builds,
run by eager kernels); on CUDA through Inductor against float64 references."""

from __future__ import annotations

import logging

import pytest
import torch

from colm.kernels import compiled
from colm.kernels.rmsnorm import chain_add_rmsnorm, chain_add_rmsnorm_ref, chain_rmsnorm, chain_rmsnorm_ref
from colm.kernels.rope import apply_rope_qk, apply_rope_qk_ref
from colm.kernels.swiglu import silu_mul, silu_mul_ref
from colm.model import CoLM
from colm.presets import preset

NAMES = {"chain_rmsnorm", "chain_add_rmsnorm", "silu_mul", "rope_qk"}


@pytest.fixture
def on_cpu(monkeypatch):
    """The compiled path on the CPU, through aot_eager."""
    monkeypatch.setattr(compiled, "DEVICES", ("cpu",))
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    monkeypatch.delenv("COLM_COMPILE_ELEMENTWISE", raising=False)
    compiled.reset()
    compiled.set_enabled(True)
    yield
    compiled.reset()


def _loss_and_grads(model, tokens):
    model.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1], scale=model.cfg.num_chains)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tiny", "tiny-air"])
def test_training_step_through_the_compiled_functions_equals_eager(on_cpu, monkeypatch, name):
    torch.manual_seed(0)
    model = CoLM(preset(name)).reset_parameters(seed=1)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 33))
    monkeypatch.setenv("COLM_COMPILE_ELEMENTWISE", "0")  # wins over set_enabled(True)
    loss_eager, grads_eager = _loss_and_grads(model, tokens)
    assert not compiled._compiled  # off: nothing compiled
    monkeypatch.delenv("COLM_COMPILE_ELEMENTWISE")
    compiled.set_enabled(False)  # the default
    _loss_and_grads(model, tokens)
    assert not compiled._compiled
    compiled.set_enabled(True)
    loss, grads = _loss_and_grads(model, tokens)
    assert set(compiled._compiled) == NAMES  # every function went the compiled way
    torch.testing.assert_close(loss, loss_eager, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_eager.keys() and len(grads) > 0
    for n in grads:
        torch.testing.assert_close(grads[n], grads_eager[n], rtol=1e-4, atol=1e-6, msg=n)


def test_inference_and_plain_tensors_keep_the_eager_path(on_cpu):
    x, w = torch.randn(3, 8), torch.ones(8)
    with torch.no_grad():
        chain_rmsnorm(x, w.requires_grad_(), [4, 4], 1e-5)
    chain_rmsnorm(x, torch.ones(8), [4, 4], 1e-5)  # grad mode on, but nothing requires grad
    silu_mul(x, x)
    assert not compiled._compiled


def test_a_failed_compile_falls_back_to_eager_and_stays_there(on_cpu, monkeypatch, caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(compiled, "BACKEND", broken)
    a, b = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="colm.kernels"):
        out = silu_mul(a, b)
    torch.testing.assert_close(out, silu_mul_ref(a, b), rtol=0, atol=0)
    assert "failed" in caplog.text and "silu_mul" in caplog.text and "no compiler here" in caplog.text
    assert not compiled.enabled()
    out.sum().backward()  # the eager result's graph is whole
    assert a.grad is not None
    caplog.clear()
    x = torch.randn(2, 8, requires_grad=True)
    chain_rmsnorm(x, torch.ones(8, requires_grad=True), [8], 1e-5)  # not tried again, nothing logged
    assert "chain_rmsnorm" not in compiled._compiled and not caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the Inductor code")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_functions_and_gradients_match_float64(dtype, monkeypatch):
    """Each compiled function and its input gradients against the float64 reference, on fresh random inputs."""
    monkeypatch.setenv("COLM_COMPILE_ELEMENTWISE", "1")
    compiled.reset()
    tol = dict(rtol=1e-4, atol=1e-5)  # float32; bf16 is held to the eager bf16 error below
    g = torch.Generator(device="cuda").manual_seed(7)

    def leaf(*shape, d=dtype):
        return torch.randn(*shape, device="cuda", generator=g).to(d).requires_grad_()

    x, r, w = leaf(2, 64, 384), leaf(2, 64, 384), leaf(384)
    q, k = leaf(2, 6, 64, 32), leaf(2, 2, 64, 32)
    ang = torch.randn(1, 1, 64, 32, device="cuda", generator=g)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    cases = [(chain_rmsnorm, chain_rmsnorm_ref, (x, w), ([128, 256], 1e-5)),
             (chain_add_rmsnorm, chain_add_rmsnorm_ref, (x, r, w), ([192, 192], 1e-5)),
             (silu_mul, silu_mul_ref, (x, r), ()),
             (apply_rope_qk, apply_rope_qk_ref, (q, k), (cos, sin))]
    for fn, ref, leaves, extra in cases:
        out = fn(*leaves, *extra)
        outs = out if isinstance(out, tuple) else (out,)
        seeds = [torch.randn(o.shape, device="cuda", generator=g).to(o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, leaves, seeds)
        leaves64 = [t.detach().double().requires_grad_() for t in leaves]
        extra64 = [e.double() if torch.is_tensor(e) else e for e in extra]
        out64 = ref(*leaves64, *extra64)
        outs64 = out64 if isinstance(out64, tuple) else (out64,)
        grads64 = torch.autograd.grad(outs64, leaves64, [s.double() for s in seeds])
        if dtype == torch.float32:
            for a, b in zip(outs + grads, outs64 + grads64):
                torch.testing.assert_close(a.double(), b, **tol, msg=ref.__name__)
            continue
        # bf16: rounding dominates (a weight gradient sums 128 rows), so the compiled error is held to eager's
        leaves_e = [t.detach().clone().requires_grad_() for t in leaves]
        out_e = ref(*leaves_e, *extra)
        outs_e = out_e if isinstance(out_e, tuple) else (out_e,)
        grads_e = torch.autograd.grad(outs_e, leaves_e, seeds)
        for a, e, b in zip(outs + grads, outs_e + grads_e, outs64 + grads64):
            err, err_eager = (a.double() - b).abs().max().item(), (e.double() - b).abs().max().item()
            assert err <= 2 * err_eager + 1e-3 * b.abs().max().item(), (ref.__name__, err, err_eager)
    assert set(compiled._compiled) == NAMES
    compiled.reset()


def test_train_loop_config_turns_the_compiled_path_on(on_cpu, tmp_path):
    """``run.compile_elementwise: true`` in a training run: the functions go the compiled way and the run's losses
    are the eager run's."""
    from colm.train.loop import train
    from train_helpers import make_config, pydoc_data

    data = pydoc_data(tmp_path / "data")
    compiled.reset()
    eager = train(make_config(data, tmp_path / "eager", steps=3, run={"compile_elementwise": False}))
    assert not compiled._compiled
    default = make_config(data, tmp_path / "fused", steps=3)
    assert default.run.compile_elementwise  # on unless turned off
    fused = train(default)
    assert set(compiled._compiled) == NAMES
    assert len(fused["history"]) == 3
    for a, b in zip(fused["history"], eager["history"]):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (fused["history"], eager["history"])
