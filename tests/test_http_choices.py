"""``n`` choices per prompt and batched prompts on the HTTP API, as OpenAI and vLLM return them: choice i * n + j is
prompt i's j-th sequence; the sequences of one request run at once; a seeded request seeds choice j with seed + j
(so each choice equals the single request of that seed); streamed chunks carry their choice's index and add up to
the non-streamed choices; the usage counts each prompt once and every choice's output."""

import asyncio
import json
import urllib.request

import pytest

from colm.generate import generate
from colm.router.local_backend import LocalBackend
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer
from conftest import make_model
from router_helpers import chat_router, post_json

openai = pytest.importorskip("openai")


class CountingBackend(LocalBackend):
    """The local backend, counting the sequences it runs at once."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.active = self.peak = 0

    async def generate(self, req, prefill_id, decode_id):
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(0.05)  # every sequence of a request is in flight before the first one ends
            async for tok in super().generate(req, prefill_id, decode_id):
                yield tok
        finally:
            self.active -= 1


@pytest.fixture(scope="module")
def model():
    return make_model("tiny-air", seed=1)


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    backend = CountingBackend(model)
    bg, client, _ = chat_router(model, tmp_path_factory.mktemp("ckpt"), backend, served_model_name="tiny")
    yield bg, client, backend
    bg.stop()


def greedy(model, ids, n_new):
    return generate(model, ids, SamplingParams(max_new_tokens=n_new, ignore_eos=True), scale=2).token_ids


def test_n_choices_of_batched_prompts_in_order_run_at_once(served, model):
    bg, client, backend = served
    p0, p1 = [5, 9, 14, 200, 3], [77, 1, 2]
    backend.peak = 0
    status, body = post_json(f"{bg.http_url}/v1/completions",
                             {"prompt": [p0, p1], "n": 3, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                              "scale": 2})
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == list(range(6))
    tok = ByteTokenizer()
    for c in body["choices"]:
        assert c["text"] == tok.decode(greedy(model, p0 if c["index"] < 3 else p1, 4)) and c["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 5 + 3, "completion_tokens": 6 * 4, "total_tokens": 8 + 24}
    assert backend.peak == 6  # the six sequences were in flight together (prompts used to run one after another)


def test_a_seeded_choice_equals_the_single_request_of_its_seed(served):
    bg, client, _ = served
    kw = dict(model="tiny", prompt="The chain", max_tokens=8, temperature=1.0, seed=41, extra_body={"ignore_eos": True})
    many = client.completions.create(n=3, **kw)
    texts = [c.text for c in sorted(many.choices, key=lambda c: c.index)]
    assert texts == [client.completions.create(n=1, **{**kw, "seed": 41 + j}).choices[0].text for j in range(3)]
    assert len(set(texts)) > 1  # three samples, not one repeated
    assert texts == [c.text for c in sorted(client.completions.create(n=3, **kw).choices, key=lambda c: c.index)]


def test_streamed_choices_carry_their_index_and_add_up(served, model):
    bg, client, _ = served
    kw = dict(model="tiny", prompt=["Hello", "Chains of"], max_tokens=5, temperature=1.0, seed=7,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(n=2, **kw)
    parts, finishes, usage = {}, {}, None
    for ch in client.completions.create(n=2, stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert parts == {c.index: c.text for c in whole.choices} and finishes == {i: "length" for i in range(4)}
    assert usage.prompt_tokens == len("Hello") + len("Chains of") and usage.completion_tokens == 4 * 5


def test_chat_n_choices_streamed_and_not(served):
    bg, client, _ = served
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=6, temperature=1.0,
              seed=3, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(n=3, **kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 18
    single = [client.chat.completions.create(n=1, **{**kw, "seed": 3 + j}).choices[0].message.content
              for j in range(3)]
    assert [c.message.content for c in sorted(r.choices, key=lambda c: c.index)] == single
    parts, roles = {}, set()
    for ch in client.chat.completions.create(n=3, stream=True, **kw):
        for c in ch.choices:
            if c.delta.role:
                roles.add(c.index)
            parts[c.index] = parts.get(c.index, "") + (c.delta.content or "")
    assert roles == {0, 1, 2} and [parts[j] for j in range(3)] == single


def test_a_bad_prompt_in_a_batch_fails_the_request_before_anything_runs(served):
    """One prompt of a batch over the context: the whole request is a 400 naming it, and no sequence started; a
    best_of other than n is a 400 naming best_of."""
    bg, _, backend = served
    backend.peak = 0
    too_long = [1] * 600
    status, body = post_json(f"{bg.http_url}/v1/completions", {"prompt": [[5, 6], too_long], "n": 2, "max_tokens": 2})
    assert status == 400 and "exceeds the context" in body["error"]["message"], body
    assert backend.peak == 0
    req = urllib.request.Request(f"{bg.http_url}/v1/completions", data=json.dumps(
        {"prompt": "x", "n": 2, "best_of": 3}).encode(), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "best_of" in e.value.read().decode()
