"""Sampled rows in overlapped steps: a batch of greedy and plainly sampled requests (temperature, top-k, top-p,
min-p; seeded) is queued a step ahead like a greedy one, each sampled row drawn where the logits are. Tokens equal
``colm generate`` for every request, across staggered arrivals, mixed scales, a scale switch and stop strings
(which drop a queued step: its draws are given back and redone); a row whose distribution cannot be drawn fails
its request alone, and the rows beside it draw what they would have."""

from __future__ import annotations

import time

import pytest
import torch

import colm.decode_worker.runner as runner_module
import colm.decode_worker.step as step_module
import colm.sampling as sampling_module
from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.errors import RequestFailedError
from colm.generate import generate
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.sinks import LocalKVSink
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer
from _engine_helpers import middle_stop, prompts, save_tiny_air


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air")
    full = save_tiny_air(path)
    return path, full


def _engines(path):
    de = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=200, block_size=4, mixed_scale_mode="widest",
                                                         overlap_steps=True))
    de.detokenize = ByteTokenizer().decode  # the tiny checkpoint's ids are bytes
    pe = PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=16, max_batch_tokens=64))
    return de.start(), pe.start()


def _start(de, pe, rid, prompt, params, scale):
    de.reserve(rid, len(prompt), params.max_new_tokens)
    pe.submit(rid, prompt, LocalKVSink(de, rid))
    return de.start_generation(rid, prompt[-1], params, scale=scale)


PARAMS = [  # (sampling, scale)
    (dict(temperature=0.9, seed=1), 2),
    (dict(temperature=0.7, top_k=20, seed=2), 1),
    (dict(temperature=1.1, top_p=0.8, seed=3), 2),
    (dict(temperature=0.0), 1),  # greedy among sampled rows
    (dict(temperature=0.8, min_p=0.05, top_p=0.95, seed=4), 2),
    (dict(temperature=1.3, top_k=50, top_p=0.9, seed=5), 1),
]


def test_sampled_batches_are_queued_ahead_and_match_the_reference(setup, monkeypatch):
    path, full = setup
    sampled_ahead = []
    launch = runner_module.launch_step

    def counted(model, batch, pool, scales, graphs=None, after=None, carry=None, sample=False):
        if after is not None and sample and any(not r.params.greedy for r in batch):
            sampled_ahead.append(len(batch))
        return launch(model, batch, pool, scales, graphs, after=after, carry=carry, sample=sample)

    monkeypatch.setattr(runner_module, "launch_step", counted)
    de, pe = _engines(path)
    try:
        batch = prompts([5, 14, 9, 27, 11, 6, 18], seed=31)
        streams = []
        for i, (kw, scale) in enumerate(PARAMS):
            params = SamplingParams(max_new_tokens=14 + 2 * i, ignore_eos=True, **kw)
            streams.append((batch[i], params, scale, _start(de, pe, f"s{i}", batch[i], params, scale)))
            time.sleep(0.003 * i)
        # one more whose stop string ends it mid-batch (its row leaves: the step queued with it is dropped)
        ref = generate(full, batch[6], SamplingParams(max_new_tokens=20, temperature=0.9, seed=9, ignore_eos=True),
                       scale=2)
        stop = middle_stop(ByteTokenizer().decode(ref.token_ids))
        params = SamplingParams(max_new_tokens=20, temperature=0.9, seed=9, ignore_eos=True, stop_strings=(stop,))
        streams.append((batch[6], params, 2, _start(de, pe, "stop", batch[6], params, 2)))
        for prompt, params, scale, st in streams:
            got = [e.token_id for e in st]
            assert got == generate(full, prompt, params, scale=scale, decode=ByteTokenizer().decode).token_ids, params
        assert len(got) < 20  # the stop string ended it
        stats = de.stats()
        assert stats.num_steps_launched_ahead > 10 and stats.num_steps_dropped > 0
        assert sampled_ahead  # steps with sampled rows were queued before the one before them was read
    finally:
        pe.stop(), de.stop()
    assert de.pool.num_free == de.pool.num_blocks


def test_a_scale_switch_of_a_sampled_request_in_overlapped_steps(setup):
    path, full = setup
    de, pe = _engines(path)
    try:
        p = prompts([13], seed=4)[0]
        params = SamplingParams(max_new_tokens=18, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)
        other = SamplingParams(max_new_tokens=30, temperature=0.7, seed=12, ignore_eos=True)
        q = prompts([7], seed=5)[0]
        beside = _start(de, pe, "beside", q, other, 2)  # keeps the batch going (and queued ahead) around the switch
        events = []
        for ev in _start(de, pe, "sw", p, params, 1):
            events.append(ev)
            if ev.index == 5:
                de.set_scale("sw", 2)
        used = [e.scale for e in events]
        assert used[0] == 1 and used[-1] == 2
        assert [e.token_id for e in events] == generate(full, p, params, scale_schedule=lambda i: used[i]).token_ids
        assert [e.token_id for e in beside] == generate(full, q, other, scale=2).token_ids
        assert de.stats().num_steps_launched_ahead > 0
    finally:
        pe.stop(), de.stop()


def test_a_row_that_cannot_be_drawn_fails_alone(setup, monkeypatch):
    """Rows sampled at temperature 0.77 get a NaN distribution (on the queued path and the host path alike): that
    request fails; the others, whose step failed with it and was redone row by row, equal the reference."""
    path, full = setup
    batch = prompts([6, 10, 8], seed=17)
    kws = [dict(temperature=0.9, top_p=0.9, seed=21), dict(temperature=0.77, seed=22), dict(temperature=1.2, seed=23)]
    all_params = [SamplingParams(max_new_tokens=16, ignore_eos=True, **kw) for kw in kws]
    want = {i: generate(full, batch[i], all_params[i], scale=2).token_ids for i in (0, 2)}
    real = sampling_module.filtered_rows

    def poisoned(logits, params):
        probs = real(logits, params)
        bad = torch.tensor([p.temperature == 0.77 for p in params], device=probs.device)[:, None]
        return torch.where(bad, float("nan"), probs)

    monkeypatch.setattr(sampling_module, "filtered_rows", poisoned)
    monkeypatch.setattr(step_module, "filtered_rows", poisoned)
    de, pe = _engines(path)
    try:
        streams = [_start(de, pe, f"n{i}", batch[i], all_params[i], 2) for i in range(3)]
        with pytest.raises(RequestFailedError, match="decode step failed"):
            list(streams[1])
        for i in (0, 2):
            assert [e.token_id for e in streams[i]] == want[i]
    finally:
        pe.stop(), de.stop()
    assert de.pool.num_free == de.pool.num_blocks
