"""The colocated engine (``DecodeConfig.colocated_prefill``): the decode engine prefills its own prompts with
chain 1, in chunks packed into its step loop under a token budget. Tokens equal ``colm.generate`` at every scale
(short and long prompts, chunk boundaries anywhere, a mid-stream switch, speculative rows), the K/V it writes equal
the prefill worker's, prompt chunks and decode steps interleave within the budget, and faults stay per request."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.errors import RequestFailedError
from colm.generate import generate
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.sinks import LocalKVSink
from colm.sampling import SamplingParams
from _engine_helpers import assert_pool_free, prompts, save_tiny_air


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_colocated")
    full = save_tiny_air(path)
    return path, full


def _engine(path, **config) -> DecodeEngine:
    cfg = {"num_blocks": 160, "block_size": 4, "colocated_prefill": True, "max_batched_tokens": 24, **config}
    return DecodeEngine.from_checkpoint(path, DecodeConfig(**cfg))


def _submit(de, rid, prompt, params, scale, **kw):
    de.reserve(rid, len(prompt), params.max_new_tokens)
    de.prefill_kv(rid, prompt[:-1])
    return de.start_generation(rid, prompt[-1], params, scale=scale, **kw)


@pytest.mark.parametrize("budget,prefill_scale", [(5, 1), (24, 1), (4096, 1), (24, 0)])
def test_tokens_equal_the_reference_at_every_scale(setup, budget, prefill_scale):
    """Prompts of 1..61 tokens, staggered, both scales in one batch; the budget splits prompts anywhere (5 tokens
    an iteration: every long prompt takes many chunks, beside decode rows) or packs several into one chunk; the
    full-model prefill (``prefill_scale`` 0) gives the same tokens."""
    path, full = setup
    de = _engine(path, max_batched_tokens=budget, prefill_scale=prefill_scale).start()
    try:
        batch = prompts([1, 2, 7, 23, 61, 9, 40, 17], seed=budget)
        params = SamplingParams(max_new_tokens=8, ignore_eos=True)
        streams = []
        for i, p in enumerate(batch):
            scale = 1 + i % 2
            streams.append((p, scale, _submit(de, f"c{budget}-{i}", p, params, scale)))
            time.sleep(0.005 * (i % 3))
        for p, scale, st in streams:
            events = list(st)
            assert [e.token_id for e in events] == generate(full, p, params, scale=scale).token_ids
            assert {e.scale for e in events} == {scale}
        s = de.stats()
        assert s.prefills and s.num_prefill_chunks >= 1 and s.num_prefill_queued_tokens == 0
    finally:
        de.stop()
    assert_pool_free(de)


@pytest.mark.parametrize("prefill_scale", [1, 0])
def test_the_pool_holds_the_prefill_workers_kv(setup, prefill_scale):
    """The K/V the colocated chunks write (a 37-token prompt in chunks of 10 and 3 alongside another prompt) equal
    the chain-1 prefill worker's K/V of the same prompt, written through its sink into another engine; so do those
    of the full-model prefill (``prefill_scale`` 0, the dense-cost baseline: CoLM-Air's K/V are chain 1's)."""
    path, _ = setup
    p = prompts([38], seed=11)[0]
    de = _engine(path, max_batched_tokens=13, prefill_scale=prefill_scale)
    de.reserve("a", 4, 1)
    de.prefill_kv("a", [5, 6, 7])
    de.reserve("k", len(p), 1)
    de.prefill_kv("k", p[:-1])
    while de.stats().num_prefill_queued_tokens or any(r.prefilling for r in de._requests.values()):
        de.step()
    ref = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=160, block_size=4))
    pe = PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=16, max_batch_tokens=64))
    ref.reserve("k", len(p), 1)
    pe.prefill("k", p, LocalKVSink(ref, "k"))
    mine = de.pool.slots(de._requests["k"].blocks, 0, len(p) - 1)
    theirs = ref.pool.slots(ref._requests["k"].blocks, 0, len(p) - 1)
    for layer in range(de.cfg.n_layers):
        for pool_a, pool_b in ((de.pool.k, ref.pool.k), (de.pool.v, ref.pool.v)):
            a = pool_a[layer].reshape(-1, *pool_a.shape[-2:])[mine]
            b = pool_b[layer].reshape(-1, *pool_b.shape[-2:])[theirs]
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert de._requests["k"].kv_done and de._requests["a"].kv_done
    pe.stop()


def test_prefill_chunks_and_decode_steps_interleave_within_the_budget(setup):
    """While one request decodes, a 90-token prompt is prefilled over several iterations, each also stepping the
    running request; no iteration spends more than the budget, and the decoding request's tokens keep coming."""
    path, full = setup
    de = _engine(path, max_batched_tokens=16).start()
    try:
        params = SamplingParams(max_new_tokens=40, ignore_eos=True)
        short, long_ = prompts([5, 91], seed=3)
        first = _submit(de, "running", short, params, 2)
        it = iter(first)
        events = [next(it)]  # running now
        second = _submit(de, "long", long_, SamplingParams(max_new_tokens=4, ignore_eos=True), 2)
        events += list(it)
        assert [e.token_id for e in events] == generate(full, short, params, scale=2).token_ids
        assert [e.token_id for e in second] == generate(full, long_, SamplingParams(max_new_tokens=4, ignore_eos=True),
                                                         scale=2).token_ids
        log = list(de.iterations)
    finally:
        de.stop()
    assert all(d + p <= 16 for d, p in log), log
    mixed = [(d, p) for d, p in log if d and p]
    assert len(mixed) >= 5, log  # 90 prompt tokens at <= 15 an iteration beside the running row
    assert sum(p for _, p in log) == 4 + 90
    assert_pool_free(de)


def test_mid_stream_switch_and_speculative_rows(setup):
    """A colocated request switched 2 -> 1 -> 2 mid-stream follows the reference schedule; a speculative request
    (its rounds count gamma + 1 tokens against the budget) gives plain decoding's tokens."""
    path, full = setup
    de = _engine(path, max_batched_tokens=12).start()
    try:
        p, q = prompts([19, 33], seed=8)
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        spec = _submit(de, "spec", q, params, 2, speculative=3)
        st = _submit(de, "sw", p, params, 2)
        got = []
        for ev in st:
            got.append(ev)
            if len(got) == 3:
                de.set_scale("sw", 1)
            if len(got) == 7:
                de.set_scale("sw", 2)
        # a switch applies from the next step, wherever the loop is: replay the scales the tokens were served at
        served = [e.scale for e in got]
        ref = generate(full, p, params, scale_schedule=lambda i: served[i])
        assert [e.token_id for e in got] == ref.token_ids and {e.scale for e in got} == {1, 2}
        assert [e.token_id for e in spec] == generate(full, q, params, scale=2).token_ids
        assert all(d <= 12 for d, _ in de.iterations)
    finally:
        de.stop()
    assert_pool_free(de)


def test_bad_input_and_faults_stay_per_request(setup, monkeypatch):
    """Wrong lengths and ids are clear errors that free the reservation; an abort while queued or mid-prefill
    frees the blocks; a chunk whose forward fails for one request fails only that request."""
    path, full = setup
    de = _engine(path, max_batched_tokens=8)
    off = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=16, block_size=4))
    off.reserve("x", 4, 1)
    with pytest.raises(ValueError, match="colocated_prefill is off"):
        off.prefill_kv("x", [1, 2, 3])
    assert not off._requests  # the reservation is freed
    de.reserve("short", 6, 2)
    with pytest.raises(ValueError, match="needs 5"):
        de.prefill_kv("short", [1, 2, 3])
    de.reserve("vocab", 3, 2)
    with pytest.raises(ValueError, match="must be in 0..259"):
        de.prefill_kv("vocab", [1, 999])
    assert not de._requests and de.pool.num_free == de.pool.num_blocks
    # abort while queued, and while a chunk of it is in the forward
    de.reserve("q", 30, 2)
    de.prefill_kv("q", list(range(29)))
    assert de.abort("q")
    de.step()
    assert_pool_free(de)
    from colm.decode_worker import chunked_prefill as engine_mod

    real = engine_mod.run_prefill_chunk
    entered, release = threading.Event(), threading.Event()

    def slow(model, pool, segments, scale):
        entered.set()
        release.wait(5)
        return real(model, pool, segments, scale)

    monkeypatch.setattr(engine_mod, "run_prefill_chunk", slow)
    de.reserve("mid", 30, 2)
    de.prefill_kv("mid", list(range(29)))
    t = threading.Thread(target=de.step)
    t.start()
    assert entered.wait(5)
    assert de.abort("mid") and de._requests["mid"].cancel is not None  # only marked: the forward still runs
    release.set()
    t.join(5)
    assert_pool_free(de)
    # one poisoned prompt in a packed chunk
    def poisoned(model, pool, segments, scale):
        if any(s.request.request_id == "bad" for s in segments):
            raise RuntimeError("device fault")
        return real(model, pool, segments, scale)

    monkeypatch.setattr(engine_mod, "run_prefill_chunk", poisoned)
    de.config = DecodeConfig(num_blocks=160, block_size=4, colocated_prefill=True, max_batched_tokens=64)
    de.start()
    try:
        params = SamplingParams(max_new_tokens=5, ignore_eos=True)
        good_p, bad_p = prompts([14, 9], seed=21)
        bad = _submit(de, "bad", bad_p, params, 2)
        good = _submit(de, "good", good_p, params, 2)
        with pytest.raises(RequestFailedError, match="prefill failed"):
            list(bad)
        assert [e.token_id for e in good] == generate(full, good_p, params, scale=2).token_ids
    finally:
        de.stop()
    assert_pool_free(de)


def test_the_prefill_warm_up_runs_every_chunk_size_and_gives_its_blocks_back(setup, monkeypatch):
    """On CUDA, ``start`` with ``warmup_context`` runs a chunk of every power-of-two size up to the budget (the
    kernels tune per size bucket); run here directly: the sizes, the pool whole again, and nothing counted as served
    (the stats' counters read zero)."""
    path, _ = setup
    from colm.decode_worker import chunked_prefill as engine_mod

    seen = []
    real = engine_mod.run_prefill_chunk
    monkeypatch.setattr(engine_mod, "run_prefill_chunk",
                        lambda model, pool, segs, scale: (seen.append((segs[0].start, segs[0].end)),
                                                          real(model, pool, segs, scale)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    de = _engine(path, max_batched_tokens=100)
    assert de._warm_prefill() == 8  # 1, 2, 4, ..., 64 and 100
    assert [e for s, e in seen if s == 0] == [1, 2, 4, 8, 16, 32, 64, 100]
    assert (64, 100) in seen  # a later chunk too
    assert de.pool.num_free == de.pool.num_blocks and not de._requests
    s = de.stats()
    assert (s.num_steps, s.num_finished, s.num_prefill_chunks, s.prefill_tokens_per_s) == (0, 0, 0, 0.0)
    assert not de.iterations


class _ReplayByCalling:
    """Stands in for a captured CUDA graph on CPU: replay runs the captured function again."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def replay(self) -> None:
        self.fn()


def _graphed_engine(path, monkeypatch, graph_scale: int = 1, **config):
    """A colocated engine whose chunks go through ``PackedPrefillGraphs`` with the capture replaced by a direct call
    (the graphs' static padded inputs, their one upload per replay and the pool writes run as on CUDA)."""
    from colm.decode_worker import prefill_graphs as pg

    monkeypatch.setattr(pg, "warm_and_capture", lambda fn, device, pool=None, warmup=2: (_ReplayByCalling(fn), fn()))
    de = _engine(path, **config)
    de.prefill_graphs = pg.PackedPrefillGraphs(de.model, de.pool, de.config.max_batched_tokens,
                                               de.config.max_prefill_segments, de.cfg.max_seq_len, scale=graph_scale)
    de.prefill_graphs.enabled = True
    return de


@pytest.mark.parametrize("prefill_scale", [1, 0])
def test_graphed_chunks_write_the_eager_kv_and_give_reference_tokens(setup, monkeypatch, prefill_scale):
    """Every chunk (whole prompts, a long prompt's first and later chunks, mixed) replays a padded graph (padding
    slots -1, never written) and leaves the K/V of one eager chunk per prompt in the pool; served tokens equal the
    reference. The full-model prefill (the baseline's) is graphed the same way."""
    path, full = setup
    scale = prefill_scale or full.cfg.num_chains
    de = _graphed_engine(path, monkeypatch, graph_scale=scale, max_batched_tokens=48, prefill_scale=prefill_scale)
    batch = prompts([3, 20, 11, 70], seed=9)  # the 69-token prompt spans three chunks
    for i, p in enumerate(batch):
        de.reserve(f"g{i}", len(p), 1)
        de.prefill_kv(f"g{i}", p[:-1])
    sentinel = de.pool.kv.clone()
    while de.stats().num_prefill_queued_tokens or any(r.prefilling for r in de._requests.values()):
        de.step()
    assert de.prefill_graphs.num_replays == de._num_prefill_chunks >= 3 and de.prefill_graphs.num_captures == 1
    ref = _engine(path, max_batched_tokens=4096)
    for i, p in enumerate(batch):
        ref.reserve(f"g{i}", len(p), 1)
        ref.prefill_kv(f"g{i}", p[:-1])
    ref.step()
    used = set()
    for i, p in enumerate(batch):
        a = de.pool.slots(de._requests[f"g{i}"].blocks, 0, len(p) - 1)
        b = ref.pool.slots(ref._requests[f"g{i}"].blocks, 0, len(p) - 1)
        used |= set(a.tolist())
        for layer in range(de.cfg.n_layers):
            for pa, pb in ((de.pool.k, ref.pool.k), (de.pool.v, ref.pool.v)):
                torch.testing.assert_close(pa[layer].reshape(-1, *pa.shape[-2:])[a],
                                           pb[layer].reshape(-1, *pb.shape[-2:])[b], rtol=1e-4, atol=1e-5)
    hkv, hd = de.pool.k.shape[-2:]
    untouched = torch.tensor(sorted(set(range(de.pool.num_blocks * de.pool.block_size)) - used))
    for kv_now, kv_before in zip(de.pool.kv, sentinel):  # K, then V: no slot outside the prompts was written
        assert torch.equal(kv_now.reshape(de.cfg.n_layers, -1, hkv, hd)[:, untouched],
                           kv_before.reshape(de.cfg.n_layers, -1, hkv, hd)[:, untouched])
    # the same through the running loop: tokens equal the reference
    de2 = _graphed_engine(path, monkeypatch, graph_scale=scale, max_batched_tokens=48,
                          prefill_scale=prefill_scale).start()
    try:
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        streams = [(p, _submit(de2, f"s{i}", p, params, 1 + i % 2)) for i, p in enumerate(prompts([5, 30, 9, 60],
                                                                                                   seed=2))]
        for i, (p, st) in enumerate(streams):
            assert [e.token_id for e in st] == generate(full, p, params, scale=1 + i % 2).token_ids
        assert de2.prefill_graphs.num_replays >= 1
    finally:
        de2.stop()
    assert_pool_free(de2)


def test_chunk_graph_sizes_and_which_chunks_they_take():
    import types

    from colm.decode_worker.block_pool import blocks_for
    from colm.decode_worker.prefill_graphs import PackedPrefillGraphs, token_sizes
    from colm.decode_worker.prefill_schedule import Segment

    assert token_sizes(2048) == [64, 128, 256, 512, 1024, 1536, 2048]
    assert token_sizes(48) == [64] and token_sizes(600) == [64, 128, 256, 512, 1024]
    g = PackedPrefillGraphs.__new__(PackedPrefillGraphs)
    g.sizes, g.max_segments, g.max_pages = token_sizes(300), 2, 20
    g.pool = types.SimpleNamespace(block_size=16)
    req = lambda n: types.SimpleNamespace(prompt_tokens=list(range(n)))  # noqa: E731
    assert g.size_for([Segment(req(50), 0, 50)]) == 64
    assert g.size_for([Segment(req(50), 0, 50), Segment(req(100), 0, 30)]) == 128
    assert g.size_for([Segment(req(9), 0, 9)] * 3) is None  # more segments than a graph holds
    long = req(400)
    assert blocks_for(400, 16) > g.max_pages and g.size_for([Segment(long, 300, 400)]) is None  # too many pages
    assert g.size_for([Segment(req(400), 0, 400)]) is None  # more tokens than any graph


def test_the_schedule_fills_the_budget_in_queue_order_cutting_the_last_prompt():
    import types
    from collections import deque

    from colm.decode_worker.prefill_schedule import take_chunk

    req = lambda n, name: types.SimpleNamespace(prompt_tokens=list(range(n)), prefilled=0, name=name)  # noqa: E731
    a, b, c, d = req(30, "a"), req(25, "b"), req(8, "c"), req(4, "d")
    q = deque([a, b, c, d])
    got = take_chunk(q, 40, 32, lambda r: True)  # a whole (30), then b cut to the 10 left
    assert [(s.request.name, s.start, s.end) for s in got] == [("a", 0, 30), ("b", 0, 10)]
    assert list(q) == [b, c, d]
    got = take_chunk(q, 20, 32, lambda r: True)  # b's rest (15), then c cut to 5
    assert [(s.request.name, s.start, s.end) for s in got] == [("b", 10, 25), ("c", 0, 5)] and list(q) == [c, d]
    got = take_chunk(q, 20, 1, lambda r: True)  # one segment at most
    assert [(s.request.name, s.start, s.end) for s in got] == [("c", 5, 8)] and list(q) == [d]
    q.appendleft(req(9, "gone"))
    got = take_chunk(q, 20, 32, lambda r: r.name != "gone")  # an ended request leaves the queue, takes nothing
    assert [(s.request.name, s.start, s.end) for s in got] == [("d", 0, 4)] and not q


def test_a_colocated_worker_exports_its_prefill_queue_and_chunks_as_metrics(setup):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from colm.router.metrics import EngineStatsCollector

    path, _ = setup
    de = _engine(path, max_batched_tokens=8)
    de.reserve("m", 30, 2)
    de.prefill_kv("m", list(range(29)))
    de.step()
    r = CollectorRegistry()
    r.register(EngineStatsCollector(de, "decode", "d0"))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(r).decode())}
    assert fams["colm_decode_num_prefill_chunks"].type == "counter"
    assert fams["colm_decode_num_prefill_chunks"].samples[0].value == 1
    assert fams["colm_decode_num_prefill_queued_tokens"].samples[0].value == 29 - 8
    de.stop()


def test_every_step_is_queued_ahead_with_the_prompts_a_chunk_completes(setup):
    """overlap_steps queues step n+1 before step n is read, for the rows that go on and the prompts whose last chunk
    runs this iteration (they join step n+1); a queued step whose batch turns out different is dropped (its GPU work
    thrown away). Driven step by step: prompts arrive while others decode and rows end by length; every token equals
    the reference, every step after the first was queued ahead, and none was dropped."""
    path, full = setup
    de = _engine(path, max_batched_tokens=24, overlap_steps=True)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    batch = prompts([9, 30, 5, 17, 44, 8], seed=4)
    streams = []
    for i, p in enumerate(batch):
        streams.append((p, _submit(de, f"o{i}", p, params, 2)))
        for _ in range(3):  # a few iterations between arrivals: decode rows and chunks mixed
            de.step()
    while de._running or de._prefill_queue:
        de.step()
    for p, st in streams:
        assert [e.token_id for e in st] == generate(full, p, params, scale=2).token_ids
    s = de.stats()
    assert s.num_steps_launched_ahead == s.num_steps - 1 and s.num_steps_dropped == 0


def test_a_chunk_is_queued_behind_the_decode_step_before_its_tokens_are_read(setup, monkeypatch):
    """Overlapped steps: the iteration's prompt chunk goes to the device right after the decode step is launched and
    before the host waits for that step's tokens, so the device runs it while the host hands the tokens out (no idle
    gap between the two). Recorded order of chunk and read; tokens still equal the reference."""
    from colm.decode_worker import runner as runner_mod
    from colm.decode_worker.step import LaunchedStep

    path, full = setup
    de = _engine(path, max_batched_tokens=24, overlap_steps=True)
    order: list[str] = []
    launch, result, run_prefill = runner_mod.launch_step, LaunchedStep.result, de._run_prefill
    monkeypatch.setattr(runner_mod, "launch_step", lambda *a, **k: order.append("launch") or launch(*a, **k))
    monkeypatch.setattr(LaunchedStep, "result", lambda self: order.append("read") or result(self))
    monkeypatch.setattr(de, "_run_prefill", lambda segs: order.append("chunk") or run_prefill(segs))
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    a, b = prompts([6, 40], seed=11)
    sa = _submit(de, "a", a, params, 2)
    while not de._running:
        de.step()
    sb = _submit(de, "b", b, params, 2)  # its chunks run in iterations that also step "a"
    order.clear()
    while de._prefill_queue:
        de.step()
    assert order.count("chunk") >= 2
    for i, ev in enumerate(order):
        if ev == "chunk":  # every chunk: before the read of that iteration's step, at most the next step between
            rest = order[i + 1:]
            assert "read" in rest and set(rest[: rest.index("read")]) <= {"launch"}, order
    while de._running:
        de.step()
    assert [e.token_id for e in sa] == generate(full, a, params, scale=2).token_ids
    assert [e.token_id for e in sb] == generate(full, b, params, scale=2).token_ids


def test_overlapped_steps_under_concurrent_arrivals_stops_and_an_abort(setup):
    """The loop thread runs with overlap_steps while requests arrive from other threads: prompts of many lengths
    join mid-flight (the step queued ahead includes them), rows end by length at different steps, one by a stop
    string (an end no queued step can predict: that step is dropped) and one is aborted mid-generation. Every stream
    equals ``colm generate``, the aborted one ends with its error, and every block comes back."""
    from colm.errors import RequestAbortedError
    from colm.tokenizer import ByteTokenizer
    from _engine_helpers import middle_stop

    path, full = setup
    de = _engine(path, max_batched_tokens=24, overlap_steps=True)
    de.detokenize = ByteTokenizer().decode  # the tiny checkpoint's ids are bytes
    de.start()
    try:
        batch = prompts([3, 41, 8, 27, 12, 55, 19, 6], seed=21)
        lengths = [9, 14, 5, 11, 16, 7, 12, 10]
        stop_prompt = prompts([15], seed=22)[0]
        text = ByteTokenizer().decode(generate(full, stop_prompt, SamplingParams(max_new_tokens=16, ignore_eos=True),
                                               scale=2).token_ids)
        stop_params = SamplingParams(max_new_tokens=16, ignore_eos=True, stop_strings=(middle_stop(text),))
        results: dict = {}

        def submit(i, p, n):
            time.sleep(0.004 * i)
            params = SamplingParams(max_new_tokens=n, ignore_eos=True)
            results[i] = (p, params, [e.token_id for e in _submit(de, f"c{i}", p, params, 2)])

        threads = [threading.Thread(target=submit, args=(i, p, n)) for i, (p, n) in enumerate(zip(batch, lengths))]
        for t in threads:
            t.start()
        stop_stream = _submit(de, "stop", stop_prompt, stop_params, 2)
        victim = _submit(de, "victim", prompts([9], seed=23)[0], SamplingParams(max_new_tokens=40, ignore_eos=True), 2)
        next(iter(victim))
        assert de.abort("victim")
        with pytest.raises(RequestAbortedError):
            list(victim)
        for t in threads:
            t.join(60)
        for i, (p, params, got) in sorted(results.items()):
            assert got == generate(full, p, params, scale=2).token_ids, i
        ref = generate(full, stop_prompt, stop_params, scale=2, decode=ByteTokenizer().decode)
        assert [e.token_id for e in stop_stream] == ref.token_ids and ref.finish_reason == "stop"
        assert len(results) == len(batch) and de.stats().num_steps_launched_ahead > 0
    finally:
        de.stop()
    assert_pool_free(de)


def test_speculative_rows_step_plainly_past_the_batch_limit(setup):
    """decode.speculative_max_batch = 1: two speculative requests running together step plainly (nothing drafted);
    once one has ended, the other drafts again; greedy tokens equal plain decoding at scale 2 throughout."""
    path, full = setup
    de = _engine(path, speculative_max_batch=1, max_batched_tokens=64)
    params = {"a": SamplingParams(max_new_tokens=6, ignore_eos=True), "b": SamplingParams(max_new_tokens=30,
                                                                                          ignore_eos=True)}
    ps = dict(zip("ab", prompts([9, 11], seed=4)))
    streams = {rid: _submit(de, rid, ps[rid], params[rid], 2, speculative=3) for rid in "ab"}
    while de.stats().num_prefill_queued_tokens or any(not r.running for r in de._requests.values()):
        de.step()
    assert len(de._running) == 2
    while len(de._running) == 2:
        de.step()
    assert de.stats().num_drafted == 0  # two rows past the limit of one: no round ran
    while de._running:
        de.step()
    assert de.stats().num_drafted > 0  # "b" alone: rounds again
    for rid, stream in streams.items():
        events = list(stream)
        assert [e.token_id for e in events] == generate(full, ps[rid], params[rid], scale=2).token_ids
    with pytest.raises(ValueError, match="speculative_max_batch=-1"):
        DecodeConfig(speculative_max_batch=-1)
    assert_pool_free(de)
