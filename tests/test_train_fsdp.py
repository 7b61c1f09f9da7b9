"""Two gloo processes with FSDP2 follow the one-process loss trajectory on the same data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train_helpers import make_config, pydoc_data

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_json: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from colm.train.config import TrainConfig
    from colm.train.loop import train

    summary = train(TrainConfig.from_dict(json.loads(cfg_json)))
    if rank == 0:
        Path(out).write_text(json.dumps(summary))
    from colm.train.distributed import leave

    leave(0)  # as ``colm train`` ends a gloo process (its docstring says why)
    raise AssertionError("a gloo process goes on after leave()")


@pytest.mark.timeout(240)
def test_fsdp2_two_process_matches_one_process(tmp_path):
    data = pydoc_data(tmp_path / "data")
    steps = 4
    single = make_config(data, tmp_path / "one", steps=steps, micro_batch=4, loss={"kind": "multi_chain"})
    double = make_config(data, tmp_path / "two", steps=steps, micro_batch=2, loss={"kind": "multi_chain"})
    from colm.train.loop import train

    ref = train(single)
    out = tmp_path / "two.json"
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, json.dumps(double.to_dict()), str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(200)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = json.loads(out.read_text())
    assert got["world_size"] == 2 and got["tokens_per_step"] == ref["tokens_per_step"]
    assert len(got["history"]) == steps
    for a, b in zip(got["history"], ref["history"]):
        assert abs(a - b) <= 2e-5 * max(1.0, abs(b)), (got["history"], ref["history"])
    assert ref["history"][-1] < ref["history"][0]  # it trained
    # the gathered FSDP2 weights equal the single-process weights
    from safetensors.torch import load_file

    w1, w2 = load_file(str(tmp_path / "one/model/model.safetensors")), load_file(str(tmp_path / "two/model/model.safetensors"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)


def test_python_m_colm_train_cli_help():
    r = subprocess.run([sys.executable, "-m", "colm.train", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0 and "--config" in r.stdout


@pytest.mark.timeout(240)
def test_fsdp2_chain_tuning_keeps_chain1_bit_identical(tmp_path):
    """Frozen slices of sharded (DTensor) embedding/norm/head tensors stay exact under FSDP2."""
    from safetensors.torch import load_file

    from colm import checkpoint
    from colm.model import CoLM
    from colm.presets import preset

    data = pydoc_data(tmp_path / "data")
    base = tmp_path / "base"
    checkpoint.save(CoLM(preset("tiny-air")).reset_parameters(std=0.1, seed=7), base)
    cfg = make_config(data, tmp_path / "two", steps=3, micro_batch=2, model={"preset": None, "checkpoint": str(base)},
                      tuning={"mode": "chain_tune", "freeze_chains": 1}, optim={"lr": 1e-2})
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, json.dumps(cfg.to_dict()), str(tmp_path / "s.json")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(200)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    before, after = load_file(str(base / "model.safetensors")), load_file(str(tmp_path / "two/model/model.safetensors"))
    d1 = preset("tiny-air").chain_dims[0]
    for name, w in before.items():
        if ".weights.0" in name:
            assert torch.equal(after[name], w), name
        elif name in ("embed.weight", "head.weight"):
            assert torch.equal(after[name][:, :d1], w[:, :d1]) and not torch.equal(after[name], w), name
        elif name.endswith("norm.weight"):
            assert torch.equal(after[name][:d1], w[:d1]) and not torch.equal(after[name], w), name
        else:
            assert not torch.equal(after[name], w), name
