"""The HTTP API's answers to malformed requests: one regression test per defect an outside fuzz campaign
found (500s for bad types, silently ignored fields, the x-api-key header, plain-text 404 / 405 / 413).

Every rejection is a 400 (or 401 / 404 / 405 / 413) with the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` whose message names the field and what is allowed.
"""

import gzip
import json
import urllib.error
import urllib.request

import pytest
import torch

from colm.model import CoLM
from colm.presets import preset
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.local_backend import LocalBackend
from colm.router.openai_schema import MAX_BUDGET_MS
from colm.tokenizer import ByteTokenizer
from router_helpers import BackgroundRouter

API_KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CoLM(preset("tiny-air")).reset_parameters(seed=1).eval()


@pytest.fixture(scope="module")
def url(model):
    router = Router(RouterConfig(grpc_port=0, http_port=0, poll_interval_s=0.05), model.cfg, ByteTokenizer(),
                    LocalBackend(model))
    bg = BackgroundRouter(router)
    yield bg.http_url
    bg.stop()


def call(url: str, body=None, raw: bytes | None = None, method: str = "POST", headers=None):
    """One HTTP request -> (status, parsed JSON or text, response headers)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text, hdrs = r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        status, text, hdrs = e.code, e.read().decode(), e.headers
    try:
        return status, json.loads(text), hdrs
    except ValueError:
        return status, text, hdrs


def assert_error(status, body, want_status: int, field: str | None, *words: str):
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["code"] == want_status and isinstance(err["message"], str) and err["type"]
    if field is not None:
        assert err["param"] == field, err
        assert field in err["message"], err
    for w in words:
        assert w in err["message"], err


def completion(url: str, body=None, raw=None, headers=None):
    return call(f"{url}/v1/completions", body, raw=raw, headers=headers)[:2]


GOOD = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "scale": 1}

# (the fields to change or add, the field the error must name, words the message must hold)
BAD_TYPES = [
    ({"stop": 3}, "stop", "allowed"),
    ({"stop": True}, "stop", "allowed"),
    ({"temperature": [1]}, "temperature", "allowed"),
    ({"temperature": {"a": 1}}, "temperature", "allowed"),
    ({"top_p": [0.5]}, "top_p", "allowed"),
    ({"top_p": {}}, "top_p", "allowed"),
    ({"top_k": [1]}, "top_k", "allowed"),
    ({"top_k": {}}, "top_k", "allowed"),
    ({"top_k": 2.5}, "top_k", "integer"),
    ({"colm": 3}, "colm", "allowed"),
    ({"colm": "scale=1"}, "colm", "allowed"),
    ({"colm": [1]}, "colm", "allowed"),
    ({"seed": True}, "seed", "integer"),
    ({"seed": "7"}, "seed", "integer"),
    ({"max_tokens": "3"}, "max_tokens", "integer"),
    ({"max_tokens": True}, "max_tokens", "integer"),
    ({"temperature": "0.5"}, "temperature", "number"),
    ({"temperature": 1e-45}, "temperature", "allowed"),
    ({"temperature": 1000}, "temperature", "allowed"),
    ({"top_p": 0}, "top_p", "allowed"),
    ({"prompt": [[None, 84, 104]]}, "prompt", "prompt[0][0] is null"),
    ({"prompt": [84, None]}, "prompt", "prompt[1] is null"),
    ({"prompt": [[-1, 84]]}, "prompt", "prompt[0][0] is -1"),
    ({"prompt": {"text": "hi"}}, "prompt", "allowed"),
    ({"prompt": None}, "prompt", "allowed"),
    ({"prompt": "\ud800"}, "prompt", "surrogate"),
    ({"prompt": "x" * 600}, "prompt", "exceeds the context"),  # checked by the router: param named all the same
    ({"prompt": [5, 999]}, "prompt", "outside the vocabulary"),
    ({"echo": "yes"}, "echo", "boolean"),
    ({"stream": 1}, "stream", "boolean"),
    ({"stream_options": {"include_usage": "y"}}, "stream_options.include_usage", "boolean"),
    ({"logprobs": "1"}, "logprobs", "allowed"),
    ({"stop": ["ok", ""]}, "stop[1]", "allowed"),
    ({"stop": ["s"] * 17}, "stop", "allowed"),
]


@pytest.mark.parametrize("change,field,word", BAD_TYPES, ids=[f"{k}" for k, _, _ in BAD_TYPES])
def test_bad_types_are_400_naming_the_field(url, change, field, word):
    assert_error(*completion(url, {**GOOD, **change}), 400, field, word)


# JSON's non-finite literals, which Python's json reader accepts
NON_FINITE = [('"top_k": Infinity', "top_k"), ('"top_k": -Infinity', "top_k"), ('"temperature": NaN', "temperature"),
              ('"temperature": Infinity', "temperature"), ('"top_p": NaN', "top_p"), ('"seed": NaN', "seed"),
              ('"max_tokens": Infinity', "max_tokens"), ('"deadline_ms": NaN', "deadline_ms"),
              ('"colm": {"tpot_ms": Infinity}', "colm.tpot_ms"), ('"presence_penalty": NaN', "presence_penalty")]


@pytest.mark.parametrize("fragment,field", NON_FINITE, ids=[f for _, f in NON_FINITE])
def test_non_finite_numbers_are_400_naming_the_field(url, fragment, field):
    raw = ('{"prompt": "Hello", "max_tokens": 2, ' + fragment + "}").encode()
    assert_error(*completion(url, raw=raw), 400, field)


def test_null_means_the_default_where_openai_allows_null(url):
    """The OpenAI schema marks these nullable: null is the default, exactly as if the field were left out."""
    status, plain = completion(url, GOOD)
    assert status == 200, plain
    nulls = {k: None for k in ("temperature", "top_p", "top_k", "seed", "stop", "n", "best_of", "logprobs", "echo",
                               "stream", "suffix", "presence_penalty", "frequency_penalty", "logit_bias", "user",
                               "ttft_ms", "tpot_ms", "deadline_ms", "on_miss", "colm")}
    status, body = completion(url, {**GOOD, **nulls, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["text"] == plain["choices"][0]["text"]


@pytest.mark.parametrize("depth", [100_000, 5_000])
def test_deeply_nested_json_is_400_not_a_recursion_error(url, depth):
    nested = "[" * depth + "]" * depth
    assert_error(*completion(url, raw=nested.encode()), 400, None, "nested too deeply")
    raw = ('{"prompt": "Hello", "max_tokens": 1, "extra": ' + nested + "}").encode()
    assert_error(*completion(url, raw=raw), 400, None, "nested too deeply")
    raw = ('{"prompt": ' + nested + ', "max_tokens": 1}').encode()
    assert_error(*completion(url, raw=raw), 400, None, "nested too deeply")


def test_nested_lists_in_the_prompt_within_the_recursion_limit_name_the_prompt(url):
    raw = ('{"prompt": ' + "[" * 300 + "1" + "]" * 300 + ', "max_tokens": 1}').encode()
    assert_error(*completion(url, raw=raw), 400, "prompt", "prompt[0][0] is a list")


def test_body_claiming_gzip_that_is_not_gzip_is_400(url):
    headers = {"Content-Encoding": "gzip"}
    assert_error(*completion(url, raw=json.dumps(GOOD).encode(), headers=headers), 400, None, "Content-Encoding: gzip")
    assert_error(*completion(url, raw=b"\x1f\x8b\x08\x00garbage", headers=headers), 400, None, "Content-Encoding")
    status, body = completion(url, raw=gzip.compress(json.dumps(GOOD).encode()), headers=headers)  # real gzip: fine
    assert status == 200, body


@pytest.mark.parametrize("raw,words", [(b"{not json", "not valid JSON"), (b"\xff\xfe{}", "not valid JSON"),
                                       (b"", "not valid JSON"), (b"[1, 2]", "JSON object"),
                                       (b'"prompt"', "JSON object"), (b'{"prompt": 1' + b"0" * 5000 + b"}", "JSON")])
def test_bodies_that_are_not_a_json_object_are_400(url, raw, words):
    assert_error(*completion(url, raw=raw), 400, None, words)


def test_a_wrong_content_type_or_charset_is_read_as_utf8_json(url):
    for ct in ("text/plain; charset=bogus-charset", "application/x-www-form-urlencoded",
               "application/json; charset=latin-1"):
        status, body = completion(url, raw=json.dumps(GOOD).encode(), headers={"Content-Type": ct})
        assert status == 200, (ct, body)


UNSUPPORTED = [({"suffix": "tail"}, "suffix"), ({"presence_penalty": 2.5}, "presence_penalty"),
               ({"frequency_penalty": -3}, "frequency_penalty"), ({"best_of": 2}, "best_of"), ({"n": 17}, "n"),
               ({"n": 0}, "n"), ({"n": 2, "best_of": 3}, "best_of"), ({"logit_bias": {"x50": 10}}, "logit_bias"),
               ({"best_of": True}, "best_of"), ({"logit_bias": {"50": "x"}}, "logit_bias"),
               ({"logit_bias": {"50": 100.5}}, "logit_bias"), ({"repetition_penalty": 0}, "repetition_penalty"),
               ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 1.5}, "min_tokens")]


@pytest.mark.parametrize("change,field", UNSUPPORTED, ids=[f for _, f in UNSUPPORTED])
def test_fields_the_engines_cannot_honour_are_rejected(url, change, field):
    assert_error(*completion(url, {**GOOD, **change}), 400, field, "allowed")


def test_no_op_values_and_unknown_fields_are_accepted(url):
    status, plain = completion(url, GOOD)
    assert status == 200, plain
    noops = {"presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1, "n": 1, "logit_bias": {}, "user": "me",
             "repetition_penalty": 1, "min_tokens": 0,
             "suffix": "", "model": "colm", "some_future_field": {"x": [1, 2]}, "top_k": -1}
    status, body = completion(url, {**GOOD, **noops})
    assert status == 200, body
    assert body["choices"][0]["text"] == plain["choices"][0]["text"]


BAD_EXTRAS = [
    ({"scale": 0}, "scale", "allowed"), ({"scale": True}, "scale", "integer"), ({"scale": 1.5}, "scale", "integer"),
    ({"scale": 3}, None, "scale=3"), ({"colm": {"scale": 0}}, "colm.scale", "allowed"),
    ({"scale": None, "colm": {"scale": 3}}, None, "scale=3"), ({"ttft_ms": 0}, "ttft_ms", "allowed"),
    ({"ttft_ms": -5}, "ttft_ms", "allowed"), ({"tpot_ms": "5"}, "tpot_ms", "number"),
    ({"deadline_ms": MAX_BUDGET_MS * 2}, "deadline_ms", "allowed"), ({"deadline_ms": 1e300}, "deadline_ms", "allowed"),
    ({"colm": {"deadline_ms": -1}}, "colm.deadline_ms", "allowed"), ({"on_miss": "maybe"}, "on_miss", "reject"),
    ({"colm": {"on_miss": 1}}, "colm.on_miss", "degrade"), ({"colm": {"tpot": 5}}, "colm.tpot", "tpot_ms"),
    ({"speculative": 17}, "speculative", "0..16"), ({"colm": {"speculative": -1}}, "colm.speculative", "0..16"),
    ({"speculative": True}, "speculative", "integer"),
]


@pytest.mark.parametrize("change,field,word", BAD_EXTRAS, ids=[str(c) for c, _, _ in BAD_EXTRAS])
def test_colm_extras_are_validated(url, change, field, word):
    status, body = completion(url, {**GOOD, **change})
    assert_error(status, body, 400, field, word)
    if field is None:  # checked by the router against the model (a scale above its number of chains)
        assert body["error"]["param"] == "scale"


def test_valid_colm_extras_are_honoured(url):
    status, body = completion(url, {"prompt": "Hello", "max_tokens": 2, "temperature": 0,
                                    "colm": {"scale": 2, "deadline_ms": 60_000, "on_miss": "degrade", "speculative": 4}})
    assert status == 200 and body["choices"][0]["scale"] == 2, body
    status, body = completion(url, {"prompt": "Hello", "max_tokens": 2, "temperature": 0, "scale": 1,
                                    "colm": {"scale": 2}})  # the top level wins
    assert status == 200 and body["choices"][0]["scale"] == 1, body


def test_tokenize_and_detokenize_validate_their_fields(url):
    assert_error(*call(f"{url}/tokenize", {"prompt": 5})[:2], 400, "prompt", "string")
    assert_error(*call(f"{url}/detokenize", {"tokens": [1, None]})[:2], 400, "tokens[1]", "integer")
    assert_error(*call(f"{url}/detokenize", {"tokens": [1, 10**30]})[:2], 400, "tokens[1]", "vocabulary")
    assert_error(*call(f"{url}/detokenize", {"tokens": True})[:2], 400, "tokens", "list")


def test_unknown_routes_and_wrong_methods_are_json(url):
    status, body, _ = call(f"{url}/v1/nope", {"prompt": "x"})
    assert_error(status, body, 404, None, "/v1/nope")
    status, body, headers = call(f"{url}/v1/completions", method="GET")
    assert_error(status, body, 405, None, "GET", "POST")
    assert "POST" in headers.get("Allow", "")
    status, body, _ = call(f"{url}/v1/models", {"x": 1}, method="DELETE")
    assert_error(status, body, 405, None, "DELETE")


@pytest.fixture(scope="module")
def keyed(model):
    router = Router(RouterConfig(grpc_port=0, http_port=0, api_key=API_KEY, max_message_bytes=64 << 10),
                    model.cfg, ByteTokenizer(), LocalBackend(model))
    bg = BackgroundRouter(router)
    yield bg
    bg.stop()


def test_api_key_as_bearer_or_x_api_key_on_http_and_grpc(keyed):
    import grpc

    from colm.client import Client

    url = keyed.http_url
    body = {"prompt": "hi", "max_tokens": 2}
    assert completion(url, body, headers={"Authorization": f"Bearer {API_KEY}"})[0] == 200
    assert completion(url, body, headers={"x-api-key": API_KEY})[0] == 200
    assert completion(url, body, headers={"X-Api-Key": API_KEY})[0] == 200
    assert completion(url, body, headers={"Authorization": f"bearer {API_KEY}"})[0] == 200  # schemes ignore case
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"x-api-key": API_KEY[:-1]},
                    {"Authorization": f"Basic {API_KEY}"}, {"Authorization": API_KEY},  # the key without its scheme
                    {"Authorization": f"Bearer{API_KEY}"}, {"Authorization": "Bearer"}):
        assert_error(*completion(url, body, headers=headers), 401, None, "API key")
    assert_error(*call(f"{url}/v1/models", method="GET")[:2], 401, None, "API key")
    assert call(f"{url}/health", method="GET")[0] == 200  # no key needed
    with Client(keyed.grpc_addr, api_key=API_KEY) as c:  # the same key and the same rule on gRPC
        assert len(c.complete("hi", max_new_tokens=2)["token_ids"]) == 2
    with Client(keyed.grpc_addr) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.complete("hi", max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_an_api_key_header_that_is_not_utf8_is_401_not_500(keyed):
    import socket

    host, port = keyed.http_url.rsplit("/", 1)[1].split(":")
    body = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()
    for header in (b"x-api-key: \xff\xfe", b"Authorization: Bearer \xc3" + API_KEY.encode()):
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + header +
                      b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        head, _, payload = out.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0] == b"HTTP/1.1 401 Unauthorized", out[:300]
        assert_error(401, json.loads(payload), 401, None, "API key")


def test_oversized_bodies_are_413_json(keyed):
    headers = {"x-api-key": API_KEY}
    big = json.dumps({"prompt": "y" * (100 << 10), "max_tokens": 1}).encode()
    assert_error(*completion(keyed.http_url, raw=big, headers=headers), 413, None, "limit")
    bomb = gzip.compress(b'{"prompt": "' + b"y" * (1 << 20) + b'"}')  # small on the wire, 1 MiB decompressed
    assert len(bomb) < (64 << 10)
    assert_error(*completion(keyed.http_url, raw=bomb, headers={**headers, "Content-Encoding": "gzip"}), 413, None)
