"""Prefill engine: chain-1 weights only, refuses non-Air, K/V equal the full model's, chunking exact."""

from __future__ import annotations

import pytest
import torch

from colm import checkpoint
from colm.kv_cache import ContiguousKVCache
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker import engine as engine_mod
from colm.prefill_worker.engine import PrefillEngine, padded_length
from conftest import make_model
from _engine_helpers import CaptureSink, prompts, save_tiny_air


def test_prefill_holds_only_chain_1(tmp_path):
    full = save_tiny_air(tmp_path)
    eng = PrefillEngine.from_checkpoint(tmp_path, PrefillConfig())
    cfg = full.cfg
    assert eng.num_params == cfg.num_params(1) < cfg.num_params()
    nbytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    assert nbytes == cfg.num_params(1) * 4
    # no tensor of a chain > 1: every chain Linear has exactly one weight, widths are chain 1's
    names = [n for n, _ in eng.model.named_parameters()]
    assert not any(".weights.1" in n for n in names)
    assert eng.model.embed.weight.shape[1] == cfg.chain_dims[0]


def test_prefill_refuses_non_air(tmp_path):
    checkpoint.save(make_model("tiny"), tmp_path)
    with pytest.raises(ValueError, match="CoLM-Air"):
        PrefillEngine.from_checkpoint(tmp_path)


def test_nixl_send_side_follows_the_engine_device():
    from colm.kv_wire import default_checksum

    auto = PrefillConfig()
    assert auto.nixl_send("cpu") == ("cpu", default_checksum())
    assert auto.nixl_send("cuda:1") == ("cuda:1", "wsum32")  # VRAM send buffer to another host, checked on the GPU
    assert auto.nixl_send("cuda:1", same_host=True) == ("cuda:1", "none")  # GPU to GPU within one host
    assert auto.nixl_send("cpu", same_host=True) == ("cpu", default_checksum())  # host memory: checked as before
    assert PrefillConfig(nixl_send_memory="host").nixl_send("cuda:0") == ("cpu", default_checksum())
    assert PrefillConfig(nixl_checksum="crc32").nixl_send("cuda:0") == ("cuda:0", "crc32")
    with pytest.raises(ValueError, match="not on a GPU"):
        PrefillConfig(nixl_send_memory="device").nixl_send("cpu")
    with pytest.raises(ValueError, match="nixl_send_memory='vram'"):
        PrefillConfig(nixl_send_memory="vram")
    with pytest.raises(ValueError, match="nixl_checksum='auto'|checksum='auto'"):
        PrefillConfig(checksum="auto")


def test_padded_length_buckets_cuda_lengths_only():
    assert padded_length(300, 256, torch.device("cuda")) == 512
    assert padded_length(512, 256, torch.device("cuda")) == 512
    assert padded_length(300, 256, torch.device("cpu")) == 300


@pytest.mark.parametrize("chunk_size,bucket", [(64, None), (7, None), (64, 16), (7, 5)])
def test_prefill_kv_equals_full_model(tmp_path, chunk_size, bucket, monkeypatch):
    """``bucket``: lengths padded as on CUDA (forced here on the CPU); the real tokens' K/V must not change."""
    if bucket:
        monkeypatch.setattr(engine_mod, "padded_length", lambda n, b, device: -(-n // b) * b)
    full = save_tiny_air(tmp_path)
    eng = PrefillEngine.from_checkpoint(tmp_path, PrefillConfig(chunk_size=chunk_size, max_batch_tokens=256,
                                                                length_bucket=bucket or 256))
    batch = prompts([3, 20, 11])
    sinks = [CaptureSink() for _ in batch]
    futs = [eng.submit(f"r{i}", p, s) for i, (p, s) in enumerate(zip(batch, sinks))]
    assert eng.run_once()  # the three short prompts form one padded batch (or chunked alone)
    while eng.run_once():
        pass
    for p, s, f in zip(batch, sinks, futs):
        assert f.result().num_tokens == len(p) - 1
        assert all(torch.equal(kv, copy) for kv, copy in s.kept)
        cache = ContiguousKVCache(full.cfg, 1, len(p))
        full(torch.tensor([p[:-1]]), scale=2, cache=cache)  # the full model's K/V at full scale
        for layer in range(full.cfg.n_layers):
            k, v = cache.layer_kv(layer)  # [1, Hkv, T, hd]
            torch.testing.assert_close(s.k[layer, :, 0], k[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s.k[layer, :, 1], v[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_stop_ends_the_delivery_threads_and_fails_deliveries_not_started(tmp_path):
    """Twelve computed prompts, eight finisher threads, every delivery held: ``stop`` returns at once, the four
    deliveries that never started fail, the eight under way still deliver, and no delivery thread outlives them."""
    import threading
    import time

    from colm.prefill_worker.sinks import NullKVSink

    release = threading.Event()

    class HeldSink(NullKVSink):
        def finish(self, timeout_s):
            release.wait(30)
            return super().finish(timeout_s)

    save_tiny_air(tmp_path)
    earlier = set(threading.enumerate())  # engines of other tests may leave theirs
    eng = PrefillEngine.from_checkpoint(tmp_path, PrefillConfig()).start()
    futs = [eng.submit(f"r{i}", [1 + i, 2, 3], HeldSink(), timeout_s=60) for i in range(12)]
    deadline = time.monotonic() + 30
    while len(eng._finishing) < 12 and time.monotonic() < deadline:  # all computed, handed to the finisher
        time.sleep(0.01)
    assert len(eng._finishing) == 12
    t0 = time.monotonic()
    eng.stop()
    assert time.monotonic() - t0 < 5  # no wait for the held deliveries
    failed = [f for f in futs if f.done()]
    assert len(failed) == 4 and all("prefill engine stopped" in str(f.exception()) for f in failed)
    release.set()
    results = [f.result(30) for f in futs if f not in failed]
    assert len(results) == 8 and all(r.num_bytes > 0 for r in results)

    def finishers():
        return [t.name for t in set(threading.enumerate()) - earlier if t.name.startswith("colm-prefill-finish")]

    deadline = time.monotonic() + 10
    while finishers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not finishers()
