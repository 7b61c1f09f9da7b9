"""Clients written for OpenAI's / vLLM's API against colm's HTTP front, unchanged: what such a client reads must be
what the reference API gives.

* Streamed chat log-probs: every generated token's entry arrives, in the chunk that carries its text (a token whose
  text is not out yet, held back by a stop string or a partial UTF-8 character, has its entry in the next chunk of
  its choice, the finish chunk at the latest), so a stream gives the same entries as the same request unstreamed.
* A chat log-prob's ``bytes`` are the token's own bytes (OpenAI: joined, they make the text), also for a token that
  is part of a multi-byte character.
* ``role: "developer"`` (OpenAI's name for system instructions) is accepted and reaches a template that does not
  know the role as ``system``.
* A streamed completion with ``stream_options.include_usage`` has ``"usage": null`` in every chunk but the last.
* ``GET /v1/models/{model}`` (the ``openai`` client's ``models.retrieve``) answers a listed model's card, 404 others.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from colm.chat_template import TokenizerConfig
from colm.tokenizer import ByteTokenizer
from conftest import make_model
from router_helpers import chat_router, get_json

openai = pytest.importorskip("openai")

USER = [{"role": "user", "content": "Write a function"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = make_model("tiny-air", seed=3)
    bg, client, _ = chat_router(model, tmp_path_factory.mktemp("compat"), served_model_name="tiny")
    yield bg, client
    bg.stop()


def _streamed_chat_logprobs(client, **kw):
    """(text, [(token, logprob, bytes)], completion tokens) of a streamed chat completion's single choice."""
    text, entries, usage = "", [], None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in ch.choices:
            text += c.delta.content or ""
            entries += [(e.token, e.logprob, e.bytes) for e in (c.logprobs.content if c.logprobs else None) or ()]
        if ch.usage is not None:
            usage = ch.usage.completion_tokens
    return text, entries, usage


@pytest.mark.parametrize("extra", [{"stop": ["qqqq"]},  # never matched: the last three characters are held back
                                   {"allowed_token_ids": [195, 169]}],  # bytes of multi-byte characters
                         ids=["held-by-stop", "partial-utf8"])
def test_streamed_chat_logprobs_cover_every_token(served, extra):
    _, client = served
    extra_body = {"ignore_eos": True, **{k: v for k, v in extra.items() if k != "stop"}}
    kw = dict(model="tiny", messages=USER, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2,
              stop=extra.get("stop"), extra_body=extra_body)
    r = client.chat.completions.create(**kw)
    whole = [(e.token, e.logprob, e.bytes) for e in r.choices[0].logprobs.content]
    assert len(whole) == r.usage.completion_tokens == 12
    text, entries, usage = _streamed_chat_logprobs(client, **kw)
    assert text == r.choices[0].message.content and usage == 12
    assert entries == whole


def test_chat_logprob_bytes_are_the_tokens_own(served):
    _, client = served
    r = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=2, extra_body={"allowed_token_ids": [195, 169]})
    content = r.choices[0].logprobs.content
    assert all(len(e.bytes) == 1 and 128 <= e.bytes[0] < 256 for e in content)  # one UTF-8 byte per token
    raw = b"".join(bytes(e.bytes) for e in content)
    assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content
    for e in content:
        assert all(len(a.bytes) == 1 or a.bytes == [] for a in e.top_logprobs)


def test_developer_role_is_a_system_message(served):
    _, client = served
    dev = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0,
                                         messages=[{"role": "developer", "content": "Answer in Python."}, *USER])
    sys_ = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0,
                                          messages=[{"role": "system", "content": "Answer in Python."}, *USER])
    assert dev.choices[0].message.content == sys_.choices[0].message.content
    assert dev.usage.prompt_tokens == sys_.usage.prompt_tokens


def test_a_template_that_knows_developer_gets_it():
    tok = ByteTokenizer()
    tcfg = TokenizerConfig(tok, "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                "{# roles: system, developer, user #}")
    plain = TokenizerConfig(tok, "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    msgs = [{"role": "developer", "content": "a"}, {"role": "user", "content": "b"}]
    assert tcfg.render(msgs, add_generation_prompt=False) == "<developer>a<user>b"
    assert plain.render(msgs, add_generation_prompt=False) == "<system>a<user>b"
    assert msgs[0]["role"] == "developer"  # the request's messages are not changed


def test_streamed_completion_chunks_carry_null_usage(served):
    bg, _ = served
    body = {"model": "tiny", "prompt": "def f(x):", "max_tokens": 4, "temperature": 0, "n": 2, "echo": True,
            "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(f"{bg.http_url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_models_retrieve(served):
    bg, client = served
    listed = {m.id: m.model_dump() for m in client.models.list()}
    for name in ("tiny", "tiny@1", "tiny@2"):
        assert client.models.retrieve(name).model_dump() == listed[name]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    status, body = get_json(f"{bg.http_url}/v1/models/tiny@3")
    assert status == 404 and body["error"]["param"] == "model"


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_stream_options_need_a_stream(served, path):
    """As vLLM answers: stream_options that set a field on a request that does not stream are a 400 naming the
    field; none, or an empty object, pass."""
    from router_helpers import post_json

    bg, _ = served
    body = {"model": "tiny", "max_tokens": 2, "stream_options": {"include_usage": True},
            **({"prompt": "x"} if path == "completions" else {"messages": [{"role": "user", "content": "x"}]})}
    status, err = post_json(f"{bg.http_url}/v1/{path}", body)[:2]
    assert status == 400 and err["error"]["param"] == "stream_options", err
    for unset in (None, {}):
        assert post_json(f"{bg.http_url}/v1/{path}", {**body, "stream_options": unset})[0] == 200
