"""A KV stream that ends before its writes have run (``DecodeConfig.kv_ready_wait``), on any machine.

On CUDA a cuda_pool sender in another process sends ``KVEnd`` with the IPC handle of an event recorded after its
writes (tests/test_kv_ipc_gpu.py runs that across processes). Here the decode engine gets a stand-in event, one
the test completes or fails, through the same ``finish_kv(..., ready=...)`` the gRPC service calls.

Shown here: the request is admitted only once the event is done, and its tokens equal ``colm generate``; the
running batch goes on stepping meanwhile; a request that ends while its event is pending keeps its blocks out of
the free list until the event is done; an event that fails ends its request with a TransferError and the engine
goes on serving; a CPU decode worker accepts no ready event; bad settings name the field.
"""

from __future__ import annotations

import threading
import time

import pytest

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.errors import RequestAbortedError, TransferError
from colm.generate import generate
from colm.prefill_worker.sinks import LocalKVSink
from colm.sampling import SamplingParams
from _engine_helpers import assert_pool_free, prefill_engine_from, prompts, save_tiny_air


class StandInEvent:
    """``query()`` like a CUDA event; ``done.set()`` completes it, ``broken`` makes query raise."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.broken = False

    def query(self) -> bool:
        if self.broken:
            raise RuntimeError("CUDA error: the event's owner is gone (stand-in)")
        return self.done.is_set()


class ReadySink(LocalKVSink):
    """LocalKVSink whose stream ends with a ready event (as a cuda_pool sender's KVEnd does)."""

    def __init__(self, engine, request_id: str, ready) -> None:
        super().__init__(engine, request_id)
        self.ready = ready

    def finish(self, timeout_s: float) -> int:
        self.engine.finish_kv(self.request_id, self._num_tokens, ready=self.ready)
        return self.num_bytes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_ready")
    full = save_tiny_air(path)
    return path, full, prefill_engine_from(path)


@pytest.fixture
def eng(setup):
    """A started decode engine with the default ``kv_ready_wait`` ("host")."""
    engine = DecodeEngine.from_checkpoint(setup[0], DecodeConfig(num_blocks=128, block_size=4, kv_timeout_s=30))
    yield engine.start()
    engine.stop()


def hand_over(setup, eng, rid, prompt, max_new, ready, scale=None):
    """Reserve, prefill into ``eng`` ending with ``ready``, start generating: the token stream."""
    _, _, pe = setup
    eng.reserve(rid, len(prompt), max_new)
    pe.prefill(rid, prompt, ReadySink(eng, rid, ready))
    return eng.start_generation(rid, prompt[-1], SamplingParams(max_new_tokens=max_new, ignore_eos=True), scale=scale)


def is_running(eng, rid) -> bool:
    with eng._lock:
        req = eng._requests.get(rid)
        return req is not None and req.running


def test_host_wait_admits_once_the_writes_have_run(setup, eng):
    full = setup[1]
    for i, prompt in enumerate(prompts([9, 21], seed=3)):
        ev = StandInEvent()
        stream = hand_over(setup, eng, f"host-{i}", prompt, 5, ev, scale=2)
        time.sleep(0.2)
        assert not is_running(eng, f"host-{i}"), "admitted before the sender's writes had run"
        assert eng.stats().num_steps == 0 or i > 0
        ev.done.set()
        events = list(stream)
        assert [e.token_id for e in events] == generate(full, prompt, SamplingParams(max_new_tokens=5,
                                                                                     ignore_eos=True), scale=2).token_ids
        assert "kv_ready" in events[0].timeline_ms  # the loop saw the event done
    assert_pool_free(eng)


def test_pending_writes_do_not_stall_the_running_batch(setup, eng):
    full = setup[1]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    long = prompts([5], seed=6)[0]
    ev_long = StandInEvent()
    ev_long.done.set()
    long_stream = hand_over(setup, eng, "long", long, 400, ev_long)
    next(long_stream)
    prompt = prompts([6], seed=4)[0]
    ev = StandInEvent()
    stream = hand_over(setup, eng, "pending", prompt, 5, ev)
    steps = eng.stats().num_steps
    time.sleep(0.05)
    assert is_running(eng, "long"), "the long request ended before the check (a slow host?)"
    assert eng.stats().num_steps > steps and not is_running(eng, "pending")
    ev.done.set()
    assert [e.token_id for e in stream] == generate(full, prompt, params).token_ids
    eng.abort("long")
    with pytest.raises(RequestAbortedError):
        list(long_stream)
    assert_pool_free(eng)


def test_blocks_held_until_the_writes_have_run(setup, eng):
    prompt = prompts([13], seed=8)[0]
    ev = StandInEvent()
    stream = hand_over(setup, eng, "held", prompt, 4, ev)
    blocks = len(eng._requests["held"].blocks)
    assert eng.abort("held")
    with pytest.raises(RequestAbortedError):
        list(stream)
    time.sleep(0.1)
    assert eng.stats().num_held_blocks == blocks and eng.pool.num_free == eng.pool.num_blocks - blocks
    ev.done.set()
    assert_pool_free(eng)
    assert eng.stats().num_held_blocks == 0


def test_failed_ready_event_fails_its_request(setup, eng):
    full = setup[1]
    prompt = prompts([10], seed=9)[0]
    ev = StandInEvent()
    stream = hand_over(setup, eng, "broken", prompt, 4, ev)
    ev.broken = True
    with pytest.raises(TransferError, match="ready event failed"):
        list(stream)
    assert_pool_free(eng)
    ok = hand_over(setup, eng, "after", prompt, 4, None)  # the worker goes on serving
    assert [e.token_id for e in ok] == generate(full, prompt, SamplingParams(max_new_tokens=4,
                                                                             ignore_eos=True)).token_ids


def test_cpu_worker_accepts_no_ready_event(setup):
    path = setup[0]
    eng = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=8, block_size=4))
    assert not eng.accepts_ready_events()
    with pytest.raises(TransferError, match="did not accept"):
        eng.open_ready_event(b"\0" * 64)


def test_bad_ready_settings_name_the_field():
    with pytest.raises(ValueError, match="kv_ready_wait='device'"):
        DecodeConfig(kv_ready_wait="device")
    with pytest.raises(ValueError, match="kv_ready_poll_s=0"):
        DecodeConfig(kv_ready_poll_s=0)
