"""The serving benchmarks' independent engine (``bench/_hf_backend.py``: transformers' continuous batching behind
colm's router) serves what colm's engines serve: concurrent greedy requests through the router's gRPC give
transformers' own ``generate`` tokens and the same responses as the router over colm's engines for the same
weights (a Llama converted by ``colm convert-hf``), stop ids included; a request it cannot serve is refused with
the field named and the engine serves on; a cancelled stream frees its request."""

import asyncio
import sys
import threading
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.generation.continuous_batching")
pytest.importorskip("colm.decode_worker.engine")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _hf_backend import HFContinuousBackend, dense_llama, unsupported  # noqa: E402
from colm.client import Client  # noqa: E402
from colm.decode_worker.config import DecodeConfig  # noqa: E402
from colm.decode_worker.engine import DecodeEngine  # noqa: E402
from colm.prefill_worker.engine import PrefillEngine  # noqa: E402
from colm.presets import preset  # noqa: E402
from colm.router.engine_backend import EngineBackend  # noqa: E402
from colm.sampling import SamplingParams  # noqa: E402
from hf_llama_helpers import converted_llama, hf_greedy, router_over  # noqa: E402

N = 10


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF model, its folder, converted colm checkpoint) of a tiny random Llama whose greedy outputs vary."""
    return converted_llama(tmp_path_factory.mktemp("hf-baseline"), 3, vocab_size=300, hidden_size=64,
                           intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.2, rope_theta=10000.0)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 300, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def hf_backend(hf_dir):
    """The backend over its own copy of the model (the manager switches the copy's attention to a paged one)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    cb = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=128, max_requests_per_batch=8,
                                  use_cuda_graph=False)
    return HFContinuousBackend(model, cb, warmup=False)


def concurrently(addr, calls):
    """Run each (prompt, kwargs) on its own connection at once; their responses in order."""
    out = [None] * len(calls)

    def one(i, prompt, kw):
        with Client(addr) as c:
            try:
                out[i] = c.complete(prompt, **kw)
            except Exception as e:  # noqa: BLE001 - the test inspects it
                out[i] = e

    threads = [threading.Thread(target=one, args=(i, p, kw)) for i, (p, kw) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_concurrent_greedy_requests_equal_transformers_generate_and_colm_engines(llama):
    hf, hf_dir, ckpt = llama
    ps = prompts(12)
    want = [hf_greedy(hf, p, N) for p in ps]
    assert len({t for w in want for t in w}) > 5  # the outputs vary: equality means something
    # a stop string the router finds in one output (a printable byte token after its first): that request ends there
    i, k = next((i, k) for i, w in enumerate(want) for k, t in enumerate(w) if k > 0 and 48 <= t < 123)
    stop = chr(want[i][k])
    calls = [(p, {"max_new_tokens": N, "ignore_eos": True}) for p in ps] + \
            [(ps[i], {"max_new_tokens": N, "ignore_eos": True, "stop": (stop,)})]
    bg = router_over(hf_backend(hf_dir), ckpt)
    try:
        got = concurrently(bg.grpc_addr, calls)
    finally:
        bg.stop()
    for r, w, p in zip(got, want, ps):
        assert not isinstance(r, Exception), r
        assert r["token_ids"] == w, p
    colm_engines = EngineBackend({"prefill-0": PrefillEngine.from_checkpoint(ckpt)},
                                 {"decode-0": DecodeEngine.from_checkpoint(ckpt, DecodeConfig(num_blocks=64))})
    bg = router_over(colm_engines, ckpt)
    try:
        ref = concurrently(bg.grpc_addr, calls)
    finally:
        bg.stop()
    for r, g in zip(ref, got):
        assert not isinstance(r, Exception), r
    for r, g in zip(ref, got):  # the same responses as colm's own engines give: tokens and finish reasons
        assert r["token_ids"] == g["token_ids"] and r["finish_reason"] == g["finish_reason"]
    stopped = got[-1]
    assert stopped["finish_reason"] == "stop" and stopped["token_ids"] == want[i][:want[i].index(ord(stop)) + 1]


def test_unservable_request_is_refused_naming_the_field_and_the_engine_serves_on(llama):
    hf, hf_dir, ckpt = llama
    backend = hf_backend(hf_dir)
    bg = router_over(backend, ckpt)
    p = prompts(1, seed=5)[0]
    try:
        with Client(bg.grpc_addr) as c:
            with pytest.raises(Exception, match="temperature"):
                c.complete(p, max_new_tokens=4, temperature=0.7, seed=1)
            with pytest.raises(Exception, match="presence_penalty"):
                c.complete(p, max_new_tokens=4, presence_penalty=0.5)
            r = c.complete(p, max_new_tokens=N, ignore_eos=True)
        assert r["token_ids"] == hf_greedy(hf, p, N)
    finally:
        bg.stop()
    assert unsupported(SamplingParams(), 0) == ""
    assert "speculative=2" in unsupported(SamplingParams(), 2)


def test_cancelled_stream_cancels_its_request(llama):
    _, hf_dir, _ = llama
    backend = hf_backend(hf_dir)
    from colm.router.backend import EngineRequest

    async def run():
        await backend.start()
        try:
            req = EngineRequest("r1", tuple(prompts(1, seed=7)[0]), SamplingParams(max_new_tokens=400, ignore_eos=True),
                                1, 60.0)
            cancelled = []
            cancel = backend.manager.cancel_request
            backend.manager.cancel_request = lambda rid: (cancelled.append(rid), cancel(rid))
            stream = backend.generate(req, "hf-0", "hf-0")
            first = await anext(stream)
            await stream.aclose()  # the client went away after one token
            for _ in range(200):  # the manager drops the request on its next iteration
                rep = await backend.poll("hf-0")
                if rep.num_running == 0 and rep.num_waiting == 0:
                    break
                await asyncio.sleep(0.05)
            return first, rep, cancelled
        finally:
            await backend.close()

    first, rep, cancelled = asyncio.run(run())
    assert cancelled == ["r1"]  # the engine was told, not left to run the request's 400 tokens for nobody
    assert first.token_id >= 0 and rep.num_running == 0 and rep.num_waiting == 0
    with pytest.raises(Exception, match="not running"):
        asyncio.run(backend.poll("hf-0"))


def test_end_of_sequence_and_stop_ids_end_the_engine_request(llama):
    """The request's end-of-sequence id (unless ``ignore_eos``) and its stop ids reach the engine: its stream ends at
    the first of them, that token included, as colm's engines end theirs."""
    hf, hf_dir, _ = llama
    p = prompts(1, seed=11)[0]
    want = hf_greedy(hf, p, 16)
    first = {}
    for i, t in enumerate(want):
        first.setdefault(t, i)
    (ie, eos), (is_, stop) = sorted((i, t) for t, i in first.items() if i >= 2)[:2]  # ends mid-output, eos first
    backend = hf_backend(hf_dir)
    from colm.router.backend import EngineRequest

    async def run(params, eos_id):
        return [t.token_id async for t in backend.generate(EngineRequest("r", tuple(p), params, 1, 60.0, eos_id),
                                                         "hf-0", "hf-0")]

    async def main():
        await backend.start()
        try:
            return [await run(SamplingParams(max_new_tokens=16), eos),
                    await run(SamplingParams(max_new_tokens=16, ignore_eos=True), eos),
                    await run(SamplingParams(max_new_tokens=16, ignore_eos=True, stop_token_ids=(stop,)), eos),
                    await run(SamplingParams(max_new_tokens=16, stop_token_ids=(stop,)), None)]
        finally:
            await backend.close()

    at_eos, ignored, at_stop, stop_only = asyncio.run(main())
    assert at_eos == want[:ie + 1] and ignored == want
    assert at_stop == want[:is_ + 1] and stop_only == want[:is_ + 1] and len(at_stop) < len(want)


def test_dense_llama_has_the_full_scale_shape():
    cfg = preset("tiny-air")
    m = dense_llama(cfg, "cpu", torch.float32)
    n = sum(p.numel() for p in m.parameters())
    full = (1 if cfg.tie_embeddings else 2) * cfg.dim * cfg.vocab_size + cfg.n_layers * (
        cfg.dim * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.dim
        + 3 * cfg.dim * cfg.ffn_hidden + 2 * cfg.dim) + cfg.dim
    assert n == full  # the dense model of the same width and depth
    w = m.model.layers[0].mlp.down_proj.weight
    assert 0.015 < float(w.detach().std()) < 0.025
    # Llama 3's scaled RoPE, as colm computes it
    import dataclasses

    from colm.presets import llama32_1b
    from colm.rope import rope_inv_freq

    cfg = dataclasses.replace(llama32_1b(), dim=256, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=512,
                              vocab_size=300, chains=(4,))
    m = dense_llama(cfg, "cpu", torch.float32)
    assert torch.allclose(m.model.rotary_emb.inv_freq, rope_inv_freq(cfg), rtol=1e-6, atol=0)


def test_serve_path_runs_the_independent_engine_beside_colm(tmp_path):
    """``bench/serve_path.py --modes colocated,dense,hf_dense`` on the CPU (a tiny Air model and its dense shape, served
    by colm's engine and by transformers'): the same load through one harness, every request of each served, the
    dense model at its one scale, the JSON naming the engine and each mode against both dense baselines."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    subprocess.run([sys.executable, str(root / "bench" / "serve_path.py"), "--preset", "tiny-air", "--dtype", "float32",
                    "--device", "cpu", "--modes", "colocated,dense,hf_dense", "--concurrency", "4", "--num-requests", "8",
                    "--warmup-requests", "4", "--prompt-len", "16,32", "--output-len", "8,16",
                    "--max-batched-tokens", "256", "--out", str(out)],
                   check=True, cwd=root, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    d = json.loads(out.with_suffix(".json").read_text())
    assert [r["mode"] for r in d["results"]] == ["colocated", "dense", "hf_dense"]
    for r in d["results"]:
        assert r["summary"]["num_ok"] == 8 and r["summary"]["throughput_rps"] > 0
        # server cores over the load window, beside the whole client run's
        assert r["cpu_cores_busy"]["router"] > 0 and set(r["cpu_cores_busy_client_run"]) == set(r["cpu_cores_busy"])
    modes = {r["mode"]: r for r in d["results"]}
    assert modes["dense"]["scale_mix"] == {"1": 1.0} and modes["colocated"]["scale_mix"] == {"2": 1.0}
    assert modes["dense"]["decode_engine"]["num_prefill_chunks"] > 0  # prompts prefilled inside the decode loop
    assert d["hf_dense"]["transformers"] == transformers.__version__
    assert d["ratio_vs_hf_dense"]["hf_dense"]["throughput"] == 1.0
    assert d["ratio_vs_dense"]["dense"]["throughput"] == 1.0
    assert d["ratio_vs_hf_dense"]["colocated"]["throughput"] > 0 and d["ratio_vs_dense"]["hf_dense"]["throughput"] > 0


def test_serve_path_counts_the_dense_model_it_serves():
    """The limit's weight count for ``hf_dense`` (``serve_path.dense_config``) is the served model's: every Linear
    of transformers' Llama of that shape, head included; the CoLM-Air model it stands beside has fewer."""
    import serve_path

    cfg = preset("tiny-air")
    dense = serve_path.dense_config(cfg)
    m = dense_llama(cfg, "cpu", torch.float32)
    linears = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    assert serve_path.linear_params(dense, 1) == linears
    assert serve_path.linear_params(cfg, cfg.num_chains) < linears
    a, b = (serve_path.request_cost(c, 512, 64) for c in (cfg, dense))
    assert b["prefill_flops"] > a["prefill_flops"] and b["weight_bytes"] == 2 * linears


def test_dense_mode_serves_the_dense_llama_of_the_same_shape(tmp_path, monkeypatch):
    """``serve_path.dense_checkpoint``: a colm checkpoint of one chain and no K/V sharing whose Linear weights are
    as many as those of transformers' Llama of the full-scale shape, with the source checkpoint's tokenizer; made once
    (a second call returns the same directory without rewriting it)."""
    import serve_path

    from colm import checkpoint
    from colm.assets import demo_model_dir

    monkeypatch.setattr(serve_path.tempfile, "gettempdir", lambda: str(tmp_path))
    src = str(demo_model_dir())
    path = serve_path.dense_checkpoint(src, torch.float32, "cpu")
    cfg, src_cfg = checkpoint.load_config(path), checkpoint.load_config(src)
    assert cfg.chains == (sum(src_cfg.chains),) and not cfg.kv_sharing and cfg.num_chains == 1
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden, cfg.vocab_size) == (
        src_cfg.dim, src_cfg.n_layers, src_cfg.n_heads, src_cfg.n_kv_heads, src_cfg.ffn_hidden, src_cfg.vocab_size)
    model = checkpoint.load(path, device="cpu")
    hf = dense_llama(src_cfg, "cpu", torch.float32)
    weights = lambda m: sum(p.numel() for n, p in m.named_parameters() if "norm" not in n)  # noqa: E731
    assert weights(model) == weights(hf) > 0  # every matrix, the (tied) embedding once
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (Path(path) / name).read_bytes() == (Path(src) / name).read_bytes()
    stamp = (Path(path) / "model.safetensors").stat().st_mtime_ns
    assert serve_path.dense_checkpoint(src, torch.float32, "cpu") == path
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == stamp
