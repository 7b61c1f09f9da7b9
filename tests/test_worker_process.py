"""Both workers in spawned children (``colm.spawn.WorkerProcess``: ``PrefillProcess``, ``DecodeProcess``), the
client in this process, as the hand-off benchmark runs them: greedy tokens over real gRPC equal ``colm generate``
at every scale; ``call`` runs a function on the child's engine while it serves, and a call that raises reports
the child's traceback and leaves the worker serving; an unknown role is refused."""

from __future__ import annotations

import threading

import pytest

from colm.decode_worker.spawn import DecodeProcess
from colm.generate import generate
from colm.prefill_worker.spawn import PrefillProcess
from colm.proto import load_proto
from colm.proto.rpc import auth_metadata, make_channel
from colm.sampling import SamplingParams
from colm.spawn import WorkerProcess
from _engine_helpers import (TOKEN, decode_engine_from, engine_call_fails, engine_num_params, prefill_engine_from,
                             prompts, save_tiny_air, wait_pool_free)

kv_pb2, kv_pb2_grpc = load_proto("kv")
MD = auth_metadata(TOKEN)


def generate_remote(d, p, decode_address, rid, prompt, scale, max_new=5):
    d.Reserve(kv_pb2.ReserveRequest(request_id=rid, prompt_len=len(prompt), max_new_tokens=max_new), metadata=MD,
              timeout=10)
    replies = []
    th = threading.Thread(target=lambda: replies.append(p.Prefill(kv_pb2.PrefillRequest(
        request_id=rid, token_ids=prompt, decode_address=decode_address, path="grpc"), metadata=MD, timeout=30)))
    th.start()
    req = kv_pb2.StartGenerationRequest(request_id=rid, last_token_id=prompt[-1], scale=scale,
                                        sampling=kv_pb2.DecodeSampling(max_new_tokens=max_new, ignore_eos=True))
    toks = [e.token_id for e in d.StartGeneration(req, metadata=MD, timeout=30)]
    th.join()
    return toks, replies[0]


def test_both_workers_in_children(tmp_path):
    full = save_tiny_air(tmp_path)
    with PrefillProcess(prefill_engine_from, (str(tmp_path),), TOKEN) as pc, \
            DecodeProcess(decode_engine_from, (str(tmp_path),), TOKEN) as dc:
        assert pc.pid != dc.pid
        d = kv_pb2_grpc.DecodeWorkerStub(make_channel(dc.address))
        p = kv_pb2_grpc.PrefillWorkerStub(make_channel(pc.address))
        params = SamplingParams(max_new_tokens=5, ignore_eos=True)
        for i, prompt in enumerate(prompts([9, 30], seed=4)):  # 30 tokens: two prefill chunks
            for scale in range(1, full.cfg.num_chains + 1):
                toks, reply = generate_remote(d, p, dc.address, f"w{i}-{scale}", prompt, scale)
                assert toks == generate(full, prompt, params, scale=scale).token_ids, (i, scale)
                assert reply.num_tokens == len(prompt) - 1 and reply.path == "grpc"
        # the prefill child holds chain 1 only; the decode child every chain
        assert pc.call(engine_num_params) < sum(t.numel() for t in full.parameters())
        with pytest.raises(RuntimeError, match="engine_call_fails failed:(.|\n)*ValueError: boom"):
            pc.call(engine_call_fails, "boom")
        toks, _ = generate_remote(d, p, dc.address, "after-failed-call", prompts([7], seed=5)[0], 1)
        assert len(toks) == 5
        s = wait_pool_free(d)
        assert s.num_free_blocks == s.num_blocks


def test_unknown_role():
    with pytest.raises(ValueError, match="role='router'"):
        WorkerProcess("router", prefill_engine_from)
