"""The cuda_pool hand-off (prefill writes K/V straight into decode's blocks, ``DecodeWorker.WriteKV``) on any
machine: decode in the same process over real gRPC, so the pool is written directly instead of opened
through CUDA IPC (tests/test_kv_ipc_gpu.py covers the cross-process GPU case).

Shown here: greedy tokens equal ``colm generate`` at every scale (chunked prompts included); the grant names
the reservation's blocks; a request that ends while its writer's stream is open keeps its blocks out of the
free list until the stream ends, then for the grace period when it broke; and the documented errors: unknown
request (NOT_FOUND), wrong layout, out-of-range or duplicated marks, inline bytes, PushKV bytes for a granted
request (DATA_LOSS), cuda_pool requested from a CPU prefill worker (INVALID_ARGUMENT), a pool that cannot be
opened from another process (decode in a spawned child). The pool is fully free after every case."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.decode_worker.service import DecodeServer
from colm.decode_worker.spawn import DecodeProcess
from colm.errors import RequestAbortedError, TransferError
from colm.generate import generate
from colm.kv_wire import KVLayout
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.kv_push import decode_stub
from colm.prefill_worker.pool_sink import PoolKVSink
from colm.prefill_worker.service import PrefillServer
from colm.proto import load_proto
from colm.proto.rpc import auth_metadata, make_channel
from colm.sampling import SamplingParams
from _engine_helpers import TOKEN, assert_pool_free, decode_engine_from, prompts, save_tiny_air, wait_pool_free

kv_pb2, kv_pb2_grpc = load_proto("kv")
MD = auth_metadata(TOKEN)
S = grpc.StatusCode
GRACE_S = 0.4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_pool")
    full = save_tiny_air(path)
    config = DecodeConfig(num_blocks=128, block_size=4, external_write_grace_s=GRACE_S, grant_wait_s=GRACE_S)
    decode = DecodeServer(DecodeEngine.from_checkpoint(path, config), TOKEN).start()
    pe = PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=16))
    prefill = PrefillServer(pe, TOKEN).start()
    d = kv_pb2_grpc.DecodeWorkerStub(make_channel(decode.address))
    p = kv_pb2_grpc.PrefillWorkerStub(make_channel(prefill.address))
    yield path, full, decode, pe, d, p
    prefill.stop(), decode.stop()




def reserve(d, rid, n, max_new=6):
    return d.Reserve(kv_pb2.ReserveRequest(request_id=rid, prompt_len=n, max_new_tokens=max_new), metadata=MD, timeout=5)


def layout_of(cfg, num_tokens, dtype="float32"):
    return KVLayout(cfg.n_layers, num_tokens, cfg.n_kv_heads, cfg.head_dim, dtype)


def header(cfg, rid, n, dtype="float32"):
    return kv_pb2.KVMessage(header=kv_pb2.KVHeader(request_id=rid, num_layers=cfg.n_layers, num_tokens=n,
                                                   num_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, dtype=dtype,
                                                   checksum="none"))


def chunk(seq, l0, l1, t0, t1, **extra):
    return kv_pb2.KVMessage(chunk=kv_pb2.KVChunk(seq=seq, layer_start=l0, layer_end=l1, token_start=t0, token_end=t1,
                                                 dtype="float32", **extra))


def code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def run(cluster, rid, prompt, scale, max_new=6):
    _, full, decode, pe, d, _ = cluster
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    reserve(d, rid, len(prompt), max_new)
    sink = PoolKVSink(decode_stub(decode.address), rid, TOKEN)
    res = {}
    th = threading.Thread(target=lambda: res.update(r=pe.prefill(rid, prompt, sink)))
    th.start()
    toks = [e.token_id for e in decode.engine.start_generation(rid, prompt[-1], params, scale=scale)]
    th.join()
    assert toks == generate(full, prompt, params, scale=scale).token_ids, (rid, scale)
    return res["r"], sink


def test_pool_writes_give_reference_tokens(cluster):
    full, decode = cluster[1], cluster[2]
    cfg = full.cfg
    for i, prompt in enumerate(prompts([1, 7, 40], seed=11)):  # 1 token: no KV; 40: three prefill chunks
        for scale in range(1, cfg.num_chains + 1):
            r, sink = run(cluster, f"pool-{i}-{scale}", prompt, scale)
            n = len(prompt) - 1
            assert r.path == "cuda_pool" and r.num_tokens == n
            assert r.num_bytes == cfg.n_layers * n * 2 * cfg.n_kv_heads * cfg.head_dim * 4
            chunks = -(-n // 16) * cfg.n_layers  # one mark per layer of each prefill chunk
            assert sink._num_chunks == chunks
            assert "first_put" in r.timeline_ms or n == 0
    assert decode.engine.stats().num_held_blocks == 0
    assert_pool_free(decode.engine)


def test_grant_waits_for_a_reservation_sent_at_the_same_time(cluster):
    """The router sends Reserve and Prefill at once on this path: a WriteKV that arrives first waits for the
    reservation (up to grant_wait_s), and the tokens are the reference's."""
    _, full, decode, pe, d, _ = cluster
    prompt = prompts([23], seed=5)[0]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    sink = PoolKVSink(decode_stub(decode.address), "late-reserve", TOKEN)
    fut = pe.submit("late-reserve", prompt, sink)
    time.sleep(GRACE_S / 4)
    # the forward did not wait for the grant: every layer is put (kept as the backlog); the request waits for it
    assert sink._cells_unput == 0 and not sink.granted.is_set() and not fut.done()
    reserve(d, "late-reserve", len(prompt), 5)
    toks = [e.token_id for e in decode.engine.start_generation("late-reserve", prompt[-1], params, scale=2)]
    assert fut.result(10).path == "cuda_pool"
    assert toks == generate(full, prompt, params, scale=2).token_ids
    assert_pool_free(decode.engine)


def test_cancelled_prefill_does_not_wait_for_a_grant(cluster):
    """A Reserve that never comes (the router's failed, so it cancels Prefill): failing the sink ends the request at
    once with the caller's reason (not after grant_wait_s) and drops the K/V it kept."""
    decode, pe = cluster[2], cluster[3]
    sink = PoolKVSink(decode_stub(decode.address), "never-reserved", TOKEN)
    t0 = time.monotonic()
    fut = pe.submit("never-reserved", prompts([30], seed=6)[0], sink)
    time.sleep(0.05)
    sink.fail(RequestAbortedError("cancelled by the caller"))
    with pytest.raises(RequestAbortedError):
        fut.result(10)
    assert time.monotonic() - t0 < GRACE_S and not sink._backlog
    assert_pool_free(decode.engine)


def test_grant_names_the_reserved_blocks(cluster):
    full, decode, d = cluster[1], cluster[2], cluster[4]
    reserve(d, "grant", 10)
    req = decode.engine._requests["grant"]
    msgs = [header(full.cfg, "grant", 9)]
    replies = d.WriteKV(iter(msgs), metadata=MD, timeout=5)
    grant = next(replies).grant
    assert list(grant.block_ids) == req.blocks and grant.block_size == 4 and grant.num_blocks == 128
    assert grant.dtype == "float32" and not grant.ipc_handle  # a CPU pool: this process only
    code, details = code_of(lambda: next(replies))  # the stream ends without KVEnd
    assert code == S.DATA_LOSS and "truncated" in details
    assert_pool_free(decode.engine)


def test_blocks_held_while_the_writer_may_write(cluster):
    """Abort after the grant: the blocks stay out of the free list while the sender's stream is open, then go back
    after the grace period once it breaks (the sender's next mark finds the request gone)."""
    full, decode, d = cluster[1], cluster[2], cluster[4]
    cfg, eng = full.cfg, decode.engine
    n = 9
    reserve(d, "held", n + 1)
    blocks = list(eng._requests["held"].blocks)
    sink = PoolKVSink(decode_stub(decode.address), "held", TOKEN, timeout_s=10)
    sink.begin(layout_of(cfg, n))
    kv = torch.randn(1, n, 2, cfg.n_kv_heads, cfg.head_dim)
    sink.put(0, 1, 0, n, kv)  # before the grant: kept, and written into decode's blocks once the grant is in
    assert sink.granted.wait(5)
    assert torch.equal(eng.pool.k[0].reshape(-1, cfg.n_kv_heads, cfg.head_dim)[blocks[0] * 4 : blocks[0] * 4 + 4],
                       kv[0, :4, 0])
    assert eng.abort("held")
    free_now = eng.pool.num_free
    assert free_now == eng.pool.num_blocks - len(blocks) and eng.stats().num_held_blocks == len(blocks)
    with pytest.raises(grpc.RpcError) as e:  # layer 0's mark reaches a request that is gone
        sink.put(1, 2, 0, n, kv)
        sink.finish(5)
    assert e.value.code() == S.NOT_FOUND
    t_broke = time.monotonic()
    time.sleep(GRACE_S / 4)
    if time.monotonic() - t_broke < GRACE_S / 2:
        assert eng.pool.num_free == free_now, "held blocks were freed before the grace period ended"
    assert_pool_free(eng)


def test_clean_end_releases_held_blocks_at_once(cluster):
    """A request that ends while its writer is still on (abort), then the writer ends cleanly: no grace."""
    full, decode, d = cluster[1], cluster[2], cluster[4]
    eng = decode.engine
    reserve(d, "held-clean", 1)  # one-token prompt: an empty stream
    grant = eng.grant_kv("held-clean", layout_of(full.cfg, 0))
    eng.abort("held-clean")
    assert eng.stats().num_held_blocks == len(grant.blocks) > 0
    eng.end_external_writes(grant, clean=True)
    assert eng.stats().num_held_blocks == 0 and eng.pool.num_free == eng.pool.num_blocks


def marks(*chunks):
    return kv_pb2.KVMessage(marks=kv_pb2.KVMarks(chunks=[c.chunk for c in chunks]))


@pytest.mark.parametrize("case", ["unknown", "wrong-layout", "wrong-dtype", "out-of-range", "twice", "bytes",
                                  "no-header", "pushkv-bytes", "marks-out-of-range", "marks-twice", "marks-bytes"])
def test_bad_streams_fail_that_request(cluster, case):
    full, decode, d = cluster[1], cluster[2], cluster[4]
    cfg = full.cfg
    rid = f"bad-pool-{case}"
    n = 8
    if case != "unknown":
        reserve(d, rid, n + 1)
    msgs = {
        "unknown": [header(cfg, rid, n)],
        "wrong-layout": [header(cfg, rid, n + 3)],
        "wrong-dtype": [header(cfg, rid, n, dtype="bfloat16")],
        "out-of-range": [header(cfg, rid, n), chunk(0, 0, 1, 0, n + 1)],
        "twice": [header(cfg, rid, n), chunk(0, 0, 1, 0, n), chunk(1, 0, 1, 2, 4)],
        "bytes": [header(cfg, rid, n), chunk(0, 0, 1, 0, n, data=b"\x00" * 16, nbytes=16)],
        "no-header": [chunk(0, 0, 1, 0, n)],
        "pushkv-bytes": [header(cfg, rid, n)],
        "marks-out-of-range": [header(cfg, rid, n), marks(chunk(0, 0, 1, 0, n), chunk(1, 1, 2, 0, n + 1))],
        "marks-twice": [header(cfg, rid, n), marks(chunk(0, 0, 1, 0, n), chunk(1, 0, 1, 2, 4))],
        "marks-bytes": [header(cfg, rid, n), marks(chunk(0, 0, 1, 0, n), chunk(1, 1, 2, 0, n, data=b"\x00" * 16,
                                                                              nbytes=16))],
    }[case]
    want = {"unknown": S.NOT_FOUND}.get(case, S.DATA_LOSS)

    checked = threading.Event()

    def stream():
        yield from msgs
        checked.wait(5)  # pushkv-bytes: the stream stays open until the bytes were refused

    def call():
        replies = d.WriteKV(stream(), metadata=MD, timeout=5)
        if case == "pushkv-bytes":  # granted: K/V bytes for the same request (write_kv, as PushKV does) are refused
            assert next(replies).WhichOneof("kind") == "grant"
            kv = torch.zeros(1, n, 2, cfg.n_kv_heads, cfg.head_dim)
            with pytest.raises(TransferError, match="cuda_pool"):
                decode.engine.write_kv(rid, 0, 1, 0, n, kv)
        checked.set()
        list(replies)

    code, details = code_of(call)
    assert code == want, (case, details)
    if case == "no-header":  # no stream named the request: its reservation stands until the router aborts it
        assert decode.engine.abort(rid)
    else:
        assert rid in details
    assert_pool_free(decode.engine)


def test_the_ranges_of_one_write_are_marked_in_one_message(cluster):
    """A ``KVMarks`` message carries several ranges (the puts one write carried): decode marks each as that chunk
    alone, and the ack counts them all; the last one may carry the KVEnd; ``PushKV`` (bytes) refuses it with
    DATA_LOSS."""
    full, decode, d = cluster[1], cluster[2], cluster[4]
    cfg = full.cfg
    n = 6
    reserve(d, "marks-ok", n + 1)
    ranges = [chunk(layer, layer, layer + 1, 0, n) for layer in range(cfg.n_layers)]
    end = kv_pb2.KVMessage(end=kv_pb2.KVEnd(num_chunks=len(ranges), num_bytes=0))
    replies = list(d.WriteKV(iter([header(cfg, "marks-ok", n), marks(*ranges), end]), metadata=MD, timeout=5))
    assert [r.WhichOneof("kind") for r in replies] == ["grant", "ack"]
    assert replies[1].ack.num_chunks == cfg.n_layers
    assert decode.engine.abort("marks-ok")
    reserve(d, "marks-end", n + 1)  # the last marks carry the stream's KVEnd: no separate end message
    last = kv_pb2.KVMessage(marks=kv_pb2.KVMarks(chunks=[c.chunk for c in ranges], end=end.end))
    replies = list(d.WriteKV(iter([header(cfg, "marks-end", n), last]), metadata=MD, timeout=5))
    assert [r.WhichOneof("kind") for r in replies] == ["grant", "ack"]
    assert replies[1].ack.num_chunks == cfg.n_layers
    assert decode.engine.abort("marks-end")
    reserve(d, "marks-push", n + 1)
    code, details = code_of(lambda: d.PushKV(iter([header(cfg, "marks-push", n), marks(*ranges)]), metadata=MD,
                                             timeout=5))
    assert code == S.DATA_LOSS and "marks" in details
    decode.engine.abort("marks-push")
    assert_pool_free(decode.engine)


def test_the_sender_marks_the_writes_done_together_in_one_message():
    """``PoolKVSink``: the puts whose writes are done (or need no wait: a ready event follows) when the stream
    looks go out as one ``KVMarks``, with the stream's KVEnd when it came right behind them; KVEnd counts each
    range."""
    sink = PoolKVSink(None, "r", TOKEN)
    sink._layout = KVLayout(3, 5, 2, 4, "float32")
    for layer in range(3):
        sink._q.put(((layer, layer + 1, 0, 5), None, None))
    sink._close_queue()
    msgs = list(sink._messages(kv_pb2.KVHeader(request_id="r")))
    assert [m.WhichOneof("kind") for m in msgs] == ["header", "marks"]  # KVEnd rides on the last marks
    assert [(c.seq, c.layer_start, c.layer_end) for c in msgs[1].marks.chunks] == [(0, 0, 1), (1, 1, 2), (2, 2, 3)]
    assert msgs[1].marks.HasField("end")
    assert msgs[1].marks.end.num_chunks == 3 and msgs[1].marks.end.num_bytes == 3 * 5 * 2 * 2 * 4 * 4


def test_cuda_pool_requested_from_a_cpu_prefill_worker(cluster):
    decode, d, p = cluster[2], cluster[4], cluster[5]
    prompt = prompts([9], seed=2)[0]
    reserve(d, "pool-no-cuda", len(prompt))
    req = kv_pb2.PrefillRequest(request_id="pool-no-cuda", token_ids=prompt, decode_address=decode.address,
                                path="cuda_pool")
    code, details = code_of(lambda: p.Prefill(req, metadata=MD, timeout=10))
    assert code == S.INVALID_ARGUMENT and "cuda_pool" in details and "CUDA" in details
    d.Abort(kv_pb2.AbortRequest(request_id="pool-no-cuda"), metadata=MD, timeout=5)
    assert_pool_free(decode.engine)


def test_pool_of_another_process_without_cuda(cluster):
    """Decode in a spawned child: its CPU pool cannot be opened from here -> the prefill fails with the reason,
    the child frees the request's blocks (after the grace: the grant was given) and keeps serving."""
    path, full, _, pe, _, _ = cluster
    args = (str(path), "cpu", "float32", 128, 4, 0.0, GRACE_S)  # decode_engine_from(..., external_write_grace_s)
    with DecodeProcess(decode_engine_from, args, TOKEN) as child:
        d = kv_pb2_grpc.DecodeWorkerStub(make_channel(child.address))
        prompt = prompts([12], seed=1)[0]
        reserve(d, "x-proc-pool", len(prompt))
        sink = PoolKVSink(decode_stub(child.address), "x-proc-pool", TOKEN, timeout_s=10)
        with pytest.raises(TransferError, match="not on CUDA"):
            pe.prefill("x-proc-pool", prompt, sink)
        s = wait_pool_free(d, timeout=5)
        assert s.num_free_blocks == s.num_blocks and s.num_failed == 1 and s.num_held_blocks == 0
