"""A Llama straight from `colm convert-hf` (one chain, no KV sharing) is served: with one chain, chain 1 is the
whole model, so the chain-1 prefill's K/V are the K/V decode needs. Greedy tokens through the router and the
real engines (in-process, and as worker processes over gRPC) equal `colm generate` and transformers' greedy
generate on the same weights; `colm expand --kv-sharing` of it serves both scales."""

import os
import subprocess

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("colm.decode_worker.engine")

from colm import checkpoint  # noqa: E402
from colm.cli import main  # noqa: E402
from colm.client import Client  # noqa: E402
from colm.config import servable  # noqa: E402
from colm.decode_worker.config import DecodeConfig  # noqa: E402
from colm.decode_worker.engine import DecodeEngine  # noqa: E402
from colm.deploy.config import ClusterConfig  # noqa: E402
from colm.deploy.launcher import Launcher  # noqa: E402
from colm.generate import generate  # noqa: E402
from colm.prefill_worker.engine import PrefillEngine  # noqa: E402
from colm.presets import preset  # noqa: E402
from colm.router.config import RouterConfig  # noqa: E402
from colm.router.core import Router  # noqa: E402
from colm.router.engine_backend import EngineBackend  # noqa: E402
from colm.sampling import SamplingParams  # noqa: E402
from colm.tokenizer import load_checkpoint_tokenizer  # noqa: E402
from hf_llama_helpers import converted_llama, hf_greedy, router_over  # noqa: E402
from router_helpers import BackgroundRouter, start_worker_procs  # noqa: E402

N = 12
PROMPTS = [[5, 300, 17, 99, 200, 42, 7, 311, 64, 128, 3], [77]]  # a one-token prompt needs no KV hand-off


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF model, converted colm checkpoint dir) of a tiny random Llama with grouped-query attention."""
    hf, _, ckpt = converted_llama(tmp_path_factory.mktemp("llama"), 11, vocab_size=320, hidden_size=64,
                                  intermediate_size=160, num_hidden_layers=3, num_attention_heads=8,
                                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
                                  initializer_range=0.15, rope_theta=50000.0)
    return hf, ckpt


def colm_greedy(ckpt, prompt, scale=None, n=N):
    model = checkpoint.load(ckpt).eval()
    return generate(model, prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), scale=scale).token_ids


def engine_router(ckpt):
    prefill = {"prefill-0": PrefillEngine.from_checkpoint(ckpt)}
    decode = {"decode-0": DecodeEngine.from_checkpoint(ckpt, DecodeConfig(num_blocks=64))}
    return router_over(EngineBackend(prefill, decode), ckpt), decode


def test_servable_rule():
    assert servable(preset("tiny-air")) is None  # CoLM-Air
    assert servable(preset("tiny", chains=(4,))) is None  # one chain: chain 1 is the whole model
    reason = servable(preset("tiny"))  # two chains without KV sharing: K/V depend on chain 2 too
    assert reason is not None and "not a CoLM-Air model" in reason and "kv_sharing" in reason


def test_converted_llama_serves_tokens_of_colm_generate_and_transformers(llama):
    hf, ckpt = llama
    cfg = checkpoint.load_config(ckpt)
    assert cfg.num_chains == 1 and not cfg.kv_sharing and servable(cfg) is None
    assert Launcher(ClusterConfig.from_dict({"model": {"path": ckpt}, "decode": {"num_blocks": 64}})).prepare() == ckpt
    bg, decode = engine_router(ckpt)
    try:
        with Client(bg.grpc_addr) as c:
            assert [s["scale"] for s in c.list_scales()] == [1]
            for prompt in PROMPTS:
                want = hf_greedy(hf, prompt, N)
                assert colm_greedy(ckpt, prompt) == want
                r = c.complete(prompt, max_new_tokens=N, ignore_eos=True)
                assert r["token_ids"] == want and r["scales"] == [1] * N, prompt
        s = decode["decode-0"].stats()
        assert s.num_free_blocks == s.num_blocks
    finally:
        bg.stop()


def test_expanded_air_model_serves_both_scales(llama, tmp_path):
    hf, ckpt = llama
    air = str(tmp_path / "air")
    assert main(["expand", ckpt, air, "--add-chain", "8", "--kv-sharing"]) == 0
    cfg = checkpoint.load_config(air)
    assert cfg.chains == (8, 8) and cfg.kv_sharing
    bg, _ = engine_router(air)
    try:
        with Client(bg.grpc_addr) as c:
            for scale in (1, 2):
                for prompt in PROMPTS:
                    r = c.complete(prompt, max_new_tokens=N, scale=scale, ignore_eos=True)
                    assert r["token_ids"] == colm_greedy(air, prompt, scale), (prompt, scale)
                    assert r["scales"] == [scale] * N
            # chain 1 is the converted Llama: scale 1 (and, right after expansion, scale 2) continue as it does
            assert c.complete(PROMPTS[0], max_new_tokens=N, scale=1, ignore_eos=True)["token_ids"] == hf_greedy(
                hf, PROMPTS[0], N)
    finally:
        bg.stop()


def test_converted_llama_served_by_worker_processes(llama):
    """The same through `colm.deploy.worker_main` processes and the gRPC backend (what Ray actors run)."""
    from colm.router.backend import WorkerInfo
    from colm.router.grpc_backend import GrpcBackend

    hf, ckpt = llama
    token = "any-llama-test-token-0123456789"
    env = {**os.environ, "COLM_CLUSTER_TOKEN": token}
    procs = []
    try:
        addrs = start_worker_procs(ckpt, (("decode", '{"num_blocks": 64}'), ("prefill", "{}")), env, procs)
        workers = [WorkerInfo("decode-0", "decode", addrs["decode"]),
                   WorkerInfo("prefill-0", "prefill", addrs["prefill"])]
        bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=None), checkpoint.load_config(ckpt),
                                     load_checkpoint_tokenizer(ckpt), GrpcBackend(workers, cluster_token=token)))
        try:
            with Client(bg.grpc_addr) as c:
                assert c.complete(PROMPTS[0], max_new_tokens=N, ignore_eos=True)["token_ids"] == hf_greedy(
                    hf, PROMPTS[0], N)
        finally:
            bg.stop()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
