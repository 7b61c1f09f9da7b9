"""The decode engine under pressure: rows that fail beside healthy ones, a small pool, shared prefixes, aborts.

Each test pins a behaviour an adversarial run broke or nearly broke: one request's failure never changes another
request's tokens (greedy tokens equal ``colm.generate``), and every block is free again once all requests ended.
"""

from __future__ import annotations

import pytest

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.errors import NoTokenAllowedError
from colm.generate import generate
from colm.sampling import SamplingParams
from _engine_helpers import assert_pool_free, prompts, save_tiny_air


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_pressure")
    full = save_tiny_air(path)
    return path, full


def _engine(path, **config) -> DecodeEngine:
    cfg = {"num_blocks": 64, "block_size": 4, "colocated_prefill": True, "max_batched_tokens": 256, **config}
    return DecodeEngine.from_checkpoint(path, DecodeConfig(**cfg))


@pytest.mark.parametrize("bad_row", [0, 1])
def test_a_row_that_allows_no_token_leaves_its_neighbours_tokens_alone(setup, bad_row):
    """A row whose constraints allow no token (only EOS allowed while min_tokens holds it back) fails its batch's
    step; the rows are then run one by one. The failing row must keep its place in the results: the rows after it
    get their own tokens, not their neighbour's."""
    path, full = setup
    de = _engine(path)
    eos = de.eos_id
    assert eos is not None
    good = [SamplingParams(max_new_tokens=6, ignore_eos=True),
            SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=1.0, seed=5)]
    bad = SamplingParams(max_new_tokens=6, allowed_token_ids=(eos,), min_tokens=3)
    rows = list(good)
    rows.insert(bad_row, bad)
    streams = []
    for i, (p, params) in enumerate(zip(prompts([9, 10, 11], seed=7), rows)):
        de.reserve(f"r{i}", len(p), params.max_new_tokens)
        de.prefill_kv(f"r{i}", p[:-1])
        streams.append((p, params, de.start_generation(f"r{i}", p[-1], params, scale=2)))
    de.start()  # started after all three: their first decode step is one batch
    try:
        for p, params, st in streams:
            if params is bad:
                with pytest.raises(NoTokenAllowedError, match="no token is allowed"):
                    list(st)
                continue
            assert [e.token_id for e in st] == generate(full, p, params, scale=2).token_ids
        assert_pool_free(de)
    finally:
        de.stop()


def test_prefill_kv_with_a_bad_cache_salt_frees_its_reservation(setup):
    """``prefill_kv`` refusing its ``cache_salt`` (too long, not a string) fails the request like any other refused
    prompt: its blocks go back at once, not when the reservation's deadline passes."""
    path, _ = setup
    de = _engine(path, num_blocks=20).start()
    try:
        p = prompts([30], seed=1)[0]
        for salt in ("x" * 300, 123):
            de.reserve("a", len(p), 4)
            with pytest.raises(ValueError, match="cache_salt"):
                de.prefill_kv("a", p[:-1], cache_salt=salt)
            assert "a" not in de._requests and de.pool.num_free == de.pool.num_blocks
        de.reserve("a", len(p), 4)  # the id is free again; a good salt runs
        de.prefill_kv("a", p[:-1], cache_salt="tenant")
        assert len(list(de.start_generation("a", p[-1], SamplingParams(max_new_tokens=4, ignore_eos=True)))) == 4
        assert_pool_free(de)
    finally:
        de.stop()
