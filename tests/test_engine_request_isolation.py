"""One request's failure inside the decode engine ends that request only, never its batch or the engine."""

from __future__ import annotations

import pytest

from colm.errors import RequestFailedError
from colm.generate import generate
from colm.prefill_worker.sinks import LocalKVSink
from colm.sampling import SamplingParams
from _engine_helpers import prompts, started_engines


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    with started_engines(tmp_path_factory.mktemp("tiny_air"), num_blocks=96) as engines:
        yield engines


def _poisoned(n: int) -> SamplingParams:
    """Sampling parameters that got past validation but break sampling (a NaN temperature makes every
    probability NaN): what a bug or a missed check anywhere upstream would hand the engine."""
    params = SamplingParams(max_new_tokens=n, temperature=1.0, seed=3, ignore_eos=True)
    object.__setattr__(params, "temperature", float("nan"))
    return params


def test_a_poisoned_request_fails_alone_and_its_batch_mates_match_the_reference(engines):
    de, pe, full = engines
    good = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batch = prompts([9, 14, 5], seed=4)
    streams = []
    for i, p in enumerate(batch):
        rid = f"iso-{i}"
        params = _poisoned(12) if i == 1 else good
        de.reserve(rid, len(p), 12)
        pe.submit(rid, p, LocalKVSink(de, rid))
        streams.append((p, params, de.start_generation(rid, p[-1], params, scale=1 + i % 2)))
    errors_before = de._num_step_errors
    for i, (p, params, st) in enumerate(streams):
        if i == 1:
            with pytest.raises(RequestFailedError, match="iso-1.*goes on serving"):
                list(st)
            continue
        got = [e.token_id for e in st]
        assert got == generate(full, p, good, scale=1 + i % 2).token_ids
    assert de._num_step_errors == errors_before + 1  # only the poisoned row failed
    # the engine serves on, and the poisoned request's blocks came back
    q = prompts([7], seed=5)[0]
    de.reserve("after", len(q), 6)
    pe.submit("after", q, LocalKVSink(de, "after"))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert [e.token_id for e in de.start_generation("after", q[-1], params, scale=2)] == \
        generate(full, q, params, scale=2).token_ids
    assert de.alive() and de.pool.num_free == de.pool.num_blocks
