"""KV hand-off over real gRPC on loopback: bytes path and shared-memory path give the reference
tokens at every scale and with a scale switch; auth is required; stats report a free pool."""

from __future__ import annotations

import threading

import grpc
import pytest

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.decode_worker.service import DecodeServer
from colm.generate import generate
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.kv_push import GrpcKVSink, decode_stub
from colm.prefill_worker.service import PrefillServer
from colm.proto import load_proto
from colm.proto.rpc import auth_metadata, make_channel
from colm.sampling import SamplingParams
from _engine_helpers import TOKEN, CaptureSink, decode_engine_from, prompts, save_tiny_air

kv_pb2, kv_pb2_grpc = load_proto("kv")
MD = auth_metadata(TOKEN)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_rpc")
    full = save_tiny_air(path)
    decode = DecodeServer(DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=128, block_size=4)), TOKEN).start()
    # tiny chunks so one request's K/V take many messages
    prefill = PrefillServer(PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=16, kv_chunk_bytes=512)),
                            TOKEN).start()
    d = kv_pb2_grpc.DecodeWorkerStub(make_channel(decode.address))
    p = kv_pb2_grpc.PrefillWorkerStub(make_channel(prefill.address))
    yield full, decode, prefill, d, p
    prefill.stop(), decode.stop()


def run_request(d, p, decode, rid, prompt, scale, max_new, same_host, switch_at=None):
    d.Reserve(kv_pb2.ReserveRequest(request_id=rid, prompt_len=len(prompt), max_new_tokens=max_new), metadata=MD, timeout=10)
    reply = {}
    t = threading.Thread(target=lambda: reply.update(r=p.Prefill(kv_pb2.PrefillRequest(
        request_id=rid, token_ids=prompt, decode_address=decode.address, same_host=same_host), metadata=MD, timeout=30)))
    t.start()
    sampling = kv_pb2.DecodeSampling(max_new_tokens=max_new, ignore_eos=True)
    events = []
    for ev in d.StartGeneration(kv_pb2.StartGenerationRequest(request_id=rid, last_token_id=prompt[-1], sampling=sampling,
                                                             scale=scale), metadata=MD, timeout=30):
        events.append(ev)
        if switch_at is not None and ev.index == switch_at:
            d.SetScale(kv_pb2.SetScaleRequest(request_id=rid, scale=3 - scale), metadata=MD, timeout=5)
    t.join()
    return events, reply["r"]


@pytest.mark.parametrize("same_host", [False, True], ids=["bytes", "shm"])
def test_handoff_matches_reference(cluster, same_host):
    full, decode, _, d, p = cluster
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    results = {}
    threads = []
    for i, prompt in enumerate(prompts([2, 19, 33], seed=11)):
        for scale in (1, 2):
            rid = f"{same_host}-{i}-{scale}"
            th = threading.Thread(target=lambda rid=rid, prompt=prompt, scale=scale: results.update(
                {rid: (prompt, scale, run_request(d, p, decode, rid, prompt, scale, 8, same_host))}))
            th.start()
            threads.append(th)
    for th in threads:
        th.join()
    for rid, (prompt, scale, (events, reply)) in results.items():
        assert [e.token_id for e in events] == generate(full, prompt, params, scale=scale).token_ids, rid
        assert reply.path == ("shm" if same_host else "grpc")
        assert reply.num_tokens == len(prompt) - 1
        assert reply.num_bytes == full.cfg.n_layers * (len(prompt) - 1) * 2 * full.cfg.n_kv_heads * full.cfg.head_dim * 4
    # scale switch mid-generation over the wire
    prompt = prompts([25], seed=5)[0]
    events, _ = run_request(d, p, decode, f"switch-{same_host}", prompt, 1, 12, same_host, switch_at=3)
    used = [e.scale for e in events]
    assert used[0] == 1 and used[-1] == 2
    ref = generate(full, prompt, SamplingParams(max_new_tokens=12, ignore_eos=True), scale_schedule=lambda i: used[i])
    assert [e.token_id for e in events] == ref.token_ids
    stats = d.Stats(kv_pb2.DecodeStatsRequest(), metadata=MD, timeout=5)
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0 and stats.num_steps > 0


def test_auth_required(cluster):
    _, _, _, d, p = cluster
    for call in (lambda: d.Stats(kv_pb2.DecodeStatsRequest(), timeout=5),
                 lambda: p.Stats(kv_pb2.PrefillStatsRequest(), metadata=auth_metadata("wrong"), timeout=5)):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    s = p.Stats(kv_pb2.PrefillStatsRequest(), metadata=MD, timeout=5)
    assert s.num_params == cluster[0].cfg.num_params(1)


def test_score_gives_logprobs_and_greedy_tokens(cluster):
    """Score over gRPC (what the router's echo/logprobs uses) against a direct log-softmax of the model."""
    import torch

    full, _, _, d, _ = cluster
    ids = [5, 40, 77, 120, 3, 9]
    for scale in (1, 2):
        r = d.Score(kv_pb2.ScoreRequest(token_ids=ids, scale=scale), metadata=MD, timeout=10)
        with torch.no_grad():
            logp = torch.log_softmax(full(torch.tensor([ids]), scale=scale)[0, :-1].float(), -1)
        assert r.logprobs[0] == 0.0 and r.top_token_ids[0] == -1
        assert list(r.logprobs[1:]) == pytest.approx(logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist(),
                                                     abs=1e-5)
        assert list(r.top_token_ids[1:]) == logp.argmax(-1).tolist()
        assert list(r.top_logprobs[1:]) == pytest.approx(logp.max(-1).values.tolist(), abs=1e-5)
    with pytest.raises(grpc.RpcError) as e:
        d.Score(kv_pb2.ScoreRequest(token_ids=[5, 999], scale=1), metadata=MD, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_timelines_order_the_handoff(cluster):
    """PrefillReply and the first TokenEvent carry each worker's milestones; on one host their monotonic bases
    put both on one clock, where the hand-off's order must hold."""
    full, decode, _, d, p = cluster
    prompt = prompts([40], seed=3)[0]  # 39 tokens of K/V in 3 chunks of 16 positions, many messages each
    events, reply = run_request(d, p, decode, "timeline", prompt, 2, 3, same_host=False)
    first, rest = events[0], events[1:]
    assert all(not e.timeline_ms and e.monotonic_s == 0 for e in rest)
    dec = {k: first.monotonic_s + v / 1000 for k, v in first.timeline_ms.items()}  # absolute, monotonic clock
    pre = {k: reply.monotonic_s + v / 1000 for k, v in reply.timeline_ms.items()}
    assert reply.timeline_ms["submitted"] == 0.0 and first.timeline_ms["started"] == 0.0
    order = [dec["reserved"], pre["submitted"], pre["batch_start"], pre["kv_begin"], dec["kv_header"],
             dec["kv_first_chunk"], dec["kv_last_chunk"], dec["kv_done"], pre["delivered"]]
    assert order == sorted(order), {**{f"d.{k}": v for k, v in dec.items()}, **{f"p.{k}": v for k, v in pre.items()}}
    assert pre["first_put"] <= pre["last_put"] <= pre["computed"] <= pre["delivered"]
    assert dec["kv_first_chunk"] < dec["kv_last_chunk"]  # several chunks
    assert max(dec["kv_done"], dec["started"]) <= dec["admitted"] <= dec["first_token"]
    assert dec["first_token"] - dec["reserved"] < 30  # seconds: one clock, not two unrelated ones


@pytest.mark.parametrize("shm", [False, True], ids=["bytes", "shm"])
def test_one_put_of_every_layer(cluster, shm):
    """A prefill that hands a request all its layers in one put (the graphed path does): the bytes path cuts it
    into small chunks by token ranges (each made contiguous), shared memory sends it whole; the tokens are the
    reference's."""
    full, decode, prefill, d, _ = cluster
    prompt = prompts([21], seed=12)[0]
    captured = CaptureSink()
    prefill.engine.prefill("capture", prompt, captured)
    kv_all = captured.k.clone()  # [L, 20, 2, Hkv, hd]: every layer's K/V of the prompt
    rid = f"one-put-{shm}"
    d.Reserve(kv_pb2.ReserveRequest(request_id=rid, prompt_len=len(prompt), max_new_tokens=4), metadata=MD, timeout=10)
    sink = GrpcKVSink(decode_stub(decode.address), rid, TOKEN, chunk_bytes=512, shm=shm)
    sink.begin(captured.layout)
    sink.put(0, kv_all.shape[0], 0, kv_all.shape[1], kv_all)
    sent = {}
    th = threading.Thread(target=lambda: sent.update(n=sink.finish(10)))  # KVEnd, then decode's ack
    th.start()
    sampling = kv_pb2.DecodeSampling(max_new_tokens=4, ignore_eos=True)
    toks = [e.token_id for e in d.StartGeneration(kv_pb2.StartGenerationRequest(
        request_id=rid, last_token_id=prompt[-1], sampling=sampling, scale=2), metadata=MD, timeout=30)]
    th.join()
    assert sent["n"] == kv_all.numel() * 4
    assert toks == generate(full, prompt, SamplingParams(max_new_tokens=4, ignore_eos=True), scale=2).token_ids
    if not shm:
        assert sink._num_chunks > 1


def test_decode_stats_list_the_transports_before_any_reserve(tmp_path):
    """A fresh decode worker's Stats already say what it can receive: the router's first request to it may send
    Prefill with Reserve where that transport allows."""
    from colm.decode_worker.service import DecodeService
    from colm.kv.registry import receivable

    save_tiny_air(tmp_path)
    service = DecodeService(decode_engine_from(tmp_path))
    stats = service.Stats(kv_pb2.DecodeStatsRequest(), None)
    assert list(stats.transports) == receivable(False) and {"grpc", "shm"} <= set(stats.transports)
