"""Training building blocks: token files, packing and rank sharding, losses, schedule, config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from colm.model import CoLM
from colm.presets import preset
from colm.tokenizer import ByteTokenizer
from colm.train.config import TrainConfig
from colm.train.data import PackedLoader, TokenFile, prepare_token_files
from colm.train.losses import chain_losses
from colm.train.step import lr_at


def test_prepare_data_roundtrip_and_doc_split(tmp_path):
    src = tmp_path / "texts"
    src.mkdir()
    docs = {f"d{i}.txt": f"document {i} " * (i + 1) for i in range(10)}
    for name, text in docs.items():
        (src / name).write_text(text)
    (src / "skip.bin").write_bytes(b"\x00\x01")  # not a text suffix: ignored
    summary = prepare_token_files([str(src)], tmp_path / "out", ByteTokenizer(), val_fraction=0.2, seed=3)
    assert summary["train"]["num_docs"] == 8 and summary["val"]["num_docs"] == 2
    tok = ByteTokenizer()
    all_tokens = []
    for split in ("train", "val"):
        f = TokenFile(tmp_path / "out" / f"{split}.bin")
        assert f.tokens.dtype == np.uint16 and f.meta["tokenizer"] == {"kind": "byte"}
        ids = f.tokens.tolist()
        assert ids[-1] == tok.eos_id
        pieces = [bytes(p).decode() for p in _split(ids, tok.eos_id)]
        all_tokens += pieces
    assert sorted(all_tokens) == sorted(docs.values())  # every document exactly once, intact


def _split(ids, sep):
    out, cur = [], []
    for t in ids:
        if t == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def _token_file(tmp_path, n=1000):
    from colm.train.data import write_token_file

    ids = np.arange(n) % 251
    return TokenFile(write_token_file(tmp_path / "t.bin", ids, {"kind": "byte"}, 259, 1))


def test_packed_loader_windows_and_rank_sharding(tmp_path):
    f = _token_file(tmp_path)
    seq = 9
    one = PackedLoader(f, seq, micro_batch=4, grad_accum=2, seed=5)
    two = [PackedLoader(f, seq, micro_batch=2, grad_accum=2, rank=r, world_size=2, seed=5) for r in range(2)]
    seen = []
    for step in range(30):  # several epochs (110 windows, 8 per step)
        for micro in range(2):
            x, y = one.batch(step, micro)
            assert x.shape == (4, seq) and torch.equal(x[:, 1:], y[:, :-1])
            ids = one.window_ids(step, micro)
            for row, w in zip(x, ids):  # each row is the window's tokens from the file
                assert row.tolist() == f.tokens[w * seq: w * seq + seq].astype(np.int64).tolist()
            # two ranks with half the micro-batch read exactly the one-process windows, rank 0 first
            parts = np.concatenate([ld.window_ids(step, micro) for ld in two])
            assert parts.tolist() == ids.tolist()
            seen += ids.tolist()
    usable = one.num_windows - one.num_windows % 4
    first_epoch = seen[:usable]
    assert len(set(first_epoch)) == usable  # an epoch visits each window once


def test_multi_chain_loss_matches_separate_sub_models():
    torch.manual_seed(0)
    model = CoLM(preset("tiny-air-3chain")).reset_parameters(std=0.2, seed=1)
    x = torch.randint(0, 259, (2, 12))
    y = torch.randint(0, 259, (2, 12))
    weights = (0.5, 1.0, 2.0)
    loss, per = chain_losses(model, x, y, "multi_chain", weights)
    # independent reference: run each scale-k sub-model on its own
    ref = [torch.nn.functional.cross_entropy(model(x, scale=k).flatten(0, 1), y.flatten()) for k in (1, 2, 3)]
    for k in (1, 2, 3):
        torch.testing.assert_close(per[k], ref[k - 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, sum(w * r for w, r in zip(weights, ref)), rtol=1e-5, atol=1e-5)
    final, per_final = chain_losses(model, x, y, "final")
    torch.testing.assert_close(final, ref[2], rtol=1e-5, atol=1e-5)
    assert set(per_final) == {1, 2, 3}
    # gradients: final-scale loss gives the head's chain-3 columns gradient; multi-chain gives all
    model.zero_grad()
    final.backward()
    assert model.head.weight.grad[:, :64].abs().sum() > 0  # chains 1-2 still feed the full scale
    with pytest.raises(ValueError, match="loss.weights has 2 entries"):
        chain_losses(model, x, y, "multi_chain", (1.0, 1.0))


def test_lr_schedule():
    assert lr_at(0, 1.0, 4, 20, "cosine", 0.1) == pytest.approx(0.25)
    assert lr_at(3, 1.0, 4, 20, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_at(4, 1.0, 4, 20, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_at(12, 1.0, 4, 20, "cosine", 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20, 1.0, 4, 20, "linear", 0.0) == pytest.approx(0.0)
    assert lr_at(12, 1.0, 4, 20, "linear", 0.0) == pytest.approx(0.5)
    assert lr_at(15, 2.0, 4, 20, "constant", 0.1) == 2.0


def test_config_validation_names_field():
    base = {"model": {"preset": "tiny"}, "data": {"train": "x.bin"}}
    TrainConfig.from_dict(base)
    with pytest.raises(ValueError, match="optim.schedule='warp'"):
        TrainConfig.from_dict({**base, "optim": {"schedule": "warp"}})
    with pytest.raises(ValueError, match="unknown fields \\['stepz'\\]"):
        TrainConfig.from_dict({**base, "optim": {"stepz": 3}})
    with pytest.raises(ValueError, match="exactly one of preset"):
        TrainConfig.from_dict({**base, "model": {"preset": "tiny", "checkpoint": "d"}})
    with pytest.raises(ValueError, match="mode 'heads'"):
        TrainConfig.from_dict({**base, "tuning": {"mode": "heads"}})
    with pytest.raises(ValueError, match="tuning.freeze_chains=0"):
        TrainConfig.from_dict({**base, "tuning": {"mode": "chain_tune"}})
    with pytest.raises(ValueError, match="data.micro_batch=0"):
        TrainConfig.from_dict({**base, "data": {"train": "x.bin", "micro_batch": 0}})


@pytest.mark.parametrize("kw", [dict(seq_len=0), dict(micro_batch=0), dict(micro_batch=-1), dict(grad_accum=0),
                                dict(seq_len=8.5)])
def test_packed_loader_refuses_sizes_below_one(tmp_path, kw):
    """As called from Python (perplexity_per_scale, a script): not a ZeroDivisionError or a misleading count."""
    args = {"seq_len": 9, "micro_batch": 2, **kw}
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"{name}={kw[name]!r}: must be an integer >= 1"):
        PackedLoader(_token_file(tmp_path), **args)
