"""A client switches a running request's scale through the public API (UpdateRequest): the stream's tokens
report where the switch applied, and they equal `colm generate` replaying the same schedule."""

import json
import threading
import urllib.request

import grpc
import pytest

pytest.importorskip("colm.decode_worker.engine")

from colm import checkpoint  # noqa: E402
from colm.client import Client  # noqa: E402
from colm.decode_worker.config import DecodeConfig  # noqa: E402
from colm.decode_worker.engine import DecodeEngine  # noqa: E402
from colm.generate import generate  # noqa: E402
from colm.model import CoLM  # noqa: E402
from colm.prefill_worker.engine import PrefillEngine  # noqa: E402
from colm.presets import preset  # noqa: E402
from colm.router.config import RouterConfig  # noqa: E402
from colm.router.core import Router  # noqa: E402
from colm.router.engine_backend import EngineBackend  # noqa: E402
from colm.sampling import SamplingParams  # noqa: E402
from colm.tokenizer import ByteTokenizer  # noqa: E402
from router_helpers import BackgroundRouter, post_json  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-air"))
    checkpoint.save(CoLM(preset("tiny-air")).reset_parameters(seed=5), path, tokenizer={"kind": "byte"})
    prefill = {"prefill-0": PrefillEngine.from_checkpoint(path)}
    decode = {"decode-0": DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=128))}
    router = Router(RouterConfig(grpc_port=0, http_port=0, poll_interval_s=0.05), checkpoint.load_config(path),
                    ByteTokenizer(), EngineBackend(prefill, decode))
    bg = BackgroundRouter(router)
    yield bg, path
    bg.stop()


def _reference(path, prompt, n, schedule):
    model = checkpoint.load(path).eval()
    return generate(model, ByteTokenizer().encode(prompt), SamplingParams(max_new_tokens=n, ignore_eos=True),
                    scale_schedule=schedule, eos_id=ByteTokenizer.eos_id).token_ids


@pytest.mark.parametrize("start,to", [(2, 1), (1, 2)])
def test_client_switches_scale_mid_stream_and_tokens_follow_the_schedule(served, start, to):
    bg, path = served
    rid, n, out = f"switch-{start}-{to}", 160, []
    with Client(bg.grpc_addr) as c:
        for ev in c.stream("switch me", max_new_tokens=n, scale=start, ignore_eos=True, request_id=rid):
            if ev["kind"] == "token":
                out.append((ev["id"], ev["scale"]))
                if len(out) == 5:
                    assert c.set_scale(rid, to) == to
    scales = [s for _, s in out]
    at = scales.index(to)  # the first token at the new scale: where the switch applied
    assert 5 <= at < n and scales == [start] * at + [to] * (n - at)
    assert [t for t, _ in out] == _reference(path, "switch me", n, lambda i: start if i < at else to)


def test_switch_errors_name_the_problem(served):
    bg, _ = served
    with Client(bg.grpc_addr) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.set_scale("nobody-runs-this", 1)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "nobody-runs-this" in e.value.details()
        started, release = threading.Barrier(4), threading.Event()
        scales = {}

        def run(i, rid):
            seen = scales[i] = []
            for ev in c.stream("long one", max_new_tokens=400, scale=2, ignore_eos=True, request_id=rid):
                if ev["kind"] == "token":
                    seen.append(ev["scale"])
                    if len(seen) == 1:
                        started.wait(30)
                        release.wait(30)

        threads = [threading.Thread(target=run, args=(i, rid)) for i, rid in enumerate(("same", "same", "solo"))]
        for t in threads:
            t.start()
        started.wait(30)  # every stream has its first token
        try:
            with pytest.raises(grpc.RpcError) as e:
                c.set_scale("solo", 3)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "scale" in e.value.details()
            assert c.set_scale("same", 1) == 1  # an id shared by several running requests switches them all
        finally:
            release.set()
            for t in threads:
                t.join(60)
    assert scales[0][-1] == scales[1][-1] == 1 and set(scales[2]) == {2}


def test_http_switch_of_a_running_request(served):
    bg, path = served
    rid, n, out, replies = "http-switch", 120, [], []
    with Client(bg.grpc_addr) as c:
        for ev in c.stream("switch me", max_new_tokens=n, scale=2, ignore_eos=True, request_id=rid):
            if ev["kind"] == "token":
                out.append((ev["id"], ev["scale"]))
                if len(out) == 5:
                    replies.append(post_json(f"{bg.http_url}/v1/requests/cmpl-{rid}/scale", {"scale": 1}))
    assert replies == [(200, {"id": f"cmpl-{rid}", "scale": 1})]
    scales = [s for _, s in out]
    at = scales.index(1)
    assert [t for t, _ in out] == _reference(path, "switch me", n, lambda i: 2 if i < at else 1)
    status, body = post_json(f"{bg.http_url}/v1/requests/{rid}/scale", {"scale": 1})  # finished: gone
    assert status == 404 and rid in body["error"]["message"]
    status, body = post_json(f"{bg.http_url}/v1/requests/{rid}/scale", {"scale": "1"})
    assert status == 400 and "scale" in body["error"]["message"]


def _sse(resp):
    """The JSON events of a streamed HTTP response, as they come."""
    for line in resp:
        line = line.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


@pytest.mark.parametrize("body", [{"prompt": "switch me", "n": 2}, {"prompt": ["switch me", "and me"]}],
                         ids=["n=2", "two prompts"])
def test_http_switch_names_every_sequence_of_the_completion(served, body):
    """A completion's id names all of its sequences (n choices, batched prompts): the switch reaches each one, and
    each follows the reference from where the switch applied to it."""
    bg, path = served
    n, toks, cid, replies = 150, {}, None, []
    req = urllib.request.Request(f"{bg.http_url}/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({**body, "max_tokens": n, "temperature": 0, "scale": 2,
                                                  "ignore_eos": True, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        for ev in _sse(r):
            cid = ev["id"]
            ch = ev["choices"][0]
            if "token_id" in ch:
                toks.setdefault(ch["index"], []).append((ch["token_id"], ch["scale"]))
                if len(toks[ch["index"]]) == 5 and not replies:
                    replies.append(post_json(f"{bg.http_url}/v1/requests/{cid}/scale", {"scale": 1}))
    assert replies == [(200, {"id": cid, "scale": 1})]
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]] * body["n"]
    assert sorted(toks) == list(range(len(prompts)))
    for i, prompt in enumerate(prompts):
        scales = [s for _, s in toks[i]]
        at = scales.index(1)  # where the switch applied to this sequence
        assert scales == [2] * at + [1] * (n - at)
        assert [t for t, _ in toks[i]] == _reference(path, prompt, n, lambda j, at=at: 2 if j < at else 1)


def test_a_switch_the_worker_no_longer_holds_is_no_internal_error(served, monkeypatch):
    """A switch can race its request's end (or an attempt not on the worker yet): the worker answers that it holds no
    such request. The switch is still the router's (pinned for a retry), so it is answered, never INTERNAL with the
    worker's error; the HTTP front the same."""
    from colm.errors import UnknownRequestError

    bg, _ = served

    async def gone(decode_id, request_id, scale):
        raise UnknownRequestError(f"request {request_id!r} is not reserved on this decode worker")

    rid, replies = "switch-gone", []
    with Client(bg.grpc_addr) as c:
        for ev in c.stream("switch me", max_new_tokens=20, scale=2, ignore_eos=True, request_id=rid):
            if ev["kind"] == "token" and not replies:
                with monkeypatch.context() as m:
                    m.setattr(bg.router.backend, "set_scale", gone)
                    replies.append(c.set_scale(rid, 1))
                    replies.append(post_json(f"{bg.http_url}/v1/requests/{rid}/scale", {"scale": 1}))
    assert replies == [1, (200, {"id": rid, "scale": 1})]


def test_a_switch_to_the_running_scale_counts_no_scale_change(served):
    """colm_scale_changes_total counts sequences moved to another scale: a switch to the scale a request runs at
    moves nothing."""
    bg, _ = served
    changes = bg.router.metrics.scale_changes
    rid, seen = "switch-same", []
    with Client(bg.grpc_addr) as c:
        # long enough that the request is still running when both switches arrive (40 tokens could end first)
        for ev in c.stream("switch me", max_new_tokens=400, scale=2, ignore_eos=True, request_id=rid):
            if ev["kind"] == "token":
                seen.append(ev["scale"])
                if len(seen) == 3:
                    before = changes._value.get()
                    assert c.set_scale(rid, 2) == 2
                    assert changes._value.get() == before
                    assert c.set_scale(rid, 1) == 1
                    assert changes._value.get() == before + 1
                    break  # the client leaves: the request is cancelled
    assert len(seen) == 3


def test_a_switch_between_reserve_and_start_over_grpc_workers(tmp_path):
    """Disaggregated over gRPC the router reserves, waits for the reply, then starts: a client switching at the decision
    lands in between. The request must run at the switched scale from its first token (the start used to undo the
    switch while UpdateRequest answered OK)."""
    import time as _time

    from colm.decode_worker.service import DecodeServer
    from colm.prefill_worker.service import PrefillServer
    from colm.router.backend import WorkerInfo
    from colm.router.grpc_backend import GrpcBackend

    token = "switch-test-token-0123456789"
    checkpoint.save(CoLM(preset("tiny-air")).reset_parameters(seed=5), str(tmp_path), tokenizer={"kind": "byte"})
    engine = DecodeEngine.from_checkpoint(str(tmp_path), DecodeConfig(num_blocks=128))
    reserve = engine.reserve

    def slow_reserve(*a, **kw):  # the reply comes late: the client's switch reaches the worker before the start
        r = reserve(*a, **kw)
        _time.sleep(0.5)
        return r

    engine.reserve = slow_reserve
    decode = DecodeServer(engine, token).start()
    prefill = PrefillServer(PrefillEngine.from_checkpoint(str(tmp_path)), token).start()
    workers = [WorkerInfo("decode-0", "decode", decode.address), WorkerInfo("prefill-0", "prefill", prefill.address)]
    bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05),
                                 checkpoint.load_config(str(tmp_path)), ByteTokenizer(),
                                 GrpcBackend(workers, cluster_token=token)))
    try:
        rid, n, out = "switch-early", 12, []
        with Client(bg.grpc_addr) as c:
            for ev in c.stream("switch me", max_new_tokens=n, scale=2, ignore_eos=True, request_id=rid):
                if ev["kind"] == "decision":
                    assert c.set_scale(rid, 1) == 1
                elif ev["kind"] == "token":
                    out.append((ev["id"], ev["scale"]))
        assert [s for _, s in out] == [1] * n
        assert [t for t, _ in out] == _reference(str(tmp_path), "switch me", n, lambda i: 1)
        # a worker that holds no such request says so as the in-process engine does (the router then answers the
        # switch; it used to pass the worker's NOT_FOUND on as INTERNAL)
        from colm.errors import UnknownRequestError

        with pytest.raises(UnknownRequestError):
            bg.call(bg.router.backend.set_scale("decode-0", "nobody-runs-this", 1))
    finally:
        bg.stop()
        prefill.stop(), decode.stop()


def test_a_switch_whose_worker_is_gone_holds_and_the_request_fails_over_at_it(served, monkeypatch):
    """A client switches a request whose decode worker has just died (a Ray actor killed): the worker's SetScale fails
    (WorkerFailed). The switch is the router's (pinned), so it is answered, and the request fails over and goes on at
    the new scale; it was answered with the worker's error (INTERNAL over a Ray service) and the request went on at
    the old scale on its worker while the router recorded the new one."""
    from colm.router.backend import WorkerFailed

    bg, path = served

    async def gone(decode_id, request_id, scale):
        raise WorkerFailed(decode_id, "UNAVAILABLE: Stream removed (recvmsg:Connection reset by peer (104))")

    rid, n, out, replies, finish = "switch-worker-gone", 120, [], [], {}
    with Client(bg.grpc_addr) as c:
        for ev in c.stream("switch me", max_new_tokens=n, scale=2, ignore_eos=True, request_id=rid):
            if ev["kind"] == "token":
                out.append((ev["id"], ev["scale"]))
                if len(out) == 5:
                    with monkeypatch.context() as m:
                        m.setattr(bg.router.backend, "set_scale", gone)
                        replies.append(c.set_scale(rid, 1))
            elif ev["kind"] == "finish":
                finish = ev
    assert replies == [1]
    assert finish["usage"]["retries"] >= 1  # it failed over
    scales = [s for _, s in out]
    at = scales.index(1)
    assert 5 <= at < n and scales == [2] * at + [1] * (n - at), scales
    assert [t for t, _ in out] == _reference(path, "switch me", n, lambda j: 2 if j < at else 1)


def test_a_grpc_switch_to_a_gone_worker_raises_worker_failed():
    """GrpcBackend.set_scale on a worker that no longer listens raises WorkerFailed naming it (the router's failure of
    a worker), not the channel's AioRpcError (which the public API answered INTERNAL)."""
    import asyncio
    import socket

    from colm.router.backend import WorkerFailed, WorkerInfo
    from colm.router.grpc_backend import GrpcBackend

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def run():
        for calls in ("stream", "unary"):
            b = GrpcBackend([WorkerInfo("decode-0", "decode", f"127.0.0.1:{port}")], cluster_token="t" * 20,
                            worker_calls=calls)
            try:
                with pytest.raises(WorkerFailed) as e:
                    await asyncio.wait_for(b.set_scale("decode-0", "some-request", 1), 10)
                assert e.value.worker_id == "decode-0" and "UNAVAILABLE" in str(e.value)
            finally:
                await b.close()

    asyncio.run(run())


def _first_switch_unanswered(bg, monkeypatch) -> list[int]:
    """The router's first SetScale to its worker gets no answer in time (DEADLINE_EXCEEDED); the others go through.
    Returns the list of the scales sent, in order."""
    from colm.router.request import DeadlineExceeded

    real, sent = bg.router.backend.set_scale, []

    async def late_once(decode_id, request_id, scale):
        sent.append(scale)
        if len(sent) == 1:
            raise DeadlineExceeded(f"{decode_id}: Deadline Exceeded")
        await real(decode_id, request_id, scale)

    monkeypatch.setattr(bg.router.backend, "set_scale", late_once)
    return sent


def test_a_switch_a_live_worker_answers_late_is_sent_again_and_applies(served, monkeypatch):
    """The decode worker does not answer a client's switch in time (DEADLINE_EXCEEDED: a long iteration): the switch
    is answered, sent again in the background, and applies without a retry of the request; a later switch made
    meanwhile is what the resend carries (the state's scale at each try), so it is never undone."""
    from colm.router import scale_control

    bg, path = served
    sent = _first_switch_unanswered(bg, monkeypatch)
    # resent soon enough that the switch lands well before the stream's end on any machine
    monkeypatch.setattr(scale_control, "SCALE_RESEND_DELAYS_S", (0.02, 0.05, 0.1, 0.2, 0.4))
    rid, n, out, replies, finish = "switch-answered-late", 400, [], [], {}
    with Client(bg.grpc_addr) as c:
        for ev in c.stream("switch me", max_new_tokens=n, scale=2, ignore_eos=True, request_id=rid):
            if ev["kind"] == "token":
                out.append((ev["id"], ev["scale"]))
                if len(out) == 5:
                    replies.append(c.set_scale(rid, 1))  # not answered by the worker: sent again after 20 ms
            elif ev["kind"] == "finish":
                finish = ev
    assert replies == [1] and sent[:2] == [1, 1], sent
    assert finish["usage"]["retries"] == 0
    scales = [s for _, s in out]
    at = scales.index(1)
    assert 5 <= at < n and scales == [2] * at + [1] * (n - at), scales
    assert [t for t, _ in out] == _reference(path, "switch me", n, lambda j: 2 if j < at else 1)


def test_a_resend_carries_the_latest_switch(served, monkeypatch):
    """Switch to 1 (not answered in time), then to 2 before the resend: the resend sends 2 and the request stays at 2."""
    import time

    from colm.router import scale_control

    bg, _ = served
    sent = _first_switch_unanswered(bg, monkeypatch)
    monkeypatch.setattr(scale_control, "SCALE_RESEND_DELAYS_S", (0.3,))
    rid, out, switched = "switch-resend-latest", [], []
    with Client(bg.grpc_addr) as c:
        for ev in c.stream("switch me", max_new_tokens=400, scale=2, ignore_eos=True, request_id=rid):
            if ev["kind"] == "token":
                out.append(ev["scale"])
                if len(out) == 5:
                    t0 = time.monotonic()
                    assert c.set_scale(rid, 1) == 1 and c.set_scale(rid, 2) == 2
                    switched.append(time.monotonic() - t0)
    assert switched[0] < 0.3, switched  # both switches before the resend
    assert sent == [1, 2, 2], sent  # the resend went, with the later switch's scale
    assert set(out) == {2}, out
