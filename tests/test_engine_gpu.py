"""Decode engine with CUDA graphs. On CUDA (skipped without a GPU): tokens equal ``colm.generate``
for a staggered, mixed-scale batch with a scale switch; graph replay equals the eager forward in
bf16 (Triton chain-linear and paged attention inside the graph) for a padded batch bucket. (The CPU test
of the graphs' static buffers is in test_serve_decode_graph_buffers.py.)"""

from __future__ import annotations

import time

import pytest
import torch

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.decode_worker.graphs import head_outputs
from colm.decode_worker.step import _step_tensors
from colm.generate import generate
from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.sinks import LocalKVSink
from colm.sampling import SamplingParams
from _engine_helpers import prompts
from _kernel_helpers import cuda
from conftest import make_model
from test_serve_decode_graph_buffers import three_running


def _pair(dtype, tmp_path):
    from colm import checkpoint

    checkpoint.save(make_model("tiny-air"), tmp_path)
    return (checkpoint.load(tmp_path, scale=None, device="cuda", dtype=dtype),
            checkpoint.load(tmp_path, scale=1, device="cuda", dtype=dtype))


@cuda
@pytest.mark.parametrize("overlap", [False, True])
def test_graph_engine_matches_reference_float32(tmp_path, overlap):
    """Also with overlap_steps: graph replays queued ahead, tokens fed on the device, pinned read-backs."""
    full, sub = _pair(torch.float32, tmp_path)
    de = DecodeEngine(full, DecodeConfig(num_blocks=128, block_size=4, max_batch_size=8, overlap_steps=overlap)).start()
    pe = PrefillEngine(sub, full.cfg, PrefillConfig(chunk_size=16, max_batch_tokens=64)).start()
    try:
        params = SamplingParams(max_new_tokens=10, ignore_eos=True)
        streams = []
        for i, p in enumerate(prompts([1, 6, 23, 40, 9])):
            rid = f"g{i}"
            de.reserve(rid, len(p), 10)
            pe.submit(rid, p, LocalKVSink(de, rid))
            streams.append((p, 1 + i % 2, de.start_generation(rid, p[-1], params, scale=1 + i % 2)))
            time.sleep(0.01 * i)
        for p, scale, st in streams:
            assert [e.token_id for e in st] == generate(full, p, params, scale=scale).token_ids
        p = prompts([14], seed=3)[0]
        # 40 tokens: the engine runs ahead of this loop, and a switch asked for after the request's last step finds
        # it gone (at 12 tokens the switch at index 7 once came after the end)
        de.reserve("sw", len(p), 40)
        pe.prefill("sw", p, LocalKVSink(de, "sw"))
        events = []
        for ev in de.start_generation("sw", p[-1], SamplingParams(max_new_tokens=40, ignore_eos=True), scale=2):
            events.append(ev)
            if ev.index in (2, 7):
                de.set_scale("sw", 1 if ev.index == 2 else 2)
        used = [e.scale for e in events]
        ref = generate(full, p, SamplingParams(max_new_tokens=40, ignore_eos=True), scale_schedule=lambda i: used[i])
        assert [e.token_id for e in events] == ref.token_ids and 1 in used
        assert de.graphs is not None and de.graphs.enabled and de.graphs.num_captures >= 2
        assert (de.stats().num_steps_launched_ahead > 0) == overlap
    finally:
        pe.stop(), de.stop()
    assert de.pool.num_free == de.pool.num_blocks


@cuda
def test_sampled_rows_queued_ahead_in_graphs_match_reference(tmp_path):
    """Seeded sampled rows (temperature, top-k, top-p, min-p) beside a greedy one and penalised ones, at both
    scales: adjusted and drawn on the GPU after each graph replay and fed to the step queued behind it; tokens equal
    ``colm.generate`` on the GPU."""
    full, sub = _pair(torch.float32, tmp_path)
    de = DecodeEngine(full, DecodeConfig(num_blocks=128, block_size=4, max_batch_size=8, overlap_steps=True)).start()
    pe = PrefillEngine(sub, full.cfg, PrefillConfig(chunk_size=16, max_batch_tokens=64)).start()
    kws = [dict(temperature=0.9, seed=1), dict(temperature=0.7, top_k=20, seed=2), dict(temperature=0.0),
           dict(temperature=1.1, top_p=0.8, seed=3), dict(temperature=0.8, min_p=0.05, top_p=0.95, seed=4),
           dict(repetition_penalty=1.5, frequency_penalty=0.8, presence_penalty=0.5),  # adjusted on the GPU
           dict(temperature=0.9, seed=6, frequency_penalty=1.1, logit_bias=((7, -30.0),), min_tokens=3)]
    try:
        streams = []
        for i, (p, kw) in enumerate(zip(prompts([3, 9, 17, 30, 12, 6, 21], seed=7), kws)):
            params = SamplingParams(max_new_tokens=16, ignore_eos=True, **kw)
            rid = f"s{i}"
            de.reserve(rid, len(p), 16)
            pe.submit(rid, p, LocalKVSink(de, rid))
            # penalties read the prompt: a disaggregated decode worker gets it as context_ids, as the router sends it
            streams.append((p, params, 1 + i % 2, de.start_generation(rid, p[-1], params, scale=1 + i % 2,
                                                                      context_ids=p[:-1])))
            time.sleep(0.01 * i)
        for p, params, scale, st in streams:
            assert [e.token_id for e in st] == generate(full, p, params, scale=scale).token_ids, params
        assert de.graphs is not None and de.graphs.enabled and de.stats().num_steps_launched_ahead > 0
    finally:
        pe.stop(), de.stop()
    assert de.pool.num_free == de.pool.num_blocks


@cuda
def test_graph_replay_equals_eager_bf16(tmp_path):
    full, _ = _pair(torch.bfloat16, tmp_path)
    de, batch = three_running(full)  # 3 rows: the graph runs a padded bucket of 4
    for scale in (2, 1):
        with torch.no_grad():
            tokens, positions, cache = _step_tensors(batch, de.pool, full.inv_freq.device)
            eager = full.hidden(tokens, scale=scale, cache=cache, positions=positions)[:, 0].float()
            graph = de.graphs.hidden(batch, scale).float()
            again = de.graphs.hidden(batch, scale).float()  # a replay of the captured graph
            head = de.graphs.step_head(batch, scale)  # the graph that also holds the head
            # graphs share one memory pool: replaying another graph may reuse these outputs' memory
            head = type(head)(*(t.clone() for t in head))
            ref = head_outputs(full, de.graphs.hidden(batch, scale), scale)
        assert de.graphs.enabled
        torch.testing.assert_close(graph, eager, atol=2e-2, rtol=2e-2)
        assert torch.equal(graph, again)
        assert head.logits.shape == (3, full.cfg.vocab_size) and head.packed.shape == (2, 3)
        # cuBLAS may pick another lm-head algorithm inside a capture than eagerly: close, not bit-equal
        torch.testing.assert_close(head.logits.float(), ref.logits.float(), atol=2e-2, rtol=2e-2)
        # the packed read-back is the graph's own argmax and log-prob of its own logits
        assert head.packed[0].tolist() == head.logits.argmax(-1).double().tolist()
        own = head.logits.gather(1, head.greedy)[:, 0].float() - torch.logsumexp(head.logits.float(), -1)
        torch.testing.assert_close(head.packed[1], own.double(), atol=1e-5, rtol=1e-5)
    de.stop()


_SYNC_WHILE_TUNING = r'''
import importlib, threading, torch
from colm.kernels import _tuning
cl = importlib.import_module("colm.kernels.chain_linear")
stop, errors = threading.Event(), []

def copy_and_sync():  # what a decode worker's gRPC threads do with arriving K/V
    s = torch.cuda.Stream()
    x = torch.randn(1 << 20, device="cuda")
    try:
        while not stop.is_set():
            with torch.cuda.stream(s):
                y = x * 2
            s.synchronize()
            ev = torch.cuda.Event()
            ev.record(s)
            ev.synchronize()
    except Exception as e:
        errors.append(repr(e))

t = threading.Thread(target=copy_and_sync)
t.start()
ws = [torch.randn(96, 64, device="cuda", dtype=torch.bfloat16), torch.randn(96, 128, device="cuda", dtype=torch.bfloat16)]
for m in (1, 3):  # new shapes: the tuner times its candidates as CUDA graph replays
    x = torch.randn(m, 128, device="cuda", dtype=torch.bfloat16)
    y = cl.chain_linear_triton(x, ws)
    ref = torch.cat([x[:, :64] @ ws[0].T, x @ ws[1].T], 1)
    assert torch.allclose(y.float(), ref.float(), atol=5e-2, rtol=5e-2)
stop.set()
t.join()
assert not errors, errors
print("survived", len(_tuning.tuning_log()))
'''


@cuda
def test_kernel_tuning_survives_another_threads_syncs():
    """The forward tuner captures CUDA graphs to time candidates. Captured in CUDA's global mode, a sync
    in another thread meanwhile fails, and this killed a decode worker under load (H100). Captures are
    thread-local now: another thread's copies and syncs go on, and the tuner still picks a config."""
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _SYNC_WHILE_TUNING], env=dict(os.environ, COLM_KERNEL_TUNE="1"),
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0 and "survived" in r.stdout, (r.stdout[-2000:], r.stderr[-4000:])
    assert int(r.stdout.split("survived")[1]) >= 2  # both shapes were tuned (timed), not defaulted


@cuda
def test_fused_rope_kv_write_step_equals_the_unfused_step(tmp_path):
    """A bf16 decode step with RoPE and the KV write in one kernel (PagedStepCache.attend_unroped) gives
    the same hidden states and pool contents as RoPE, then the write kernel (attend)."""
    from colm.decode_worker.paged_cache import PagedStepCache

    class Unfused(PagedStepCache):
        ropes_and_writes_kv = False

    full, _ = _pair(torch.bfloat16, tmp_path)
    de, batch = three_running(full, cuda_graphs=False)
    k0, v0 = de.pool.k.clone(), de.pool.v.clone()
    outs, pools = [], []
    for cls in (PagedStepCache, Unfused):
        de.pool.k.copy_(k0)
        de.pool.v.copy_(v0)
        tokens, positions, cache = _step_tensors(batch, de.pool, full.inv_freq.device)
        cache = cls(de.pool, cache.block_tables, cache.context_lens, cache.slot_mapping, cache.length)
        with torch.no_grad():
            outs.append(full.hidden(tokens, scale=2, cache=cache, positions=positions))
        pools.append((de.pool.k.clone(), de.pool.v.clone()))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(pools[0][0], pools[1][0]) and torch.equal(pools[0][1], pools[1][1])
    assert not torch.equal(pools[0][0], k0)  # the step wrote its K
    de.stop()


@cuda
def test_warm_up_captures_every_graph_serving_then_needs(tmp_path):
    """DecodeConfig.warmup_context: graphs for every batch/width bucket and scale are captured at start, so
    requests within that context capture nothing while they run, and still equal the reference."""
    full, sub = _pair(torch.float32, tmp_path)
    de = DecodeEngine(full, DecodeConfig(num_blocks=128, block_size=4, max_batch_size=4, warmup_context=64)).start()
    pe = PrefillEngine(sub, full.cfg, PrefillConfig(chunk_size=16, max_batch_tokens=64)).start()
    try:
        captured = de.graphs.num_captures
        # widths 16 (up to 64 tokens / 4 per block), batches 1, 2, 4, scales 1 and 2, with and without head, and
        # the mixed-scale graphs (widest scale 2, batches 2 and 4)
        assert captured == 1 * 3 * 2 * 2 + 2
        params = SamplingParams(max_new_tokens=10, ignore_eos=True)
        streams = []
        for i, p in enumerate(prompts([1, 6, 23, 40])):
            de.reserve(f"w{i}", len(p), 10)
            pe.submit(f"w{i}", p, LocalKVSink(de, f"w{i}"))
            streams.append((p, 1 + i % 2, de.start_generation(f"w{i}", p[-1], params, scale=1 + i % 2)))
        for p, scale, st in streams:
            assert [e.token_id for e in st] == generate(full, p, params, scale=scale).token_ids
        assert de.graphs.num_captures == captured
    finally:
        pe.stop(), de.stop()


@cuda
@pytest.mark.parametrize("colocated", [False, True])
def test_the_start_warm_up_serves_nothing_the_counters_show(tmp_path, colocated):
    """The warm-up at start (every decode graph captured, and colocated: a prompt chunk of every size) is no served
    work: every counter of the stats, as the worker's metrics serve them, reads zero, as do the recent steps."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from colm.router.metrics import CUMULATIVE_STATS, worker_registry

    full, _ = _pair(torch.float32, tmp_path)
    de = DecodeEngine(full, DecodeConfig(num_blocks=128, block_size=4, max_batch_size=4, warmup_context=64,
                                         colocated_prefill=colocated, max_batched_tokens=64)).start()
    try:
        assert de.graphs.num_captures > 0
        s = de.stats()
        assert not {f: getattr(s, f) for f in CUMULATIVE_STATS if getattr(s, f, 0)}
        assert (s.num_running, s.num_reserved, s.last_batch_size, s.prefill_tokens_per_s) == (0, 0, 0, 0.0)
        assert not s.step_ms_by_scale and not s.round_ms_by_scale_gamma and not de.iterations
        text = generate_latest(worker_registry(de, "decode", "d0")).decode()
        counters = {x.name: x.value for f in text_string_to_metric_families(text) if f.type == "counter"
                    and f.name.startswith("colm_decode_num_") for x in f.samples}
        assert counters and not any(counters.values()), counters
    finally:
        de.stop()


@cuda
def test_pdl_graph_step_is_bit_equal_to_the_plain_one(tmp_path, monkeypatch):
    """Programmatic dependent launch changes when the step's kernels start, never what they compute: the
    graph's hidden states with it equal those without it bit for bit, at both scales (and it is in use on
    sm_90+, so a Triton without it cannot pass silently)."""
    from colm.kernels import _pdl

    full, _ = _pair(torch.bfloat16, tmp_path)
    if torch.cuda.get_device_capability()[0] >= 9:
        assert _pdl.use(torch.empty(1, device="cuda"), 3) and not _pdl.use(torch.empty(1, device="cuda"), 9)
    outs = {}
    for pdl in ("1", "0"):
        monkeypatch.setenv("COLM_PDL", pdl)
        torch.manual_seed(5)
        de, batch = three_running(full)
        with torch.no_grad():
            outs[pdl] = [de.graphs.hidden(batch, scale).float().clone() for scale in (2, 1)]
        de.stop()
    for a, b in zip(outs["1"], outs["0"]):
        assert torch.equal(a, b)
