"""Guards around a training run: field kinds, resuming a state past or at ``optim.steps``, a state of another
model, two runs on one ``run.out_dir``, and LoRA on a freshly expanded chain (zero head columns)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from colm import checkpoint
from colm.expand import expand
from colm.model import CoLM
from colm.presets import preset
from colm.train.config import TrainConfig
from colm.train.data import PackedLoader, TokenFile
from colm.train.loop import train
from colm.train.losses import cross_entropy
from tests.train_helpers import make_config, pydoc_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return pydoc_data(tmp_path_factory.mktemp("pydoc"))


def _rows(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _files(directory):
    """Every file of a run directory but its lock, with size and modification time (what a rewrite changes)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "train.lock"}


@pytest.mark.parametrize("section, name, value, allowed", [
    ("optim", "steps", 3.5, "must be an integer"),
    ("data", "seq_len", 64.5, "must be an integer"),
    ("optim", "steps", True, "must be an integer"),
    ("run", "eval_batches", 2.0, "must be an integer"),
    ("run", "resume", "no", "must be true or false"),
    ("run", "progress", 1, "must be true or false"),
    ("optim", "lr", "3e-4", "must be a number"),
])
def test_fields_refuse_values_of_another_kind(section, name, value, allowed):
    base = {"model": {"preset": "tiny"}, "data": {"train": "x.bin"}}
    with pytest.raises(ValueError, match=rf"^{section}\.{name}={value!r}: {allowed}"):
        TrainConfig.from_dict({**base, section: {**base.get(section, {}), name: value}})
    TrainConfig.from_dict({**base, "run": {"max_seconds": 10}, "optim": {"lr": 1}})  # an integer is a number


def test_resume_refuses_a_state_of_another_model(data, tmp_path):
    out = tmp_path / "run"
    train(make_config(data, out, steps=2))
    saved_config = (out / "train_config.json").read_text()
    with pytest.raises(ValueError, match="does not match this model") as e:
        train(make_config(data, out, steps=4, model={"preset": "tiny-air-3chain"}))
    assert str(out) in str(e.value) and "fresh run.out_dir" in str(e.value) and "run.resume=false" in str(e.value)
    with pytest.raises(ValueError, match="does not match this model"):  # same shapes, another trainable set
        train(make_config(data, out, steps=4, tuning={"mode": "chain_tune", "freeze_chains": 1, "lora_rank": 2}))
    assert (out / "train_config.json").read_text() == saved_config  # a refused run leaves the directory as it was
    fresh = train(make_config(data, out, steps=3, model={"preset": "tiny-air-3chain"}, run={"resume": False}))
    assert fresh["complete"] and fresh["resumed_from"] == 0
    tuned = tmp_path / "tuned"
    train(make_config(data, tuned, steps=2, tuning={"mode": "chain_tune", "freeze_chains": 1}))
    with pytest.raises(ValueError, match="does not match this model.*optim.state"):  # no optimizer state for chain 1
        train(make_config(data, tuned, steps=4))


def test_resume_refuses_a_state_past_optim_steps(data, tmp_path):
    out = tmp_path / "run"
    train(make_config(data, out, steps=4, run={"save_every": 2}))
    before = _files(out)
    with pytest.raises(ValueError, match=r"saved state is at step 4, past optim.steps=2; set optim.steps >= 4") as e:
        train(make_config(data, out, steps=2, run={"save_every": 2}))
    assert "fresh run.out_dir" in str(e.value) and "run.resume=false" in str(e.value)
    assert _files(out) == before  # nothing relabelled, re-saved or logged
    assert (out / "state" / "latest").read_text() == "4"


def test_rerun_of_a_complete_run_changes_nothing(data, tmp_path, capsys):
    out = tmp_path / "run"
    first = train(make_config(data, out, steps=3))
    capsys.readouterr()
    before = _files(out)
    again = train(make_config(data, out, steps=3))
    printed = capsys.readouterr().out
    assert "already complete at optim.steps=3" in printed and "None" not in printed
    assert _files(out) == before  # no new log rows, no state re-save, no re-export
    assert again["complete"] and again["steps"] == 3 and again["history"] == []
    assert again["val_scale_loss"] == first["val_scale_loss"]


def test_a_run_stopped_after_its_last_save_finishes_without_training(data, tmp_path, capsys):
    """The final state was saved but the run died before its export and summary: the rerun exports it, evaluating
    once more without logging a second final evaluation or training a step."""
    import shutil

    out = tmp_path / "run"
    train(make_config(data, out, steps=3))
    weights = load_file(str(out / "model" / "model.safetensors"))
    rows = _rows(out)
    shutil.rmtree(out / "model")
    (out / "summary.json").unlink()
    capsys.readouterr()
    again = train(make_config(data, out, steps=3))
    assert "tok/s" not in capsys.readouterr().out  # no steps, no speed (was "None tok/s")
    assert again["complete"] and again["resumed_from"] == 3 and again["history"] == []
    assert _rows(out) == rows  # the same train rows and one final evaluation
    rerun = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(weights[n], rerun[n]) for n in weights)


_HOLDER = r"""
import json, sys, time
from pathlib import Path
import colm.train.loop as loop
from colm.train.config import TrainConfig

def stuck_step(*args, **kwargs):  # a run busy in its first step, until killed
    Path(sys.argv[2]).touch()
    while True:
        time.sleep(1)

loop.train_step = stuck_step
loop.train(TrainConfig.from_dict(json.loads(sys.argv[1])))
"""


@pytest.mark.timeout(180)
def test_second_run_on_one_out_dir_is_refused_and_a_killed_run_leaves_no_lock(data, tmp_path):
    out = tmp_path / "run"
    cfg = make_config(data, out, steps=2)
    started = tmp_path / "holder_started"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, json.dumps(cfg.to_dict()), str(started)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        with pytest.raises(ValueError, match=rf"run.out_dir={out}: another training run \(pid {holder.pid}\)"):
            train(cfg)
    finally:
        holder.kill()  # as a crash would: no clean-up runs in the first process
        holder.wait(30)
    summary = train(cfg)  # the kernel released the dead process's lock
    assert summary["complete"] and [r["step"] for r in _rows(out) if r["kind"] == "train"] == [0, 1]


def _val_ce(model_dir, val_file, scale):
    model = checkpoint.load(model_dir).eval()
    loader = PackedLoader(TokenFile(val_file), 32, 8, 1, seed=0)
    with torch.no_grad():
        return sum(float(cross_entropy(model(x, scale=scale), y)) for x, y in loader.sequential_batches(2)) / 2


@pytest.mark.parametrize("tuning", [{"mode": "expand"}, {"mode": "chain_tune", "freeze_chains": 1}])
def test_lora_trains_a_freshly_expanded_chain(data, tmp_path, tuning):
    """After ``colm expand`` the new chain's head columns are zero; LoRA on that chain must still train it (the
    head's new-chain columns train beside the adapters) while scale 1 stays the original model exactly."""
    small = CoLM(preset("tiny-1chain")).reset_parameters(std=0.1, seed=3).eval()
    checkpoint.save(expand(small, 2, kv_sharing=True), tmp_path / "expanded")
    cfg = make_config(data, tmp_path / "run", steps=8, model={"preset": None, "checkpoint": str(tmp_path / "expanded")},
                      tuning={**tuning, "lora_rank": 4}, optim={"lr": 1e-2}, loss={"kind": "final"})
    train(cfg)
    assert all(r["grad_norm"] > 0 for r in _rows(tmp_path / "run") if r["kind"] == "train")
    before, after = load_file(str(tmp_path / "expanded" / "model.safetensors")), \
        load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    d1 = small.cfg.dim
    assert not before["head.weight"][:, d1:].any() and after["head.weight"][:, d1:].any()
    assert torch.equal(before["head.weight"][:, :d1], after["head.weight"][:, :d1])
    changed = [n for n in before if ".weights.1" in n and not torch.equal(before[n], after[n])]
    assert changed  # the adapters' deltas reached the new chain's weights
    assert all(torch.equal(before[n], after[n]) for n in before if ".weights.0" in n)
    val = data["val"]
    assert _val_ce(tmp_path / "run" / "model", val, 2) < _val_ce(tmp_path / "expanded", val, 2) - 0.05
    tuned = checkpoint.load(tmp_path / "run" / "model").eval()
    tokens = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(tuned(tokens, scale=1), small(tokens))  # the original model lives on as scale 1
        assert not torch.equal(tuned(tokens, scale=2), tuned(tokens, scale=1))  # the new chain now speaks
