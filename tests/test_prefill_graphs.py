"""Prefill CUDA graphs (``prefill_worker.graphs``): a graphed prefill hands the sinks the eager prefill's
K/V, for a padded multi-row batch and a single prompt, captures once per shape (or all at start), and
never writes a tensor it handed over. The captured forward (into the static K/V buffer), the shape
rules and the config run on any device."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from colm.prefill_worker.config import PrefillConfig
from colm.kv_wire import KVLayout
from colm.prefill_worker.engine import PrefillEngine, _Job
from colm.prefill_worker.graphs import PrefillGraphs, forward_into, graph_rows
from _engine_helpers import CaptureSink, prompts, save_tiny_air
from _kernel_helpers import cuda


def test_graph_rows_round_up_to_powers_of_two_and_config_checks():
    assert [graph_rows(n) for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 4, 8, 16]
    with pytest.raises(ValueError, match="rows=0"):
        graph_rows(0)
    with pytest.raises(ValueError, match="cuda_graph_tokens=-1"):
        PrefillConfig(cuda_graph_tokens=-1)


def test_no_graphs_off_cuda_or_by_default(tmp_path):
    save_tiny_air(tmp_path)
    assert PrefillEngine.from_checkpoint(tmp_path, PrefillConfig(cuda_graph_tokens=4096)).graphs is None
    assert PrefillConfig().cuda_graph_tokens == 0


def test_captured_forward_writes_the_engines_kv_into_the_static_buffers(tmp_path):
    """``forward_into`` (what a graph captures) on a batch padded to 4 rows: its K/V views equal what the
    eager engine hands its sinks, for every real token of every row."""
    save_tiny_air(tmp_path)
    eng = PrefillEngine.from_checkpoint(tmp_path, PrefillConfig(chunk_size=64, max_batch_tokens=256))
    batch = prompts([3, 20, 11], seed=4)
    sinks = _prefill(eng, batch)
    cfg = eng.model.cfg
    T = max(len(p) - 1 for p in batch)  # K/V of all prompt tokens but the last
    tokens = torch.zeros(4, T, dtype=torch.long)
    for row, p in enumerate(batch):
        tokens[row, : len(p) - 1] = torch.tensor(p[:-1])
    buf = torch.full((cfg.n_layers, 2, 4 * T * cfg.n_kv_heads * cfg.head_dim), float("nan"))
    shape = (4, cfg.n_kv_heads, T, cfg.head_dim)
    keys = [buf[li, 0].view(shape) for li in range(cfg.n_layers)]
    values = [buf[li, 1].view(shape) for li in range(cfg.n_layers)]
    with torch.no_grad():
        forward_into(eng.model, tokens, keys, values)
    for row, (p, s) in enumerate(zip(batch, sinks)):
        n = len(p) - 1
        got = torch.stack([torch.stack((keys[li][row, :, :n].transpose(0, 1), values[li][row, :, :n].transpose(0, 1)), 1)
                           for li in range(cfg.n_layers)])  # [L, n, 2, Hkv, hd], the sinks' layout
        torch.testing.assert_close(got, s.k, rtol=1e-5, atol=1e-5)


def test_emit_all_hands_each_request_every_layer_in_one_put(tmp_path):
    """After a replay the engine hands each request all its layers in one put, read through the static buffer's
    permuted view (``PrefillGraphs``' buffer, filled here by the captured forward run eagerly): the eager engine's
    K/V, a fresh contiguous tensor per request, and a padded row that is not a request is never read."""
    save_tiny_air(tmp_path)
    eng = PrefillEngine.from_checkpoint(tmp_path, PrefillConfig(chunk_size=64, max_batch_tokens=256))
    batch = prompts([3, 20, 11], seed=4)
    ref = _prefill(eng, batch)
    cfg = eng.model.cfg
    T = max(len(p) - 1 for p in batch)
    tokens = torch.zeros(4, T, dtype=torch.long)
    for row, p in enumerate(batch):
        tokens[row, : len(p) - 1] = torch.tensor(p[:-1])
    g = PrefillGraphs(eng.model, max_tokens=4 * T)
    keys, values, kv = g._views(4, T)
    assert kv.shape == (4, cfg.n_layers, T, 2, cfg.n_kv_heads, cfg.head_dim)
    with torch.no_grad():
        forward_into(eng.model, tokens, keys, values)
    sinks = [CaptureSink() for _ in batch]
    jobs = [_Job(f"e{i}", np.asarray(p[:-1], dtype=np.int64), s, time.monotonic() + 60)
            for i, (p, s) in enumerate(zip(batch, sinks))]
    for job, s in zip(jobs, sinks):
        s.begin(KVLayout(cfg.n_layers, len(job.tokens), cfg.n_kv_heads, cfg.head_dim, "float32"))
    eng._emit_all(jobs, kv)
    for s, r in zip(sinks, ref):
        assert len(s.kept) == 1  # one put: every layer, every token
        torch.testing.assert_close(s.k, r.k, rtol=1e-5, atol=1e-5)
    keys[0].fill_(float("nan"))  # the next replay overwrites the buffer: what was handed over stays
    assert all(not torch.isnan(s.kept[0][0]).any() for s in sinks)


def test_emit_all_hands_a_sink_that_copies_at_put_the_buffer_itself(tmp_path):
    """A sink whose put queues its own copy (``copies_at_put``: nixl's, into its send region) gets a view of the
    static buffer, not a fresh copy: one copy of 256 MiB fewer behind an 8K graphed forward. Others get a clone."""
    save_tiny_air(tmp_path)
    eng = PrefillEngine.from_checkpoint(tmp_path, PrefillConfig(chunk_size=64, max_batch_tokens=256))
    cfg = eng.model.cfg
    g = PrefillGraphs(eng.model, max_tokens=2 * 8)
    _, _, kv = g._views(2, 8)  # [2, L, 8, 2, Hkv, hd]
    kv.copy_(torch.randn(kv.shape))

    class Copying(CaptureSink):
        copies_at_put = True

        def put(self, l0, l1, t0, t1, kv):
            self.kept.append((kv, kv.clone()))

    sinks = [Copying(), CaptureSink()]
    jobs = [_Job(f"c{i}", np.arange(5 + i, dtype=np.int64), s, time.monotonic() + 60) for i, s in enumerate(sinks)]
    for job, s in zip(jobs, sinks):
        s.begin(KVLayout(cfg.n_layers, len(job.tokens), cfg.n_kv_heads, cfg.head_dim, "float32"))
    eng._emit_all(jobs, kv)
    shared, cloned = sinks[0].kept[0][0], sinks[1].kept[0][0]  # the tensors handed over
    assert shared.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()
    assert cloned.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()
    torch.testing.assert_close(shared, kv[0, :, :5])
    torch.testing.assert_close(cloned, kv[1, :, :6])


def test_warm_up_shapes_cover_every_padded_batch(tmp_path):
    save_tiny_air(tmp_path)
    model = PrefillEngine.from_checkpoint(tmp_path, PrefillConfig()).model
    g = PrefillGraphs(model, max_tokens=1024)
    assert not g.enabled  # CPU
    shapes = g.shapes(length_bucket=256, max_length=1024, max_rows=5)
    assert shapes == [(1, 256), (1, 512), (1, 768), (1, 1024), (2, 256), (2, 512), (4, 256)]  # 8 rows: none fit
    assert all(g.fits(r, t) is False for r, t in shapes)  # graphs are off on the CPU
    assert g.warm_up(256, 1024, 5) == 0


def _prefill(eng, batch):
    sinks = [CaptureSink() for _ in batch]
    futs = [eng.submit(f"r{id(s)}", p, s) for p, s in zip(batch, sinks)]
    assert eng.run_once()
    while eng.run_once():
        pass
    for f in futs:
        f.result(timeout=60)
    return sinks


@cuda
def test_graphed_prefill_hands_over_the_eager_kv(tmp_path):
    save_tiny_air(tmp_path)
    kw = dict(chunk_size=64, max_batch_tokens=256, length_bucket=8)
    eager = PrefillEngine.from_checkpoint(tmp_path, PrefillConfig(cuda_graph_tokens=0, **kw), device="cuda")
    graphed = PrefillEngine.from_checkpoint(tmp_path, PrefillConfig(cuda_graph_tokens=4096, **kw), device="cuda")
    assert eager.graphs is None and graphed.graphs.num_captures == 0
    batches = [prompts([3, 20, 11], seed=1), prompts([17], seed=2), prompts([19], seed=3)]  # 3 rows -> a 4-row graph
    for batch in batches:
        for ref, got in zip(_prefill(eager, batch), _prefill(graphed, batch)):
            assert not torch.isnan(got.k).any()
            torch.testing.assert_close(got.k, ref.k, rtol=1e-5, atol=1e-5)
    # K/V of all prompt tokens but the last: (4 rows, 24 tokens), (1 row, 16), (1 row, 24)
    assert graphed.graphs.num_captures == 3
    # what was handed over is a copy: the later replays did not touch the first batch's tensors
    first = _prefill(graphed, batches[0])
    _prefill(graphed, batches[0])
    assert graphed.graphs.num_captures == 3  # replays, no new captures
    for s in first:
        for kv, at_put in s.kept:
            assert torch.equal(kv, at_put)


@cuda
def test_graph_warm_up_at_start_captures_every_shape(tmp_path):
    save_tiny_air(tmp_path)
    cfg = PrefillConfig(chunk_size=32, max_batch_tokens=64, max_batch_size=4, length_bucket=8, cuda_graph_tokens=64,
                        warmup_graphs=True)
    eng = PrefillEngine.from_checkpoint(tmp_path, cfg, device="cuda")
    eng.start()
    try:
        n = eng.graphs.num_captures
        assert n == len(eng.graphs.shapes(8, 32, 4)) > 0
        ref = PrefillEngine.from_checkpoint(tmp_path, PrefillConfig(chunk_size=32, max_batch_tokens=64), device="cuda")
        batch = prompts([5, 30, 12], seed=6)
        futs, sinks = [], [CaptureSink() for _ in batch]
        for i, (p, s) in enumerate(zip(batch, sinks)):
            futs.append(eng.submit(f"w{i}", p, s))
        for f in futs:
            f.result(timeout=60)
        for r, s in zip(_prefill(ref, batch), sinks):
            torch.testing.assert_close(s.k, r.k, rtol=1e-5, atol=1e-5)
        assert eng.graphs.num_replays > 0 and eng.graphs.num_captures == n  # served from the graphs captured at start
    finally:
        eng.stop()
