"""A worker whose engine loop is stuck (a step that never returns, as a hung device sync looks) while its Stats still
answer is reported truthfully: the engines report how long they have held work without progress (``stall_s``), the
router takes such a worker out past ``router.worker_stall_s`` and keeps it out at every poll until it makes progress
again (no flapping back in on each report), and health says so everywhere (gRPC Health with the reason,
grpc.health.v1, HTTP /health, ``colm_worker_healthy``). An idle engine, and one whose long step captures graphs or
tunes kernels, is never flagged."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from colm.client import Client
from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.generate import generate
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.engine import PrefillEngine
from colm.proto import load_proto
from colm.proto.rpc import auth_metadata
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.engine_backend import EngineBackend
from colm.router.placement import WorkerRegistry
from colm.router.policy import WorkerReport
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer
from _engine_helpers import prompts, save_tiny_air
from router_helpers import BackgroundRouter, get_json, until

kv_pb2, kv_pb2_grpc = load_proto("kv")
TOKEN = "worker-stall-test-token-0123456789"
STALL_S = 0.5  # router.worker_stall_s of these tests: far above a tiny model's CPU step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_stall")
    return path, save_tiny_air(path)


def _decode(path, num_blocks: int = 256, colocated: bool = True) -> DecodeEngine:
    return DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=num_blocks, block_size=4,
                                                           colocated_prefill=colocated))


def _block(engine, method: str, after: int = 0) -> threading.Event:
    """``engine.<method>`` waits (outside the engine's lock, as a hung device sync would) from its call ``after`` + 1
    on until the returned event is set."""
    gate, real, calls = threading.Event(), getattr(engine, method), [0]

    def blocked(*args, **kwargs):
        calls[0] += 1
        if calls[0] > after:
            gate.wait()
        return real(*args, **kwargs)

    setattr(engine, method, blocked)
    return gate


def _grpc_health(addr: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="colm.v1.Colm"), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)


def _reference(full, p, n: int) -> list[int]:
    return generate(full, p, SamplingParams(max_new_tokens=n, ignore_eos=True), scale=2).token_ids


def test_a_stuck_decode_worker_is_out_and_stays_out_until_it_progresses(setup):
    """One colocated decode worker over gRPC; its step blocks mid-request. Its Stats report the stall, the router says
    NOT_SERVING everywhere with the worker and the stall in the reason, at every poll while it lasts; unblocked, it
    serves again and the request in flight ends with the reference tokens."""
    from colm.decode_worker.service import DecodeServer
    from colm.router.backend import WorkerInfo
    from colm.router.grpc_backend import GrpcBackend

    path, full = setup
    server = DecodeServer(_decode(path), TOKEN, "127.0.0.1:0").start()
    gate = _block(server.engine, "_plain_step", after=2)  # two tokens, then stuck
    router = Router(RouterConfig(grpc_port=0, http_port=0, poll_interval_s=0.05, worker_stall_s=STALL_S,
                                 token_timeout_s=60), full.cfg, ByteTokenizer(),
                    GrpcBackend([WorkerInfo("d0", "decode", server.address)], cluster_token=TOKEN))
    bg = BackgroundRouter(router)
    p = prompts([9], seed=11)[0]
    channel = grpc.insecure_channel(server.address)
    stub = kv_pb2_grpc.DecodeWorkerStub(channel)
    try:
        with Client(bg.grpc_addr) as c, ThreadPoolExecutor(1) as pool:
            assert until(lambda: c.health()["serving"])
            fut = pool.submit(c.complete, p, max_new_tokens=8, scale=2, ignore_eos=True)
            assert until(lambda: not c.health()["serving"], timeout=10)
            s = stub.Stats(kv_pb2.DecodeStatsRequest(), metadata=auth_metadata(TOKEN), timeout=5)
            assert s.stall_s >= STALL_S and s.stall_requests == 1 and s.num_running == 1, s
            h = c.health()
            assert "d0: unhealthy, engine made no progress for" in h["reason"] and "with 1 request" in h["reason"], h
            (w,) = h["workers"]
            assert w["state"] == "unhealthy" and "engine made no progress" in w["detail"] and w["inflight"] == 1, w
            assert _grpc_health(bg.grpc_addr) == "NOT_SERVING"
            status, body = get_json(f"{bg.http_url}/health")
            assert status == 503 and "engine made no progress" in body["reason"], (status, body)
            metric = router.metrics.registry.get_sample_value
            assert metric("colm_worker_healthy", {"worker": "d0", "role": "decode"}) == 0
            assert metric("colm_serving") == 0
            for _ in range(20):  # 20 polls and more: out at every one of them, not back in on each report
                time.sleep(0.05)
                assert router.worker_states() == {"d0": "unhealthy"} and not c.health()["serving"]
            assert not fut.done()
            gate.set()
            assert until(lambda: c.health()["serving"], timeout=10)
            assert _grpc_health(bg.grpc_addr) == "SERVING" and get_json(f"{bg.http_url}/health")[0] == 200
            assert metric("colm_worker_healthy", {"worker": "d0", "role": "decode"}) == 1
            out = fut.result(timeout=60)
        s = stub.Stats(kv_pb2.DecodeStatsRequest(), metadata=auth_metadata(TOKEN), timeout=5)
        assert s.stall_s == 0 and s.stall_requests == 0
    finally:
        gate.set()
        channel.close()
        bg.stop()
        server.stop()
    assert out["token_ids"] == _reference(full, p, 8)


def test_a_stuck_worker_taken_out_by_the_token_timeout_is_not_readmitted_by_its_next_report(setup):
    """The campaign's flapping: a request's no-token timeout takes the stuck worker out (it fails over to the other
    worker), and the stuck worker's next Stats, well under ``worker_stall_s``, must not bring it back: it stays out,
    and no new request goes to it, until it makes progress."""
    path, full = setup
    engines = {"d0": _decode(path, num_blocks=512), "d1": _decode(path)}  # d0: more free blocks, picked first
    gate = _block(engines["d0"], "_plain_step")
    reserved_on_d0 = []
    real_reserve = engines["d0"].reserve

    def reserve(request_id, *args, **kwargs):
        reserved_on_d0.append(request_id)
        return real_reserve(request_id, *args, **kwargs)

    engines["d0"].reserve = reserve
    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05, worker_stall_s=30.0,
                                 token_timeout_s=1.0, max_retries=2), full.cfg, ByteTokenizer(),
                    EngineBackend({}, engines))
    bg = BackgroundRouter(router)
    ps = prompts([9, 7, 11, 8], seed=12)
    n = 12
    try:
        with Client(bg.grpc_addr) as c, ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.complete, ps[0], max_new_tokens=n, scale=2, ignore_eos=True)
            assert until(lambda: router.worker_states()["d0"] == "unhealthy", timeout=10)  # the no-token timeout
            outs = [first.result(timeout=60)]  # failed over to d1
            for _ in range(20):  # 20 polls and more, each answered by d0 (its Stats work): it stays out
                time.sleep(0.05)
                assert router.worker_states() == {"d0": "unhealthy", "d1": "healthy"}
            outs += [c.complete(p, max_new_tokens=n, scale=2, ignore_eos=True) for p in ps[1:]]
            assert len(reserved_on_d0) == 1  # the stuck request's alone
            assert router.worker_states()["d0"] == "unhealthy"
            assert "none since it was taken out" in router.registry.workers["d0"].stalled
            gate.set()
            assert until(lambda: router.worker_states() == {"d0": "healthy", "d1": "healthy"}, timeout=10)
    finally:
        gate.set()
        bg.stop()
    assert outs[0]["usage"]["retries"] == 1
    for p, out in zip(ps, outs):
        assert out["token_ids"] == _reference(full, p, n)


def test_a_stuck_prefill_worker_is_reported_and_out_until_it_progresses(setup):
    """A prefill forward that never returns with prompts queued: its Stats report the stall and both prompts, the router
    has no worker that prefills (the reason names it), and the request ends with the reference tokens once it moves."""
    from colm.prefill_worker.service import PrefillService
    from colm.prefill_worker.sinks import NullKVSink

    path, full = setup
    pe = PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=16))
    gate = _block(pe, "_forward")
    de = _decode(path, colocated=False)
    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05, worker_stall_s=STALL_S,
                                 token_timeout_s=60), full.cfg, ByteTokenizer(), EngineBackend({"p0": pe}, {"d0": de}))
    bg = BackgroundRouter(router)
    p = prompts([40], seed=13)[0]  # longer than chunk_size: a batch of its own
    try:
        with Client(bg.grpc_addr) as c, ThreadPoolExecutor(1) as pool:
            assert until(lambda: c.health()["serving"])
            fut = pool.submit(c.complete, p, max_new_tokens=6, scale=2, ignore_eos=True)
            assert until(lambda: pe.stats().num_queued == 0 and pe.stats().stall_s > 0, timeout=10)
            queued = pe.submit("queued", prompts([6], seed=14)[0], NullKVSink())  # behind the stuck batch
            assert until(lambda: not c.health()["serving"], timeout=10)
            h = c.health()
            assert "p0: unhealthy, engine made no progress for" in h["reason"] and "with 2 requests" in h["reason"], h
            s = PrefillService(pe, TOKEN).Stats(kv_pb2.PrefillStatsRequest(), None)
            assert s.stall_s >= STALL_S and s.stall_requests == 2 and s.num_queued == 1, s
            for _ in range(10):
                time.sleep(0.05)
                assert router.worker_states()["p0"] == "unhealthy"
            gate.set()
            assert until(lambda: c.health()["serving"], timeout=10)
            out = fut.result(timeout=60)
            queued.result(timeout=30)
        assert pe.stats().stall_s == 0
    finally:
        gate.set()
        bg.stop()
    assert out["token_ids"] == _reference(full, p, 6)


def test_idle_engines_are_never_stalled(setup):
    """No work, no stall: a decode engine whose loop is stuck with nothing to do, an idle prefill engine, and an engine
    that holds a reservation before its loop starts (warm-up, graph captures at start) all report 0."""
    path, _ = setup
    de = _decode(path)
    de.reserve("r", 5, 4, prefill_tokens=[1, 2, 3, 4])
    assert de.stats().stall_s == 0  # not started: warm-up is no stall
    de.abort("r")
    stuck_idle = _decode(path)
    gate = _block(stuck_idle, "step")  # its loop is stuck, but it holds nothing
    pe = PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=16))
    engines = [de.start(), stuck_idle.start(), pe.start()]
    try:
        time.sleep(3 * STALL_S)
        for e in engines:
            s = e.stats()
            assert s.stall_s == 0 and s.stall_requests == 0, (type(e).__name__, s)
    finally:
        gate.set()
        for e in engines:
            e.stop()


def test_a_long_step_that_tunes_or_captures_is_progress_not_a_stall(setup, monkeypatch):
    """A step that takes several thresholds because it tunes kernels (or captures CUDA graphs: both report progress to
    the loop they run on, ``colm.loop_thread.progress``) never shows a stall above one tuning's time."""
    from colm.kernels import _tuning

    path, _ = setup
    monkeypatch.setattr(_tuning, "_BEST", {})  # this test's tunings stay out of the process's tables
    monkeypatch.setattr(_tuning, "_LOG", [])
    de = _decode(path)
    real = de._plain_step
    done = threading.Event()

    def tuning_step(*args, **kwargs):  # the first step meets new shapes: 8 tunings of ~0.2 s, then the step
        if not done.is_set():
            for i in range(8):
                _tuning._tune(("stall-test", i), ["a", "b"], lambda cfg, rep: time.sleep(0.05) or 1.0, False)
            done.set()
        return real(*args, **kwargs)

    de._plain_step = tuning_step
    de.start()
    try:
        p = prompts([9], seed=15)[0]
        de.reserve("a", len(p), 4, prefill_tokens=p[:-1])
        de.prefill_kv("a", p[:-1])
        stream = de.start_generation("a", p[-1], SamplingParams(max_new_tokens=4, ignore_eos=True))
        t0, worst = time.monotonic(), 0.0
        while not done.is_set() and time.monotonic() - t0 < 30:
            worst = max(worst, de.stats().stall_s)
            time.sleep(0.01)
        assert done.is_set() and time.monotonic() - t0 > 2 * STALL_S  # the step was long
        assert 0 < worst < STALL_S, worst  # yet never a stall: each tuning was progress
        assert len(list(stream)) == 4
    finally:
        de.stop()


def test_the_registry_keeps_a_stalled_worker_out_until_its_report_shows_progress():
    reg = WorkerRegistry(stall_s=1.0)
    reg.add("d0", "decode")

    def report(stall_s: float, n: int = 3, now: float | None = None):
        reg.update(WorkerReport("d0", "decode", stall_s=stall_s, stall_requests=n if stall_s else 0), now=now)
        return reg.workers["d0"]

    assert report(0.4).healthy  # below the threshold: a slow step
    w = report(1.2)
    assert not w.healthy and w.stalled == ("engine made no progress for 1.2 s with 3 requests "
                                           "(router.worker_stall_s=1)")
    assert reg.state(w) == "unhealthy" and reg.detail(w) == w.stalled and not reg.healthy("decode")
    assert not report(1.3).healthy and not report(5.0, n=1).healthy  # every report while it lasts
    assert report(0.0).healthy and not w.stalled  # progress: back in
    reg.mark_unhealthy("d0")  # a failed call (e.g. no token in time) takes it out
    t = w.out_since
    assert not report(0.6, now=t + 0.2).healthy  # stuck since before it was taken out: no progress since
    assert "none since it was taken out" in w.stalled
    assert report(0.1, now=t + 0.3).healthy  # it moved after it was taken out: back in
    reg.mark_unhealthy("d0")
    assert report(0.0).healthy  # a worker with nothing to do (or a restarted one) comes back at once


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "30"])
def test_worker_stall_s_is_validated(value):
    with pytest.raises(ValueError, match=r"router.worker_stall_s=.*finite number of seconds > 0"):
        RouterConfig(worker_stall_s=value)
    assert RouterConfig(worker_stall_s=2).worker_stall_s == 2
