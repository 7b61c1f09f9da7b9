"""The nixl transport between two processes (CPU, DRAM over UCX): greedy tokens equal ``colm generate`` at every
scale through worker processes and the router, and its faults (sender killed, receiver killed, a range that never
arrives, a corrupted range) fail the request with the documented status within its deadline, leave the decode pool
(nothing held) and prefill's NIXL send arena fully free, and both workers keep serving. Skipped where nixl does not import."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from colm.kv import registry

pytestmark = pytest.mark.skipif(not registry.get("nixl").importable(),
                                reason="nixl not importable (pip install 'colm[nixl]')")

from colm.errors import PeerUnavailableError, TransferError  # noqa: E402
from colm.generate import generate  # noqa: E402
from colm.kv_wire import KVLayout  # noqa: E402
from colm.prefill_worker.kv_push import decode_stub  # noqa: E402
from colm.proto import load_proto  # noqa: E402
from colm.proto.rpc import auth_metadata, make_channel  # noqa: E402
from colm.sampling import SamplingParams  # noqa: E402
from _engine_helpers import (TOKEN, assert_pool_free, prompts, save_tiny_air, wait_pool_free,  # noqa: E402
                             worker_servers)

kv_pb2, kv_pb2_grpc = load_proto("kv")
MD = auth_metadata(TOKEN)
S = grpc.StatusCode
HERE = Path(__file__).resolve().parent
GRACE_S = 0.3


def arena_free(role: str, timeout: float = 5.0) -> bool:
    from colm.kv.nixl import arena_free_bytes

    end = time.monotonic() + timeout
    while True:
        got = arena_free_bytes(role)
        if got is None or got[0] == got[1]:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_air_nixl")
    full = save_tiny_air(path)
    with worker_servers(path, GRACE_S) as (decode, d, p, _):
        yield path, full, decode, d, p


def run(d, p, decode_address, rid, prompt, scale, max_new=6, switch_at=None):
    """Reserve -> Prefill(path nixl) alongside StartGeneration; (token events, PrefillReply)."""
    rr = d.Reserve(kv_pb2.ReserveRequest(request_id=rid, prompt_len=len(prompt), max_new_tokens=max_new), metadata=MD,
                   timeout=10)
    assert "nixl" in rr.transports
    out = {}
    th = threading.Thread(target=lambda: out.update(r=p.Prefill(kv_pb2.PrefillRequest(
        request_id=rid, token_ids=prompt, decode_address=decode_address, path="nixl",
        decode_transports=rr.transports), metadata=MD, timeout=30)))
    th.start()
    events = []
    for ev in d.StartGeneration(kv_pb2.StartGenerationRequest(
            request_id=rid, last_token_id=prompt[-1], scale=scale,
            sampling=kv_pb2.DecodeSampling(max_new_tokens=max_new, ignore_eos=True)), metadata=MD, timeout=30):
        events.append(ev)
        if switch_at is not None and ev.index == switch_at:
            d.SetScale(kv_pb2.SetScaleRequest(request_id=rid, scale=3 - scale), metadata=MD, timeout=5)
    th.join()
    return events, out["r"]


def start(d, rid, kv_timeout_s=0.0):
    return d.StartGeneration(kv_pb2.StartGenerationRequest(
        request_id=rid, last_token_id=3, scale=1, kv_timeout_s=kv_timeout_s,
        sampling=kv_pb2.DecodeSampling(max_new_tokens=4)), metadata=MD, timeout=20)


def code_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


def sender(mode, address, rid, cfg, tokens=8, kind="crc32"):
    return subprocess.Popen([sys.executable, str(HERE / "_nixl_sender.py"), mode, address, rid, str(cfg.n_layers),
                             str(cfg.n_kv_heads), str(cfg.head_dim), str(tokens), kind], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def said(proc, word: str) -> bool:
    """Read the child's stdout (NIXL logs there too) until a line equal to ``word``; False at EOF."""
    for line in proc.stdout:
        if line.strip() == word:
            return True
    return False


def assert_all_free(decode):
    assert_pool_free(decode.engine)
    assert decode.engine.stats().num_held_blocks == 0
    assert arena_free("prefill")


def test_tokens_equal_reference_with_a_scale_switch(cluster):
    """In-process servers, the bytes through NIXL between two agents: mixed prompt lengths, both scales, a switch."""
    _, full, decode, d, p = cluster
    for i, prompt in enumerate(prompts([2, 9, 33, 70], seed=3)):
        for scale in (1, 2):
            events, reply = run(d, p, decode.address, f"tok-{i}-{scale}", prompt, scale)
            want = generate(full, prompt, SamplingParams(max_new_tokens=6, ignore_eos=True), scale=scale).token_ids
            assert [e.token_id for e in events] == want, (len(prompt), scale)
            assert reply.path == "nixl" and reply.num_tokens == len(prompt) - 1
    prompt = prompts([41], seed=8)[0]
    events, _ = run(d, p, decode.address, "switch", prompt, 1, max_new=10, switch_at=3)
    used = [e.scale for e in events]
    assert used[0] == 1 and used[-1] == 2
    ref = generate(full, prompt, SamplingParams(max_new_tokens=10, ignore_eos=True), scale_schedule=lambda i: used[i])
    assert [e.token_id for e in events] == ref.token_ids
    assert_all_free(decode)


def test_sender_killed_mid_transfer(cluster):
    _, full, decode, d, p = cluster
    d.Reserve(kv_pb2.ReserveRequest(request_id="killed", prompt_len=9, max_new_tokens=4), metadata=MD, timeout=5)
    stream = start(d, "killed", kv_timeout_s=60)  # the child's start (torch, nixl) may take seconds on a busy host
    proc = sender("kill", decode.address, "killed", full.cfg)
    try:
        assert said(proc, "sent")
        assert decode.engine.pool.num_free < decode.engine.pool.num_blocks  # blocks held mid-transfer
        t0 = time.monotonic()
    finally:
        proc.kill()
        proc.wait(10)
    assert code_of(lambda: list(stream)) in (S.DATA_LOSS, S.UNAVAILABLE)
    assert time.monotonic() - t0 < 5
    assert_all_free(decode)
    events, _ = run(d, p, decode.address, "after-kill", prompts([12])[0], 2)  # both sides serve on
    assert len(events) == 6


def test_range_that_never_arrives_times_out(cluster):
    _, full, decode, d, p = cluster
    d.Reserve(kv_pb2.ReserveRequest(request_id="never", prompt_len=9, max_new_tokens=4), metadata=MD, timeout=5)
    proc = sender("never", decode.address, "never", full.cfg)
    try:
        assert said(proc, "sent")  # granted: the blocks are the sender's to write, nothing written
        t0 = time.monotonic()
        assert code_of(lambda: list(start(d, "never", kv_timeout_s=1.0))) == S.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 3
        # the blocks go back after the KV deadline: decode cancels the open stream, then waits out the grace
        assert_pool_free(decode.engine, timeout=GRACE_S + 3)
    finally:
        proc.kill()
        proc.wait(10)
    assert_all_free(decode)
    events, _ = run(d, p, decode.address, "after-never", prompts([7])[0], 1)
    assert len(events) == 6


@pytest.mark.parametrize("kind", ["crc32", "wsum32"])
def test_corrupted_range_fails_with_data_loss(cluster, kind):
    _, full, decode, d, p = cluster
    rid = f"corrupt-{kind}"
    d.Reserve(kv_pb2.ReserveRequest(request_id=rid, prompt_len=9, max_new_tokens=4), metadata=MD, timeout=5)
    stream = start(d, rid, kv_timeout_s=60)
    proc = sender("corrupt", decode.address, rid, full.cfg, kind=kind)
    out, _ = proc.communicate(timeout=60)
    assert any(line.startswith("failed") for line in out.splitlines()), out  # the sender hears of it too
    assert code_of(lambda: list(stream)) == S.DATA_LOSS
    assert_all_free(decode)
    events, _ = run(d, p, decode.address, f"after-{rid}", prompts([20])[0], 2)
    assert len(events) == 6


def start_worker(role, model_dir, config, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "colm.deploy.worker_main", "--role", role, "--model", str(model_dir),
                             "--config", config], stdout=subprocess.PIPE, text=True, env=env)


def ready_address(proc, role) -> str:
    ready = proc.stdout.readline().split()
    assert ready[:2] == ["READY", role], ready
    return ready[2]


def worker(role, model_dir, config, env):
    proc = start_worker(role, model_dir, config, env)
    return proc, ready_address(proc, role)


def test_receiver_killed_mid_transfer(cluster):
    """Decode in a worker process dies while this process's sink writes: the sink fails (peer unavailable) well within
    its deadline, its send region goes back, and this process's prefill worker serves the next request."""
    path, full, decode, d, p = cluster
    env = {**os.environ, "COLM_CLUSTER_TOKEN": TOKEN}
    proc, address = worker("decode", path, '{"num_blocks": 64, "block_size": 4}', env)
    try:
        stub = decode_stub(address)
        T, cfg = 8, full.cfg
        stub.Reserve(kv_pb2.ReserveRequest(request_id="rk", prompt_len=T + 1, max_new_tokens=2), metadata=MD, timeout=10)
        from colm.kv.nixl import NixlKVSink

        sink = NixlKVSink(stub, "rk", TOKEN, checksum_kind="crc32", timeout_s=20, grace_s=GRACE_S)
        sink.begin(KVLayout(cfg.n_layers, T, cfg.n_kv_heads, cfg.head_dim, "float32"))
        sink.put(0, 1, 0, T, torch.randn(1, T, 2, cfg.n_kv_heads, cfg.head_dim))
        assert sink.granted.wait(10)
        time.sleep(0.3)
        proc.kill()
        proc.wait(10)
        t0 = time.monotonic()
        with pytest.raises((PeerUnavailableError, TransferError, TimeoutError)):
            for layer in range(1, cfg.n_layers):
                sink.put(layer, layer + 1, 0, T, torch.randn(1, T, 2, cfg.n_kv_heads, cfg.head_dim))
            sink.finish(20)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert arena_free("prefill")
    events, _ = run(d, p, decode.address, "after-receiver", prompts([15])[0], 1)
    assert len(events) == 6
    assert_all_free(decode)


def test_worker_processes_and_router_give_reference_tokens(cluster):
    """Prefill and decode as separate worker processes, the router asking for transport nixl: tokens equal
    ``colm generate`` at every scale for mixed prompt lengths; the decode pool is free afterwards."""
    from router_helpers import assert_router_gives_reference_tokens

    path, full, _, _, _ = cluster
    env = {**os.environ, "COLM_CLUSTER_TOKEN": TOKEN}
    procs = []
    try:
        dproc = start_worker("decode", path, '{"num_blocks": 128, "block_size": 4}', env)
        procs.append(dproc)
        pproc = start_worker("prefill", path, '{"nixl_arena_bytes": 4194304}', env)  # both start at once
        procs.append(pproc)
        daddr, paddr = ready_address(dproc, "decode"), ready_address(pproc, "prefill")
        d = kv_pb2_grpc.DecodeWorkerStub(make_channel(daddr))
        p = kv_pb2_grpc.PrefillWorkerStub(make_channel(paddr))
        _, reply = run(d, p, daddr, "direct", prompts([30])[0], 1)
        assert reply.path == "nixl"
        assert_router_gives_reference_tokens(full, path, daddr, paddr, TOKEN, "nixl")
        s = wait_pool_free(d)
        assert s.num_free_blocks == s.num_blocks
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)


_IDLE_PROBE = """
import resource, time
from colm.kv.nixl import NixlEndpoint
ep = NixlEndpoint("probe")
time.sleep(0.3)  # the agent's threads are up
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
time.sleep(1.5)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / (time.monotonic() - t0))
"""


@pytest.mark.parametrize("delay_us,spins", [(None, False), ("0", True)])
def test_an_idle_agent_does_not_spin_a_core(delay_us, spins):
    """NIXL's Python API starts the agent's progress thread with no pause between rounds: an idle process then burns a
    whole core for the agent's life (on two cores, a prefill and a decode worker took the machine). colm's endpoint
    pauses it (COLM_NIXL_PROGRESS_DELAY_US, 100 us by default); 0 shows what the pause prevents."""
    env = {k: v for k, v in os.environ.items() if k != "COLM_NIXL_PROGRESS_DELAY_US"}
    if delay_us is not None:
        env["COLM_NIXL_PROGRESS_DELAY_US"] = delay_us
    out = subprocess.run([sys.executable, "-c", _IDLE_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    cores = float(out.stdout.strip().splitlines()[-1])
    assert (cores > 0.4) if spins else (cores < 0.15), cores
