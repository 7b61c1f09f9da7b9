"""OpenAI / vLLM semantics of the HTTP API that clients such as lm-eval rely on: model names (one per scale,
404 for others), stop strings cut from the text, /tokenizer_info naming the special tokens, and the logprobs
limit."""

import json
import urllib.request

import pytest
import torch

from colm.generate import generate
from colm.model import CoLM
from colm.presets import preset
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.stop_trim import StopTrimmer
from colm.router.local_backend import LocalBackend
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer
from router_helpers import BackgroundRouter, get_json, post_json

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CoLM(preset("tiny-air")).reset_parameters(seed=1).eval()


@pytest.fixture(scope="module")
def bg(model):
    router = Router(RouterConfig(grpc_port=0, http_port=0, poll_interval_s=0.05, served_model_name="tiny"),
                    model.cfg, ByteTokenizer(), LocalBackend(model))
    bg = BackgroundRouter(router)
    yield bg
    bg.stop()


def ref_text(model, prompt, n, scale):
    tok = ByteTokenizer()
    return tok.decode(generate(model, tok.encode(prompt), SamplingParams(max_new_tokens=n), scale=scale,
                               eos_id=tok.eos_id).token_ids)


def test_models_lists_one_name_per_scale_and_names_pin_the_scale(bg, model):
    status, body = get_json(f"{bg.http_url}/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny", "tiny@1", "tiny@2"]
    assert all(m["object"] == "model" and m["max_model_len"] == model.cfg.max_seq_len for m in body["data"])
    client = openai.OpenAI(base_url=f"{bg.http_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny", "tiny@1", "tiny@2"]
    for scale in (1, 2):
        r = client.completions.create(model=f"tiny@{scale}", prompt="Hello", max_tokens=6, temperature=0)
        assert r.model == f"tiny@{scale}" and r.choices[0].model_extra["scale"] == scale
        assert r.choices[0].text == ref_text(model, "Hello", 6, scale)
        same = post_json(f"{bg.http_url}/v1/completions", {"model": f"tiny@{scale}", "prompt": "Hello",
                                                            "max_tokens": 1, "scale": scale})
        assert same[0] == 200, same
    # omitted: the default name (the router picks the scale)
    status, body = post_json(f"{bg.http_url}/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert status == 200 and body["model"] == "tiny"


@pytest.mark.parametrize("name", ["colm", "x", "tiny@3", "tiny@0", "tiny@01", "tiny@", "tiny@1@1", "TINY", ""])
def test_unknown_models_are_404_as_vllm_answers(bg, name):
    for path in ("/v1/completions", "/v1/chat/completions"):
        status, body = post_json(f"{bg.http_url}{path}", {"model": name, "prompt": "hi", "max_tokens": 1,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert status == 404, body
        assert body == {"error": {"message": f"The model `{name}` does not exist.", "type": "NotFoundError",
                                  "param": "model", "code": 404}}
    client = openai.OpenAI(base_url=f"{bg.http_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=name, prompt="hi", max_tokens=1)


def test_a_scale_that_conflicts_with_the_model_name_is_400(bg):
    status, body = post_json(f"{bg.http_url}/v1/completions", {"model": "tiny@1", "prompt": "hi", "max_tokens": 1,
                                                               "colm": {"scale": 2}})
    assert status == 400 and body["error"]["param"] == "scale" and "tiny@1" in body["error"]["message"], body


def test_tokenizer_info_names_the_special_tokens_and_tokenize_maps_them_back(bg):
    status, info = get_json(f"{bg.http_url}/tokenizer_info")
    assert status == 200
    assert isinstance(info["eos_token"], str) and isinstance(info["bos_token"], str)
    for name, tid in (("eos_token", ByteTokenizer.eos_id), ("bos_token", ByteTokenizer.bos_id)):
        # what lm-eval's remote tokenizer does to find the id: /tokenize(eos_token)[0]
        status, body = post_json(f"{bg.http_url}/tokenize", {"prompt": info[name], "add_special_tokens": False})
        assert status == 200 and body["tokens"] == [tid], body
    assert info["eos_token_id"] == ByteTokenizer.eos_id and info["model_max_length"] == info["max_model_len"]
    assert post_json(f"{bg.http_url}/tokenize", {"prompt": "a" + info["eos_token"]})[1]["tokens"] == [97, 257]
    assert post_json(f"{bg.http_url}/detokenize", {"tokens": [104, 105]})[1]["prompt"] == "hi"


def stream_text(url, body):
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks


def test_stop_strings_are_not_returned_unless_asked(bg, model):
    full = ref_text(model, "Hello, chains", 32, 2)
    # stops of whole characters (a random model's bytes are not all UTF-8): the first one ends the text, the
    # second occurs only after it
    i = next(i for i in range(4, len(full)) if full[i:i + 3].isascii() and full[i:i + 3].isprintable())
    stops = [full[i:i + 2], full[i + 2]]
    cut = full[:full.index(stops[0])]
    base = {"model": "tiny@2", "prompt": "Hello, chains", "max_tokens": 32, "temperature": 0}
    for stop in (stops, stops[0]):
        status, body = post_json(f"{bg.http_url}/v1/completions", {**base, "stop": stop})
        assert status == 200 and body["choices"][0]["text"] == cut and body["choices"][0]["finish_reason"] == "stop"
        text, chunks = stream_text(bg.http_url, {**base, "stop": stop})
        assert text == cut and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    status, body = post_json(f"{bg.http_url}/v1/completions", {**base, "stop": stops,
                                                               "include_stop_str_in_output": True})
    assert body["choices"][0]["text"] == cut + stops[0]
    assert stream_text(bg.http_url, {**base, "stop": stops, "include_stop_str_in_output": True})[0] == cut + stops[0]
    # echo: the prompt is returned whole, the completion cut
    status, body = post_json(f"{bg.http_url}/v1/completions", {**base, "stop": stops, "echo": True})
    assert body["choices"][0]["text"] == "Hello, chains" + cut
    # a stop that never occurs changes nothing
    status, body = post_json(f"{bg.http_url}/v1/completions", {**base, "stop": ["\x00never"]})
    assert body["choices"][0]["text"] == full and body["choices"][0]["finish_reason"] == "length"
    assert stream_text(bg.http_url, {**base, "stop": ["\x00never"]})[0] == full


def test_stop_trimmer_holds_back_what_may_start_a_stop_string():
    t = StopTrimmer(("STOP", "xy"), include_stop=False)
    out = [t.add(d) for d in ("ab", "cS", "TO", "Pzz")]
    assert "".join(out) == "abc" and out[:2] == ["", "abc"[:1]]  # three characters held back: they may start "STOP"
    t = StopTrimmer(("STOP",), include_stop=False)
    assert t.add("abST") == "a" and t.add("Oq") == "bS" and t.flush() == "TOq"
    t = StopTrimmer(("ST", "TOP"), include_stop=True)
    assert t.add("aSTOP") == "aST" and t.add("more") == "" and t.flush() == ""
    t = StopTrimmer((), include_stop=False)
    assert t.add("abc") == "abc" and t.flush() == ""


def test_logprobs_above_what_the_engines_report_are_400(bg):
    """Generated tokens report up to 20 alternatives; the prompt's positions (echo) only their most likely one."""
    for body in ({"logprobs": 21}, {"logprobs": 5, "echo": True}):
        status, out = post_json(f"{bg.http_url}/v1/completions", {"prompt": "hi", "max_tokens": 1, **body})
        assert status == 400 and out["error"]["param"] == "logprobs", out
    for lp in (0, 1, True):
        status, body = post_json(f"{bg.http_url}/v1/completions",
                                 {"prompt": "hi", "max_tokens": 2, "logprobs": lp, "temperature": 0})
        assert status == 200 and len(body["choices"][0]["logprobs"]["token_logprobs"]) == 2, body


def test_stop_token_ids_and_prompt_truncation(bg, model):
    """vLLM's stop_token_ids end the output at the first of them (kept, as an EOS is); truncate_prompt_tokens keeps
    the prompt's last N tokens (echo shows what was used); both against colm generate."""
    tok = ByteTokenizer()
    ids = tok.encode("a prompt that is longer than its truncation")
    full = generate(model, ids, SamplingParams(max_new_tokens=12, ignore_eos=True), scale=2).token_ids
    stop = full[5]
    status, body = post_json(f"{bg.http_url}/v1/completions", {"prompt": ids, "max_tokens": 12, "temperature": 0,
                                                               "scale": 2, "ignore_eos": True, "stop_token_ids": [stop]})
    want = full[:full.index(stop) + 1]
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop", body
    assert body["usage"]["completion_tokens"] == len(want) and body["choices"][0]["text"] == tok.decode(want)
    status, body = post_json(f"{bg.http_url}/v1/completions", {"prompt": ids, "max_tokens": 6, "temperature": 0,
                                                               "scale": 2, "truncate_prompt_tokens": 10, "echo": True})
    cut = generate(model, ids[-10:], SamplingParams(max_new_tokens=6), scale=2, eos_id=tok.eos_id).token_ids
    assert status == 200 and body["usage"]["prompt_tokens"] == 10, body
    assert body["choices"][0]["text"] == tok.decode(ids[-10:] + cut)
    for bad in ({"stop_token_ids": [-1]}, {"stop_token_ids": [1] * 1025}, {"truncate_prompt_tokens": 0}):
        status, body = post_json(f"{bg.http_url}/v1/completions", {"prompt": "x", **bad})
        assert status == 400 and body["error"]["param"].startswith(next(iter(bad))), body
