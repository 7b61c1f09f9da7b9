"""Forced tool calls on the chat API (``router.tool_calls``): a named function's arguments and ``"required"``'s
calls come back as OpenAI ``tool_calls`` whose arguments follow each tool's schema (checked with ``jsonschema``),
equal to ``colm generate`` held to the same schema; the ``openai`` client reads them, streamed (a named function)
or not; multi-turn messages with earlier calls and tool results are accepted; what cannot be honoured is a 400
naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest

pytest.importorskip("xgrammar")

from colm.chat_template import TokenizerConfig  # noqa: E402
from colm.generate import generate  # noqa: E402
from colm.router.tool_calls import forced_choice  # noqa: E402
from colm.sampling import SamplingParams  # noqa: E402
from colm.tokenizer import ByteTokenizer  # noqa: E402
from conftest import make_model  # noqa: E402
from router_helpers import chat_router, post_json  # noqa: E402

openai = pytest.importorskip("openai")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet", "pst"]}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = make_model("tiny-air", seed=4)
    path = tmp_path_factory.mktemp("tools")
    bg, client, tok = chat_router(model, path, served_model_name="tiny")
    yield bg, client, model, TokenizerConfig.load(str(path), tok)
    bg.stop()


def reference(model, tcfg, tool_choice, max_new=120) -> str:
    ids = tcfg.encode(tcfg.render(MESSAGES, add_generation_prompt=True, tools=TOOLS), False)
    so = forced_choice(tool_choice, TOOLS).structured()
    r = generate(model, ids, SamplingParams(max_new_tokens=max_new, structured=so), scale=2,
                 eos_id=ByteTokenizer.eos_id, tokenizer=ByteTokenizer())
    assert r.finish_reason == "stop"
    return ByteTokenizer().decode(r.token_ids[:-1])


def test_a_named_function_returns_its_arguments_as_a_call(served):
    bg, client, model, tcfg = served
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                       max_tokens=120, temperature=0, extra_body={"scale": 2})
    msg = r.choices[0].message
    assert msg.content is None and r.choices[0].finish_reason == "stop" and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER)
    assert args == json.loads(reference(model, tcfg, choice))


def test_a_named_call_streams_its_arguments(served):
    """stream: the first delta opens the call (id, name), the next ones add to its arguments; put together they are
    the arguments the whole response gives."""
    bg, client, model, tcfg = served
    choice = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=choice, max_tokens=120, temperature=0,
              extra_body={"scale": 2})
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    parts, names, ids, finish = [], set(), set(), None
    for ch in client.chat.completions.create(stream=True, **kw):
        c = ch.choices[0]
        assert not c.delta.content
        for call in c.delta.tool_calls or ():
            parts.append(call.function.arguments or "")
            if call.function.name:
                names.add(call.function.name)
            if call.id:
                ids.add(call.id)
        finish = c.finish_reason or finish
    assert "".join(parts) == whole.function.arguments and names == {"get_weather"} and len(ids) == 1
    assert finish == "stop"


def test_required_returns_calls_of_the_tools(served):
    bg, client, model, tcfg = served
    for seed in range(3):
        status, body = post_json(f"{bg.http_url}/v1/chat/completions",
                                 {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 200,
                                  "temperature": 1.0, "seed": seed, "scale": 2})
        assert status == 200, body
        c = body["choices"][0]
        if c["finish_reason"] == "length":  # a long sampled array: stays text, as OpenAI returns a cut-off call
            continue
        assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None
        for call in c["message"]["tool_calls"]:
            schema = {"get_weather": WEATHER, "get_time": TIME}[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    status, body = post_json(f"{bg.http_url}/v1/chat/completions",
                             {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required", "max_tokens": 200,
                              "temperature": 0, "scale": 2})
    calls = body["choices"][0]["message"]["tool_calls"]
    want = json.loads(reference(model, tcfg, "required", 200))
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (w["name"], w["parameters"]) for w in want]


def test_earlier_calls_and_tool_results_are_a_conversation(served):
    bg, client, _, _ = served
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, cloudy"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body,param,words", [
    ({"tool_choice": "auto"}, "tool_choice", "no parser"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not one of the tools"),
    ({"tool_choice": "required", "tools": None}, "tool_choice", "needs tools"),
    ({"tool_choice": "required", "stream": True}, "stream", "returned whole"),
    ({"tool_choice": "required", "guided_regex": "a+"}, "tool_choice", "drop response_format"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "letters, digits"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools", "appears twice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id", "names the call"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0]", "arguments")])
def test_what_cannot_be_honoured_is_a_400(served, body, param, words):
    bg = served[0]
    status, out = post_json(f"{bg.http_url}/v1/chat/completions",
                            {"messages": MESSAGES, "tools": TOOLS, "max_tokens": 4, **body})
    assert status == 400 and out["error"]["param"] == param and words in out["error"]["message"], out
