"""Prefill CUDA graphs (``prefill_worker.graphs``): a graphed prefill hands the sinks the eager prefill's
K/V, for a padded multi-row batch and a single prompt, captures once per shape, and never writes a
tensor it handed over. The shape rules and the config run on any device."""

from __future__ import annotations

import pytest
import torch

from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.graphs import graph_rows
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
    assert eager.graphs is None and graphed.graphs.num_captured == 0
    batches = [prompts([3, 20, 11], seed=1), prompts([17], seed=2), prompts([19], seed=3)]  # 3 rows -> a 4-row graph
    for batch in batches:
        for ref, got in zip(_prefill(eager, batch), _prefill(graphed, batch)):
            assert not torch.isnan(got.k).any()
            torch.testing.assert_close(got.k, ref.k, rtol=1e-5, atol=1e-5)
    # K/V of all prompt tokens but the last: (4 rows, 24 tokens), (1 row, 16), (1 row, 24)
    assert graphed.graphs.num_captured == 3
    # what was handed over is a copy: the later replays did not touch the first batch's tensors
    first = _prefill(graphed, batches[0])
    _prefill(graphed, batches[0])
    assert graphed.graphs.num_captured == 3  # replays, no new captures
    for s in first:
        for kv, at_put in s.kept:
            assert torch.equal(kv, at_put)
