"""Fuzz the OpenAI-compatible HTTP API of a running router over real prefill and decode worker processes.

Seeded, bounded: at least 1000 malformed requests, each a valid completions (or tokenize /
detokenize) request mutated at the field level (wrong types, NaN / inf / huge / negative numbers,
nulls, nesting, unsupported fields) or at the byte level (truncated or corrupted JSON, bad encodings,
deep nesting, a Content-Encoding the body does not have, wrong content types, wrong routes and
methods, missing keys, oversized bodies), sent from 4 threads. Every answer must be one of the
documented statuses with the JSON error body, never a 5xx (except 504 for a body that asked for a
deadline of at most a second, which it may fairly miss); meanwhile a well-formed greedy client streams
the same request over and over and must get exactly the tokens it got before the fuzz.
"""

import gzip
import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("colm.decode_worker.service")

from colm import checkpoint  # noqa: E402
from colm.assets import demo_model_dir  # noqa: E402
from colm.router.backend import WorkerInfo  # noqa: E402
from colm.router.config import RouterConfig  # noqa: E402
from colm.router.core import Router  # noqa: E402
from colm.router.grpc_backend import GrpcBackend  # noqa: E402
from colm.tokenizer import ByteTokenizer  # noqa: E402
from router_helpers import BackgroundRouter, start_worker_procs  # noqa: E402

TOKEN = "fuzz-cluster-token-0123456789"
API_KEY = "fuzz-api-key-0123456789"
MAX_BODY = 256 << 10
NUM_REQUESTS = 1200
TIME_CAP_S = 40.0  # the fuzz stops sending here even if NUM_REQUESTS are not out (the count is asserted)
ALLOWED = {200, 400, 401, 404, 405, 413, 429}
STEADY = {"prompt": "The import statement", "max_tokens": 24, "temperature": 0, "scale": 2, "stream": True}


@pytest.fixture(scope="module")
def router():
    """One router for the module, over a decode and a prefill worker process (the bundled demo model)."""
    model_dir = str(demo_model_dir())
    env = {**os.environ, "COLM_CLUSTER_TOKEN": TOKEN}
    procs = []
    try:
        addrs = start_worker_procs(model_dir, (("decode", '{"num_blocks": 256}'), ("prefill", "{}")), env, procs)
        workers = [WorkerInfo("decode-0", "decode", addrs["decode"]),
                   WorkerInfo("prefill-0", "prefill", addrs["prefill"])]
        cfg = RouterConfig(grpc_port=0, http_port=0, api_key=API_KEY, max_message_bytes=MAX_BODY, max_running=8,
                           max_queued=64, poll_interval_s=0.1)
        bg = BackgroundRouter(Router(cfg, checkpoint.load_config(model_dir), ByteTokenizer(),
                                     GrpcBackend(workers, cluster_token=TOKEN)))
        try:
            yield bg
        finally:
            bg.stop()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


# ---- requests ---------------------------------------------------------------------------------------
BASES = [
    {"prompt": "Hello fuzz", "max_tokens": 2, "temperature": 0},
    {"prompt": [72, 101, 108], "max_tokens": 1, "temperature": 0.7, "seed": 3, "top_p": 0.9, "top_k": 5},
    {"prompt": ["ab", [99, 100]], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0},
    {"prompt": "Hi", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0},
    {"prompt": "Hi", "max_tokens": 2, "stop": ["\n", "zz"],
     "colm": {"scale": 1, "deadline_ms": 60000, "on_miss": "degrade"}},
    {"prompt": "Hi", "max_tokens": 2, "scale": 2, "ttft_ms": 5000, "tpot_ms": 1000, "on_miss": "reject", "n": 1,
     "best_of": 1, "user": "u", "presence_penalty": 0, "logit_bias": {}},
]
FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "echo",
          "logprobs", "ignore_eos", "n", "best_of", "suffix", "presence_penalty", "frequency_penalty", "logit_bias",
          "user", "model", "colm", "scale", "ttft_ms", "tpot_ms", "deadline_ms", "on_miss", "no_such_field"]
COLM_FIELDS = ["scale", "ttft_ms", "tpot_ms", "deadline_ms", "on_miss", "no_such_field"]


def nested(depth: int, leaf=1):
    x = leaf
    for _ in range(depth):
        x = [x]
    return x


EVIL = [None, True, False, 0, 1, -1, 2, 3, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400, 0.0, -0.0, 0.5, 1.5,
        1e-45, 5e-324, 1e308, -1e308, math.nan, math.inf, -math.inf, "", "0", "1.5", "NaN", "null", "x" * 300,
        "\ud800", "é漢🙂\x00", [], [None], [1, "a"], [[None, 84, 104]], [[]], [""], [1.5], [True], {}, {"a": 1},
        {"scale": "x"}, {"include_usage": 1}, "degrade", "reject", nested(50), nested(400), [nested(3)] * 3]


def field_mutation(rng: random.Random, body: dict) -> dict:
    body = json.loads(json.dumps(body))
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.random()
        if op < 0.1 and body:
            body.pop(rng.choice(list(body)))
        elif op < 0.25:
            colm = body.get("colm") if isinstance(body.get("colm"), dict) else {}
            colm[rng.choice(COLM_FIELDS)] = rng.choice(EVIL)
            body["colm"] = colm
        else:
            body[rng.choice(FIELDS)] = rng.choice(EVIL)
    return body


def byte_mutation(rng: random.Random, text: bytes) -> bytes:
    op = rng.randrange(12)
    if op == 0:
        return text[:rng.randrange(len(text) + 1)]
    if op == 1:
        i = rng.randrange(len(text))
        return text[:i] + bytes([rng.randrange(256)]) + text[i + 1:]
    if op == 2:
        i = rng.randrange(len(text) + 1)
        return text[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8))) + text[i:]
    if op == 3:
        d = rng.choice((900, 2000, 50_000, 100_000))
        return b'{"prompt": "hi", "max_tokens": 1, "x": ' + b"[" * d + b"]" * d + b"}"
    if op == 4:
        return b'{"prompt": "a", "prompt": ' + rng.choice((b"5", b"null", b'"b"', b"[[null]]")) + b', "max_tokens": 1}'
    if op == 5:
        return text.decode().encode(rng.choice(("utf-16", "utf-32", "utf-8-sig", "latin-1", "utf-16-be")),
                                    errors="replace")
    if op == 6:
        return rng.choice((b"", b"[]", b"null", b"1", b'"s"', b"true", b"{", b"}", b"\xff\xfe\x00", b" " * 10))
    if op == 7:  # a non-finite or malformed number literal where a number was
        lit = rng.choice((b"NaN", b"Infinity", b"-Infinity", b"1e999999", b"-", b"01", b"1.", b".5", b"0x10",
                          b"1" * 5000, b"-0"))
        return text.replace(b": 0", b": " + lit, 1).replace(b": 2", b": " + lit, 1)
    if op == 8:
        return text.replace(b'"Hi"', b'"\\ud800\\udc00\\u0000\x01"', 1).replace(b'"Hello fuzz"', b'"\\uZZZZ"', 1)
    if op == 9:
        return text + rng.choice((b"garbage", b"{}", b"\x00", b",", b"\n" * 3))
    if op == 10:
        return b"prompt=hi&max_tokens=2"
    return b"[" + text + b"]"


def make_request(rng: random.Random) -> tuple[str, str, bytes, dict]:
    """-> (method, path, body, headers)."""
    r = rng.random()
    if r < 0.1:
        path, base = rng.choice((("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [104, 105]})))
        body = field_mutation(rng, base)
        body[rng.choice(("prompt", "tokens"))] = rng.choice(EVIL)
        raw = json.dumps(body).encode()
    else:
        path = "/v1/completions"
        base = rng.choice(BASES)
        raw = json.dumps(field_mutation(rng, base) if rng.random() < 0.65 else base).encode()
        if rng.random() < 0.35:
            raw = byte_mutation(rng, raw)
    headers = {"Content-Type": rng.choice(["application/json"] * 6 + [
        "text/plain", "", "application/x-www-form-urlencoded", "application/json; charset=utf-16",
        "text/plain; charset=no-such-charset", "multipart/form-data; boundary=zz", "application/octet-stream"])}
    k = rng.random()
    if k < 0.45:
        headers["Authorization"] = f"Bearer {API_KEY}"
    elif k < 0.9:
        headers["x-api-key"] = API_KEY
    elif k < 0.95:
        headers["Authorization"] = rng.choice(("Bearer wrong", "", "Bearer", f"Basic {API_KEY}", API_KEY + "x"))
    else:
        headers["x-api-key"] = rng.choice(("", "wrong", API_KEY[:-1], "\t", "\xff\xfe", "é" + API_KEY))
    e = rng.random()
    if e < 0.03:
        headers["Content-Encoding"] = "gzip"  # but the body is not
    elif e < 0.05:
        headers["Content-Encoding"] = "gzip"
        raw = gzip.compress(raw)[:rng.choice((None, 10, -4))]
    elif e < 0.06:
        headers["Content-Encoding"] = "deflate"
        raw = rng.choice((raw, zlib.compress(raw)))
    method = "POST"
    m = rng.random()
    if m < 0.02:
        path = rng.choice(("/v1/completion", "/v1/chat/completions", "/", "/v1/completions/", "/%ff", "/v1//models"))
    elif m < 0.04:
        method = rng.choice(("GET", "PUT", "DELETE", "PATCH"))
    elif m < 0.05:
        raw = json.dumps({"prompt": "y" * (MAX_BODY + rng.randrange(1, 3 * MAX_BODY)), "max_tokens": 1}).encode()
    return method, path, raw, headers


def send(url: str, method: str, path: str, raw: bytes, headers: dict) -> tuple[int, bytes, str]:
    req = urllib.request.Request(url + path, data=raw if method != "GET" else None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def short_deadline(raw: bytes, headers: dict) -> bool:
    """A body asking for a deadline this short may fairly end in 504 (deadline exceeded)."""
    try:
        enc = headers.get("Content-Encoding")
        body = json.loads(gzip.decompress(raw) if enc == "gzip" else zlib.decompress(raw) if enc == "deflate" else raw)
    except Exception:
        return False
    if not isinstance(body, dict):
        return False
    ds = [body.get("deadline_ms"), (body.get("colm") or {}).get("deadline_ms") if isinstance(body.get("colm"), dict)
          else None]
    return any(isinstance(d, (int, float)) and not isinstance(d, bool) and 0 < d <= 1000 for d in ds)


def steady_tokens(url: str) -> list[int]:
    status, raw, _ = send(url, "POST", "/v1/completions", json.dumps(STEADY).encode(),
                          {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    assert status == 200, raw
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    return [c["choices"][0]["token_id"] for c in chunks if "token_id" in c["choices"][0]]


def test_fuzzed_http_requests_never_5xx_and_do_not_disturb_a_greedy_client(router):
    url = router.http_url
    want = steady_tokens(url)
    assert len(want) == STEADY["max_tokens"]

    done = threading.Event()
    steady = {"runs": 0, "mismatch": [], "error": None}

    def steady_client():
        try:
            while not done.is_set():
                got = steady_tokens(url)
                steady["runs"] += 1
                if got != want:
                    steady["mismatch"].append(got)
        except BaseException as e:  # reported below
            steady["error"] = repr(e)

    rng = random.Random(20261124)
    requests = [make_request(rng) for _ in range(NUM_REQUESTS)]
    t_end = time.monotonic() + TIME_CAP_S
    histogram, bad = Counter(), []

    def one(r):
        if time.monotonic() > t_end:
            return None
        method, path, raw, headers = r
        try:
            status, body, ctype = send(url, method, path, raw, headers)
        except Exception as e:
            return r, f"EXC {type(e).__name__}", f"{e}"
        if status not in ALLOWED and not (status == 504 and short_deadline(raw, headers)):  # no 5xx in ALLOWED
            return r, status, body[:300]
        if status != 200:
            try:
                err = json.loads(body)["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
            except Exception:
                return r, f"{status} without the JSON error body", body[:300]
        elif "event-stream" in ctype:  # a failure after the 200 went out is an error event in the stream
            events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
            if not events or events[-1] != "[DONE]":
                return r, "stream without [DONE]", body[-300:]
            for e in events[:-1]:
                code = json.loads(e).get("error", {}).get("code", 200)
                if code >= 500 and not (code == 504 and short_deadline(raw, headers)):
                    return r, f"stream error {code}", e[:300]
        elif not {"choices", "tokens", "prompt"} & set(json.loads(body)):
            return r, "200 without a result", body[:300]
        return r, status, None

    t = threading.Thread(target=steady_client, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(4) as pool:
            for res in pool.map(one, requests):
                if res is None:
                    continue
                r, status, problem = res
                histogram[status] += 1
                if problem is not None:
                    bad.append((status, r[0], r[1], r[2][:200], r[3], problem))
    finally:
        done.set()
        t.join(120)
    seconds = time.monotonic() - t0
    sent = sum(histogram.values())
    print(f"\nfuzz: {sent} requests in {seconds:.1f} s; statuses {dict(sorted(histogram.items(), key=str))}; "
          f"steady client: {steady['runs']} runs during the fuzz")
    assert not bad, f"{len(bad)} bad answers, first: {bad[:5]}"
    assert sent >= 1000, f"only {sent} requests within {TIME_CAP_S} s"
    assert steady["error"] is None, steady["error"]
    assert steady["runs"] >= 1 and not steady["mismatch"], steady["mismatch"][:2]
    assert steady_tokens(url) == want  # and after
    assert histogram[400] > 500 and histogram[200] > 50  # the mutations reach validation, and valid ones still serve
    for s in (401, 404, 405, 413):
        assert histogram[s] > 0, s
