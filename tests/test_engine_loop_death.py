"""An engine loop that ends with an error (a bug, not one request's failure) must not leave a worker that answers its
health checks while serving nothing: its requests end at once, health fails, new work is refused, the router fails
over to another worker, and a worker process exits so that its supervisor restarts it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import grpc
import pytest

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.errors import EngineDeadError
from colm.generate import generate
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.engine import PrefillEngine
from colm.proto import load_proto
from colm.proto.rpc import auth_metadata
from colm.sampling import SamplingParams
from _engine_helpers import assert_pool_free, prompts, save_tiny_air

kv_pb2, kv_pb2_grpc = load_proto("kv")
TOKEN = "loop-death-test-token-0123456789"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_loop_death")
    return path, save_tiny_air(path)


def _decode(path) -> DecodeEngine:
    return DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=256, block_size=4, colocated_prefill=True))


def _break_loop(engine, what: str = "step") -> None:
    """The engine's next loop iteration raises (as a bug in the loop itself would)."""
    def broken(*args, **kwargs):
        raise RuntimeError("injected loop bug")

    setattr(engine, what, broken)


def _running(de: DecodeEngine, rid: str, p: list[int], n: int = 100):
    de.reserve(rid, len(p), n, prefill_tokens=p[:-1])
    de.prefill_kv(rid, p[:-1])
    it = iter(de.start_generation(rid, p[-1], SamplingParams(max_new_tokens=n, ignore_eos=True)))
    next(it)  # running: its first token came
    return it


def test_a_dead_decode_loop_ends_its_requests_now_and_reports_itself_dead(setup):
    path, _ = setup
    de = _decode(path).start()
    died = []
    de.on_loop_error(died.append)
    try:
        a, b = (_running(de, rid, p) for rid, p in zip("ab", prompts([9, 13], seed=3)))
        assert de.alive()
        _break_loop(de)
        t0 = time.monotonic()
        for it in (a, b):
            with pytest.raises(EngineDeadError, match="injected loop bug"):
                for _ in it:
                    pass
        assert time.monotonic() - t0 < 10  # at once, not at the reservation deadline (600 s)
        assert not de.alive()
        assert len(died) == 1 and "injected loop bug" in str(died[0])
        with pytest.raises(EngineDeadError):
            de.reserve("c", 4, 4)
        assert_pool_free(de)
    finally:
        de.stop()


def test_a_dead_prefill_loop_fails_its_queue_and_refuses_more(setup):
    path, _ = setup
    pe = PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=16))
    _break_loop(pe, "run_once")  # before start: the first queued prompt meets the broken loop
    pe.start()
    try:
        fut = pe.submit("a", prompts([12], seed=1)[0], sink=None)
        with pytest.raises(EngineDeadError, match="injected loop bug"):
            fut.result(timeout=10)
        assert not pe.alive()
        with pytest.raises(EngineDeadError):
            pe.submit("b", prompts([5], seed=2)[0], sink=None)
    finally:
        pe.stop()


def test_a_dead_decode_loop_fails_the_workers_stats_with_unavailable(setup):
    from colm.decode_worker.service import DecodeServer

    path, _ = setup
    server = DecodeServer(_decode(path), TOKEN, "127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = kv_pb2_grpc.DecodeWorkerStub(channel)
        stub.Stats(kv_pb2.DecodeStatsRequest(), metadata=auth_metadata(TOKEN), timeout=30)  # healthy
        it = _running(server.engine, "a", prompts([9], seed=4)[0])
        _break_loop(server.engine)
        with pytest.raises(EngineDeadError):
            for _ in it:
                pass
        with pytest.raises(grpc.RpcError) as e:
            stub.Stats(kv_pb2.DecodeStatsRequest(), metadata=auth_metadata(TOKEN), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "injected loop bug" in e.value.details()
    finally:
        channel.close()
        server.stop()


def test_the_router_fails_over_from_a_worker_whose_loop_died(setup):
    """Two colocated decode workers in the router's process: one's loop dies while requests stream from both; the
    router takes it out at its next health poll, and every request, those that were running on it included, ends
    with the reference tokens from the other."""
    from concurrent.futures import ThreadPoolExecutor

    from colm.client import Client
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.engine_backend import EngineBackend
    from colm.tokenizer import ByteTokenizer
    from router_helpers import BackgroundRouter

    path, full = setup
    engines = {"d0": _decode(path), "d1": _decode(path)}
    bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05, max_retries=2),
                                 full.cfg, ByteTokenizer(), EngineBackend({}, engines)))
    ps = prompts([7, 9, 11, 13, 8, 10], seed=5)
    n = 60
    try:
        with Client(bg.grpc_addr) as c, ThreadPoolExecutor(4) as pool:
            first = [pool.submit(c.complete, p, max_new_tokens=n, scale=2, ignore_eos=True) for p in ps[:4]]
            deadline = time.monotonic() + 30
            while engines["d0"].stats().num_running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engines["d0"].stats().num_running > 0  # requests were running on the worker that dies
            _break_loop(engines["d0"])
            outs = [f.result(timeout=120) for f in first]
            outs += [c.complete(p, max_new_tokens=n, scale=2, ignore_eos=True) for p in ps[4:]]
        states = bg.router.worker_states()
    finally:
        bg.stop()
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    for p, out in zip(ps, outs):
        assert list(out["token_ids"]) == generate(full, p, params, scale=2).token_ids
    assert states == {"d0": "unhealthy", "d1": "healthy"}
    assert not engines["d0"].alive()


def test_a_worker_process_exits_after_its_loop_died(setup, tmp_path):
    """deploy's hook: the process ends (exit code 70) about a second after the loop died, for Ray to restart it."""
    path, _ = setup
    code = textwrap.dedent(f"""
        import time
        from colm.decode_worker.config import DecodeConfig
        from colm.decode_worker.engine import DecodeEngine
        from colm.deploy.actors import exit_after_loop_error
        de = DecodeEngine.from_checkpoint({str(path)!r}, DecodeConfig(num_blocks=16, block_size=4))
        de.on_loop_error(exit_after_loop_error)
        def broken():
            raise RuntimeError("injected loop bug")
        de.step = broken
        de.start()
        time.sleep(60)
        raise SystemExit(0)  # not reached: the hook exits first
    """)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 70, r.stderr[-2000:]
    assert time.monotonic() - t0 < 50
    assert "exits in 1.0 s" in r.stderr
