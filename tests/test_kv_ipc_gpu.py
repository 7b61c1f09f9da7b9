"""The cuda_ipc and cuda_pool hand-offs on a GPU (skipped without CUDA). Prefill serves from this process;
decode runs in spawned children (``DecodeProcess``: CUDA IPC cannot open a handle in the process that made
it), both on the same GPU. Greedy tokens equal ``colm.generate`` (float32) at both scales, for both paths
(cuda_pool: prefill writes into the child's pool, opened once through CUDA IPC) and with ``path="auto"``; a decode child killed mid-stream fails only that request with UNAVAILABLE, prefill's
staging memory goes back, and prefill keeps serving another decode child over cuda_ipc."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from colm import checkpoint, kv_ipc
from colm.decode_worker.spawn import DecodeProcess
from colm.generate import generate
from colm.kv import registry
from colm.prefill_worker.config import PrefillConfig
from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.service import PrefillServer
from colm.proto import load_proto
from colm.proto.rpc import auth_metadata, make_channel
from colm.sampling import SamplingParams
from _engine_helpers import TOKEN, decode_engine_from, prompts, save_tiny_air, wait_pool_free

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

kv_pb2, kv_pb2_grpc = load_proto("kv")
MD = auth_metadata(TOKEN)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_ipc_gpu")
    save_tiny_air(path)
    full = checkpoint.load(path, scale=None, device="cuda", dtype=torch.float32)
    pe = PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=16, max_batch_tokens=64), device="cuda",
                                       dtype=torch.float32)
    prefill = PrefillServer(pe, TOKEN).start()
    p = kv_pb2_grpc.PrefillWorkerStub(make_channel(prefill.address))
    yield str(path), full, pe, p
    prefill.stop()


@pytest.fixture(scope="module")
def graphed(tmp_path_factory):
    """A prefill worker whose prompt batches (up to 64 tokens, one chunk) replay CUDA graphs."""
    path = tmp_path_factory.mktemp("tiny_air_ipc_gpu_graphed")
    save_tiny_air(path)
    full = checkpoint.load(path, scale=None, device="cuda", dtype=torch.float32)
    # lengths padded to 16 (not 256): every batch of at most 64 prompt tokens in one chunk fits a graph of 256 tokens
    # but those of 5 or more prompts (8 graph rows)
    pe = PrefillEngine.from_checkpoint(path, PrefillConfig(chunk_size=64, max_batch_tokens=64, cuda_graph_tokens=256,
                                                           length_bucket=16), device="cuda", dtype=torch.float32)
    prefill = PrefillServer(pe, TOKEN).start()
    p = kv_pb2_grpc.PrefillWorkerStub(make_channel(prefill.address))
    yield str(path), full, pe, p
    prefill.stop()


def decode_child(path, write_delay_s=0.0, kv_ready_wait="host"):
    return DecodeProcess(decode_engine_from, (path, "cuda", "float32", 256, 4, write_delay_s, 2.0, kv_ready_wait), TOKEN)


def run_request(d, p, address, rid, prompt, scale, max_new=8, path="cuda_ipc"):
    r = d.Reserve(kv_pb2.ReserveRequest(request_id=rid, prompt_len=len(prompt), max_new_tokens=max_new), metadata=MD,
                  timeout=10)
    assert r.cuda_kv
    reply = {}

    def prefill():
        reply["r"] = p.Prefill(kv_pb2.PrefillRequest(request_id=rid, token_ids=prompt, decode_address=address,
                                                     same_host=True, path=path, decode_cuda=r.cuda_kv,
                                                     decode_transports=r.transports),
                               metadata=MD, timeout=60)

    th = threading.Thread(target=prefill)
    th.start()
    req = kv_pb2.StartGenerationRequest(request_id=rid, last_token_id=prompt[-1], scale=scale,
                                        sampling=kv_pb2.DecodeSampling(max_new_tokens=max_new, ignore_eos=True))
    events = list(d.StartGeneration(req, metadata=MD, timeout=120))
    th.join()
    return [ev.token_id for ev in events], reply["r"], dict(events[0].timeline_ms)  # decode's milestones


def concurrent_requests(d, p, address, path, batch, prefix) -> dict:
    """Every prompt of ``batch`` at scales 1 and 2, all in flight together: {request id: (prompt, scale,
    run_request's result)}."""
    results, threads = {}, []
    for i, prompt in enumerate(batch):
        for scale in (1, 2):
            rid = f"{prefix}-{i}-{scale}"

            def one(rid=rid, prompt=prompt, scale=scale):
                results[rid] = (prompt, scale, run_request(d, p, address, rid, prompt, scale, path=path))

            threads.append(threading.Thread(target=one))
            threads[-1].start()
    for th in threads:
        th.join()
    assert len(results) == 2 * len(batch)
    return results


def reference(full, prompt, scale, max_new=8):
    return generate(full, prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True), scale=scale).token_ids




@pytest.mark.parametrize("hand_off,ready_wait", [("cuda_ipc", "host"), ("cuda_pool", "host"), ("cuda_pool", "sender"),
                                                ("nixl", "host")])
def test_cuda_ipc_across_processes_matches_reference(setup, hand_off, ready_wait):
    """cuda_pool runs with each ``DecodeConfig.kv_ready_wait``: "host" takes the sender's KVEnd with a CUDA IPC ready
    event, which decode polls before admitting the request; with "sender" the sender waits for its writes first.
    nixl: VRAM -> VRAM WRITEs from prefill's device send buffer into the child's pool, wsum32 checked on the GPU."""
    if hand_off == "nixl" and not registry.get("nixl").importable():
        pytest.skip("nixl not importable")
    path, full, _, p = setup
    with decode_child(path, kv_ready_wait=ready_wait) as child:
        d = kv_pb2_grpc.DecodeWorkerStub(make_channel(child.address))
        results = concurrent_requests(d, p, child.address, hand_off, prompts([2, 19, 33, 57], seed=11), hand_off)
        for rid, (prompt, scale, (tokens, reply, timeline)) in results.items():
            assert tokens == reference(full, prompt, scale), rid
            assert reply.path == hand_off and reply.num_tokens == len(prompt) - 1
            if hand_off == "cuda_pool" and len(prompt) > 1:  # "host": the ready event came and decode polled it
                assert ("kv_ready" in timeline) == (ready_wait == "host"), (rid, timeline)
        if hand_off == "nixl":
            from colm.kv.nixl import endpoint

            assert endpoint("prefill").buf.is_cuda  # the send buffer the writes came from lies on the GPU
        prompt = prompts([40], seed=3)[0]
        tokens, reply, _ = run_request(d, p, child.address, f"{hand_off}-auto", prompt, 2, path="auto")
        assert reply.path == "cuda_pool" and tokens == reference(full, prompt, 2)
        s = wait_pool_free(d)
        assert s.num_free_blocks == s.num_blocks and s.num_failed == 0
    assert not kv_ipc._local


def test_decode_child_killed_mid_stream(setup):
    path, full, pe, p = setup
    with decode_child(path) as healthy:
        d = kv_pb2_grpc.DecodeWorkerStub(make_channel(healthy.address))
        warm = prompts([30], seed=5)[0]
        assert run_request(d, p, healthy.address, "warm", warm, 1)[0] == reference(full, warm, 1)
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        failed_before = pe.stats().num_failed

        slow = decode_child(path, write_delay_s=0.25)  # 2 layers x 8 chunks of 16 tokens: ~4 s of writes
        try:
            ds = kv_pb2_grpc.DecodeWorkerStub(make_channel(slow.address))
            prompt = prompts([129], seed=6)[0]
            ds.Reserve(kv_pb2.ReserveRequest(request_id="doomed", prompt_len=len(prompt), max_new_tokens=4),
                       metadata=MD, timeout=10)
            err = {}

            def prefill():
                try:
                    p.Prefill(kv_pb2.PrefillRequest(request_id="doomed", token_ids=prompt, decode_address=slow.address,
                                                    path="cuda_ipc"), metadata=MD, timeout=60)
                except grpc.RpcError as e:
                    err["e"] = e

            th = threading.Thread(target=prefill)
            th.start()
            end = time.monotonic() + 30
            while not kv_ipc._local and time.monotonic() < end:  # the staging tensor exists: the stream is open
                time.sleep(0.005)
            assert kv_ipc._local, "the cuda_ipc request never started"
            time.sleep(0.5)  # decode is inside its (slowed) chunk writes
            slow.kill()
            th.join(60)
        finally:
            slow.stop()
        assert "e" in err, "the request should fail when its decode worker dies"
        assert err["e"].code() == grpc.StatusCode.UNAVAILABLE, err["e"].details()
        assert pe.stats().num_failed == failed_before + 1
        end = time.monotonic() + 5  # the staging tensor goes back to the caching allocator (no IPC limbo)
        while (kv_ipc._local or torch.cuda.memory_allocated() > allocated) and time.monotonic() < end:
            time.sleep(0.05)
        assert not kv_ipc._local
        assert torch.cuda.memory_allocated() <= allocated

        again = prompts([45], seed=8)[0]  # prefill keeps serving over cuda_ipc
        tokens, reply, _ = run_request(d, p, healthy.address, "after-kill", again, 2)
        assert reply.path == "cuda_ipc" and tokens == reference(full, again, 2)
        assert wait_pool_free(d).num_failed == 0


@pytest.mark.parametrize("hand_off", ["cuda_pool", "nixl"])
def test_graphed_prefill_hands_over_through_each_transport(graphed, hand_off):
    """Prompts prefilled by graph replays: the cuda_pool sink gets a copy of the graph's static buffer, the nixl sink
    (``copies_at_put``) the buffer itself, copied into its send region before the next replay. Greedy tokens equal
    ``colm generate`` at both scales, prompts in flight together, the pool free afterwards."""
    if hand_off == "nixl" and not registry.get("nixl").importable():
        pytest.skip("nixl not importable")
    path, full, pe, p = graphed
    replays = pe.graphs.num_replays
    with decode_child(path) as child:
        d = kv_pb2_grpc.DecodeWorkerStub(make_channel(child.address))
        results = concurrent_requests(d, p, child.address, hand_off, prompts([5, 30, 47, 60], seed=13),
                                      f"graphed-{hand_off}")
        for rid, (prompt, scale, (tokens, reply, _)) in results.items():
            assert tokens == reference(full, prompt, scale), rid
            assert reply.path == hand_off
        s = wait_pool_free(d)
        assert s.num_free_blocks == s.num_blocks and s.num_failed == 0
    assert pe.graphs.num_replays > replays  # the prompts ran from graphs
