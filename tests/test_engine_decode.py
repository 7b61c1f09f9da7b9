"""Decode engine with in-process prefill: tokens equal ``colm.generate`` at every scale, staggered
arrivals, mixed scales in one batch (both modes), scale switch mid-generation; blocks all freed."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.errors import CapacityError, RequestAbortedError, UnknownRequestError
from colm.generate import generate
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.sinks import LocalKVSink
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer
from _engine_helpers import middle_stop, prompts, save_tiny_air


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air")
    full = save_tiny_air(path)
    return path, full


def _engines(path, mode="widest", before_start=None, **config):
    """Started (decode, prefill) engines of the tiny checkpoint; ``before_start(decode engine)`` runs first."""
    de = DecodeEngine.from_checkpoint(path, DecodeConfig(**{"num_blocks": 96, "block_size": 4, "mixed_scale_mode": mode,
                                                            **config}))
    if before_start is not None:
        before_start(de)
    pe = PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=16, max_batch_tokens=64))
    return de.start(), pe.start()


def _switching(de, pe, rid, prompt, params, scale, switches: dict) -> list:
    """The events of a request started at ``scale`` whose scale is set to ``switches[i]`` once token i came."""
    de.reserve(rid, len(prompt), params.max_new_tokens)
    pe.prefill(rid, prompt, LocalKVSink(de, rid))
    events = []
    for ev in de.start_generation(rid, prompt[-1], params, scale=scale):
        events.append(ev)
        if ev.index in switches:
            de.set_scale(rid, switches[ev.index])
    return events


def _byte_text(de: DecodeEngine) -> None:
    de.detokenize = ByteTokenizer().decode  # the tiny checkpoint's ids are bytes


@pytest.mark.parametrize("mode", ["widest", "group"])
def test_staggered_mixed_scale_batch_matches_reference(setup, mode):
    path, full = setup
    de, pe = _engines(path, mode)
    try:
        batch = prompts([1, 6, 23, 40, 9, 17])
        params = SamplingParams(max_new_tokens=10, ignore_eos=True)
        streams = []
        for i, p in enumerate(batch):
            scale = 1 + i % 2
            rid = f"{mode}-{i}"
            de.reserve(rid, len(p), 10)
            pe.submit(rid, p, LocalKVSink(de, rid))
            streams.append((p, scale, de.start_generation(rid, p[-1], params, scale=scale)))
            time.sleep(0.01 * i)  # later requests join a batch that is already running
        for p, scale, st in streams:
            events = list(st)
            assert [e.token_id for e in events] == generate(full, p, params, scale=scale).token_ids
            assert {e.scale for e in events} == {scale} and events[-1].finish_reason == "length"
    finally:
        pe.stop(), de.stop()
    assert de.pool.num_free == de.pool.num_blocks


def test_stop_strings_match_the_reference(setup):
    """The engine's stop strings (incremental detokenization) end a request at the reference's token."""
    path, full = setup
    de, pe = _engines(path, before_start=_byte_text)
    try:
        p = prompts([11], seed=5)[0]
        free = generate(full, p, SamplingParams(max_new_tokens=20, ignore_eos=True), scale=2).token_ids
        stop = middle_stop(ByteTokenizer().decode(free))
        params = SamplingParams(max_new_tokens=20, ignore_eos=True, stop_strings=(stop,))
        ref = generate(full, p, params, scale=2, decode=ByteTokenizer().decode)
        de.reserve("st", len(p), 20)
        pe.prefill("st", p, LocalKVSink(de, "st"))
        events = list(de.start_generation("st", p[-1], params, scale=2))
        assert [e.token_id for e in events] == ref.token_ids and len(ref.token_ids) < 20
        assert events[-1].finish_reason == "stop" == ref.finish_reason
    finally:
        pe.stop(), de.stop()
    assert de.pool.num_free == de.pool.num_blocks


def test_overlapped_steps_match_the_reference(setup):
    """DecodeConfig.overlap_steps: step n+1 is queued (fed step n's greedy tokens) before step n is read.
    Staggered arrivals, different lengths, a stop string, an abort mid-generation and a scale switch: every
    stream equals `colm generate`, steps were launched ahead and some dropped, and every block comes back."""
    path, full = setup
    unsafe_frees = []

    def check_frees(de):
        _byte_text(de)
        free = de.pool.free

        def checked_free(blocks):  # the loop frees a running request's blocks only with no step in flight on them
            ahead = de._ahead
            if threading.current_thread().name == "colm-decode-loop" and ahead is not None and \
                    set(blocks) & {b for r in ahead.batch for b in r.blocks}:
                unsafe_frees.append(list(blocks))
            free(blocks)

        de.pool.free = checked_free

    de, pe = _engines(path, before_start=check_frees, num_blocks=160, overlap_steps=True)
    try:
        batch = prompts([3, 17, 8, 29, 12], seed=9)
        lengths = [14, 6, 20, 11, 17]
        streams = []
        for i, (p, n) in enumerate(zip(batch, lengths)):
            params = SamplingParams(max_new_tokens=n, ignore_eos=True)
            rid = f"ov{i}"
            de.reserve(rid, len(p), n)
            pe.submit(rid, p, LocalKVSink(de, rid))
            streams.append((rid, p, params, de.start_generation(rid, p[-1], params, scale=2)))
            time.sleep(0.005 * i)
        # one request with a stop string from its own free-running output
        p = prompts([9], seed=4)[0]
        text = ByteTokenizer().decode(generate(full, p, SamplingParams(max_new_tokens=16, ignore_eos=True),
                                               scale=2).token_ids)
        sp = SamplingParams(max_new_tokens=16, ignore_eos=True, stop_strings=(middle_stop(text),))
        de.reserve("ovs", len(p), 16)
        pe.prefill("ovs", p, LocalKVSink(de, "ovs"))
        stop_stream = de.start_generation("ovs", p[-1], sp, scale=2)
        for rid, prompt, params, st in streams:
            events = list(st)
            assert [e.token_id for e in events] == generate(full, prompt, params, scale=2).token_ids, rid
        ref = generate(full, p, sp, scale=2, decode=ByteTokenizer().decode)
        assert [e.token_id for e in stop_stream] == ref.token_ids and ref.finish_reason == "stop"
        # a scale switch and an abort while steps run ahead
        p = prompts([10], seed=6)[0]
        params = SamplingParams(max_new_tokens=18, ignore_eos=True)
        de.reserve("ovsw", len(p), 18)
        pe.prefill("ovsw", p, LocalKVSink(de, "ovsw"))
        de.reserve("ovab", len(p), 18)
        pe.prefill("ovab", p, LocalKVSink(de, "ovab"))
        aborted = de.start_generation("ovab", p[-1], params, scale=2)
        events = []
        for ev in de.start_generation("ovsw", p[-1], params, scale=2):
            events.append(ev)
            if ev.index == 4:
                de.set_scale("ovsw", 1)
                de.abort("ovab")
        used = [e.scale for e in events]
        assert used[0] == 2 and used[-1] == 1
        assert [e.token_id for e in events] == generate(full, p, params, scale_schedule=lambda i: used[i]).token_ids
        with pytest.raises(RequestAbortedError):
            list(aborted)
        stats = de.stats()
        assert stats.num_steps_launched_ahead > 10 and stats.num_steps_dropped > 0
        assert not unsafe_frees
    finally:
        pe.stop(), de.stop()
    assert de.pool.num_free == de.pool.num_blocks


def test_overlapped_steps_of_mixed_scales_match_the_reference(setup, monkeypatch):
    """With ``mixed_scale_mode: widest`` a batch of mixed scales is one forward, so its steps are queued ahead too
    (each row's head at its own scale, tokens fed on the device): requests at scales 1 and 2 arriving staggered,
    and one switching scale mid-stream, each equal `colm generate`; steps were launched ahead while both scales
    ran, and every block comes back."""
    import colm.decode_worker.runner as runner_module

    path, full = setup
    ahead_mixed = []
    launch = runner_module.launch_step

    def counted(model, batch, pool, scales, graphs=None, after=None, carry=None, sample=False):
        if after is not None and len(set(scales)) > 1:
            ahead_mixed.append(list(scales))
        return launch(model, batch, pool, scales, graphs, after=after, carry=carry, sample=sample)

    monkeypatch.setattr(runner_module, "launch_step", counted)
    de, pe = _engines(path, "widest", num_blocks=160, overlap_steps=True)
    try:
        batch = prompts([4, 15, 9, 26, 11, 7], seed=21)
        streams = []
        for i, p in enumerate(batch):
            params = SamplingParams(max_new_tokens=12 + i, ignore_eos=True)
            rid = f"mx{i}"
            de.reserve(rid, len(p), params.max_new_tokens)
            pe.submit(rid, p, LocalKVSink(de, rid))
            streams.append((rid, p, params, 1 + i % 2, de.start_generation(rid, p[-1], params, scale=1 + i % 2)))
            time.sleep(0.004 * i)
        p = prompts([12], seed=8)[0]
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        events = _switching(de, pe, "mxsw", p, params, 1, {3: 2})
        used = [e.scale for e in events]
        assert used[0] == 1 and used[-1] == 2
        assert [e.token_id for e in events] == generate(full, p, params, scale_schedule=lambda i: used[i]).token_ids
        for rid, prompt, params, scale, st in streams:
            got = list(st)
            assert [e.token_id for e in got] == generate(full, prompt, params, scale=scale).token_ids, rid
            assert {e.scale for e in got} == {scale}
        assert de.stats().num_steps_launched_ahead > 0
        assert ahead_mixed  # a step of a mixed-scale batch was queued before the one before it was read
    finally:
        pe.stop(), de.stop()
    assert de.pool.num_free == de.pool.num_blocks


def test_step_times_leave_out_steps_that_tuned_or_captured(setup, monkeypatch):
    """The router prices scales from these: a step that paid for a kernel tuning or a graph capture (a
    warm-up, hundreds of ms on a GPU) is not reported."""
    import colm.decode_worker.runner as runner_mod

    path, _ = setup
    de, pe = _engines(path)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    def run(rid, scale):
        p = prompts([11])[0]
        de.reserve(rid, len(p), 6)
        pe.submit(rid, p, LocalKVSink(de, rid))
        assert len(list(de.start_generation(rid, p[-1], params, scale=scale))) == 6

    try:
        run("st1", 1)
        stats = de.stats()
        assert set(stats.step_ms_by_scale) == {1} and stats.step_ms_by_scale[1] > 0
        assert stats.step_batch_by_scale == {1: 1.0}
        tunings = iter(range(10**6))
        monkeypatch.setattr(runner_mod, "num_tuned", lambda: next(tunings))  # every step now tunes something
        run("st2", 2)
        assert set(de.stats().step_ms_by_scale) == {1}
    finally:
        pe.stop(), de.stop()


def test_scale_switch_mid_generation_and_sampling(setup):
    path, full = setup
    de, pe = _engines(path)
    try:
        p = prompts([14], seed=3)[0]
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        events = _switching(de, pe, "sw", p, params, 2, {2: 1, 8: 2})
        used = [e.scale for e in events]
        assert 1 in used and used[0] == 2 and used[-1] == 2
        ref = generate(full, p, params, scale_schedule=lambda i: used[i])
        assert [e.token_id for e in events] == ref.token_ids
        # seeded sampling with top-k/top-p reproduces the reference generator's draws
        sp = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=7, ignore_eos=True)
        de.reserve("smp", len(p), 12)
        pe.prefill("smp", p, LocalKVSink(de, "smp"))
        got = [e.token_id for e in de.start_generation("smp", p[-1], sp, scale=1)]
        assert got == generate(full, p, sp, scale=1).token_ids
        # stop token ends the stream with "stop"
        stop_tok = generate(full, p, params, scale=2).token_ids[4]
        de.reserve("stop", len(p), 16)
        pe.prefill("stop", p, LocalKVSink(de, "stop"))
        sp2 = SamplingParams(max_new_tokens=16, stop_token_ids=(stop_tok,), ignore_eos=True)
        ev = list(de.start_generation("stop", p[-1], sp2, scale=2))
        assert [e.token_id for e in ev] == generate(full, p, sp2, scale=2).token_ids and ev[-1].finish_reason == "stop"
    finally:
        pe.stop(), de.stop()
    assert de.pool.num_free == de.pool.num_blocks


def test_a_switch_between_reservation_and_start_is_kept(setup):
    """The router reserves, then starts: a client's switch (SetScale) can land in between. The start must not undo it:
    every token comes at the switched scale and equals the reference (it came at the start's scale, the switch lost)."""
    path, full = setup
    de, pe = _engines(path)
    try:
        p = prompts([14], seed=5)[0]
        params = SamplingParams(max_new_tokens=8, ignore_eos=True)
        de.reserve("early", len(p), params.max_new_tokens)
        assert de.set_scale("early", 1) == 1
        pe.prefill("early", p, LocalKVSink(de, "early"))
        events = list(de.start_generation("early", p[-1], params, scale=2))
        assert [e.scale for e in events] == [1] * 8
        assert [e.token_id for e in events] == generate(full, p, params, scale=1).token_ids
    finally:
        pe.stop(), de.stop()
    assert de.pool.num_free == de.pool.num_blocks


def test_reservation_errors_and_abort(setup):
    path, _ = setup
    de = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=8, block_size=4)).start()
    try:
        with pytest.raises(CapacityError):
            de.reserve("big", 30, 10)  # 39 positions need 10 blocks of 4 > 8
        assert de.pool.num_free == 8
        de.reserve("a", 5, 4)
        with pytest.raises(ValueError):
            de.reserve("a", 5, 4)
        with pytest.raises(UnknownRequestError):
            de.start_generation("nope", 1, SamplingParams(max_new_tokens=2))
        with pytest.raises(ValueError, match="scale"):
            de.start_generation("a", 1, SamplingParams(max_new_tokens=2), scale=3)
        assert de.pool.num_free == 8  # a failed start frees the reservation
        de.reserve("b", 1, 20)
        st = de.start_generation("b", 5, SamplingParams(max_new_tokens=20, ignore_eos=True), scale=1)
        next(st)
        assert de.abort("b")
        with pytest.raises(RequestAbortedError):
            list(st)
        deadline = time.monotonic() + 5
        while de.pool.num_free != 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert de.pool.num_free == 8 and not de.abort("b")
        assert de.score([1, 2, 3], scale=1)[0] == (0.0, -1, 0.0)
    finally:
        de.stop()


def test_graph_warm_up_is_a_no_op_without_cuda(setup):
    path, _ = setup
    de = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=32, block_size=4, warmup_context=64)).start()
    try:
        assert de.graphs is None  # CPU: no graphs, nothing to capture; the engine serves as usual
    finally:
        de.stop()
    with pytest.raises(ValueError, match="warmup_context=-1"):
        DecodeConfig(warmup_context=-1)


def test_graph_step_buffers_fill_on_cpu():
    """The CUDA-graph step's static inputs (staging logic only; the replay itself needs a GPU)."""
    import types

    from colm.decode_worker.block_pool import BlockPool
    from colm.decode_worker.graphs import DecodeGraphs, _Graph

    pool = BlockPool.__new__(BlockPool)
    pool.block_size = 4
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.pool, graphs.device = pool, torch.device("cpu")
    g = _Graph(4, 16, "cpu")
    req = lambda blocks, cached, token: types.SimpleNamespace(blocks=blocks, num_cached=cached, next_input=token)  # noqa: E731
    a, b = req([3, 7, 9], 5, 11), req([2], 1, 12)
    graphs._fill(g, [a, b])
    assert g.tokens[:, 0].tolist() == [11, 12, 0, 0] and g.positions[:, 0].tolist() == [5, 1, 0, 0]
    assert g.dev_ints[2].tolist() == [6, 2, 1, 1]  # context lengths; the graph converts them to int32 itself
    g.ctx.copy_(g.dev_ints[2])
    assert g.ctx.tolist() == [6, 2, 1, 1] and g.ctx.dtype == torch.int32
    assert g.slots.tolist() == [7 * 4 + 1, 2 * 4 + 1, -1, -1]  # padding rows write nowhere
    assert g.tables[:2, :4].tolist() == [[3, 7, 9, 0], [2, 0, 0, 0]]
    graphs._fill(g, [b])  # rows move: row 0 now b, row 1 padding again
    assert g.tokens[:, 0].tolist() == [12, 0, 0, 0] and g.slots.tolist() == [9, -1, -1, -1]
    assert g.tables[:2, :4].tolist() == [[2, 0, 0, 0], [0, 0, 0, 0]]
    # the step after one queued but not read: rows carried from it (here its rows 2 and 0) run one position
    # further on its greedy tokens, gathered on the device; a row new to the batch feeds its own input
    c = req([5], 2, 13)
    feed = torch.tensor([[101], [102], [103], [104]])  # [B', 1] the queued step's greedy tokens
    graphs._fill(g, [b, a, c], carry=[2, 0], feed=feed)
    assert g.tokens[:, 0].tolist() == [103, 101, 13, 0] and g.positions[:, 0].tolist() == [2, 6, 2, 0]
    assert g.dev_ints[2].tolist() == [3, 7, 3, 1] and g.slots.tolist() == [2 * 4 + 2, 7 * 4 + 2, 5 * 4 + 2, -1]
    graphs._fill(g, [a, b], carry=[0, 1], feed=feed)  # carried in order: a plain slice of the feed
    assert g.tokens[:, 0].tolist() == [101, 102, 0, 0] and g.positions[:, 0].tolist() == [6, 2, 0, 0]


def test_graph_step_tables_follow_every_batch_across_staging_turns():
    """Random batches (rows joining, ending, reordering), staged in alternating host buffers as overlapped steps
    use them: after each fill the device's block tables, slots and positions equal those built row by row."""
    import random
    import types

    from colm.decode_worker.block_pool import BlockPool
    from colm.decode_worker.graphs import DecodeGraphs, _Graph

    pool = BlockPool.__new__(BlockPool)
    pool.block_size = 4
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.pool, graphs.device = pool, torch.device("cpu")
    B, W, rng = 8, 6, random.Random(7)
    g = _Graph(B, W, "cpu")
    reqs = []
    for k in range(20):
        blocks = rng.sample(range(1, 100), rng.randint(1, W))
        reqs.append(types.SimpleNamespace(blocks=blocks, num_cached=rng.randrange(len(blocks) * 4), next_input=k))
    history = [[], []]
    for step in range(80):
        # sometimes the batch of two steps ago: the buffers of this turn already hold it, the device does not
        batch = history[-2] if rng.random() < 0.3 else rng.sample(reqs, rng.randint(0, B))
        history.append(batch)
        graphs._fill(g, batch)
        want = torch.zeros(B, W, dtype=torch.int32)
        for i, r in enumerate(batch):
            want[i, : len(r.blocks)] = torch.tensor(r.blocks)
        assert torch.equal(g.tables, want), step
        slots = [r.blocks[r.num_cached // 4] * 4 + r.num_cached % 4 for r in batch] + [-1] * (B - len(batch))
        assert g.slots.tolist() == slots and g.positions[:, 0].tolist() == [r.num_cached for r in batch] + [0] * (
            B - len(batch))
        if rng.random() < 0.7:
            g.turn ^= 1  # a step read asynchronously: the next fill stages in the other buffers


def test_failed_step_ends_its_batch_not_the_engine(setup, monkeypatch):
    """A decode step that raises (e.g. a CUDA error, a kernel with no runnable config) fails the requests
    of that batch with a clear error and frees their blocks; the loop goes on and serves the next one."""
    from colm.decode_worker import runner as runner_mod

    path, full = setup
    de, pe = _engines(path)
    real, calls = runner_mod.decode_step, []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # the second step of the first request
            raise RuntimeError("injected step failure")
        return real(*args, **kw)

    monkeypatch.setattr(runner_mod, "decode_step", flaky)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    try:
        p = prompts([12])[0]
        de.reserve("bad", len(p), 5)
        pe.submit("bad", p, LocalKVSink(de, "bad"))
        events = []
        with pytest.raises(RuntimeError, match="decode step failed .*injected step failure.*goes on serving"):
            for e in de.start_generation("bad", p[-1], params, scale=2):
                events.append(e)
        assert len(events) == 1  # the first step's token came out before the failure
        q = prompts([7])[0]
        de.reserve("good", len(q), 5)
        pe.submit("good", q, LocalKVSink(de, "good"))
        got = [e.token_id for e in de.start_generation("good", q[-1], params, scale=2)]
        assert got == generate(full, q, params, scale=2).token_ids
        assert de.alive() and de._num_step_errors == 1
    finally:
        pe.stop(), de.stop()
    assert de.pool.num_free == de.pool.num_blocks
