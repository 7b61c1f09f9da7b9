"""Chain-1 self-speculative decoding (``decode_worker.speculative``): greedy tokens equal plain full-scale decoding
(``colm.generate``) for many prompts and gamma in {1, 2, 4, 8}, in a batch mixed with plain requests, across a
mid-stream scale switch and at the max_new_tokens / stop-token edges (accepted drafts counted only where emitted);
the acceptance rule and the engine's sampled tokens are distributed as the target scale's (chi-square tests on a
small vocabulary); pools end free."""

from __future__ import annotations

import math

import pytest
import torch

from colm.decode_worker.speculative import accept_greedy, accept_sampled
from colm.generate import generate
from colm.prefill_worker.sinks import LocalKVSink
from colm.sampling import SamplingParams, filtered_probs
from _engine_helpers import assert_pool_free, prompts, started_engines


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square(dof), by the Wilson-Hilferty normal approximation (good for dof >= 2)."""
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def chi2_pvalue(counts: dict, probs: dict) -> float:
    """Goodness of fit of ``counts`` (outcome -> count) to ``probs`` (outcome -> probability); cells with an
    expected count below 5 are pooled."""
    n = sum(counts.values())
    assert set(counts) <= {k for k, p in probs.items() if p > 0}, "an outcome the target gives probability 0"
    cells, small_o, small_e = [], 0, 0.0
    for k, p in probs.items():
        if n * p >= 5:
            cells.append((counts.get(k, 0), n * p))
        else:
            small_o, small_e = small_o + counts.get(k, 0), small_e + n * p
    if small_e > 0:
        cells.append((small_o, small_e))
    stat = sum((o - e) ** 2 / e for o, e in cells)
    return chi2_sf(stat, max(2, len(cells) - 1))


def test_greedy_acceptance_is_the_longest_matching_prefix():
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == 3
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == 1
    assert accept_greedy([5], [4, 1]) == 0


def test_sampling_rule_gives_the_target_distribution():
    """Synthetic draft and target distributions over 6 tokens: the first emitted token is distributed as p_1
    and, after an accepted draft, the second as p_2, whatever q is (including tokens q never proposes)."""
    g = torch.Generator().manual_seed(0)
    vocab, gamma, trials = 6, 3, 20000
    p = torch.softmax(torch.randn(gamma + 1, vocab, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(gamma, vocab, generator=g) * 1.5, -1)
    q[:, 5] = 0  # the draft never proposes token 5: only the residual can emit it
    q = q / q.sum(-1, keepdim=True)
    first, second, accepted = {}, {}, 0
    for _ in range(trials):
        drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(gamma)]
        n, nxt = accept_sampled(drafts, q, p, g)
        toks = drafts[:n] + [nxt]
        accepted += n
        first[toks[0]] = first.get(toks[0], 0) + 1
        if len(toks) > 1:
            second[toks[1]] = second.get(toks[1], 0) + 1
    assert 0 < accepted < gamma * trials
    assert chi2_pvalue(first, dict(enumerate(p[0].tolist()))) > 1e-3
    assert chi2_pvalue(second, dict(enumerate(p[1].tolist()))) > 1e-3
    assert first.get(5, 0) > 0  # reached through the residual
    # a target equal to the draft accepts everything
    n, _ = accept_sampled([1, 2], q[:2], torch.cat([q[:2], p[2:3]]), g)
    assert n == 2


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    with started_engines(tmp_path_factory.mktemp("spec"), num_blocks=512) as engines:
        yield engines


def _start(de, pe, rid, p, params, scale, gamma):
    de.reserve(rid, len(p), params.max_new_tokens)
    pe.submit(rid, p, LocalKVSink(de, rid))
    return de.start_generation(rid, p[-1], params, scale=scale, speculative=gamma)


@pytest.fixture(scope="module")
def gather_engines(tmp_path_factory):
    with started_engines(tmp_path_factory.mktemp("spec-gather"), num_blocks=512, verify_attention="gather") as engines:
        yield engines


@pytest.mark.parametrize("gamma", [1, 2, 4, 8])
def test_greedy_tokens_equal_plain_full_scale_decoding(engines, gamma):
    greedy_tokens_equal_plain(engines, gamma)


@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_tokens_equal_plain_with_the_gathered_verify(gather_engines, gamma):
    greedy_tokens_equal_plain(gather_engines, gamma)


def greedy_tokens_equal_plain(engines, gamma):
    de, pe, full = engines
    before = de.stats()
    batch = prompts([1, 3, 9, 17, 30, 5, 12, 24], seed=gamma)
    lengths = [12, 3, 20, 7, 16, 2, 11, 25]
    streams = []
    for i, (p, n) in enumerate(zip(batch, lengths)):
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        # every third request plain (speculative=0) and one at scale 1 (nothing to draft): mixed in one engine
        g, scale = (0, 2) if i % 3 == 2 else (gamma, 1 if i == 4 else 2)
        streams.append((p, params, scale, _start(de, pe, f"g{gamma}-{i}", p, params, scale, g)))
    for p, params, scale, st in streams:
        events = list(st)
        assert [e.token_id for e in events] == generate(full, p, params, scale=scale).token_ids
        assert [e.index for e in events] == list(range(params.max_new_tokens))
        assert events[-1].finish_reason == "length" and {e.scale for e in events} == {scale}
    after = de.stats()
    drafted = after.num_drafted - before.num_drafted
    accepted = after.num_draft_accepted - before.num_draft_accepted
    assert drafted > 0 and 0 < accepted <= drafted
    assert_pool_free(de)


def test_scale_switch_and_stop_token_mid_round(engines):
    """set_scale applies from the next round (2 -> 1 plain -> 2 speculative); a stop token that is an accepted
    draft ends the request there, the tokens after it in the round are dropped."""
    de, pe, full = engines
    p = prompts([14], seed=3)[0]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    events = []
    for ev in _start(de, pe, "sw", p, params, 2, 4):
        events.append(ev)
        if ev.index in (5, 14):
            de.set_scale("sw", 1 if ev.index == 5 else 2)
    used = [e.scale for e in events]
    assert used[0] == 2 and 1 in used and used[-1] == 2
    assert [e.token_id for e in events] == generate(full, p, params, scale_schedule=lambda i: used[i]).token_ids
    assert any(e.drafted for e in events) and not any(e.drafted for e in events if e.scale == 1)
    plain = generate(full, p, params, scale=2).token_ids
    stop_tok = next(t for t in plain[3:] if plain.count(t) == 1)
    sp = SamplingParams(max_new_tokens=30, stop_token_ids=(stop_tok,), ignore_eos=True)
    ev = list(_start(de, pe, "st", p, sp, 2, 8))
    assert [e.token_id for e in ev] == generate(full, p, sp, scale=2).token_ids
    assert ev[-1].finish_reason == "stop" and ev[-1].token_id == stop_tok
    assert_pool_free(de)


def test_accepted_drafts_count_only_the_tokens_emitted(engines):
    """A stop token that is an accepted draft, followed in its round by another accepted draft: the round's tokens
    after the stop are never emitted, and the worker's num_draft_accepted counts only the drafted tokens it emitted
    (it counted the whole round's)."""
    de, pe, _ = engines
    case = None
    for seed in range(8):  # a prompt whose output has a drafted token, first of its kind, then another drafted one
        p = prompts([14], seed=seed)[0]
        ev = list(_start(de, pe, f"probe{seed}", p, SamplingParams(max_new_tokens=30, ignore_eos=True), 2, 8))
        toks = [e.token_id for e in ev]
        k = next((k for k in range(len(ev) - 1) if ev[k].drafted and ev[k + 1].drafted and toks.index(toks[k]) == k),
                 None)
        if k is not None:
            case = p, toks[k], k
            break
    assert case is not None, "no prompt gave a stop token inside a round of accepted drafts"
    p, stop_tok, k = case
    before = de.stats()
    sp = SamplingParams(max_new_tokens=30, stop_token_ids=(stop_tok,), ignore_eos=True)
    ev = list(_start(de, pe, "stop-in-round", p, sp, 2, 8))
    assert len(ev) == k + 1 and ev[-1].finish_reason == "stop" and ev[-1].drafted
    after = de.stats()
    assert after.num_draft_accepted - before.num_draft_accepted == sum(e.drafted for e in ev)
    assert_pool_free(de)


def test_bad_speculative_values_are_refused(engines):
    de, pe, _ = engines
    p = prompts([5], seed=9)[0]
    for bad in (-1, 17, 2.5, True):
        de.reserve("bad", len(p), 4)
        with pytest.raises(ValueError, match="speculative="):
            de.start_generation("bad", p[-1], SamplingParams(max_new_tokens=4), scale=2, speculative=bad)
        assert "bad" not in de._requests  # the failed start ended the reservation
    assert_pool_free(de)


def test_sampled_tokens_follow_the_target_scale(engines):
    """Seeded sampling at scale 2 with drafts: the first two tokens of 1200 requests are distributed as the scale-2
    model's own (top-k 3, so the joint has at most 9 outcomes; computed exactly with the reference model)."""
    de, pe, full = engines
    p = prompts([6], seed=11)[0]
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, top_k=3, seed=s, ignore_eos=True) for s in range(1200)]
    with torch.no_grad():
        p1 = filtered_probs(full(torch.tensor([p]), scale=2)[0, -1], params[0])
        joint = {}
        for a in torch.nonzero(p1).flatten().tolist():
            p2 = filtered_probs(full(torch.tensor([p + [a]]), scale=2)[0, -1], params[0])
            for b in torch.nonzero(p2).flatten().tolist():
                joint[(a, b)] = float(p1[a] * p2[b])
    counts, drafted = {}, 0
    for lo in range(0, len(params), 60):
        streams = [_start(de, pe, f"smp{i}", p, params[i], 2, 2) for i in range(lo, lo + 60)]
        for st in streams:
            ev = list(st)
            key = (ev[0].token_id, ev[1].token_id)
            counts[key] = counts.get(key, 0) + 1
            drafted += sum(e.drafted for e in ev)
    assert drafted > 0  # some drafts were accepted: the rule, not only the residual, was exercised
    assert chi2_pvalue(counts, joint) > 1e-3, (counts, joint)
    assert_pool_free(de)


@pytest.mark.parametrize("attention", ["gather", "paged"])
def test_verify_graph_buffers_match_the_eager_verify(engines, monkeypatch, attention):
    """The graphed verify's static buffers (batch and context padded to buckets, padding rows writing nowhere)
    give the eager verify's logits (the gather forward), with either attention. On CPU the 'graph' replays the
    captured function (no CUDA here)."""
    import colm.decode_worker.verify_graphs as vg
    from colm.decode_worker.speculative import verify

    class FakeGraph:
        def __init__(self, fn):
            self.replay = fn

    def fake_capture(fn, device, pool=None, warmup=2):
        out = fn()
        return FakeGraph(lambda: out.copy_(fn())), out

    monkeypatch.setattr(vg, "warm_and_capture", fake_capture)
    de, _, _ = engines
    graphs = vg.VerifyGraphs(de.model, de.pool, max_batch=8, max_context=512, attention=attention)
    graphs.enabled = True

    class Row:
        def __init__(self, n, x):
            self.blocks = de.pool.allocate(-(-(n + 8) // de.pool.block_size))
            self.num_cached, self.next_input = n, x

    rows = [Row(n, x) for n, x in ((5, 3), (70, 9), (33, 1))]  # 3 rows -> bucket 4; widths -> bucket 128
    g = torch.Generator().manual_seed(5)
    for r in rows:  # some context in each row's blocks
        slots = de.pool.slots(r.blocks, 0, r.num_cached)
        for pool_lk in (de.pool.k, de.pool.v):
            pool_lk.view(pool_lk.shape[0], -1, *pool_lk.shape[3:])[:, slots] = torch.randn(
                pool_lk.shape[0], len(slots), *pool_lk.shape[3:], generator=g)
    drafts = [[4, 8, 15], [16, 23, 42], [7, 7, 7]]
    try:
        want = verify(de.model, rows, de.pool, drafts, 2).float()
        got = verify(de.model, rows, de.pool, drafts, 2, graphs)
        assert graphs.num_replays == 1 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        got2 = verify(de.model, rows[:1], de.pool, drafts[:1], 2, graphs)  # another key: batch 1, width 64
        torch.testing.assert_close(got2, want[:1], rtol=1e-4, atol=1e-4)
    finally:
        for r in rows:
            de.pool.free(r.blocks)
    assert_pool_free(de)


def test_an_iteration_of_one_round_is_reported_as_that_rounds_time(engines):
    """A speculative request decoded alone: its iterations are rounds of (scale 2, gamma 3) and nothing else, so the
    engine reports their time under "2:3" (the router's policy prices speculation with it)."""
    de, pe, _ = engines
    p = list(range(5, 40))
    toks = list(_start(de, pe, "round-times", p, SamplingParams(max_new_tokens=24, ignore_eos=True), 2, 3))
    assert len(toks) == 24
    s = de.stats()
    assert s.round_ms_by_scale_gamma.get("2:3", 0) > 0 and s.round_batch_by_scale_gamma["2:3"] == 1.0
    assert_pool_free(de)


def test_the_router_refuses_speculative_without_shared_kv():
    """Chain-1 drafts are the full model's K/V only in CoLM-Air: the router refuses them for other models."""
    from colm.model import CoLM
    from colm.presets import preset
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.local_backend import LocalBackend
    from colm.tokenizer import ByteTokenizer

    for name, ok in (("tiny", False), ("tiny-air", True)):
        model = CoLM(preset(name)).eval()
        router = Router(RouterConfig(grpc_port=0, http_port=None), model.cfg, ByteTokenizer(), LocalBackend(model))
        call = lambda: router.validate([1, 2, 3], None, SamplingParams(max_new_tokens=2), speculative=2)  # noqa: E731
        if ok:
            assert call().speculative == 2
        else:
            with pytest.raises(ValueError, match="CoLM-Air"):
                call()
