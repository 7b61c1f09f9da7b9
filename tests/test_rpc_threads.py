"""Worker gRPC servers never starve their short calls: a decode worker holds one thread per running
StartGeneration stream and per PushKV stream, so with more requests waiting for their KV than a fixed
pool has threads, the KV streams that would release them could not be served (and Stats timed out).
The pools are sized from the engines' own bounds (reservations, queue)."""

from __future__ import annotations

import threading
import time

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.decode_worker.service import DecodeServer
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.kv_push import GrpcKVSink, decode_stub
from colm.prefill_worker.service import PrefillServer
from colm.proto import load_proto
from colm.proto.rpc import auth_metadata, make_channel
from _engine_helpers import TOKEN, prompts, save_tiny_air

kv_pb2, kv_pb2_grpc = load_proto("kv")
MD = auth_metadata(TOKEN)


def test_more_waiting_streams_than_a_fixed_pool_still_complete(tmp_path):
    save_tiny_air(tmp_path)
    n = 64  # 64 StartGeneration streams waiting, then their PushKV streams: more than the 64 threads the server had
    de = DecodeEngine.from_checkpoint(tmp_path, DecodeConfig(num_blocks=4 * n + 8, block_size=4, max_reservations=n,
                                                             kv_timeout_s=20))
    decode = DecodeServer(de, TOKEN).start()
    assert decode.max_workers >= 2 * n
    pe = PrefillEngine.from_checkpoint(tmp_path, PrefillConfig(chunk_size=16, max_batch_size=4, max_queue=n))
    d = kv_pb2_grpc.DecodeWorkerStub(make_channel(decode.address))
    stub = decode_stub(decode.address)
    ps = prompts([9] * n, seed=1)
    tokens, errors = {}, []

    def generate(i):
        try:
            req = kv_pb2.StartGenerationRequest(request_id=f"r{i}", last_token_id=ps[i][-1],
                                                sampling=kv_pb2.DecodeSampling(max_new_tokens=2, ignore_eos=True))
            tokens[i] = [e.token_id for e in d.StartGeneration(req, metadata=MD, timeout=30)]
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    try:
        for i in range(n):
            d.Reserve(kv_pb2.ReserveRequest(request_id=f"r{i}", prompt_len=9, max_new_tokens=2), metadata=MD, timeout=5)
        threads = [threading.Thread(target=generate, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # every stream is waiting for its KV, each on a server thread
        sinks = [GrpcKVSink(stub, f"r{i}", TOKEN, chunk_bytes=64) for i in range(n)]
        futures = [pe.submit(f"r{i}", ps[i], sinks[i]) for i in range(n)]
        pe.start()
        t0 = time.monotonic()
        stats = d.Stats(kv_pb2.DecodeStatsRequest(), metadata=MD, timeout=5)  # answers while all streams run
        assert time.monotonic() - t0 < 5 and stats.num_blocks == 4 * n + 8
        for f in futures:
            f.result(timeout=30)
        for t in threads:
            t.join(30)
        assert not errors, errors[:3]
        assert len(tokens) == n and all(len(v) == 2 for v in tokens.values())
    finally:
        pe.stop()
        decode.stop()


def test_prefill_server_threads_cover_its_queue(tmp_path):
    save_tiny_air(tmp_path)
    pe = PrefillEngine.from_checkpoint(tmp_path, PrefillConfig(max_queue=100, max_batch_size=8))
    assert PrefillServer(pe, TOKEN).max_workers >= 100 + 2 * 8
    assert PrefillServer(pe, TOKEN, max_workers=7).max_workers == 7
