"""Structured output (``colm.structured``, xgrammar): outputs checked by independent validators (Python's ``re``,
``json`` and ``jsonschema``) from a random-weight model, greedy and sampled; every serving path gives
``colm generate``'s tokens (the colocated and the disaggregated decode engine, mixed with free-text and penalised
rows; a retried attempt whose grammar has read the earlier output); the HTTP API (OpenAI's ``response_format``,
vLLM's ``guided_*``) and the gRPC API; bad specs are 400s / INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("xgrammar")

from colm.decode_worker.config import DecodeConfig  # noqa: E402
from colm.decode_worker.engine import DecodeEngine  # noqa: E402
from colm.generate import generate  # noqa: E402
from colm.sampling import SamplingParams  # noqa: E402
from colm.structured import MAX_SPEC_CHARS, StructuredOutput, compile_output  # noqa: E402
from colm.tokenizer import ByteTokenizer  # noqa: E402
from _engine_helpers import assert_pool_free, mixed_batch_engines, prompts, save_tiny_air  # noqa: E402

TOK = ByteTokenizer()
EOS = TOK.eos_id
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["red", "green", "blue"]},
                                           "name": {"type": "string", "maxLength": 6}},
          "required": ["ok", "tag", "name"], "additionalProperties": False}
REGEX = r"[a-c]{2,5}@(x|yz)\.com"
CHOICES = ("yes", "no", "it depends", "é中")
GRAMMAR = 'root ::= "(" digit (("+" | "*") digit)? ")"\ndigit ::= [0-9]'


def so(kind: str) -> StructuredOutput:
    return {"json_schema": StructuredOutput("json_schema", json.dumps(SCHEMA)),
            "regex": StructuredOutput("regex", REGEX),
            "choice": StructuredOutput("choice", choices=CHOICES), "grammar": StructuredOutput("grammar", GRAMMAR),
            "json_object": StructuredOutput("json_object")}[kind]


def check_text(kind: str, text: str) -> None:
    """The output obeys its constraint, by a validator that is not the grammar engine."""
    if kind == "json_schema":
        import jsonschema

        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    elif kind == "grammar":
        assert re.fullmatch(r"\(\d([+*]\d)?\)", text), text
    else:
        assert isinstance(json.loads(text), dict), text


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_structured")
    return path, save_tiny_air(path)


def test_the_device_expansion_of_a_grammar_bitmask_equals_xgrammar():
    """On a GPU a grammar row's bitmask is expanded by a byte table (``logits_adjust._refused``); on the host
    xgrammar applies it. Both refuse the same tokens, for masks of a grammar at several points of an output and of
    random words (every bit pattern), at a vocabulary that is not a multiple of 32."""
    import numpy as np
    import torch

    from colm.logits_adjust import _refused
    from colm.structured import OutputMatcher

    vocab = 300  # the byte tokenizer's 260 ids and 40 more no grammar allows
    m = OutputMatcher(compile_output(StructuredOutput("json_object"), ByteTokenizer(), vocab), vocab)
    masks = []
    for t in b'{"a": [1, 2':
        masks.append(m.fill().copy())
        m.accept(t)
    masks.append(np.random.default_rng(0).integers(-2**31, 2**31, size=(3, masks[0].shape[1]), dtype=np.int64)
                 .astype(np.int32))
    words = np.concatenate(masks)  # [R, W] int32
    got = _refused(torch.from_numpy(words.view(np.uint8).copy()), vocab)  # [R, V]
    for row, w in zip(got, words):
        want = torch.zeros(vocab)
        m._xgr.apply_token_bitmask_inplace(want, torch.from_numpy(w[None].copy()))
        assert torch.equal(row, torch.isinf(want))
    assert 0 < int(got[:-3].sum()) < got[:-3].numel()


def test_bad_requests_are_refused_with_the_field():
    with pytest.raises(ValueError, match="kind='xml' is unknown"):
        StructuredOutput("xml", "x")
    with pytest.raises(ValueError, match=r"structured_output \(json_schema\): the schema is not JSON"):
        StructuredOutput("json_schema", "{nope")
    with pytest.raises(ValueError, match=r"structured_output \(regex\): the spec must be a string of at most"):
        StructuredOutput("regex", "a" * (MAX_SPEC_CHARS + 1))
    with pytest.raises(ValueError, match=r"structured_output \(choice\): give 1..256 strings"):
        StructuredOutput("choice")
    with pytest.raises(ValueError, match=r"each choice is a non-empty string"):
        StructuredOutput("choice", choices=("a", ""))
    with pytest.raises(ValueError, match=r"the choices hold 17408 characters together; at most 16384"):
        StructuredOutput("choice", choices=tuple(f"{i:04d}" + "y" * 1020 for i in range(17)))
    StructuredOutput("choice", choices=tuple("y" * 1024 for _ in range(16)))  # 16,384 exactly
    with pytest.raises(ValueError, match="cannot be combined with ignore_eos or min_tokens"):
        SamplingParams(structured=so("regex"), ignore_eos=True)
    with pytest.raises(ValueError, match="cannot be combined with ignore_eos or min_tokens"):
        SamplingParams(structured=so("regex"), min_tokens=1)
    for bad, msg in ((StructuredOutput("regex", "(unclosed"), "parenthesis is not closed"),
                     (StructuredOutput("json_schema", '{"type": "nonsense"}'), "nonsense"),
                     (StructuredOutput("grammar", "root ::= "), "EBNF parser error")):
        with pytest.raises(ValueError, match=rf"structured_output \({bad.kind}\) does not compile: .*{msg}"):
            compile_output(bad, TOK, 260)
    # a pattern that explodes a regex-to-DFA index (2**14 states) compiles at once here
    compile_output(StructuredOutput("regex", r"(a|b)*a(a|b){14}"), TOK, 260)


@pytest.mark.parametrize("kind", ["json_schema", "regex", "choice", "grammar"])
def test_generated_outputs_obey_their_constraint(setup, kind):
    """Random weights, 12 prompts, greedy and sampled: every output completes and passes the validator; the
    outputs are not all one string (the constraint leaves the model choices)."""
    _, full = setup
    texts = set()
    for i, p in enumerate(prompts([3, 8, 20] * 4, seed=30)):
        params = SamplingParams(max_new_tokens=120, temperature=0.0 if i < 3 else 1.0, seed=i, structured=so(kind))
        r = generate(full, p, params, scale=1 + i % 2, eos_id=EOS, tokenizer=TOK)
        assert r.finish_reason == "stop" and r.token_ids[-1] == EOS, (kind, r)
        text = TOK.decode(r.token_ids[:-1])
        check_text(kind, text)
        texts.add(text)
    assert len(texts) > 1


def test_any_json_object_is_valid_json_when_complete(setup):
    _, full = setup
    done = 0
    for i, p in enumerate(prompts([4, 9, 15, 6], seed=2)):
        r = generate(full, p, SamplingParams(max_new_tokens=200, structured=so("json_object")), scale=2, eos_id=EOS,
                     tokenizer=TOK)
        text = TOK.decode(r.token_ids[:-1] if r.finish_reason == "stop" else r.token_ids)
        assert text.startswith("{")
        if r.finish_reason == "stop":
            check_text("json_object", text)
            done += 1
    assert done >= 1


def _requests():
    """(prompt, params, scale, speculative): structured rows beside free-text and penalised ones, both scales."""
    ps = prompts([3, 17, 30, 8, 25, 12], seed=12)
    return [
        (ps[0], SamplingParams(max_new_tokens=40, ignore_eos=True), 2, 0),
        (ps[1], SamplingParams(max_new_tokens=60, structured=so("json_schema")), 2, 0),
        (ps[2], SamplingParams(max_new_tokens=40, structured=so("regex"), temperature=0.8, seed=3), 1, 0),
        (ps[3], SamplingParams(max_new_tokens=40, structured=so("choice"), repetition_penalty=1.3), 2, 0),
        (ps[4], SamplingParams(max_new_tokens=40, structured=so("grammar")), 2, 3),
        (ps[5], SamplingParams(max_new_tokens=20, ignore_eos=True, frequency_penalty=1.0), 1, 0),
    ]


@pytest.mark.parametrize("colocated", [True, False])
def test_the_decode_engine_gives_the_reference_tokens(setup, colocated):
    path, full = setup
    reqs = _requests()
    with mixed_batch_engines(path, colocated) as (de, start):
        streams = [start(f"so-{colocated}-{i}", p, params, scale, spec)
                   for i, (p, params, scale, spec) in enumerate(reqs)]
        got = [[e.token_id for e in st] for st in streams]
        want = [generate(full, p, params, scale=s, eos_id=EOS, tokenizer=TOK).token_ids for p, params, s, _ in reqs]
        assert got == want
        for (_, params, _, _), ids in zip(reqs, got):
            if params.structured is not None:
                check_text(params.structured.kind, TOK.decode(ids[:-1]))
        assert de.stats().num_drafted == 0


def test_a_spec_that_does_not_compile_fails_only_its_start(setup):
    path, _ = setup
    de = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=64, block_size=4)).start()
    try:
        de.reserve("bad", 3, 4)
        with pytest.raises(ValueError, match="does not compile"):
            de.start_generation("bad", 3, SamplingParams(max_new_tokens=4, structured=StructuredOutput("regex", "(")))
        de.reserve("no-tok", 3, 4)
        de.tokenizer, tok = None, de.tokenizer
        with pytest.raises(ValueError, match="no tokenizer"):
            de.start_generation("no-tok", 3, SamplingParams(max_new_tokens=4, structured=so("regex")))
        de.tokenizer = tok
    finally:
        de.stop()
    assert_pool_free(de)


# ---------------------------------------------------------------------------------------------------- router
def test_grpc_requests_and_a_retried_attempt(routed, setup):
    """Over gRPC: each kind's tokens equal the reference; an attempt failing after 4 tokens is retried with them
    ending the prompt, and the new attempt's grammar, which read them, finishes the same output."""
    import grpc

    from colm.client import Client

    bg, backend = routed
    _, full = setup
    p = prompts([11], seed=40)[0]
    with Client(bg.grpc_addr) as c:
        for kind in ("json_schema", "regex", "choice", "grammar"):
            want = generate(full, p, SamplingParams(max_new_tokens=64, structured=so(kind)), scale=2, eos_id=EOS,
                            tokenizer=TOK)
            r = c.complete(p, max_new_tokens=64, scale=2, structured_output=so(kind))
            assert r["token_ids"] == want.token_ids and r["finish_reason"] == "stop"
            check_text(kind, r["text"])
        want = generate(full, p, SamplingParams(max_new_tokens=64, structured=so("json_schema")), scale=2, eos_id=EOS,
                        tokenizer=TOK).token_ids
        backend.attempts.clear()
        backend.fail_after = 4
        r = c.complete(p, max_new_tokens=64, scale=2, structured_output=so("json_schema"))
        assert r["token_ids"] == want and len(backend.attempts) == 2 and backend.attempts[1].prior_output == 4
        with pytest.raises(grpc.RpcError) as e:
            c.complete(p, structured_output=StructuredOutput("regex", "[a-"))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "structured_output (regex)" in e.value.details()


def test_http_structured_output(routed, setup):
    from router_helpers import post_json

    bg, _ = routed
    _, full = setup
    url = f"{bg.http_url}/v1/completions"
    base = {"prompt": "structured", "max_tokens": 80, "temperature": 0, "scale": 2}
    ids = TOK.encode("structured")

    def want(kind):
        r = generate(full, ids, SamplingParams(max_new_tokens=80, structured=so(kind)), scale=2, eos_id=EOS,
                     tokenizer=TOK)
        return TOK.decode(r.token_ids[:-1])

    for extra, kind in (({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
                         "json_schema"), ({"guided_json": SCHEMA}, "json_schema"),
                        ({"guided_json": json.dumps(SCHEMA)}, "json_schema"), ({"guided_regex": REGEX}, "regex"),
                        ({"guided_choice": list(CHOICES)}, "choice"), ({"guided_grammar": GRAMMAR}, "grammar")):
        status, body = post_json(url, {**base, **extra})
        assert status == 200, body
        text = body["choices"][0]["text"]
        assert text == want(kind) and body["choices"][0]["finish_reason"] == "stop"
        check_text(kind, text)
    status, body = post_json(url, {**base, "response_format": {"type": "text"}})
    assert status == 200
    for extra, where in (({"guided_regex": "(", "guided_choice": ["a"]}, "guided_choice"),
                         ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
                         ({"response_format": {"type": "xml"}}, "response_format.type"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
                          "response_format.json_schema.schema"),
                         ({"guided_regex": "(unclosed"}, "structured_output"),
                         ({"guided_choice": []}, "guided_choice"),
                         ({"guided_regex": "a", "ignore_eos": True}, "structured_output"),
                         ({"guided_json": "{not json"}, "guided_json")):
        status, body = post_json(url, {**base, **extra})
        assert status == 400 and where in (body["error"].get("param") or "") + body["error"]["message"], (extra, body)


def test_the_grammar_cache_is_bounded_and_memory_stays_flat(monkeypatch):
    """Distinct specs, one after another: the cache holds at most GRAMMAR_CACHE_BYTES of compiled grammars (least
    recently used out), a repeated spec is a hit, xgrammar's own cache stays empty, and the process's memory stops
    growing (xgrammar's bounded cache had kept ~3.5 MiB per distinct 2,500-alternative regex past its limit)."""
    import os

    import colm.structured as st

    monkeypatch.setattr(st, "GRAMMAR_CACHE_BYTES", 8 << 20)
    tok = ByteTokenizer()  # a tokenizer of its own: a compiler and cache made with the bound above

    def rss_mib() -> int:
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024

    first = StructuredOutput("regex", "|".join(f"first{j}" for j in range(2000)))
    compiled = compile_output(first, tok, 260)
    assert compile_output(first, tok, 260) is compiled  # a hit
    comp, cache = st._compiler(tok, 260)
    marks = []
    for i in range(60):
        spec = "|".join(os.urandom(3).hex() + f"w{j}" for j in range(2500))
        compile_output(StructuredOutput("regex", spec), tok, 260)
        assert cache.size_bytes <= 8 << 20
        if i in (19, 59):
            marks.append(rss_mib())
    assert ("regex", first.spec, ()) not in cache.entries  # evicted long ago
    assert comp.get_cache_size_bytes() == 0
    assert marks[1] - marks[0] < 64, marks  # 40 more compiles; ~140 MiB with xgrammar's cache
