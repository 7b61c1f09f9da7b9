"""Batched token delivery (``DecodeEngine.mux``, ``DecodeWorker.Tokens`` / ``Start``, the router's
``token_stream: batched``): a decode step hands every running request's token over at once, the tokens
equal the reference and the per-request stream's, a failing request's error reaches only that request, and
a subscriber that goes away gets its requests aborted and their blocks freed."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from colm.errors import PeerUnavailableError, RequestFailedError
from colm.generate import generate
from colm.prefill_worker.sinks import LocalKVSink
from colm.sampling import SamplingParams
from _engine_helpers import prompts, started_engines


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    with started_engines(tmp_path_factory.mktemp("tiny_air_mux"), num_blocks=128) as engines:
        yield engines


def _collect(sub, want_done: set[str], timeout_s: float = 60.0):
    """(events by request, failures by request, batches) read from ``sub`` until every request in
    ``want_done`` finished or failed."""
    events: dict[str, list] = {}
    failures: dict[str, BaseException] = {}
    batches = []
    end = time.monotonic() + timeout_s
    while not want_done <= (set(failures) | {r for r, evs in events.items() if evs and evs[-1].finish_reason}):
        assert time.monotonic() < end, (events, failures)
        items = sub.next_batch(timeout_s=0.5)
        assert items is not None, "subscription closed"
        if items:
            batches.append(items)
        for it in items:
            if isinstance(it, tuple):
                failures[it[0]] = it[1]
            else:
                events.setdefault(it.request_id, []).append(it)
    return events, failures, batches


def test_one_batch_per_step_and_tokens_equal_the_reference(engines):
    de, pe, full = engines
    sub = de.mux.open("router-a")
    batch = prompts([9, 14, 5, 11], seed=11)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    rids = []
    for i, p in enumerate(batch):
        rid = f"mux-{i}"
        de.reserve(rid, len(p), 10)
        pe.submit(rid, p, LocalKVSink(de, rid))
        de.start_generation(rid, p[-1], params, scale=1 + i % 2, subscriber="router-a")
        rids.append(rid)
    events, failures, batches = _collect(sub, set(rids))
    assert not failures
    for i, (rid, p) in enumerate(zip(rids, batch)):
        assert [e.token_id for e in events[rid]] == generate(full, p, params, scale=1 + i % 2).token_ids
        assert [e.index for e in events[rid]] == list(range(10))
    # steps hand their events over whole: several requests' tokens share a hand-over (a reader that lags behind
    # gets several steps' events at once, still in order per request)
    assert len(batches) < sum(len(v) for v in events.values())
    de.mux.remove(sub)


def test_a_failing_request_reaches_its_subscriber_alone(engines):
    de, pe, full = engines
    sub = de.mux.open("router-b")
    good = SamplingParams(max_new_tokens=8, ignore_eos=True)
    bad = SamplingParams(max_new_tokens=8, temperature=1.0, seed=1, ignore_eos=True)
    object.__setattr__(bad, "temperature", float("nan"))  # past validation: breaks sampling in the step
    batch = prompts([6, 8], seed=12)
    for i, (p, params) in enumerate(zip(batch, (good, bad))):
        de.reserve(f"f-{i}", len(p), 8)
        pe.submit(f"f-{i}", p, LocalKVSink(de, f"f-{i}"))
        de.start_generation(f"f-{i}", p[-1], params, scale=2, subscriber="router-b")
    events, failures, _ = _collect(sub, {"f-0", "f-1"})
    assert isinstance(failures.get("f-1"), RequestFailedError), failures
    assert "f-0" not in failures
    assert [e.token_id for e in events["f-0"]] == generate(full, batch[0], good, scale=2).token_ids
    de.mux.remove(sub)


def test_unknown_subscriber_is_refused_and_frees_the_reservation(engines):
    de, pe, _ = engines
    free = de.pool.num_free
    de.reserve("nosub", 1, 4)
    with pytest.raises(PeerUnavailableError, match="no token subscription"):
        de.start_generation("nosub", 3, SamplingParams(max_new_tokens=4), subscriber="nobody")
    assert de.pool.num_free == free and "nosub" not in de._requests


def test_a_second_start_of_a_running_id_with_an_unknown_subscriber_leaves_it_running(engines):
    de, pe, full = engines
    sub = de.mux.open("router-e")
    p = prompts([6], seed=14)[0]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    de.reserve("twice", len(p), 12)
    pe.submit("twice", p, LocalKVSink(de, "twice"))
    de.start_generation("twice", p[-1], params, scale=2, subscriber="router-e")
    with pytest.raises(ValueError, match="already started"):
        de.start_generation("twice", p[-1], params, scale=2, subscriber="nobody")
    events, failures, _ = _collect(sub, {"twice"})
    assert not failures and [e.token_id for e in events["twice"]] == generate(full, p, params, scale=2).token_ids
    de.mux.remove(sub)


def test_a_subscriber_that_goes_away_has_its_requests_aborted(engines):
    de, pe, _ = engines
    free = de.pool.num_free
    sub = de.mux.open("router-c")
    p = prompts([7], seed=13)[0]
    de.reserve("gone", len(p), 400)
    pe.submit("gone", p, LocalKVSink(de, "gone"))
    de.start_generation("gone", p[-1], SamplingParams(max_new_tokens=400, ignore_eos=True), subscriber="router-c")
    end = time.monotonic() + 60
    while not sub.next_batch(timeout_s=0.5):  # it runs
        assert time.monotonic() < end, "no token came"
    assert de.end_subscription(sub) == 1
    end = time.monotonic() + 60
    while de.pool.num_free != free:
        assert time.monotonic() < end, "the aborted request's blocks did not come back"
        time.sleep(0.02)
    assert sub.next_batch(timeout_s=0.1) is None  # closed


def test_a_reopened_subscriber_closes_the_old_stream(engines):
    de, _, _ = engines
    old = de.mux.open("router-d")
    new = de.mux.open("router-d")
    assert old.next_batch(timeout_s=0.1) is None and not new.closed
    de.mux.remove(new)


# ------------------------------------------------------------------------------------------- over gRPC
TOKEN = "mux-test-token-0123456789"


@pytest.fixture(scope="module")
def worker_procs():
    """A decode and a prefill worker process, shared by both token stream modes."""
    pytest.importorskip("colm.decode_worker.service")
    from colm.assets import demo_model_dir
    from router_helpers import start_worker_procs

    procs: list = []
    try:
        addrs = start_worker_procs(str(demo_model_dir()), (("decode", '{"num_blocks": 512}'), ("prefill", "{}")),
                                   {**os.environ, "COLM_CLUSTER_TOKEN": TOKEN}, procs)
        yield addrs
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)


TEXTS = [f"def f{i}(x):\n    return" + " x" * (i % 5) for i in range(16)]
# every third request has penalties: the decode worker reads its prompt, sent with its start (context ids)
PENALIZED = dict(repetition_penalty=1.5, frequency_penalty=0.75, presence_penalty=0.5)


@pytest.fixture(scope="module", autouse=True)
def reference():
    """The demo model and ``colm generate``'s tokens of every (text, scale, penalized): both token stream modes are
    checked against the same reference, made once. Made before the module's first test (autouse), ahead of the
    in-process engines of ``engines``: once their threads have run torch, this process's own torch calls take ~2.7x
    longer while they live (libgomp's wait with more OpenMP threads than cores)."""
    from colm import checkpoint
    from colm.assets import demo_model_dir
    from colm.tokenizer import ByteTokenizer

    model = checkpoint.load(str(demo_model_dir())).eval()
    tok = ByteTokenizer()
    want = {(t, s, a): generate(model, tok.encode(t), SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                                    **(PENALIZED if a else {})), scale=s).token_ids
            for t in TEXTS for s in (1, 2) for a in (False, True)}
    return model, want


@pytest.mark.parametrize("token_stream", ["batched", "per_request"])
def test_worker_processes_concurrent_requests_equal_the_reference(worker_procs, reference, token_stream):
    from colm import checkpoint
    from colm.assets import demo_model_dir
    from colm.client import Client
    from colm.router.backend import WorkerInfo
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.grpc_backend import GrpcBackend
    from colm.tokenizer import ByteTokenizer
    from router_helpers import BackgroundRouter, walk_away

    model_dir = str(demo_model_dir())
    addrs = worker_procs
    workers = [WorkerInfo("decode-0", "decode", addrs["decode"]), WorkerInfo("prefill-0", "prefill", addrs["prefill"])]
    model, want = reference
    tok = ByteTokenizer()
    texts, penalized = TEXTS, PENALIZED
    assert all(want[(t, s, True)] != want[(t, s, False)] for t in texts[:4] for s in (1, 2))
    bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=None, token_stream=token_stream),
                                 checkpoint.load_config(model_dir), tok,
                                 GrpcBackend(workers, cluster_token=TOKEN, token_stream=token_stream)))
    try:
        def one(i: int):
            t, s, a = texts[i % len(texts)], 1 + i % 2, i % 3 == 2
            with Client(bg.grpc_addr) as c:
                return (t, s, a), c.complete(t, max_new_tokens=12, scale=s, ignore_eos=True,
                                             **(penalized if a else {}))["token_ids"]

        with ThreadPoolExecutor(16) as ex:
            got = list(ex.map(one, range(32)))
        for key, ids in got:
            assert ids == want[key], key
        if token_stream == "batched":  # every request's tokens came over the one Tokens stream
            assert list(bg.router.backend._subs) == ["decode-0"]
        # top log-probs cross the worker's wire with each token: the reference's, from one full forward
        with Client(bg.grpc_addr) as c:
            r = c.complete(texts[3], max_new_tokens=6, scale=2, ignore_eos=True, top_logprobs=3)
        ids = tok.encode(texts[3])
        with torch.no_grad():
            lps = torch.log_softmax(model(torch.tensor([ids + r["token_ids"]]), scale=2)[0].double(), -1)
        for i, top in enumerate(r["top_logprobs"]):
            v, t = lps[len(ids) - 1 + i].topk(3)
            assert [x for x, _ in top] == t.tolist() and [y for _, y in top] == pytest.approx(v.tolist(), abs=1e-4)
        # a request the client walks away from mid-stream is aborted on the worker: its blocks come back
        with Client(bg.grpc_addr) as c:
            walk_away(c, "walk away", 200)
        end = time.monotonic() + 30
        while True:
            bg.call(bg.router.poll_once())
            rep = bg.router.registry.workers["decode-0"].report
            if rep.free_blocks == rep.total_blocks:
                break
            assert time.monotonic() < end, rep
            time.sleep(0.1)
    finally:
        bg.stop()


def test_a_router_refuses_a_backend_made_with_another_token_stream():
    """router.token_stream decides how decode workers send tokens; a backend made with the other mode would silently
    ignore it, so the router refuses the pair and says which field to fix."""
    from colm.presets import preset
    from colm.router.backend import WorkerInfo
    from colm.router.config import RouterConfig
    from colm.router.core import Router
    from colm.router.grpc_backend import GrpcBackend
    from colm.tokenizer import ByteTokenizer

    workers = [WorkerInfo("decode-0", "decode", "127.0.0.1:1")]
    backend = GrpcBackend(workers, cluster_token=TOKEN, token_stream="batched")
    with pytest.raises(ValueError, match="router.token_stream='per_request'.*token_stream='batched'"):
        Router(RouterConfig(grpc_port=0, http_port=None, token_stream="per_request"), preset("tiny-air"),
               ByteTokenizer(), backend)
    Router(RouterConfig(grpc_port=0, http_port=None, token_stream="batched"), preset("tiny-air"), ByteTokenizer(),
           backend)  # the same mode: accepted
