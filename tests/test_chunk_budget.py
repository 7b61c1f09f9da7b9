"""The colocated engine's prompt budget steered toward a TPOT target (``decode_worker.chunk_budget``).

Against a simulated GPU whose iteration costs a fixed decode part plus a per-prompt-token part (with noise), the
budget settles where iterations take the target, on slow and fast "GPUs" alike, recovers after a burst of slow
iterations, and never starves prompts below its floor. In the engine (tiny Air model, CPU), a target no iteration
can meet shrinks the chunks beside running rows to the floor while tokens still equal ``colm.generate``; with no
row running the fixed budget applies."""

from __future__ import annotations

import random
import statistics

import pytest

from colm.decode_worker.chunk_budget import GRAIN, ChunkBudget
from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.generate import generate
from colm.sampling import SamplingParams
from _engine_helpers import assert_pool_free, prompts, save_tiny_air


def _simulate(budget: ChunkBudget, decode_ms: float, ms_per_token: float, iterations: int, seed: int = 0,
              noise_ms: float = 0.3, backlog: bool = True):
    """Run ``iterations`` iterations with an endless prompt queue; returns (times, chunks) per iteration."""
    rng = random.Random(seed)
    times, chunks = [], []
    for _ in range(iterations):
        allowed = budget.tokens(decoding=True)
        chunk = allowed if backlog else min(allowed, 300)
        ms = decode_ms + ms_per_token * chunk + rng.uniform(-noise_ms, noise_ms)
        budget.observe(ms, True, chunk, allowed)
        times.append(ms)
        chunks.append(chunk)
    return times, chunks


@pytest.mark.parametrize("decode_ms,ms_per_token", [(3.0, 0.0015), (1.0, 0.0006), (5.0, 0.004)])
def test_iterations_settle_at_the_target(decode_ms, ms_per_token):
    """Three "GPUs": the iterations' mean over the last 200 lands within 8 % of the 9 ms target (the budget moves
    in 512-token grains, so it dithers around the exact point), and the budget is where that cost model says."""
    target = 9.0
    b = ChunkBudget(max_tokens=16384, target_ms=target, min_tokens=512)
    times, chunks = _simulate(b, decode_ms, ms_per_token, 400)
    settled = statistics.mean(times[-200:])
    assert abs(settled - target) / target < 0.08, settled
    exact = (target - decode_ms) / ms_per_token
    assert abs(statistics.mean(chunks[-200:]) - exact) <= GRAIN, (statistics.mean(chunks[-200:]), exact)
    assert all(c % GRAIN == 0 for c in chunks)  # whole graph sizes: no padded chunk


def test_a_fixed_budget_over_the_target_is_what_it_replaces():
    """Without a target the budget is the fixed one, whatever the iterations take."""
    b = ChunkBudget(max_tokens=4096, target_ms=0.0, min_tokens=512)
    times, chunks = _simulate(b, 3.0, 0.0015, 50)
    assert set(chunks) == {4096} and min(times) > 8.5


def test_recovers_after_a_burst_of_slow_iterations_and_keeps_its_floor():
    """Twenty iterations of 50 ms (a stall beside the chunk) drive the budget to its floor, not below; once the
    iterations are cheap again it climbs back to where the target puts it."""
    b = ChunkBudget(max_tokens=8192, target_ms=9.0, min_tokens=512)
    _simulate(b, 3.0, 0.0015, 200)
    before = b.tokens(decoding=True)
    for _ in range(20):
        allowed = b.tokens(decoding=True)
        b.observe(50.0, True, allowed, allowed)
    assert b.tokens(decoding=True) == 512
    _, chunks = _simulate(b, 3.0, 0.0015, 100, seed=1)
    assert abs(chunks[-1] - before) <= GRAIN


def test_an_unused_allowance_teaches_nothing_upward():
    """Fast iterations whose chunks were smaller than the budget (the queue ran dry) leave the budget where it
    was; a slow one lowers it from what the chunk held, not from the allowance."""
    b = ChunkBudget(max_tokens=8192, target_ms=9.0, min_tokens=256)
    b.observe(12.0, True, 4096, 8192)  # too slow with 4096 tokens: below 4096 now
    low = b.tokens(decoding=True)
    assert low < 4096
    _simulate(b, 1.0, 0.0015, 50, backlog=False)  # 300-token chunks, 1.5 ms: the budget never bound
    assert b.tokens(decoding=True) == low
    assert b.tokens(decoding=False) == 8192  # no rows running: the fixed budget


def test_bad_settings_are_refused_with_their_field():
    with pytest.raises(ValueError, match="tpot_target_ms=-1"):
        DecodeConfig(tpot_target_ms=-1)
    with pytest.raises(ValueError, match="tpot_min_prompt_tokens=0"):
        DecodeConfig(tpot_min_prompt_tokens=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_budget")
    return path, save_tiny_air(path)


def test_engine_shrinks_chunks_beside_running_rows_to_the_floor(tiny):
    """A target of 0.001 ms (no CPU iteration meets it): while nothing runs, a chunk takes the whole fixed budget
    (64 tokens); once rows run, each chunk beside them is at most 0.8x the one before (the bound per iteration) or
    the floor (3 tokens), and the last ones are at the floor. Tokens equal the reference at both scales."""
    path, full = tiny
    de = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=600, block_size=4, colocated_prefill=True,
                                                         max_batched_tokens=64, tpot_target_ms=0.001,
                                                         tpot_min_prompt_tokens=3)).start()
    try:
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        batch = prompts([70, 61, 63, 59, 62, 66, 58, 64, 60, 67], seed=5)
        streams = []
        for i, p in enumerate(batch):
            de.reserve(f"b{i}", len(p), params.max_new_tokens)
            de.prefill_kv(f"b{i}", p[:-1])
            streams.append((p, 1 + i % 2, de.start_generation(f"b{i}", p[-1], params, scale=1 + i % 2)))
        for p, scale, st in streams:
            assert [e.token_id for e in st] == generate(full, p, params, scale=scale).token_ids
        its = list(de.iterations)
        beside_rows = [pre for dec, pre in its if dec and pre]
        alone = [pre for dec, pre in its if not dec and pre]
        assert alone and max(alone) == 64, its  # the first prompt's first chunk, with nothing running yet
        assert len(beside_rows) > 12, its
        for before, after in zip(beside_rows, beside_rows[1:]):
            assert after <= max(3, int(0.8 * before)), its
        assert max(beside_rows[-5:]) <= 3 and beside_rows.count(3) >= 5, its  # the last may be a prompt's rest
        assert de.stats().prefill_budget_tokens == 3
    finally:
        de.stop()
    assert_pool_free(de)
