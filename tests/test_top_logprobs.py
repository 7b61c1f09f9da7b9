"""Top log-probs: every generated token can report the k most likely tokens and their log-probs under the
model at the token's scale. Checked against a teacher-forced full forward of the reference model (no cache): on
the colocated and the disaggregated decode engine (greedy and sampled rows beside plain ones, a speculative
request stepping plainly), through the router over gRPC, and on the HTTP API (completions streamed or not, chat)."""

from __future__ import annotations

import pytest
import torch

from colm.chat_template import TokenizerConfig
from colm.generate import generate
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer
from _engine_helpers import mixed_batch_engines, prompts, save_tiny_air

TOK = ByteTokenizer()


def reference_tops(model, prompt, out, scale, k):
    """Per generated token: (its log-prob, [(id, log-prob)] of the k most likely), from one full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(out)]), scale=scale)[0]  # [T, V]
    lps = torch.log_softmax(logits.double(), dim=-1)[len(prompt) - 1: len(prompt) - 1 + len(out)]
    res = []
    for i, t in enumerate(out):
        v, ids = lps[i].topk(k)
        res.append((float(lps[i, t]), list(zip(ids.tolist(), v.tolist()))))
    return res


def assert_tops(got_lp, got_top, want):
    lp, top = want
    assert got_lp == pytest.approx(lp, abs=1e-4)
    assert [t for t, _ in got_top] == [t for t, _ in top]
    assert [v for _, v in got_top] == pytest.approx([v for _, v in top], abs=1e-4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_top")
    return path, save_tiny_air(path)


@pytest.mark.parametrize("colocated", [True, False])
def test_the_decode_engine_reports_the_reference_top_logprobs(setup, colocated):
    path, full = setup
    ps = prompts([5, 19, 33, 9], seed=50)
    reqs = [(ps[0], SamplingParams(max_new_tokens=10, ignore_eos=True), 2, 0),
            (ps[1], SamplingParams(max_new_tokens=10, ignore_eos=True, top_logprobs=5), 2, 0),
            (ps[2], SamplingParams(max_new_tokens=10, ignore_eos=True, top_logprobs=3, temperature=0.9, seed=4), 1, 0),
            (ps[3], SamplingParams(max_new_tokens=10, ignore_eos=True, top_logprobs=1), 2, 3)]
    checked = 0
    with mixed_batch_engines(path, colocated) as (de, start):
        streams = [start(f"top-{colocated}-{i}", p, params, scale, spec)
                   for i, (p, params, scale, spec) in enumerate(reqs)]
        for (p, params, scale, _), st in zip(reqs, streams):
            events = list(st)
            out = [e.token_id for e in events]
            assert out == generate(full, p, params, scale=scale).token_ids
            if not params.top_logprobs:
                assert all(e.top_logprobs == () for e in events)
                continue
            for e, want in zip(events, reference_tops(full, p, out, scale, params.top_logprobs)):
                assert_tops(e.logprob, e.top_logprobs, want)
                # a token among its own top log-probs has there the very value reported as its log-prob
                assert all(v == e.logprob for t, v in e.top_logprobs if t == e.token_id)
            checked += sum(t == e.token_id for e in events for t, _ in e.top_logprobs)
        assert de.stats().num_drafted == 0  # the speculative request asked for top log-probs: plain steps
    assert checked >= 20  # the greedy rows' tokens are their own most likely: the equality above ran on each


def test_grpc_tokens_carry_their_top_logprobs(routed, setup):
    from colm.client import Client

    bg, _ = routed
    _, full = setup
    p = prompts([12], seed=51)[0]
    with Client(bg.grpc_addr) as c:
        r = c.complete(p, max_new_tokens=8, scale=1, ignore_eos=True, top_logprobs=4)
        streamed = [ev for ev in c.stream(p, max_new_tokens=8, scale=1, ignore_eos=True, top_logprobs=4)
                    if ev["kind"] == "token"]
    for lp, top, want in zip(r["logprobs"], r["top_logprobs"], reference_tops(full, p, r["token_ids"], 1, 4)):
        assert_tops(lp, top, want)
    assert [ev["top_logprobs"] for ev in streamed] == r["top_logprobs"]


def test_http_completions_and_chat_report_top_logprobs(routed, setup):
    import json
    import urllib.request

    from router_helpers import post_json

    bg, _ = routed
    _, full = setup
    text = "top logprobs"
    ids = TOK.encode(text)
    body = {"prompt": text, "max_tokens": 6, "temperature": 0, "scale": 2, "ignore_eos": True, "logprobs": 3}
    status, out = post_json(f"{bg.http_url}/v1/completions", body)
    assert status == 200, out
    lp = out["choices"][0]["logprobs"]
    toks = generate(full, ids, SamplingParams(max_new_tokens=6, ignore_eos=True), scale=2).token_ids
    assert lp["tokens"] == [TOK.decode([t]) for t in toks]
    for tok_lp, top, want in zip(lp["token_logprobs"], lp["top_logprobs"], reference_tops(full, ids, toks, 2, 3)):
        pieces = {TOK.decode([t]): v for t, v in want[1]}  # keyed by text, as the API keys them
        assert tok_lp == pytest.approx(want[0], abs=1e-4) and top.keys() == pieces.keys()  # greedy: the token is top
        assert list(top.values()) == pytest.approx(list(pieces.values()), abs=1e-4)
    # streamed: the same entries, one token per chunk, offsets adding up
    req = urllib.request.Request(f"{bg.http_url}/v1/completions", json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(req, timeout=60) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("data: {"):
                c = json.loads(line[6:])["choices"][0]
                if c["logprobs"] is not None:
                    chunks.append(c["logprobs"])
    assert [c["tokens"][0] for c in chunks] == lp["tokens"]
    assert [c["top_logprobs"][0] for c in chunks] == lp["top_logprobs"]
    assert [c["text_offset"][0] for c in chunks] == lp["text_offset"]


def test_chat_reports_top_logprobs_from_the_local_backend(setup, tmp_path):
    """Chat (the demo's template) over the in-process full-model backend: top_logprobs entries per content token,
    equal to the reference's."""
    from router_helpers import chat_router, post_json

    _, full = setup
    bg, _, tok = chat_router(full, tmp_path)
    try:
        status, out = post_json(f"{bg.http_url}/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
                                 "scale": 2, "ignore_eos": True, "logprobs": True, "top_logprobs": 2})
        tcfg = TokenizerConfig.load(str(tmp_path), tok)
        prompt = tcfg.encode(tcfg.render([{"role": "user", "content": "hi"}], add_generation_prompt=True), False)
    finally:
        bg.stop()
    assert status == 200, out
    content = out["choices"][0]["logprobs"]["content"]
    toks = generate(full, prompt, SamplingParams(max_new_tokens=4, ignore_eos=True), scale=2).token_ids
    assert [c["token"] for c in content] == [TOK.decode([t]) for t in toks]
    for c, want in zip(content, reference_tops(full, prompt, toks, 2, 2)):
        assert c["logprob"] == pytest.approx(want[0], abs=1e-4)
        assert [(x["token"], x["logprob"]) for x in c["top_logprobs"]] == [
            (TOK.decode([t]), pytest.approx(v, abs=1e-4)) for t, v in want[1]]
