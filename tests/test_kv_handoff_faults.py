"""Fault cases of the KV hand-off over real gRPC: each gives its documented status, both workers keep
serving, and the decode pool is fully free afterwards."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import zlib

import grpc
import numpy as np
import pytest

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.decode_worker.service import DecodeServer
from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.service import PrefillServer
from colm.proto import load_proto
from colm.proto.rpc import auth_metadata, make_channel
from colm.proto.token_ids import pack_token_ids
from _engine_helpers import TOKEN, assert_pool_free, prompts, save_tiny_air

kv_pb2, kv_pb2_grpc = load_proto("kv")
MD = auth_metadata(TOKEN)
S = grpc.StatusCode


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_faults")
    full = save_tiny_air(path)
    decode = DecodeServer(DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=32, block_size=4, kv_timeout_s=5)),
                          TOKEN).start()
    prefill = PrefillServer(PrefillEngine.from_checkpoint(path), TOKEN).start()
    d = kv_pb2_grpc.DecodeWorkerStub(make_channel(decode.address))
    p = kv_pb2_grpc.PrefillWorkerStub(make_channel(prefill.address))
    yield full.cfg, decode, d, p
    prefill.stop(), decode.stop()


def code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def header(cfg, rid, n):
    return kv_pb2.KVMessage(header=kv_pb2.KVHeader(request_id=rid, num_layers=cfg.n_layers, num_tokens=n,
                                                   num_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                                                   dtype="float32", checksum="crc32"))


def chunk(cfg, seq, t0, t1, layer=0, corrupt=False):
    arr = np.random.default_rng(seq).standard_normal((1, t1 - t0, 2, cfg.n_kv_heads, cfg.head_dim)).astype(np.float32)
    data = arr.tobytes()
    crc = zlib.crc32(data)
    if corrupt:
        data = bytes([data[0] ^ 0xFF]) + data[1:]
    return kv_pb2.KVMessage(chunk=kv_pb2.KVChunk(seq=seq, layer_start=layer, layer_end=layer + 1, token_start=t0,
                                                 token_end=t1, dtype="float32", shape=list(arr.shape), data=data,
                                                 nbytes=len(data), crc32=crc))


def reserve(d, rid, prompt_len=9, max_new=4):
    d.Reserve(kv_pb2.ReserveRequest(request_id=rid, prompt_len=prompt_len, max_new_tokens=max_new), metadata=MD, timeout=5)


def start(d, rid, scale=1, max_new=4, kv_timeout_s=0.0):
    req = kv_pb2.StartGenerationRequest(request_id=rid, last_token_id=3, scale=scale, kv_timeout_s=kv_timeout_s,
                                        sampling=kv_pb2.DecodeSampling(max_new_tokens=max_new))
    return d.StartGeneration(req, metadata=MD, timeout=10)




def wait_started(engine, rid, timeout_s=10.0):
    """Until the decode engine has taken ``rid``'s Start (the stream's call is sent when ``start`` returns, but its
    handler may not have run yet: a push failing first would leave the Start nothing to find)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with engine._wake:
            try:
                if engine._get(rid).started:
                    return
            except Exception:  # not reserved (yet): keep waiting
                pass
        time.sleep(0.002)
    raise AssertionError(f"{rid}: the decode engine never took its Start")


def test_corrupted_chunk_truncated_stream_and_wrong_tokens(cluster):
    cfg, decode, d, _ = cluster
    cases = {
        "corrupt": [chunk(cfg, 0, 0, 8, corrupt=True)],
        "truncated": [chunk(cfg, 0, 0, 8)],                 # no KVEnd
        "out-of-range": [chunk(cfg, 0, 4, 12)],             # tokens beyond the prompt's 8
        "gap": [chunk(cfg, 1, 0, 8)],                        # seq 1 before seq 0
    }
    for name, chunks in cases.items():
        rid = f"fault-{name}"
        reserve(d, rid)
        stream = start(d, rid)
        wait_started(decode.engine, rid)
        assert code_of(lambda: d.PushKV(iter([header(cfg, rid, 8), *chunks]), metadata=MD, timeout=5)) == S.DATA_LOSS
        assert code_of(lambda: list(stream)) == S.DATA_LOSS, name
        assert_pool_free(decode.engine)
    # wrong token count in the header, and a KVEnd before every cell arrived
    reserve(d, "fault-count")
    assert code_of(lambda: d.PushKV(iter([header(cfg, "fault-count", 5)]), metadata=MD, timeout=5)) == S.DATA_LOSS
    reserve(d, "fault-short")
    msgs = [header(cfg, "fault-short", 8), chunk(cfg, 0, 0, 8), kv_pb2.KVMessage(end=kv_pb2.KVEnd(num_chunks=1))]
    assert code_of(lambda: d.PushKV(iter(msgs), metadata=MD, timeout=5)) == S.DATA_LOSS
    # a last token outside the vocabulary
    reserve(d, "fault-token", prompt_len=1)
    req = kv_pb2.StartGenerationRequest(request_id="fault-token", last_token_id=10**6,
                                        sampling=kv_pb2.DecodeSampling(max_new_tokens=2))
    assert code_of(lambda: list(d.StartGeneration(req, metadata=MD, timeout=5))) == S.INVALID_ARGUMENT
    assert_pool_free(decode.engine)


def test_pool_full_unknown_id_bad_scale(cluster):
    cfg, decode, d, _ = cluster
    assert code_of(lambda: reserve(d, "huge", prompt_len=100, max_new=100)) == S.RESOURCE_EXHAUSTED
    reserve(d, "fill", prompt_len=100, max_new=20)  # 30 of 32 blocks
    assert code_of(lambda: reserve(d, "more", prompt_len=10, max_new=5)) == S.RESOURCE_EXHAUSTED
    assert d.Abort(kv_pb2.AbortRequest(request_id="fill"), metadata=MD, timeout=5).found
    assert_pool_free(decode.engine)
    assert code_of(lambda: list(start(d, "ghost"))) == S.NOT_FOUND
    assert code_of(lambda: d.SetScale(kv_pb2.SetScaleRequest(request_id="ghost", scale=1), metadata=MD, timeout=5)) == S.NOT_FOUND
    assert code_of(lambda: d.PushKV(iter([header(cfg, "ghost", 3)]), metadata=MD, timeout=5)) == S.NOT_FOUND
    assert not d.Abort(kv_pb2.AbortRequest(request_id="ghost"), metadata=MD, timeout=5).found
    reserve(d, "badscale", prompt_len=1)
    assert code_of(lambda: list(start(d, "badscale", scale=7))) == S.INVALID_ARGUMENT
    reserve(d, "badscale2", prompt_len=1, max_new=30)
    stream = start(d, "badscale2", max_new=30)
    assert code_of(lambda: d.SetScale(kv_pb2.SetScaleRequest(request_id="badscale2", scale=9), metadata=MD, timeout=5)) == S.INVALID_ARGUMENT
    assert len(list(stream)) >= 1  # the request itself goes on
    assert_pool_free(decode.engine)


def test_kv_never_arrives_and_dead_decode_peer(cluster):
    cfg, decode, d, p = cluster
    reserve(d, "late")
    assert code_of(lambda: list(start(d, "late", kv_timeout_s=0.5))) == S.DEADLINE_EXCEEDED
    assert_pool_free(decode.engine)
    dead = kv_pb2.PrefillRequest(request_id="nowhere", token_ids=prompts([6])[0], decode_address="127.0.0.1:1")
    assert code_of(lambda: p.Prefill(dead, metadata=MD, timeout=20)) == S.UNAVAILABLE
    # both workers still serve
    ok = kv_pb2.PrefillRequest(request_id="after", token_ids=prompts([6])[0], decode_address=decode.address)
    reserve(d, "after", prompt_len=6)
    assert p.Prefill(ok, metadata=MD, timeout=20).num_tokens == 5
    assert len(list(start(d, "after"))) == 4
    assert_pool_free(decode.engine)


def test_packed_token_ids_and_their_errors(cluster):
    """The prompt as token_ids_u32 (as the router sends it) hands over like the repeated field; both fields set, a
    byte count not a multiple of 4 and an id beyond the vocabulary each fail alone with INVALID_ARGUMENT."""
    cfg, decode, d, p = cluster
    prompt = prompts([9])[0]
    reserve(d, "packed", prompt_len=9)
    ok = kv_pb2.PrefillRequest(request_id="packed", token_ids_u32=pack_token_ids(prompt), decode_address=decode.address)
    assert p.Prefill(ok, metadata=MD, timeout=20).num_tokens == 8
    assert len(list(start(d, "packed"))) == 4
    bad = {  # request id -> (fields, what the error says)
        "both": (dict(token_ids=prompt, token_ids_u32=pack_token_ids(prompt)), "not both"),
        "ragged": (dict(token_ids_u32=pack_token_ids(prompt)[:-1]), "4 bytes"),
        "vocab": (dict(token_ids_u32=pack_token_ids([1, cfg.vocab_size, 2])), f"0..{cfg.vocab_size - 1}"),
    }
    for rid, (fields, says) in bad.items():
        reserve(d, rid, prompt_len=9)
        req = kv_pb2.PrefillRequest(request_id=rid, decode_address=decode.address, **fields)
        with pytest.raises(grpc.RpcError) as e:
            p.Prefill(req, metadata=MD, timeout=20)
        assert e.value.code() == S.INVALID_ARGUMENT, rid
        assert says in e.value.details(), (rid, e.value.details())
        d.Abort(kv_pb2.AbortRequest(request_id=rid), metadata=MD, timeout=5)
    assert_pool_free(decode.engine)
    with pytest.raises(ValueError, match="0..4294967295"):
        pack_token_ids([1, -1])


SENDER = textwrap.dedent("""
    import sys, time, zlib
    sys.path[:0] = {paths!r}
    import numpy as np
    from colm.proto import load_proto
    from colm.proto.rpc import auth_metadata, make_channel
    kv_pb2, kv_pb2_grpc = load_proto("kv")
    d = kv_pb2_grpc.DecodeWorkerStub(make_channel(sys.argv[1]))
    def msgs():
        yield kv_pb2.KVMessage(header=kv_pb2.KVHeader(request_id="killed", num_layers={L}, num_tokens=8,
                               num_kv_heads={H}, head_dim={D}, dtype="float32", checksum="none"))
        arr = np.ones((1, 4, 2, {H}, {D}), np.float32)
        yield kv_pb2.KVMessage(chunk=kv_pb2.KVChunk(seq=0, layer_start=0, layer_end=1, token_start=0, token_end=4,
                               dtype="float32", shape=list(arr.shape), data=arr.tobytes(), nbytes=arr.nbytes))
        print("sent", flush=True)
        time.sleep(60)
    d.PushKV(msgs(), metadata=auth_metadata({token!r}), timeout=60)
""")


def test_prefill_killed_mid_stream(cluster):
    cfg, decode, d, _ = cluster
    reserve(d, "killed")
    stream = start(d, "killed")
    src = SENDER.format(paths=sys.path, L=cfg.n_layers, H=cfg.n_kv_heads, D=cfg.head_dim, token=TOKEN)
    proc = subprocess.Popen([sys.executable, "-c", src, decode.address], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "sent"
        time.sleep(0.3)
        assert decode.engine.pool.num_free < decode.engine.pool.num_blocks  # blocks held mid-transfer
        proc.kill()
    finally:
        proc.wait(10)
    assert code_of(lambda: list(stream)) in (S.DATA_LOSS, S.UNAVAILABLE)
    assert_pool_free(decode.engine)
