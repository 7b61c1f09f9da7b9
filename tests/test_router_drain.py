"""Shutdown drains both fronts alike (router/drain.py): once ``RouterServer.stop`` begins, health says not serving on
every interface and new requests are refused on gRPC and HTTP, while the streams in flight on both fronts get
``router.drain_s`` to finish; those still running then are cut with an error saying so. A second stop signal to
``colm serve`` ends the drain at once."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from types import SimpleNamespace

import grpc
import pytest
import torch

from colm.client import Client
from colm.deploy.launcher import Launcher
from colm.model import CoLM
from colm.presets import preset
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.local_backend import LocalBackend
from colm.tokenizer import ByteTokenizer
from router_helpers import BackgroundRouter, get_json, post_json, until

STEP_S = 0.04  # each decode step of the stand-in backend takes this long: a stream of n tokens lasts n * STEP_S


def _local_router(drain_s: float) -> Router:
    torch.manual_seed(0)
    cfg = preset("tiny-air")
    model = CoLM(cfg).reset_parameters(seed=1).eval()
    backend = LocalBackend(model, step_delay_s={k: STEP_S for k in range(1, cfg.num_chains + 1)})
    rcfg = RouterConfig(grpc_port=0, http_port=0, metrics_port=None, poll_interval_s=0.05, drain_s=drain_s)
    return Router(rcfg, cfg, ByteTokenizer(), backend)


def _router(drain_s: float) -> BackgroundRouter:
    return BackgroundRouter(_local_router(drain_s))


class GrpcStream(threading.Thread):
    """A Generate stream of ``n`` tokens (or the call: ``unary``): its tokens, its finish or its error."""

    def __init__(self, addr: str, n: int, unary: bool = False) -> None:
        super().__init__(daemon=True)
        self.addr, self.n, self.unary = addr, n, unary
        self.tokens, self.finish, self.error, self.ended_at = 0, None, None, None
        self.first = threading.Event()

    def run(self) -> None:
        try:
            with Client(self.addr, timeout_s=60) as c:
                if self.unary:
                    self.first.set()
                    r = c.complete("def read_config(path):", max_new_tokens=self.n, ignore_eos=True, scale=1)
                    self.tokens, self.finish = len(r["token_ids"]), r["finish_reason"]
                    return
                for ev in c.stream("def read_config(path):", max_new_tokens=self.n, ignore_eos=True, scale=1):
                    if ev["kind"] == "token":
                        self.tokens += 1
                        self.first.set()
                    elif ev["kind"] == "finish":
                        self.finish = ev["finish_reason"]
        except grpc.RpcError as e:
            self.error = (e.code(), e.details())
        finally:
            self.ended_at = time.monotonic()
            self.first.set()


class HttpStream(threading.Thread):
    """A streamed /v1/completions of ``n`` tokens: its tokens, finish, error events and whether [DONE] came."""

    def __init__(self, url: str, n: int) -> None:
        super().__init__(daemon=True)
        self.url, self.n = url, n
        self.tokens, self.finish, self.errors, self.done, self.failure, self.ended_at = 0, None, [], False, None, None
        self.first = threading.Event()

    def run(self) -> None:
        body = {"prompt": "def read_config(path):", "max_tokens": self.n, "temperature": 0, "stream": True,
                "ignore_eos": True, "scale": 1}
        req = urllib.request.Request(self.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                for line in r:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        self.done = True
                        continue
                    obj = json.loads(data)
                    if "error" in obj:
                        self.errors.append(obj["error"])
                        continue
                    for choice in obj["choices"]:
                        if "token_id" in choice:
                            self.tokens += 1
                            self.first.set()
                        self.finish = choice["finish_reason"] or self.finish
        except Exception as e:  # noqa: BLE001 - the test reads it
            self.failure = repr(e)
        finally:
            self.ended_at = time.monotonic()
            self.first.set()


def _grpc_health(addr: str, service: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        try:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        except grpc.RpcError as e:
            return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def _start_stop(bg: BackgroundRouter) -> tuple[threading.Thread, float]:
    """``bg.stop()`` begun in a thread of its own: (that thread, when it began)."""
    stopper = threading.Thread(target=bg.stop, daemon=True)
    t0 = time.monotonic()
    stopper.start()
    return stopper, t0


def _state(call) -> dict:
    return {k: v for k, v in vars(call).items() if not k.startswith("_")}


def _in_flight(*calls) -> None:
    for c in calls:
        c.start()
    for c in calls:
        assert c.first.wait(30) and c.is_alive(), _state(c)


@pytest.mark.timeout(60)
def test_stop_refuses_new_requests_at_once_and_lets_both_fronts_streams_finish():
    """Before, health said SERVING and gRPC took new calls while aiohttp drained, and gRPC's streams were then cut
    after a second."""
    bg = _router(drain_s=15.0)
    grpc_addr, http_url = bg.grpc_addr, bg.http_url
    n = 100  # about 4 s of tokens each, well within the drain
    g, h = GrpcStream(grpc_addr, n), HttpStream(http_url, n)
    _in_flight(g, h)
    assert _grpc_health(grpc_addr, "") == "SERVING"
    stopper, t0 = _start_stop(bg)
    try:
        # (a) health says not serving at once, on every interface, with the reason
        assert until(lambda: _grpc_health(grpc_addr, "") == "NOT_SERVING", timeout=1.0)
        assert _grpc_health(grpc_addr, "colm.v1.Colm") == "NOT_SERVING"
        with Client(grpc_addr) as c:
            health = c.health()
        assert not health["serving"] and "shutting down" in health["reason"], health
        status, body = get_json(http_url + "/health")
        assert status == 503 and "shutting down" in body["reason"], (status, body)
        # (b) new requests are refused on both fronts, saying why
        with Client(grpc_addr) as c, pytest.raises(grpc.RpcError) as e:
            c.complete("hi", max_new_tokens=2)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
        status, body = post_json(http_url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert status == 503 and "shutting down" in body["error"]["message"], (status, body)
        # but a scale switch is no new request: it may concern one in flight (this id names none)
        with Client(grpc_addr) as c, pytest.raises(grpc.RpcError) as e:
            c.set_scale("no-such-request", 1)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert post_json(http_url + "/v1/requests/no-such-request/scale", {"scale": 1})[0] == 404
        assert time.monotonic() - t0 < 2.0 and g.is_alive() and h.is_alive()  # all that while the streams ran on
        # (c) both streams in flight finish whole within the drain, and the stop ends soon after them
        g.join(30)
        h.join(30)
    finally:
        stopper.join(30)
    assert g.error is None and (g.tokens, g.finish) == (n, "length"), (g.error, g.tokens)
    assert h.failure is None and not h.errors and h.done and (h.tokens, h.finish) == (n, "length"), _state(h)
    assert not stopper.is_alive() and time.monotonic() - t0 < 15.0
    assert _grpc_health(grpc_addr, "") == "UNAVAILABLE"  # the servers are down once the drain is over


@pytest.mark.timeout(60)
def test_requests_still_running_after_drain_s_are_cut_with_an_error_saying_so():
    """A gRPC stream, a gRPC unary call, an HTTP stream and an unstreamed HTTP completion, all far from done."""
    drain_s = 1.0
    bg = _router(drain_s=drain_s)
    n = 400  # 16 s of tokens: far past the drain
    calls = [GrpcStream(bg.grpc_addr, n), GrpcStream(bg.grpc_addr, n, unary=True), HttpStream(bg.http_url, n)]
    plain: dict = {}

    def unstreamed():
        plain["answer"] = post_json(bg.http_url + "/v1/completions", {"prompt": "x", "max_tokens": n,
                                                                      "ignore_eos": True, "scale": 1})

    _in_flight(calls[0], calls[2])
    calls[1].start()
    plain_thread = threading.Thread(target=unstreamed, daemon=True)
    plain_thread.start()
    assert until(lambda: bg.server.drain.in_flight == 4, timeout=10)
    stopper, t0 = _start_stop(bg)
    for c in calls:
        c.join(20)
    plain_thread.join(20)
    stopper.join(20)
    g, unary, h = calls
    for call in (g, unary):  # gRPC: UNAVAILABLE, saying the drain ended, once drain_s passed
        assert call.error is not None and call.error[0] == grpc.StatusCode.UNAVAILABLE, (call.error, call.tokens)
        assert "router.drain_s=1 s" in call.error[1] and "did not finish" in call.error[1], call.error
        assert drain_s - 0.1 <= call.ended_at - t0 < drain_s + 3.0
    assert 0 < g.tokens < n
    # HTTP: the stream under way ends with an error event and [DONE]; the unstreamed request is a 503
    assert h.failure is None and h.done and 0 < h.tokens < n and h.finish is None, _state(h)
    assert len(h.errors) == 1 and h.errors[0]["code"] == 503 and "router.drain_s=1 s" in h.errors[0]["message"]
    assert drain_s - 0.1 <= h.ended_at - t0 < drain_s + 3.0
    status, body = plain["answer"]
    assert status == 503 and "did not finish" in body["error"]["message"], (status, body)
    assert not stopper.is_alive() and time.monotonic() - t0 < drain_s + 8.0


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), True, "30"])
def test_drain_s_must_be_a_finite_number_of_seconds(value):
    with pytest.raises(ValueError, match=r"router\.drain_s="):
        RouterConfig(drain_s=value)
    with pytest.raises(ValueError, match=r"router\.drain_s="):
        RouterConfig.from_dict({"drain_s": value})
    assert RouterConfig(drain_s=0).drain_s == 0 and RouterConfig().drain_s == 30.0


@pytest.mark.timeout(60)
def test_the_launcher_drains_its_router_and_its_replicas_at_once(monkeypatch):
    """``colm serve`` with router replicas: on stop, the launcher's router and every replica refuse new requests at
    once and drain together (a replica stopped first, as before, left the launcher's router admitting meanwhile)."""
    from colm.deploy.config import ClusterConfig
    from colm.deploy.launcher import Launcher

    own, replica = _router(drain_s=15.0), _router(drain_s=15.0)
    launcher = Launcher(ClusterConfig.from_dict({"router": {"drain_s": 15.0}}))
    launcher.server = own.server  # the launcher's own router, on its loop
    launcher.replicas = ["replica-1"]  # a RouterReplica actor's stop is its ThreadedRouterServer's
    monkeypatch.setattr(launcher, "_stop_replicas", replica.stop)
    n = 60
    streams = [GrpcStream(own.grpc_addr, n), HttpStream(own.http_url, n), GrpcStream(replica.grpc_addr, n),
               HttpStream(replica.http_url, n)]
    _in_flight(*streams)
    stopper = threading.Thread(target=lambda: own.call(launcher.stop(), timeout=60), daemon=True)
    t0 = time.monotonic()
    stopper.start()
    try:
        for bg in (own, replica):  # both at once, while every stream still runs
            assert until(lambda: _grpc_health(bg.grpc_addr, "") == "NOT_SERVING", timeout=1.0)
            with Client(bg.grpc_addr) as c, pytest.raises(grpc.RpcError) as e:
                c.complete("hi", max_new_tokens=2)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
        assert time.monotonic() - t0 < 2.0 and all(s.is_alive() for s in streams)
        stopper.join(30)
    finally:
        stopper.join(30)
        own.end_loop()
    for s in streams:
        assert s.tokens == n and s.finish == "length" and getattr(s, "error", None) is None, _state(s)
    assert not stopper.is_alive() and not replica.thread.is_alive()


def _writing_for(bg: BackgroundRouter, seconds: float) -> bool:
    """Whether the router's one call in flight has been in grpc's write of a message for ``seconds`` (sampled)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not any(c.outside for c in bg.server.drain._calls.values()):
            return False
        time.sleep(0.02)
    return True


@pytest.mark.timeout(60)
def test_a_stream_cut_while_grpc_writes_to_a_slow_reader_still_gets_the_error():
    """The cut lands while grpc.aio writes the stream's next message (the client reads slowly: HTTP/2 flow control
    holds the write). Cancelled there, the call ended with no status, and the client read "Cancelling all calls" once
    the server stopped; the cut waits for the write, and the client gets the drain's error."""
    from colm.proto import load_proto

    pb2, pb2_grpc = load_proto("public")
    bg = _router(drain_s=0.5)
    small_window = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(bg.grpc_addr, options=small_window) as ch:
        it = pb2_grpc.ColmStub(ch).Generate(pb2.GenerateRequest(
            text=b"def read_config(path):", scale=1, sampling=pb2.Sampling(max_new_tokens=400, ignore_eos=True)),
            timeout=60)
        next(it)  # then no reading: the window fills and the server's write waits
        assert until(lambda: _writing_for(bg, 0.3), timeout=10)
        stopper, t0 = _start_stop(bg)
        time.sleep(0.8)  # past drain_s: the cut came while the write waited
        tokens, error = 0, None
        try:
            for m in it:
                tokens += len(m.tokens)
        except grpc.RpcError as e:
            error = (e.code(), e.details())
        stopper.join(30)
    assert error is not None and error[0] == grpc.StatusCode.UNAVAILABLE and "router.drain_s=0.5 s" in error[1], error
    assert 0 < tokens < 400 and not stopper.is_alive()


class _InProcessLauncher(Launcher):
    """``colm serve``'s launcher with its Ray parts played in this process: its own router on the serve loop, and one
    replica (a router on a loop of its own) whose actor calls run straight on it. Its ``stop`` and ``end_drain`` are
    the launcher's."""

    made: list = []

    def __init__(self, cfg, baseline: bool = False) -> None:
        super().__init__(cfg, baseline=baseline)
        self.model_path = "tiny-air, random weights"
        self.made.append(self)

    def prepare(self) -> str:
        return self.model_path

    async def start(self) -> dict[str, str]:
        from colm.router.server import RouterServer

        self.server = RouterServer(_local_router(self.cfg.router.drain_s))
        self.addresses = await self.server.start()
        self.replica = _router(self.cfg.router.drain_s)
        self.replicas = [SimpleNamespace(end_drain=SimpleNamespace(remote=self.replica.end_drain))]  # the actor's call
        return self.addresses

    def _stop_replicas(self) -> None:  # a RouterReplica actor's stop is its ThreadedRouterServer's
        self.replica.stop()
        self.replicas = []


@pytest.mark.timeout(60)
def test_a_second_stop_signal_ends_the_drain_of_every_router_at_once(monkeypatch):
    """``colm serve``: the first SIGTERM starts the drain (health says so, the streams in flight run on); a second
    signal (here Ctrl-C's SIGINT) ends it at once on the launcher's router and its replica: what still runs is cut
    with the drain's error, saying why, instead of waiting out router.drain_s (30 s)."""
    from colm.commands import serve
    from colm.deploy.config import ClusterConfig

    cfg = ClusterConfig.from_dict({"router": {"drain_s": 30.0, "grpc_port": 0, "http_port": 0, "metrics_port": None}})
    monkeypatch.setattr(serve, "load_config", lambda args: cfg)
    monkeypatch.setattr("colm.deploy.launcher.Launcher", _InProcessLauncher)
    monkeypatch.setattr("colm.gc_pauses.freeze_start_heap", lambda: None)
    _InProcessLauncher.made.clear()
    n = 400  # 16 s of tokens: far past the cut, well within the drain
    seen: dict = {"signals": 0}

    def signal_twice():
        def serving() -> bool:  # then serve.run's handlers are in place: a signal stops it, never this process
            return bool(_InProcessLauncher.made) and getattr(_InProcessLauncher.made[0], "replicas", None) != []

        try:
            assert until(serving, timeout=30)
            launcher = _InProcessLauncher.made[0]
            own, replica = launcher.addresses, launcher.replica
            streams = seen["streams"] = [GrpcStream(own["grpc"], n), HttpStream(own["http"], n),
                                         GrpcStream(replica.grpc_addr, n), HttpStream(replica.http_url, n)]
            _in_flight(*streams)
            os.kill(os.getpid(), signal.SIGTERM)
            seen["signals"] += 1
            seen["draining"] = all(until(lambda: _grpc_health(a, "") == "NOT_SERVING", timeout=2.0)
                                   for a in (own["grpc"], replica.grpc_addr))
            time.sleep(0.5)
            seen["ran_on"] = all(s.is_alive() for s in streams)
            seen["second"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)
            seen["signals"] += 1
            for s in streams:
                s.join(20)
        finally:
            if seen["signals"] == 0 and serving():
                os.kill(os.getpid(), signal.SIGTERM)  # whatever failed above, serve.run stops

    thread = threading.Thread(target=signal_twice, daemon=True)
    thread.start()
    t0 = time.monotonic()
    assert serve.run(SimpleNamespace(baseline=False)) == 0
    thread.join(30)
    assert seen["signals"] == 2 and seen["draining"] and seen["ran_on"], seen
    assert time.monotonic() - t0 < 20.0
    g, h, rg, rh = seen["streams"]
    for call in (g, rg):  # gRPC: UNAVAILABLE, saying the drain was ended early
        assert call.error is not None and call.error[0] == grpc.StatusCode.UNAVAILABLE, (call.error, call.tokens)
        assert "second stop signal ended the drain" in call.error[1] and "did not finish" in call.error[1], call.error
    for call in (h, rh):  # HTTP: the stream under way ends with an error event and [DONE]
        assert call.failure is None and call.done and call.finish is None and len(call.errors) == 1, _state(call)
        assert call.errors[0]["code"] == 503 and "second stop signal" in call.errors[0]["message"], call.errors
    for call in (g, h, rg, rh):
        assert 0 < call.tokens < n and call.ended_at - seen["second"] < 3.0, _state(call)


def test_threaded_server_stop_ends_its_blocking_threads():
    """The threads that ran the model's steps end with the server's stop (idle ones would keep OpenMP teams)."""
    bg = _router(drain_s=1.0)
    try:
        status, body = post_json(bg.http_url + "/v1/completions", {"prompt": "hi", "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        assert any(t.name.startswith("colm-router-blocking") for t in threading.enumerate())
    finally:
        bg.stop()
    assert not bg.thread.is_alive()
    assert until(lambda: not any(t.name.startswith("colm-router-blocking") for t in threading.enumerate()), 10)
