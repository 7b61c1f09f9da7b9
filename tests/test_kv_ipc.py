"""The cuda_ipc hand-off path on any machine: path selection, the new header fields on the wire, the
``IpcKVSink`` protocol end to end with decode in the same process (the staging tensor is then read
directly), and the documented errors: cuda_ipc without CUDA on prefill (INVALID_ARGUMENT), a handle
decode cannot use (DATA_LOSS, or INVALID_ARGUMENT when decode has no CUDA), a sender in another
process whose staging is not on CUDA (DATA_LOSS, decode in a spawned child). Decode's blocks are
freed after every failure."""

from __future__ import annotations

import socket
import threading

import grpc
import pytest
import torch

from colm import kv_ipc
from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.decode_worker.service import DecodeServer, read_kv_message
from colm.decode_worker.spawn import DecodeProcess
from colm.generate import generate
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.ipc_sink import IpcKVSink
from colm.prefill_worker.kv_push import decode_stub
from colm.prefill_worker.paths import choose_path
from colm.prefill_worker.service import PrefillServer
from colm.proto import load_proto
from colm.proto.rpc import auth_metadata, make_channel
from colm.sampling import SamplingParams
from _engine_helpers import TOKEN, assert_pool_free, decode_engine_from, prompts, save_tiny_air, wait_pool_free

kv_pb2, kv_pb2_grpc = load_proto("kv")
MD = auth_metadata(TOKEN)
S = grpc.StatusCode


@pytest.mark.parametrize("path,same_host,prefill_cuda,decode_cuda,want", [
    ("", False, True, True, "grpc"), ("", True, True, True, "shm"),            # old requests: as before
    ("auto", True, True, True, "cuda_pool"), ("auto", True, False, True, "shm"), ("auto", True, True, False, "shm"),
    ("auto", False, True, True, "grpc"), ("grpc", True, True, True, "grpc"), ("shm", False, False, False, "shm"),
    ("cuda_ipc", True, True, False, "cuda_ipc"), ("cuda_ipc", False, True, True, "cuda_ipc"),
])
def test_choose_path(path, same_host, prefill_cuda, decode_cuda, want):
    assert choose_path(path, same_host, prefill_cuda, decode_cuda) == want


def test_choose_path_errors():
    with pytest.raises(ValueError, match="needs the prefill worker on CUDA"):
        choose_path("cuda_ipc", True, False, True)
    with pytest.raises(ValueError, match="allowed are"):
        choose_path("nvlink", True, True, True)


def test_header_and_request_fields_round_trip():
    h = kv_pb2.KVHeader(request_id="r", num_layers=2, num_tokens=5, num_kv_heads=2, head_dim=8, dtype="bfloat16",
                        checksum="none", ipc_process="h:12:ab", ipc_key="k" * 32, ipc_handle=bytes(range(66)),
                        ipc_device=3, ipc_device_uuid="GPU-1234", ipc_offset_bytes=2**33, ipc_size_bytes=2**34 + 7)
    got = read_kv_message(kv_pb2.KVMessage(header=h).SerializeToString())  # decode's PushKV deserialiser
    assert got.WhichOneof("kind") == "header" and got.header == h
    assert got.header.ipc_handle == bytes(range(66)) and got.header.ipc_size_bytes == 2**34 + 7
    old = kv_pb2.KVHeader(request_id="r", shm_name="seg", checksum="crc32")  # a header of the old schema
    assert kv_pb2.KVHeader.FromString(old.SerializeToString()).ipc_process == ""
    r = kv_pb2.PrefillRequest(request_id="r", token_ids=[1, 2], same_host=True, path="auto", decode_cuda=True)
    assert kv_pb2.PrefillRequest.FromString(r.SerializeToString()) == r
    assert kv_pb2.ReserveReply.FromString(kv_pb2.ReserveReply(cuda_kv=True).SerializeToString()).cuda_kv


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_ipc")
    full = save_tiny_air(path)
    decode = DecodeServer(DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=128, block_size=4)), TOKEN).start()
    pe = PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=16, kv_chunk_bytes=512))
    prefill = PrefillServer(pe, TOKEN).start()
    d = kv_pb2_grpc.DecodeWorkerStub(make_channel(decode.address))
    p = kv_pb2_grpc.PrefillWorkerStub(make_channel(prefill.address))
    yield path, full, decode, pe, d, p
    prefill.stop(), decode.stop()


def code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()




def reserve(d, rid, n, max_new=6):
    return d.Reserve(kv_pb2.ReserveRequest(request_id=rid, prompt_len=n, max_new_tokens=max_new), metadata=MD, timeout=5)


def run_in_process(cluster, rid, prompt, scale=2, max_new=6, chunk_layers=1, sinks=None):
    _, full, decode, pe, d, _ = cluster
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    assert not reserve(d, rid, len(prompt), max_new).cuda_kv
    sink = IpcKVSink(decode_stub(decode.address), rid, TOKEN, "cpu", chunk_layers=chunk_layers)
    if sinks is not None:
        sinks.append(sink)
    res = {}
    th = threading.Thread(target=lambda: res.update(r=pe.prefill(rid, prompt, sink)))
    th.start()
    toks = [e.token_id for e in decode.engine.start_generation(rid, prompt[-1], params, scale=scale)]
    th.join()
    assert toks == generate(full, prompt, params, scale=scale).token_ids
    return res["r"]


def test_ipc_sink_in_one_process_gives_reference_tokens(cluster):
    """Prefill and decode in one process: the staging tensor is handed over directly (no handle to open)."""
    full, decode = cluster[1], cluster[2]
    for i, prompt in enumerate(prompts([1, 7, 40], seed=4)):  # 1 token: no KV (no staging); 40: chunked
        r = run_in_process(cluster, f"ipc-local-{i}", prompt)
        assert r.path == "cuda_ipc" and r.num_tokens == len(prompt) - 1
        assert r.num_bytes == full.cfg.n_layers * (len(prompt) - 1) * 2 * full.cfg.n_kv_heads * full.cfg.head_dim * 4
    assert not kv_ipc._local  # every staging tensor released after the ack
    assert_pool_free(decode.engine)


@pytest.mark.parametrize("chunk_layers", [0, 1, 2])
def test_ipc_signals_per_token_range_or_per_layers(cluster, chunk_layers):
    """One KVChunk per token range once all its layers are in (0), or per ``chunk_layers`` layers of it."""
    full = cluster[1]
    L = full.cfg.n_layers
    prompt = prompts([40], seed=6)[0]  # 39 tokens of K/V, chunk_size 16: token ranges of 16, 16, 7
    sinks = []
    r = run_in_process(cluster, f"ipc-signal-{chunk_layers}", prompt, chunk_layers=chunk_layers, sinks=sinks)
    per_range = 1 if chunk_layers == 0 else -(-L // chunk_layers)
    assert sinks[0]._num_chunks == 3 * per_range and r.num_tokens == 39
    with pytest.raises(ValueError, match="chunk_layers=-1"):
        IpcKVSink(None, "x", TOKEN, "cpu", chunk_layers=-1)
    with pytest.raises(ValueError, match="ipc_chunk_layers=-1"):
        PrefillConfig(ipc_chunk_layers=-1)


def test_cuda_ipc_requested_without_cuda(cluster):
    _, _, decode, pe, d, p = cluster
    prompt = prompts([9], seed=2)[0]
    reserve(d, "no-cuda", len(prompt))
    req = kv_pb2.PrefillRequest(request_id="no-cuda", token_ids=prompt, decode_address=decode.address, path="cuda_ipc")
    code, details = code_of(lambda: p.Prefill(req, metadata=MD, timeout=10))
    assert code == S.INVALID_ARGUMENT and "cuda_ipc" in details and "CUDA" in details
    req = kv_pb2.PrefillRequest(request_id="no-cuda", token_ids=prompt, decode_address=decode.address, path="nvlink")
    assert code_of(lambda: p.Prefill(req, metadata=MD, timeout=10))[0] == S.INVALID_ARGUMENT
    # "auto" on a CPU prefill worker falls back to shared memory
    req = kv_pb2.PrefillRequest(request_id="no-cuda", token_ids=prompt, decode_address=decode.address, path="auto",
                                same_host=True, decode_cuda=True)
    assert p.Prefill(req, metadata=MD, timeout=10).path == "shm"
    d.Abort(kv_pb2.AbortRequest(request_id="no-cuda"), metadata=MD, timeout=5)
    assert_pool_free(decode.engine)


def ipc_header(cfg, rid, n, **fields):
    return kv_pb2.KVMessage(header=kv_pb2.KVHeader(request_id=rid, num_layers=cfg.n_layers, num_tokens=n,
                                                   num_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, dtype="float32",
                                                   checksum="none", **fields))


def test_unusable_handle_fails_only_that_request(cluster):
    _, full, decode, _, d, _ = cluster
    cfg = full.cfg
    nbytes = cfg.n_layers * 8 * 2 * cfg.n_kv_heads * cfg.head_dim * 4
    here = socket.gethostname()
    cases = {  # name: (header fields, status)
        # another process of this host with a handle: INVALID_ARGUMENT without CUDA here; with CUDA the bogus
        # handle cannot be opened: DATA_LOSS
        "bogus-handle": (dict(ipc_process=f"{here}:1:x", ipc_key="k", ipc_handle=b"\x01" * 66, ipc_size_bytes=nbytes),
                         S.DATA_LOSS if torch.cuda.is_available() else S.INVALID_ARGUMENT),
        "other-host": (dict(ipc_process="elsewhere:1:x", ipc_key="k", ipc_handle=b"\x01" * 66, ipc_size_bytes=nbytes),
                       S.DATA_LOSS),
        "same-process-unknown-key": (dict(ipc_process=kv_ipc.process_id(), ipc_key="gone", ipc_size_bytes=nbytes),
                                     S.DATA_LOSS),
        "too-small": (dict(ipc_process=kv_ipc.process_id(), ipc_key="gone", ipc_size_bytes=nbytes - 4), S.DATA_LOSS),
    }
    for name, (fields, status) in cases.items():
        rid = f"bad-{name}"
        reserve(d, rid, 9)
        code, details = code_of(lambda: d.PushKV(iter([ipc_header(cfg, rid, 8, **fields)]), metadata=MD, timeout=5))
        assert code == status, (name, details)
        assert rid in details
        assert_pool_free(decode.engine)
    run_in_process(cluster, "after-bad", prompts([11], seed=9)[0], scale=1)  # decode still serves
    assert_pool_free(decode.engine)


def test_sender_in_another_process_without_cuda_staging(cluster):
    """Decode in a spawned child: a CPU staging tensor cannot cross processes -> DATA_LOSS, child's pool freed."""
    path, _, _, pe, _, _ = cluster
    with DecodeProcess(decode_engine_from, (str(path),), TOKEN) as child:
        d = kv_pb2_grpc.DecodeWorkerStub(make_channel(child.address))
        prompt = prompts([12], seed=1)[0]
        reserve(d, "x-proc", len(prompt))
        sink = IpcKVSink(decode_stub(child.address), "x-proc", TOKEN, "cpu", timeout_s=10)
        with pytest.raises(grpc.RpcError) as e:
            pe.prefill("x-proc", prompt, sink)
        assert e.value.code() == S.DATA_LOSS and "not on CUDA" in e.value.details()
        s = wait_pool_free(d, timeout=5)
        assert s.num_free_blocks == s.num_blocks and s.num_failed == 1
    assert not kv_ipc._local
