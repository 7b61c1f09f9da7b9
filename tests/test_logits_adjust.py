"""Penalties, logit bias and min_tokens (``colm.logits_adjust``): the adjustment equals an independent reference
(transformers' repetition-penalty processor, OpenAI's formula in float64 Python), ``colm generate`` applies it at
every step, and every serving path gives ``colm generate``'s tokens: the colocated engine (greedy and seeded rows
with plain greedy rows in one batch, speculative requests stepping plainly, a mid-stream switch), the
disaggregated engines through the router (the prompt travels to the decode side), a retried attempt (its earlier
output counted as output), the HTTP API and the gRPC API; bad values are 400s / INVALID_ARGUMENT naming the
field."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest
import torch

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.generate import generate
from colm.logits_adjust import LogitsAdjuster, make_adjuster
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer
from _engine_helpers import assert_pool_free, mixed_batch_engines, prompts, save_tiny_air

EOS = ByteTokenizer.eos_id
STRONG = dict(repetition_penalty=1.6, frequency_penalty=0.9, presence_penalty=0.7)


def reference_adjust(logits: torch.Tensor, params: SamplingParams, prompt, out, stop_ids) -> torch.Tensor:
    """The adjustments written out independently: float64 Python per token, transformers' processor for the
    repetition penalty."""
    from transformers import RepetitionPenaltyLogitsProcessor

    x = logits.double().clone()
    for t, b in params.logit_bias:
        x[t] += b
    if len(out) < params.min_tokens:
        for t in stop_ids:
            x[t] = float("-inf")
    if params.repetition_penalty != 1:
        ids = torch.tensor([list(prompt) + list(out)])
        x = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, x[None])[0]
    counts = Counter(out)
    for t, c in counts.items():
        x[t] -= params.frequency_penalty * c + params.presence_penalty
    return x


def test_the_adjustment_equals_the_reference_and_grows_with_the_output():
    g = torch.Generator().manual_seed(7)
    vocab = 300
    for trial in range(6):
        prompt = torch.randint(0, vocab, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        out = torch.randint(0, 60, (25,), generator=g).tolist()  # a small range: tokens repeat
        bias = tuple((int(t), float(b)) for t, b in zip(torch.randperm(vocab, generator=g)[:7],
                                                         torch.empty(7).uniform_(-100, 100, generator=g)))
        params = SamplingParams(max_new_tokens=40, repetition_penalty=[1.0, 1.3, 0.7][trial % 3],
                                frequency_penalty=[0.0, 0.4, -1.5][trial % 3],
                                presence_penalty=[1.2, 0.0, 2.0][trial % 3],
                                logit_bias=bias, min_tokens=10 + trial)
        stops = (EOS, 12)
        adj = LogitsAdjuster(params, vocab, prompt, stops)
        for k in range(len(out) + 1):  # one adjuster through the whole output: its counts grow step by step
            logits = torch.randn(vocab, generator=g) * 5
            got = adj(logits, out[:k])
            want = reference_adjust(logits, params, prompt, out[:k], stops)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
            assert bool((got[list(stops)] == float("-inf")).all()) == (k < params.min_tokens)
        # a retried attempt: the earlier output ends its prompt and counts as output (min_tokens is met either way)
        resumed = LogitsAdjuster(params, vocab, prompt + out[:9], stops, prior_output=9)
        logits = torch.randn(vocab, generator=g)
        torch.testing.assert_close(resumed(logits, out[9:]), LogitsAdjuster(params, vocab, prompt, stops)(logits, out))


def test_a_batch_of_different_adjusters_adjusts_each_row_as_alone_and_as_the_reference():
    """``adjust_rows`` over rows of different requests (penalties of every kind, biases, allowed ids, min_tokens,
    nothing but a bias) gives each row bit for bit what its adjuster gives it alone, and the reference's values;
    the batch advances with outputs of different lengths."""
    from colm.logits_adjust import adjust_rows

    g = torch.Generator().manual_seed(11)
    vocab, stops = 300, (EOS, 12)
    kinds = [dict(repetition_penalty=1.4), dict(frequency_penalty=0.6), dict(presence_penalty=-0.8),
             dict(logit_bias=((5, 30.0), (250, -7.5))), dict(min_tokens=6, **STRONG),
             dict(repetition_penalty=0.8, frequency_penalty=-0.3, presence_penalty=0.5, logit_bias=((12, 3.0),)),
             dict(allowed_token_ids=(3, 9, 12, 40, 41), repetition_penalty=1.2, logit_bias=((9, 2.0),))]
    params = [SamplingParams(max_new_tokens=30, **kw) for kw in kinds]
    prompts_ = [torch.randint(0, vocab, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
                for _ in params]
    batch = [LogitsAdjuster(p, vocab, q, stops) for p, q in zip(params, prompts_)]
    alone = [LogitsAdjuster(p, vocab, q, stops) for p, q in zip(params, prompts_)]
    outs = [[] for _ in params]
    for step in range(12):
        logits = torch.randn(len(params), vocab, generator=g) * 5
        got = adjust_rows(logits, batch, outs)
        for i, (p, q, out) in enumerate(zip(params, prompts_, outs)):
            assert torch.equal(got[i], alone[i](logits[i], out)), (step, kinds[i])
            want = reference_adjust(logits[i], p, q, out, stops)
            if p.allowed_token_ids:
                want[[t for t in range(vocab) if t not in p.allowed_token_ids]] = float("-inf")
            torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-4)
        for i, out in enumerate(outs):  # outputs grow unevenly, with repeats
            out.extend(torch.randint(0, 50, (1 + (i + step) % 3,), generator=g).tolist())


def test_a_pending_token_on_the_device_counts_as_the_output_read():
    """A step queued before the previous one was read adjusts with that token known only on the device
    (``pending``): bit for bit what the adjusters give once the token is read, whether it repeats a context
    token, an output token, or is new, for every adjustment at once; rows without one (``has_pending`` False)
    are adjusted from what was read."""
    from colm.logits_adjust import adjust_rows

    g = torch.Generator().manual_seed(5)
    vocab, stops = 120, (EOS, 12)
    kinds = [dict(repetition_penalty=1.4), dict(frequency_penalty=0.6), dict(presence_penalty=-0.8),
             dict(min_tokens=4, **STRONG), dict(logit_bias=((5, 3.0),), frequency_penalty=1.1),
             dict(repetition_penalty=0.8, presence_penalty=0.5)]
    params = [SamplingParams(max_new_tokens=30, **kw) for kw in kinds]
    prompts_ = [torch.randint(0, vocab, (5,), generator=g).tolist() for _ in params]
    queued = [LogitsAdjuster(p, vocab, q, stops) for p, q in zip(params, prompts_)]
    read = [LogitsAdjuster(p, vocab, q, stops) for p, q in zip(params, prompts_)]
    outs = [[] for _ in params]
    for step in range(10):
        nxt = [int(torch.randint(0, 15, (1,), generator=g)) if i % 2 else q[step % 5] for i, q in enumerate(prompts_)]
        has = [(i + step) % 3 != 0 for i in range(len(params))]
        logits = torch.randn(len(params), vocab, generator=g) * 5
        got = adjust_rows(logits, queued, outs, torch.tensor(nxt), has)
        full = [out + [t] if h else out for out, t, h in zip(outs, nxt, has)]
        assert torch.equal(got, adjust_rows(logits, read, full)), step
        for out, t in zip(outs, nxt):
            out.append(t)


def test_min_p_keeps_the_tokens_near_the_most_likely_and_allowed_ids_mask_the_rest():
    """min_p against its definition in float64 (after temperature, before top-k / top-p, as vLLM orders them);
    allowed_token_ids leaves only those finite."""
    from colm.sampling import filtered_probs

    g = torch.Generator().manual_seed(3)
    for min_p in (0.01, 0.2, 0.9, 1.0):
        logits = torch.randn(300, generator=g) * 3
        got = filtered_probs(logits, SamplingParams(temperature=0.7, min_p=min_p))
        p = torch.softmax(logits.double() / 0.7, -1)
        want = torch.where(p >= min_p * p.max(), p, torch.zeros_like(p))
        torch.testing.assert_close(got.double(), want / want.sum(), rtol=1e-4, atol=1e-6)
    adj = make_adjuster(SamplingParams(allowed_token_ids=(7, 3, 250)), 260)
    x = adj(torch.randn(260, generator=g), [])
    assert torch.isfinite(x).nonzero().flatten().tolist() == [3, 7, 250]
    with pytest.raises(ValueError, match="allowed_token_ids: token id 260 is outside the vocabulary"):
        make_adjuster(SamplingParams(allowed_token_ids=(260,)), 260)


def test_nothing_to_adjust_means_no_adjuster_and_the_argmax_stays_on_the_device():
    plain = SamplingParams(max_new_tokens=4)
    assert make_adjuster(plain, 260, [1, 2], EOS) is None and plain.plain_greedy
    for kw in ({"presence_penalty": 0.1}, {"frequency_penalty": -0.1}, {"repetition_penalty": 1.1},
               {"logit_bias": ((3, 1.0),)}, {"min_tokens": 2}, {"allowed_token_ids": (4, 5)}):
        p = SamplingParams(max_new_tokens=4, **kw)
        assert p.adjusts_logits and not p.plain_greedy and make_adjuster(p, 260, [1, 2], EOS) is not None
    # ignore_eos: min_tokens masks the stop tokens only
    adj = make_adjuster(SamplingParams(max_new_tokens=4, min_tokens=2, ignore_eos=True, stop_token_ids=(5,)), 260, [1])
    x = adj(torch.zeros(260), [])
    assert x[5] == float("-inf") and x[EOS] == 0


@pytest.mark.parametrize("kw,field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"frequency_penalty": True}, "frequency_penalty"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": 1e9}, "repetition_penalty"), ({"logit_bias": ((3, 101.0),)}, "logit_bias[3]"),
    ({"logit_bias": ((-1, 1.0),)}, "logit_bias"), ({"logit_bias": ((3, 1.0), (3, 2.0))}, "logit_bias"),
    ({"logit_bias": tuple((i, 1.0) for i in range(1025))}, "logit_bias"), ({"min_tokens": 9}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens")])
def test_bad_values_name_their_field(kw, field):
    with pytest.raises(ValueError, match="^" + re.escape(field)):
        SamplingParams(max_new_tokens=8, **kw)


def test_a_bias_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match=r"logit_bias: token id 300 is outside the vocabulary 0..259"):
        make_adjuster(SamplingParams(logit_bias=((300, 1.0),)), 260)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_adjust")
    return path, save_tiny_air(path)


def test_generate_applies_the_adjustment_at_every_step(setup):
    """``colm generate`` against a loop that runs the whole sequence each step (no cache) and adjusts with the
    reference; the penalties change the output (else this would check nothing)."""
    _, full = setup
    prompt = prompts([9], seed=3)[0]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, **STRONG)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(24):
            logits = full(torch.tensor([prompt + out]), scale=2)[0, -1]
            out.append(int(torch.argmax(reference_adjust(logits, params, prompt, out, ()))))
    got = generate(full, prompt, params, scale=2).token_ids
    assert got == out
    assert got != generate(full, prompt, SamplingParams(max_new_tokens=24, ignore_eos=True), scale=2).token_ids


def test_min_tokens_holds_back_eos_and_stop_strings(setup):
    _, full = setup
    prompt = prompts([5], seed=4)[0]
    eager = SamplingParams(max_new_tokens=20, logit_bias=((EOS, 100.0),))  # EOS at once, whatever the model says
    assert generate(full, prompt, eager, eos_id=EOS).token_ids == [EOS]
    held = SamplingParams(max_new_tokens=20, logit_bias=((EOS, 100.0),), min_tokens=6)
    r = generate(full, prompt, held, eos_id=EOS)
    assert len(r.token_ids) == 7 and r.token_ids[-1] == EOS and EOS not in r.token_ids[:6] and r.finish_reason == "stop"
    # a stop string the output completes before min_tokens does not end it
    tok = ByteTokenizer()
    first = generate(full, prompt, SamplingParams(max_new_tokens=3), eos_id=EOS).token_ids
    stop = tok.decode(first[:1])
    ended = generate(full, prompt, SamplingParams(max_new_tokens=3, stop_strings=(stop,)), eos_id=EOS,
                     decode=tok.decode)
    kept = generate(full, prompt, SamplingParams(max_new_tokens=3, stop_strings=(stop,), min_tokens=3), eos_id=EOS,
                    decode=tok.decode)
    assert len(ended.token_ids) == 1 and kept.token_ids == first


# ---------------------------------------------------------------------------------------------------- engines
def _requests():
    """(prompt, params, scale, speculative) of a mixed batch: plain greedy rows beside adjusted greedy and seeded
    rows, both scales, a speculative request with penalties (steps plainly)."""
    ps = prompts([3, 17, 30, 8, 41, 12, 1], seed=11)
    return [
        (ps[0], SamplingParams(max_new_tokens=14, ignore_eos=True), 2, 0),
        (ps[1], SamplingParams(max_new_tokens=14, ignore_eos=True, **STRONG), 2, 0),
        (ps[2], SamplingParams(max_new_tokens=14, ignore_eos=True, repetition_penalty=1.4), 1, 0),
        (ps[3], SamplingParams(max_new_tokens=14, temperature=0.9, seed=5, frequency_penalty=1.0,
                               logit_bias=((ps[3][0], 4.0), (7, -50.0))), 2, 0),
        (ps[4], SamplingParams(max_new_tokens=14, ignore_eos=True, presence_penalty=1.5), 2, 3),
        (ps[5], SamplingParams(max_new_tokens=14, logit_bias=((EOS, 100.0),), min_tokens=5), 1, 0),
        (ps[6], SamplingParams(max_new_tokens=14, ignore_eos=True, **STRONG), 2, 0),
        (ps[0], SamplingParams(max_new_tokens=14, ignore_eos=True, allowed_token_ids=tuple(range(97, 123))), 2, 0),
        (ps[1], SamplingParams(max_new_tokens=14, temperature=1.5, seed=9, min_p=0.3), 1, 0),
    ]


def _want(full, reqs):
    return [generate(full, p, params, scale=s, eos_id=EOS).token_ids for p, params, s, _ in reqs]


@pytest.mark.parametrize("colocated", [True, False])
def test_the_decode_engine_gives_the_reference_tokens(setup, colocated):
    """One batch of adjusted and plain rows on a colocated engine (its own prompt) and on a decode engine fed by a
    prefill engine (the prompt given with the start), overlapped steps on: every row equals ``colm generate``;
    the penalties change some output and the speculative request drafted nothing."""
    path, full = setup
    reqs = _requests()
    with mixed_batch_engines(path, colocated) as (de, start):
        streams = []
        for i, (p, params, scale, spec) in enumerate(reqs):
            streams.append(start(f"adj-{colocated}-{i}", p, params, scale, spec))
            time.sleep(0.003 * (i % 3))
        got = [[e.token_id for e in st] for st in streams]
        assert got == _want(full, reqs)
        plain = [generate(full, p, SamplingParams(max_new_tokens=14, ignore_eos=True), scale=s).token_ids
                 for p, _, s, _ in reqs[1:3]]
        assert got[1:3] != plain
        assert got[5][-1] == EOS and len(got[5]) == 6
        assert all(97 <= t < 123 for t in got[7])  # allowed_token_ids: lowercase letters only
        assert de.stats().num_drafted == 0


@pytest.mark.parametrize("colocated", [True, False])
def test_constraints_that_allow_no_token_fail_their_request_alone(setup, colocated):
    """allowed_token_ids holding only EOS while min_tokens holds EOS back leaves no token: the request fails with
    NoTokenAllowedError (INVALID_ARGUMENT at the boundary), greedy (whose argmax would name a refused token) and
    sampled (whose draw would fail as a NaN row's) alike, at once; the requests beside it keep the reference tokens."""
    from colm.errors import NoTokenAllowedError

    path, full = setup
    reqs = _requests()[:4]
    dead = [SamplingParams(max_new_tokens=8, allowed_token_ids=(EOS,), min_tokens=3),
            SamplingParams(max_new_tokens=8, temperature=1.0, seed=3, allowed_token_ids=(EOS,), min_tokens=3)]
    with mixed_batch_engines(path, colocated) as (de, start):
        streams = [start(f"ok-{colocated}-{i}", p, params, scale, spec) for i, (p, params, scale, spec) in enumerate(reqs)]
        bad = [start(f"none-{colocated}-{i}", prompts([6], seed=30 + i)[0], params, 2) for i, params in enumerate(dead)]
        for st in bad:
            with pytest.raises(NoTokenAllowedError, match="no token is allowed at this output position"):
                list(st)
        assert [[e.token_id for e in st] for st in streams] == _want(full, reqs)


def test_adjusted_rows_are_queued_ahead_and_grammar_rows_are_not(setup, monkeypatch):
    """Driven step by step with overlapped steps: penalised, biased and min_tokens rows (greedy and sampled) join
    the steps queued ahead, adjusted on the device with the token of the step before counted before it is read;
    requests arriving meanwhile (their prompts completed by the chunk of that iteration) join too; a request held
    to a grammar keeps its batch off the queued path (its matcher needs each token on the host). Every row equals
    ``colm generate`` and no queued step is thrown away."""
    import colm.decode_worker.runner as runner_module
    from colm.structured import StructuredOutput

    path, full = setup
    ahead_adjusted, grammar_ahead = [], []
    launch = runner_module.launch_step

    def counted(model, batch, pool, scales, graphs=None, after=None, carry=None, sample=False):
        if after is not None:
            if any(r.adjust is not None for r in batch[: len(carry)]):
                ahead_adjusted.append(len(batch))
            if any(r.adjust is not None and r.adjust.matcher is not None for r in batch):
                grammar_ahead.append(len(batch))
        return launch(model, batch, pool, scales, graphs, after=after, carry=carry, sample=sample)

    monkeypatch.setattr(runner_module, "launch_step", counted)
    de = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=200, block_size=4, colocated_prefill=True,
                                                         max_batched_tokens=24, overlap_steps=True))
    kinds = [SamplingParams(max_new_tokens=12, ignore_eos=True),
             SamplingParams(max_new_tokens=12, ignore_eos=True, **STRONG),
             SamplingParams(max_new_tokens=12, temperature=0.9, seed=3, frequency_penalty=1.2, presence_penalty=0.4,
                            logit_bias=((7, -20.0),)),
             SamplingParams(max_new_tokens=12, ignore_eos=True, repetition_penalty=1.5, min_tokens=4),
             SamplingParams(max_new_tokens=12, logit_bias=((EOS, 60.0),), min_tokens=6, presence_penalty=0.3)]
    batch = prompts([9, 6, 5, 12, 7], seed=5)
    streams = []
    for i, (p, params) in enumerate(zip(batch, kinds)):
        de.reserve(f"q{i}", len(p), params.max_new_tokens)
        de.prefill_kv(f"q{i}", p[:-1])
        streams.append((p, params, de.start_generation(f"q{i}", p[-1], params, scale=2)))
        for _ in range(2):
            de.step()
    while de._running or de._prefill_queue:
        de.step()
    for p, params, st in streams:
        assert [e.token_id for e in st] == generate(full, p, params, scale=2, eos_id=EOS).token_ids, params
    s = de.stats()
    assert ahead_adjusted and s.num_steps_launched_ahead > 10
    # a grammar row: its batch is read before the next step is launched
    grammar = SamplingParams(max_new_tokens=10, structured=StructuredOutput("regex", "[a-z]{3,12}"))
    tok = ByteTokenizer()
    de.tokenizer = tok
    p = prompts([6], seed=9)[0]
    de.reserve("gr", len(p), 10)
    de.prefill_kv("gr", p[:-1])
    st = de.start_generation("gr", p[-1], grammar, scale=2)
    for _ in range(60):  # its prompt chunk, its admission, its 10 steps
        if de.stats().num_finished == len(kinds) + 1:
            break
        de.step()
    assert [e.token_id for e in st] == generate(full, p, grammar, scale=2, eos_id=EOS, tokenizer=tok).token_ids
    assert not grammar_ahead


def test_penalties_without_the_prompt_are_refused_and_free_the_reservation(setup):
    path, _ = setup
    de = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=64, block_size=4)).start()
    try:
        de.reserve("r", 6, 4)
        with pytest.raises(ValueError, match=r"context_ids: 0 tokens given; penalties \(and a retried attempt.s "
                                             r"grammar\) read the prompt, which has 5"):
            de.start_generation("r", 3, SamplingParams(max_new_tokens=4, repetition_penalty=1.2))
        de.reserve("r2", 3, 4)
        with pytest.raises(ValueError, match=r"context_ids: token ids must be in 0..259"):
            de.start_generation("r2", 3, SamplingParams(max_new_tokens=4, presence_penalty=1.0), context_ids=[1, 999])
        de.reserve("r3", 3, 4)
        with pytest.raises(ValueError, match="logit_bias: token id 260 is outside the vocabulary"):
            de.start_generation("r3", 3, SamplingParams(max_new_tokens=4, logit_bias=((260, 1.0),)))
    finally:
        de.stop()
    assert_pool_free(de)


# ---------------------------------------------------------------------------------------------------- router
def _client_kw(params: SamplingParams) -> dict:
    return dict(max_new_tokens=params.max_new_tokens, temperature=params.temperature, seed=params.seed,
                ignore_eos=params.ignore_eos, presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
                logit_bias=dict(params.logit_bias), min_tokens=params.min_tokens, min_p=params.min_p,
                allowed_token_ids=params.allowed_token_ids)


def test_the_router_over_disaggregated_engines_gives_the_reference_tokens(routed, setup):
    from colm.client import Client

    bg, backend = routed
    _, full = setup
    reqs = _requests()
    with Client(bg.grpc_addr) as c:
        for (p, params, scale, spec), want in zip(reqs, _want(full, reqs)):
            r = c.complete(p, scale=scale, speculative=spec, **_client_kw(params))
            assert r["token_ids"] == want


def test_a_retried_attempt_counts_its_earlier_output_as_output(routed, setup):
    """The first attempt fails after 4 tokens; the second starts from prompt + those 4, with prior_output 4 and
    min_tokens lowered by 4: the request's tokens equal one uninterrupted ``colm generate``."""
    from colm.client import Client

    bg, backend = routed
    _, full = setup
    p = prompts([10], seed=21)[0]
    params = SamplingParams(max_new_tokens=16, frequency_penalty=1.5, presence_penalty=0.5,
                            logit_bias=((EOS, 100.0),), min_tokens=9)
    want = generate(full, p, params, scale=2, eos_id=EOS).token_ids
    assert len(want) == 10 and want[-1] == EOS
    backend.attempts.clear()
    backend.fail_after = 4
    with Client(bg.grpc_addr) as c:
        r = c.complete(p, scale=2, **_client_kw(params))
    assert r["token_ids"] == want and len(backend.attempts) == 2
    second = backend.attempts[-1]
    assert second.prior_output == 4 and list(second.prompt_ids) == p + want[:4]
    assert second.params.min_tokens == 5 and second.params.max_new_tokens == 12


def test_http_fields_and_their_errors(routed, setup):
    from router_helpers import post_json

    bg, _ = routed
    _, full = setup
    tok = ByteTokenizer()
    text = "penalised text"
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, repetition_penalty=1.5, frequency_penalty=0.5,
                            presence_penalty=0.25, logit_bias=((101, 3.0),), min_tokens=2)
    want = tok.decode(generate(full, tok.encode(text), params, scale=2).token_ids)
    body = {"prompt": text, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "scale": 2,
            "repetition_penalty": 1.5, "frequency_penalty": 0.5, "presence_penalty": 0.25, "logit_bias": {"101": 3},
            "min_tokens": 2}
    status, out = post_json(f"{bg.http_url}/v1/completions", body)
    assert status == 200 and out["choices"][0]["text"] == want, out
    for bad, where in ((({"logit_bias": {"abc": 1}}), "logit_bias"), ({"logit_bias": {"999": 1}}, "logit_bias"),
                       ({"logit_bias": {"5": 101}}, "logit_bias"), ({"presence_penalty": 2.5}, "presence_penalty"),
                       ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": 13}, "min_tokens"),
                       ({"frequency_penalty": "1"}, "frequency_penalty"), ({"min_p": 1.5}, "min_p"),
                       ({"allowed_token_ids": [5, 260]}, "allowed_token_ids"),
                       ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
                       ({"allowed_token_ids": [EOS], "min_tokens": 3, "ignore_eos": False}, "no token is allowed")):
        status, out = post_json(f"{bg.http_url}/v1/completions", {**body, **bad})
        assert status == 400 and where in out["error"]["message"], (bad, out)


def test_grpc_errors_name_the_proto_field(routed):
    import grpc

    from colm.client import Client

    bg, _ = routed
    with Client(bg.grpc_addr) as c:
        for kw, msg in (({"repetition_penalty": 200.0}, "sampling.repetition_penalty=200.0"),
                        ({"logit_bias": {-3: 1.0}}, "sampling.logit_bias"),
                        ({"logit_bias": {400: 1.0}}, "logit_bias: token id 400 is outside the vocabulary"),
                        ({"min_tokens": 20, "max_new_tokens": 4}, "sampling.min_tokens=20")):
            with pytest.raises(grpc.RpcError) as e:
                c.complete("x", **kw)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and msg in e.value.details(), e.value.details()
