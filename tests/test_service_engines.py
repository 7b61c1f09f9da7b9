"""Router -> real prefill/decode engines (in-process backend): reference tokens, scale switch, failover, and the
accepted-draft flags of speculative requests over gRPC and the HTTP front."""

import threading
import time
from dataclasses import replace

import pytest

pytest.importorskip("colm.decode_worker.engine")

from colm import checkpoint  # noqa: E402
from colm.client import Client  # noqa: E402
from colm.decode_worker.config import DecodeConfig  # noqa: E402
from colm.decode_worker.engine import DecodeEngine  # noqa: E402
from colm.generate import generate  # noqa: E402
from colm.model import CoLM  # noqa: E402
from colm.prefill_worker.engine import PrefillEngine  # noqa: E402
from colm.presets import preset  # noqa: E402
from colm.router.config import RouterConfig  # noqa: E402
from colm.router.core import Router  # noqa: E402
from colm.router.engine_backend import EngineBackend  # noqa: E402
from colm.sampling import SamplingParams  # noqa: E402
from colm.tokenizer import ByteTokenizer  # noqa: E402
from router_helpers import BackgroundRouter  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-air")
    checkpoint.save(CoLM(preset("tiny-air")).reset_parameters(seed=3), path, tokenizer={"kind": "byte"})
    return str(path)


def make(ckpt, num_decode=1, **router_kw):
    prefill = {"prefill-0": PrefillEngine.from_checkpoint(ckpt)}
    decode = {f"decode-{i}": DecodeEngine.from_checkpoint(ckpt, DecodeConfig(num_blocks=128))
              for i in range(num_decode)}
    cfg = RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05, **router_kw)
    router = Router(cfg, checkpoint.load_config(ckpt), ByteTokenizer(), EngineBackend(prefill, decode))
    return BackgroundRouter(router), prefill, decode


def reference(ckpt, prompt, n, scale=None, schedule=None, ignore_eos=False):
    model = checkpoint.load(ckpt).eval()
    return generate(model, ByteTokenizer().encode(prompt), SamplingParams(max_new_tokens=n, ignore_eos=ignore_eos),
                    scale=scale, scale_schedule=schedule, eos_id=ByteTokenizer.eos_id).token_ids


def phase_counts(router) -> dict[str, float]:
    """colm_request_phase_seconds: observations per phase."""
    return {s.labels["phase"]: s.value for m in router.metrics.registry.collect() if m.name == "colm_request_phase_seconds"
            for s in m.samples if s.name.endswith("_count")}


def test_request_phases_reach_the_metrics(ckpt):
    """Both workers' timelines become colm_request_phase_seconds: every phase once per request with KV."""
    bg, _, _ = make(ckpt)
    try:
        with Client(bg.grpc_addr) as c:
            for prompt in ("phase one", "phase two"):
                c.complete(prompt, max_new_tokens=3)
        deadline = time.monotonic() + 5  # the prefill's phases are reported when its future resolves
        while phase_counts(bg.router).get("kv_delivery", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        counts = phase_counts(bg.router)
        assert counts == {p: 2.0 for p in ("prefill_queue", "prefill_compute", "kv_delivery", "kv_wait", "admission",
                                           "first_step")}, counts
    finally:
        bg.stop()


def test_phases_from_timelines():
    from colm.router.metrics import decode_phases, prefill_phases

    d = decode_phases({"reserved": -3.0, "started": 0.0, "kv_done": 20.0, "admitted": 21.0, "first_token": 22.5})
    assert d == pytest.approx({"kv_wait": 0.020, "admission": 0.001, "first_step": 0.0015})
    # KV complete before generation was asked (or no KV at all): admission counts from the start
    assert decode_phases({"started": 0.0, "admitted": 0.5, "first_token": 2.0}) == pytest.approx(
        {"admission": 0.0005, "first_step": 0.0015})
    # a colocated worker's own prefill: the wait for the KV splits into the prompt's queue and its chunks
    c = decode_phases({"started": 0.0, "kv_header": 0.1, "prefill_first_chunk": 30.0, "prefill_last_chunk": 34.0,
                       "kv_done": 34.0, "admitted": 34.0, "first_token": 36.0})
    assert c == pytest.approx({"kv_wait": 0.034, "prefill_queue": 0.030, "prefill_compute": 0.004, "admission": 0.0,
                               "first_step": 0.002})
    p = prefill_phases({"submitted": 0.0, "batch_start": 1.0, "kv_begin": 2.0, "computed": 21.0, "delivered": 22.0})
    assert p == pytest.approx({"prefill_queue": 0.001, "prefill_compute": 0.020, "kv_delivery": 0.001})


def test_disaggregated_greedy_equals_reference_and_scale_switch(ckpt):
    bg, prefill, decode = make(ckpt, rebalance=False)
    try:
        with Client(bg.grpc_addr) as c:
            for scale in (1, 2):
                for prompt in ("Hello, chains", "x"):  # a one-token prompt needs no KV hand-off
                    r = c.complete(prompt, max_new_tokens=12, scale=scale)
                    assert r["token_ids"] == reference(ckpt, prompt, 12, scale), (prompt, scale)
            # switch 2 -> 1 mid-generation through the router's scale control; every token reports its
            # scale, so the reference replays the same schedule
            out = []
            for ev in c.stream("switch me", max_new_tokens=200, scale=2):
                if ev["kind"] == "token":
                    out.append((ev["id"], ev["scale"]))
                    if len(out) == 3:
                        rid = next(iter(bg.router.running))
                        bg.call(bg.router.backend.set_scale("decode-0", rid, 1))
            scales = [s for _, s in out]
            first1 = scales.index(1)
            assert 3 <= first1 < 200 and scales == [2] * first1 + [1] * (200 - first1)
            want = reference(ckpt, "switch me", 200, schedule=lambda i: 2 if i < first1 else 1)
            assert [t for t, _ in out] == want
        for d in decode.values():
            s = d.stats()
            assert s.num_free_blocks == s.num_blocks
    finally:
        bg.stop()


def test_speculative_requests_equal_reference_and_report_drafts(ckpt):
    """speculative=4 through the router: greedy tokens equal plain decoding at scale 2, before and after a client's
    mid-stream switch to scale 1 (no drafting there) and back; the drafted flags add up to the usage's count and
    to the router's counter."""
    bg, prefill, decode = make(ckpt, rebalance=False)
    try:
        with Client(bg.grpc_addr) as c:
            r = c.complete("Hello, chains", max_new_tokens=40, scale=2, speculative=4, ignore_eos=True)
            assert r["token_ids"] == reference(ckpt, "Hello, chains", 40, 2, ignore_eos=True)
            assert r["usage"]["draft_accepted_tokens"] == sum(r["drafted"]) > 0
            out = []
            for ev in c.stream("switch me", max_new_tokens=60, scale=2, speculative=4, ignore_eos=True,
                               request_id="spec-sw"):
                if ev["kind"] == "token":
                    out.append((ev["id"], ev["scale"], ev["drafted"]))
                    if len(out) in (6, 25):
                        c.set_scale("spec-sw", 1 if len(out) == 6 else 2)
            scales = [s for _, s, _ in out]
            assert 1 in scales and scales[0] == scales[-1] == 2
            want = reference(ckpt, "switch me", 60, schedule=lambda i: scales[i], ignore_eos=True)
            assert [t for t, _, _ in out] == want
            assert not any(d for _, s, d in out if s == 1)
        counted = next(s.value for m in bg.router.metrics.registry.collect()
                       if m.name == "colm:spec_decode_num_accepted_tokens" for s in m.samples
                       if s.name.endswith("_total"))
        assert counted == sum(r["drafted"]) + sum(d for _, _, d in out)
        stats = decode["decode-0"].stats()
        assert stats.num_draft_accepted == counted and stats.num_drafted >= counted
        assert stats.num_free_blocks == stats.num_blocks
    finally:
        bg.stop()


def test_http_streams_flag_accepted_drafts_and_count_them_in_the_usage(tmp_path):
    """speculative=4 over the OpenAI-compatible HTTP front (the openai client): a streamed completion's token chunks
    carry `drafted` beside `token_id`, a streamed chat's chunks a `drafted` list of the tokens whose text they carry;
    the flags add up to the usage's `draft_accepted_tokens` (streamed and not) and to the worker's count; a request
    that asks for no drafts has neither field."""
    openai = pytest.importorskip("openai")
    from router_helpers import chat_router

    path = tmp_path / "tiny-air"
    checkpoint.save(CoLM(preset("tiny-air")).reset_parameters(seed=3), path, tokenizer={"kind": "byte"})
    decode = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=128))
    backend = EngineBackend({"prefill-0": PrefillEngine.from_checkpoint(path)}, {"decode-0": decode})
    bg, client, _ = chat_router(checkpoint.load(path), path, backend=backend, rebalance=False)
    assert isinstance(client, openai.OpenAI)
    try:
        prompt = ByteTokenizer().encode("Hello, chains")
        kw = dict(model="colm@2", prompt=prompt, max_tokens=40, temperature=0)
        spec = {"speculative": 4, "ignore_eos": True}
        usage = {"stream": True, "stream_options": {"include_usage": True}}
        chunks = list(client.completions.create(**kw, **usage, extra_body=spec))
        toks = [c.choices[0].model_extra for c in chunks if c.choices and c.choices[0].finish_reason is None]
        assert [t["token_id"] for t in toks] == reference(str(path), "Hello, chains", 40, 2, ignore_eos=True)
        flags = [t["drafted"] for t in toks]
        assert chunks[-1].usage.model_extra["draft_accepted_tokens"] == sum(flags) > 0
        whole = client.completions.create(**kw, extra_body=spec)
        assert whole.usage.model_extra["draft_accepted_tokens"] == sum(flags)
        chat = list(client.chat.completions.create(model="colm@2", messages=[{"role": "user", "content": "Hi"}],
                                                   max_completion_tokens=30, temperature=0, **usage, extra_body=spec))
        lists = [c.choices[0].model_extra.get("drafted") for c in chat if c.choices]
        assert lists[0] is None  # the role chunk carries no token
        chat_flags = [f for flags_of in lists[1:] if flags_of for f in flags_of]
        assert len(chat_flags) == 30 and chat[-1].usage.model_extra["draft_accepted_tokens"] == sum(chat_flags)
        assert decode.stats().num_draft_accepted == 2 * sum(flags) + sum(chat_flags)
        plain = list(client.completions.create(**kw, **usage, extra_body={"ignore_eos": True}))
        assert not any("drafted" in c.choices[0].model_extra for c in plain if c.choices)
        assert "draft_accepted_tokens" not in plain[-1].usage.model_extra
    finally:
        bg.stop()


def test_the_router_chooses_speculation_at_small_batches_and_tokens_stay_exact(ckpt):
    """router.speculative: auto: a request that asks for no drafts is decoded in chain-1 rounds when the policy
    predicts they pay (here: a prior acceptance and verify cost that make rounds win): greedy tokens equal plain
    decoding at scale 2, and some tokens come out as accepted drafts; with the default (off) none do."""
    bg, prefill, decode = make(ckpt, rebalance=False, speculative="auto", speculative_gammas=(3,))
    try:
        policy = bg.router.policy
        policy.cfg = policy.model.cfg = replace(policy.cfg, prior_draft_acceptance=1.0, verify_step_factor=1.0)
        with Client(bg.grpc_addr) as c:
            r = c.complete("Hello, chains", max_new_tokens=40, scale=2, ignore_eos=True)
        assert r["token_ids"] == reference(ckpt, "Hello, chains", 40, 2, ignore_eos=True)
        assert sum(r["drafted"]) > 0 and decode["decode-0"].stats().num_drafted > 0
    finally:
        bg.stop()
    bg, prefill, decode = make(ckpt, rebalance=False)
    try:
        with Client(bg.grpc_addr) as c:
            r = c.complete("Hello, chains", max_new_tokens=20, scale=2, ignore_eos=True)
        assert sum(r["drafted"]) == 0 and decode["decode-0"].stats().num_drafted == 0
    finally:
        bg.stop()


def test_decode_worker_death_is_retried_on_another_and_pools_free(ckpt):
    bg, prefill, decode = make(ckpt, num_decode=2, rebalance=False, max_retries=2)
    want = reference(ckpt, "survive", 30, 2)
    try:
        results, errors = [], []

        def worker():
            try:
                with Client(bg.grpc_addr) as c:
                    results.append(c.complete("survive", max_new_tokens=30, scale=2, deadline_ms=30000))
            except Exception as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.05)
        decode["decode-0"].stop()  # kill one decode worker while requests run on it
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(results) == 6
        assert all(r["token_ids"] == want for r in results)  # retried with its tokens so far: same greedy output
        h = Client(bg.grpc_addr).health()
        assert {w["worker_id"]: w["healthy"] for w in h["workers"]}["decode-0"] is False
        s = decode["decode-1"].stats()
        assert s.num_free_blocks == s.num_blocks and s.num_running == 0
    finally:
        bg.stop()


def test_overload_moves_running_requests_to_a_smaller_scale(ckpt):
    """When the live latency model says a running request's per-token budget no longer holds at its
    scale, the router lowers that request's scale mid-generation; tokens stay those of the reference
    run with the same scale schedule (CoLM-Air: nothing is recomputed)."""
    from colm.router.policy import WorkerReport

    bg, prefill, decode = make(ckpt, rebalance=False)
    try:
        out = []
        with Client(bg.grpc_addr) as c:
            for ev in c.stream("under pressure", max_new_tokens=200, tpot_ms=500, ignore_eos=True):
                if ev["kind"] == "decision":
                    assert ev["scale"] == 2
                if ev["kind"] == "token":
                    out.append((ev["id"], ev["scale"]))
                    if len(out) == 3:  # the decode worker reports that scale 2 now takes 2 s per step
                        bg.router.policy.observe([WorkerReport("decode-0", "decode", num_running=1,
                                                               step_ms={1: 5.0, 2: 2000.0}, free_blocks=100,
                                                               total_blocks=128)])
                        bg.call(bg.router.rebalance_once())
        scales = [s for _, s in out]
        first1 = scales.index(1)
        assert 3 <= first1 < 200 and scales == [2] * first1 + [1] * (200 - first1)
        want = reference(ckpt, "under pressure", 200, schedule=lambda i: 2 if i < first1 else 1, ignore_eos=True)
        assert [t for t, _ in out] == want
        assert bg.router.metrics.scale_changes._value.get() == 1
    finally:
        bg.stop()
