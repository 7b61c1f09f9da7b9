"""The router's public gRPC and HTTP APIs over loopback, with an in-process tiny-air model."""

import threading
import time

import grpc
import pytest
import torch

from colm.client import Client
from colm.generate import generate
from colm.model import CoLM
from colm.presets import preset
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.local_backend import LocalBackend
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer
from _engine_helpers import middle_stop
from router_helpers import BackgroundRouter, post_json

API_KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    cfg = preset("tiny-air")
    model = CoLM(cfg).reset_parameters(seed=1).eval()
    router = Router(RouterConfig(grpc_port=0, http_port=0, metrics_port=0, max_running=8, max_queued=8,
                                 poll_interval_s=0.05), cfg, ByteTokenizer(), LocalBackend(model))
    bg = BackgroundRouter(router)
    yield bg, model
    bg.stop()


def ref_tokens(model, prompt, n, scale):
    return generate(model, ByteTokenizer().encode(prompt), SamplingParams(max_new_tokens=n), scale=scale,
                    eos_id=ByteTokenizer.eos_id).token_ids


def test_grpc_greedy_matches_reference_at_every_scale(served):
    bg, model = served
    with Client(bg.grpc_addr) as c:
        for scale in (1, 2):
            r = c.complete("Hello, chains", max_new_tokens=12, scale=scale)
            assert r["token_ids"] == ref_tokens(model, "Hello, chains", 12, scale)
            assert set(r["scales"]) == {scale} and r["scale"] == scale
            streamed = [ev["id"] for ev in c.stream("Hello, chains", max_new_tokens=12, scale=scale)
                        if ev["kind"] == "token"]
            assert streamed == r["token_ids"]
        assert c.tokenize("ab") == [97, 98]
        scales = c.list_scales()
        assert [s["scale"] for s in scales] == [1, 2] and scales[0]["num_params"] < scales[1]["num_params"]
        h = c.health()
        assert h["serving"] and {w["role"] for w in h["workers"]} == {"prefill", "decode"}


def test_health_says_not_serving_while_the_service_is_starting(served):
    """``Router.starting`` (the launcher sets it while its router replicas come up): health and HTTP /health say not
    serving, with the reason, though every worker is healthy; cleared, serving again."""
    import json
    import urllib.error
    import urllib.request

    bg, _ = served
    router = bg.router
    with Client(bg.grpc_addr) as c:
        assert c.health()["serving"]
        router.starting = "router replicas starting (1 more router on these ports)"
        try:
            h = c.health()
            assert not h["serving"] and "router replicas starting" in h["reason"]
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(bg.http_url + "/health", timeout=10)
            assert e.value.code == 503 and "router replicas starting" in json.loads(e.value.read())["reason"]
        finally:
            router.starting = None
        assert c.health()["serving"]


def test_stop_strings_end_where_the_reference_ends_and_are_cut_from_the_text(served):
    """Stop strings are matched on incrementally decoded text (colm.detokenize): the tokens equal
    `colm generate` with the same stop string; the text (whole, and the streamed pieces added up) is the
    reference text without the stop string, or with it when ``include_stop_str_in_output`` asks."""
    bg, model = served
    tok = ByteTokenizer()
    free = ref_tokens(model, "Hello, chains", 24, 2)
    stop = middle_stop(tok.decode(free))
    ref = generate(model, tok.encode("Hello, chains"), SamplingParams(max_new_tokens=24, stop_strings=(stop,)),
                   scale=2, eos_id=ByteTokenizer.eos_id, decode=tok.decode)
    assert ref.finish_reason == "stop" and len(ref.token_ids) < 24
    full = tok.decode(ref.token_ids)
    assert full.endswith(stop)
    with Client(bg.grpc_addr) as c:
        for include in (False, True):  # OpenAI / vLLM: the stop string is left out unless asked for
            want = full if include else full[: -len(stop)]
            r = c.complete("Hello, chains", max_new_tokens=24, scale=2, stop=(stop,), include_stop_str_in_output=include)
            assert r["token_ids"] == ref.token_ids and r["finish_reason"] == "stop"
            assert r["text"] == want
            events = list(c.stream("Hello, chains", max_new_tokens=24, scale=2, stop=(stop,),
                                   include_stop_str_in_output=include))
            pieces = "".join(ev["text"] for ev in events if ev["kind"] in ("token", "finish"))
            assert [ev["id"] for ev in events if ev["kind"] == "token"] == ref.token_ids
            assert pieces == want


def test_http_completions_match_reference_and_echo_logprobs(served):
    bg, model = served
    url = bg.http_url
    status, body = post_json(f"{url}/v1/completions", {"prompt": "Hello", "max_tokens": 6, "temperature": 0,
                                                       "scale": 1})
    assert status == 200, body
    ref = ref_tokens(model, "Hello", 6, 1)
    assert body["choices"][0]["text"] == ByteTokenizer().decode(ref) and body["choices"][0]["scale"] == 1
    assert body["usage"]["completion_tokens"] == 6
    # lm-eval loglikelihood style: echo + logprobs, no new tokens, at scale 2
    status, body = post_json(f"{url}/v1/completions", {"prompt": ["abcd", [97, 98]], "max_tokens": 0, "echo": True,
                                                       "logprobs": 1, "temperature": 0, "scale": 2})
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    ids = torch.tensor([[97, 98, 99, 100]])
    want = torch.log_softmax(model(ids, scale=2)[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(want.tolist(), abs=1e-5)
    assert lp["tokens"] == ["a", "b", "c", "d"] and body["choices"][0]["text"] == "abcd"
    assert all(max(t.values()) >= x - 1e-6 for t, x in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
    # streaming
    import urllib.request, json
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(
        {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "scale": 1, "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [l[6:] for l in r.read().decode().splitlines() if l.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["token_id"] for c in chunks if "token_id" in c["choices"][0]] == ref
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    for path in ("/v1/models", "/tokenizer_info"):
        with urllib.request.urlopen(url + path, timeout=10) as r:
            assert r.status == 200
    assert post_json(f"{url}/tokenize", {"prompt": "hi"})[1]["tokens"] == [104, 105]
    with urllib.request.urlopen(bg.addresses["metrics"], timeout=10) as r:
        text = r.read().decode()
    assert 'colm_requests_total{model_name="colm",scale="1",status="ok"}' in text
    assert "colm:time_to_first_token_seconds_bucket" in text
    assert "colm_kv_blocks_capacity" in text and "colm:num_requests_waiting" in text
    assert post_json(f"{url}/detokenize", {"tokens": [104, 105]})[1]["prompt"] == "hi"


MALFORMED = [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="x" * 600), "exceeds the context"),
    (dict(prompt="hi", max_new_tokens=-1), "max_new_tokens=-1"),
    (dict(prompt="hi", scale=3), "scale=3"),
    (dict(prompt=b"\xff\xfehi"), "not valid UTF-8"),
    (dict(prompt=[5, 999]), "outside the vocabulary"),
    (dict(prompt="y" * (5 << 20)), "exceeds the limit"),
]


def test_malformed_requests_are_invalid_argument_and_do_not_disturb_others(served):
    bg, model = served
    ref = ref_tokens(model, "steady", 40, 2)
    out = {}

    def long_request():
        with Client(bg.grpc_addr) as c:
            out["r"] = c.complete("steady", max_new_tokens=40, scale=2)

    t = threading.Thread(target=long_request)
    t.start()
    with Client(bg.grpc_addr) as c:
        for kw, msg in MALFORMED:
            prompt = kw.pop("prompt")
            with pytest.raises(grpc.RpcError) as e:
                c.complete(prompt, **{"max_new_tokens": 4, **kw})
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (msg, e.value.details())
            assert msg in e.value.details()
    t.join(60)
    assert out["r"]["token_ids"] == ref
    status, body = post_json(f"{bg.http_url}/v1/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post_json(f"{bg.http_url}/v1/completions", {"prompt": "hi", "max_tokens": -2})
    assert status == 400 and "max_tokens=-2" in body["error"]["message"]


def test_budget_picks_scale_from_measured_latency_and_degrades_or_rejects():
    # A backend whose steps take 5 ms more at scale 1 and 40 ms more at scale 2 (a "slow device"): the
    # router must learn this from measurements alone (its priors say nothing about it).
    cfg = preset("tiny-air")
    model = CoLM(cfg).reset_parameters(seed=1).eval()
    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05), cfg, ByteTokenizer(),
                    LocalBackend(model, step_delay_s={1: 0.005, 2: 0.040}))
    bg = BackgroundRouter(router)
    r = router
    try:
        with Client(bg.grpc_addr) as c:
            # warm up: the first request pays one-time costs of every new shape, then both scales are measured
            for scale in (2, 1, 2):
                c.complete("warm up the latency model", max_new_tokens=16, scale=scale)
            for _ in range(5):
                bg.call(r.poll_once())
            s1, s2 = r.policy.model.tpot_ms(1), r.policy.model.tpot_ms(2)
            m = r.policy.model
            # the measured gap is the simulated 35 ms (the shared CPU adds noise to both, not to the gap)
            assert s2 - s1 > 20, (s1, s2, m.step_ms, m.tpot_correction)
            loose = c.complete("budget", max_new_tokens=4, tpot_ms=3 * s2)
            tight = c.complete("budget", max_new_tokens=4, tpot_ms=(s1 + s2) / 2)
            assert loose["scale"] == 2 and tight["scale"] == 1 and not tight["degraded"]
            assert set(tight["scales"]) == {1}
            impossible = c.complete("budget", max_new_tokens=4, tpot_ms=1)
            assert impossible["scale"] == 1 and impossible["degraded"] and len(impossible["token_ids"]) == 4
            with pytest.raises(grpc.RpcError) as e:
                c.complete("budget", max_new_tokens=4, tpot_ms=1, reject=True)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert float(dict(e.value.trailing_metadata())["retry-after-s"]) > 0
            scales = {s["scale"]: s for s in c.list_scales()}
            assert scales[2]["measured_step_ms"] > scales[1]["measured_step_ms"] > 0
    finally:
        bg.stop()


def test_api_key_required_when_configured():
    cfg = preset("tiny-air")
    model = CoLM(cfg).reset_parameters(seed=1).eval()
    router = Router(RouterConfig(grpc_port=0, http_port=0, api_key=API_KEY), cfg, ByteTokenizer(), LocalBackend(model))
    bg = BackgroundRouter(router)
    try:
        with Client(bg.grpc_addr) as c:
            with pytest.raises(grpc.RpcError) as e:
                c.complete("hi", max_new_tokens=2)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(bg.grpc_addr, api_key=API_KEY) as c:
            assert len(c.complete("hi", max_new_tokens=2)["token_ids"]) == 2
        assert post_json(f"{bg.http_url}/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 401
        assert post_json(f"{bg.http_url}/v1/completions", {"prompt": "hi", "max_tokens": 2},
                         headers={"Authorization": f"Bearer {API_KEY}"})[0] == 200
        # gRPC metadata follows the same rule: the key needs its Bearer scheme in `authorization`
        for md, ok in ((("authorization", API_KEY),), False), ((("authorization", f"bearer {API_KEY}"),), True), \
                      ((("authorization", f"Basic {API_KEY}"),), False), ((("x-api-key", API_KEY),), True):
            with Client(bg.grpc_addr) as c:
                c.metadata = md
                if ok:
                    assert len(c.complete("hi", max_new_tokens=1)["token_ids"]) == 1
                else:
                    with pytest.raises(grpc.RpcError) as e:
                        c.complete("hi", max_new_tokens=1)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, md
    finally:
        bg.stop()


class _ScriptedBackend:
    """Base of the test backends below, whose workers, polls and token streams a test scripts: start, close,
    set_scale and abort do nothing."""

    async def start(self):
        pass

    async def close(self):
        pass

    async def set_scale(self, *a):
        pass

    async def abort(self, *a):
        pass


def _complete_over(cfg, backend, poll_interval_s: float, settle_s: float = 0.0):
    """A router over ``backend`` (polled every ``poll_interval_s``; ``settle_s`` for the first reports): one
    8-token scale-2 completion of "Hello, chains". Returns (reply, its seconds, {worker: healthy} after)."""
    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=poll_interval_s, token_timeout_s=60),
                    cfg, ByteTokenizer(), backend)
    bg = BackgroundRouter(router)
    try:
        time.sleep(settle_s)
        with Client(bg.grpc_addr) as c:
            t0 = time.time()
            r = c.complete("Hello, chains", max_new_tokens=8, scale=2)
            seconds = time.time() - t0
            return r, seconds, {w["worker_id"]: w["healthy"] for w in c.health()["workers"]}
    finally:
        bg.stop()


def test_hung_worker_fails_its_health_poll_and_requests_move_on():
    """A decode worker that stops answering (no error, no tokens) is taken out by the health poll, and
    the requests waiting on it continue on another worker long before the per-token timeout."""
    import asyncio

    from colm.router.backend import WorkerInfo
    from colm.router.policy import WorkerReport

    cfg = preset("tiny-air")
    model = CoLM(cfg).reset_parameters(seed=1).eval()
    good = LocalBackend(model)

    class HangingBackend(_ScriptedBackend):
        hung = False

        def workers(self):
            return [WorkerInfo("p0", "prefill"), WorkerInfo("d-hang", "decode"), WorkerInfo("d-good", "decode")]

        async def poll(self, wid):
            if wid == "d-hang":
                if self.hung:
                    raise TimeoutError("no answer")
                return WorkerReport(wid, "decode", free_blocks=1000, total_blocks=1000)
            if wid == "d-good":
                return WorkerReport(wid, "decode", free_blocks=10, total_blocks=10)
            return WorkerReport(wid, "prefill")

        async def generate(self, req, prefill_id, decode_id):
            if decode_id == "d-hang":
                self.hung = True
                await asyncio.Event().wait()
            async for t in good.generate(req, prefill_id, decode_id):
                yield t

    r, seconds, healthy = _complete_over(cfg, HangingBackend(), poll_interval_s=0.1)
    assert seconds < 10
    assert r["token_ids"] == ref_tokens(model, "Hello, chains", 8, 2) and r["usage"]["retries"] == 1
    assert healthy["d-hang"] is False


def test_prefill_worker_failing_after_handoff_does_not_move_decoding_requests():
    """Once a request's tokens stream from its decode worker, its prefill worker is done with it: that
    worker failing its health poll then must not fail the request over (no retry, no recomputation)."""
    import asyncio

    from colm.router.backend import WorkerInfo
    from colm.router.policy import WorkerReport

    cfg = preset("tiny-air")
    model = CoLM(cfg).reset_parameters(seed=1).eval()
    good = LocalBackend(model)

    class PrefillDiesAfterHandoff(_ScriptedBackend):
        dead = False

        def workers(self):
            return [WorkerInfo("p0", "prefill"), WorkerInfo("p1", "prefill"), WorkerInfo("d0", "decode")]

        async def poll(self, wid):
            if wid == "p0" and self.dead:
                raise ConnectionError("prefill worker gone")
            if wid == "d0":
                return WorkerReport(wid, "decode", free_blocks=1000, total_blocks=1000)
            return WorkerReport(wid, "prefill", queued_tokens=0 if wid == "p0" else 10_000)  # p0 is picked

        async def generate(self, req, prefill_id, decode_id):
            n = 0
            async for t in good.generate(req, prefill_id, decode_id):
                yield t
                n += 1
                if n == 2 and prefill_id == "p0":
                    self.dead = True
                    await asyncio.sleep(0.5)  # a few health polls pass while this request decodes

    backend = PrefillDiesAfterHandoff()
    r, _, healthy = _complete_over(cfg, backend, poll_interval_s=0.05, settle_s=0.3)  # settle: the policy places on p0
    assert backend.dead  # p0 failed its polls while this request was decoding
    assert r["token_ids"] == ref_tokens(model, "Hello, chains", 8, 2) and r["usage"]["retries"] == 0
    assert healthy["p0"] is False


def test_tls_on_grpc_and_http(tmp_path):
    import shutil
    import ssl
    import subprocess
    import urllib.request

    if not shutil.which("openssl"):
        pytest.skip("openssl not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    cfg = preset("tiny-air")
    model = CoLM(cfg).reset_parameters(seed=1).eval()
    router = Router(RouterConfig(grpc_port=0, http_port=0, tls_cert=str(cert), tls_key=str(key)), cfg,
                    ByteTokenizer(), LocalBackend(model))
    bg = BackgroundRouter(router)
    try:
        assert bg.http_url.startswith("https://")
        with Client(bg.grpc_addr, tls_ca=str(cert)) as c:
            assert c.complete("hi", max_new_tokens=3, scale=1)["token_ids"] == ref_tokens(model, "hi", 3, 1)
        ctx = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(bg.http_url + "/v1/models", context=ctx, timeout=10) as r:
            assert r.status == 200
        with pytest.raises(grpc.RpcError):  # plaintext to a TLS port fails
            with Client(bg.grpc_addr, timeout_s=3) as c:
                c.complete("hi", max_new_tokens=1)
    finally:
        bg.stop()


def test_colm_client_cli(served, capsys):
    from colm.cli import main

    bg, model = served
    ref = ref_tokens(model, "Hello", 5, 1)
    assert main(["client", "generate", "--addr", bg.grpc_addr, "--prompt", "Hello", "--max-new-tokens", "5",
                 "--scale", "1", "--ids"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in ref]
    assert main(["client", "generate", "--addr", bg.grpc_addr, "--prompt", "Hello", "--max-new-tokens", "5",
                 "--scale", "1", "--ids", "--stream"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in ref]
    assert main(["client", "generate", "--addr", bg.grpc_addr, "--prompt", "Hello", "--max-new-tokens", "-3"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    assert main(["client", "tokenize", "--addr", bg.grpc_addr, "--text", "ab"]) == 0
    assert capsys.readouterr().out.split() == ["97", "98"]


def test_taken_ports_fail_with_the_field_named(served):
    """A second router on the same ports must refuse (gRPC would otherwise share the port silently)."""
    bg, model = served
    grpc_port = int(bg.grpc_addr.rsplit(":", 1)[1])
    http_port = int(bg.http_url.rsplit(":", 1)[1])
    for ports, field in (({"grpc_port": grpc_port, "http_port": 0}, "router.grpc_port"),
                         ({"grpc_port": 0, "http_port": http_port}, "router.http_port")):
        router = Router(RouterConfig(metrics_port=0, **ports), model.cfg, ByteTokenizer(), LocalBackend(model))
        with pytest.raises(OSError, match=field):
            BackgroundRouter(router)


def test_cli_api_key_from_an_environment_variable(monkeypatch, capsys):
    """`colm client` / `colm loadtest --api-key env:NAME` read the key from NAME (a key on the command line is visible
    to every user of the machine); an unset NAME is refused before anything is sent."""
    from colm.cli import main

    cfg = preset("tiny-air")
    model = CoLM(cfg).reset_parameters(seed=1).eval()
    bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=None, api_key=API_KEY), cfg, ByteTokenizer(),
                                 LocalBackend(model)))
    try:
        monkeypatch.setenv("COLM_TEST_KEY", API_KEY)
        assert main(["client", "health", "--addr", bg.grpc_addr, "--api-key", "env:COLM_TEST_KEY"]) == 0
        assert main(["client", "generate", "--addr", bg.grpc_addr, "--api-key", "env:COLM_TEST_KEY", "--prompt", "hi",
                     "--max-new-tokens", "2"]) == 0
        monkeypatch.delenv("COLM_TEST_KEY")
        for cmd in (["client", "health"], ["loadtest", "--concurrency", "1", "--num-requests", "1"]):
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                main([*cmd, "--addr", bg.grpc_addr, "--api-key", "env:COLM_TEST_KEY"])
            assert e.value.code == 2 and "environment variable COLM_TEST_KEY is not set" in capsys.readouterr().err
    finally:
        bg.stop()
