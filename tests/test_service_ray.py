"""`colm serve` end to end on an embedded local Ray cluster: worker actors, router, client, HTTP,
and failover when a decode or prefill actor is killed during a load test."""

import threading
import time

import pytest

ray = pytest.importorskip("ray")
from colm.deploy.actors import engines_available  # noqa: E402
from router_helpers import wait_serving  # noqa: E402

pytestmark = pytest.mark.skipif(not engines_available(), reason="engine gRPC servers not installed")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    import asyncio

    from colm.deploy.config import ClusterConfig
    from colm.deploy.launcher import Launcher

    cfg = ClusterConfig.from_dict({
        "model": {"path": "demo"},
        "workers": {"num_prefill": 2, "num_decode": 2, "num_cpus_per_worker": 0.5, "max_restarts": 2},
        "decode": {"num_blocks": 512, "block_size": 16},
        "router": {"grpc_port": 0, "http_port": 0, "metrics_port": 0, "poll_interval_s": 0.1, "max_retries": 3,
                   "poll_timeout_s": 10},  # 4 workers, a router and a load on 2 cores: a Stats call can take seconds
        "ray": {"num_cpus": 4}})
    launcher = Launcher(cfg)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    call = lambda coro, t=420: asyncio.run_coroutine_threadsafe(coro, loop).result(t)  # noqa: E731
    addrs = call(launcher.start())
    yield launcher, addrs, call
    call(launcher.stop())
    loop.call_soon_threadsafe(loop.stop)
    ray.shutdown()


def test_served_tokens_equal_colm_generate_at_every_scale(service):
    from colm import checkpoint
    from colm.assets import demo_model_dir
    from colm.client import Client
    from colm.generate import generate
    from colm.sampling import SamplingParams
    from colm.tokenizer import ByteTokenizer
    from router_helpers import post_json

    launcher, addrs, _ = service
    model = checkpoint.load(str(demo_model_dir())).eval()
    tok = ByteTokenizer()
    with Client(addrs["grpc"]) as c:
        for scale in (1, 2):
            want = generate(model, tok.encode("The import statement"), SamplingParams(max_new_tokens=24),
                            scale=scale, eos_id=tok.eos_id).token_ids
            assert c.complete("The import statement", max_new_tokens=24, scale=scale)["token_ids"] == want
            status, body = post_json(addrs["http"] + "/v1/completions",
                                     {"prompt": "The import statement", "max_tokens": 24, "temperature": 0,
                                      "scale": scale})
            assert status == 200 and body["choices"][0]["text"] == tok.decode(want)
        assert {w["role"] for w in c.health()["workers"]} == {"prefill", "decode"}


@pytest.mark.parametrize("victim", ["decode-0", "prefill-0"])
def test_killing_an_actor_during_load_loses_no_request(service, victim):
    from colm.client import Client
    from colm.loadtest import LoadSpec, run_load

    import asyncio

    launcher, addrs, call = service
    wait_serving(addrs["grpc"], 240)
    spec = LoadSpec(rates=(30.0,), num_requests=40, prompt_len=(8, 24), output_len=(8, 24), timeout_s=60,
                    seed=hash(victim) % 1000)
    box = {}
    t = threading.Thread(target=lambda: box.update(r=asyncio.run(run_load(addrs["grpc"], spec, progress=False))))
    t.start()
    time.sleep(0.4)
    launcher.pool.kill(victim, restart=True)
    t.join(300)
    results, _ = box["r"]
    assert len(results) == 40
    bad = [r.status for r in results if r.status != "OK"]
    # each request is retried elsewhere, or ends with a clear status well before its deadline
    assert all(s in ("UNAVAILABLE", "DEADLINE_EXCEEDED") for s in bad), bad
    assert len(bad) <= 2, bad
    assert all(r.e2e_ms < spec.timeout_s * 1000 for r in results)
    # pools free afterwards, and the restarted actor comes back into service
    deadline = time.time() + 240  # a restarted actor loads its model again: minutes on a loaded 2-core machine
    while time.time() < deadline:
        h = Client(addrs["grpc"]).health()
        ws = {w["worker_id"]: w for w in h["workers"]}
        if all(w["healthy"] and w["inflight"] == 0 for w in ws.values()) and \
                all(w["free_blocks"] == w["total_blocks"] for w in ws.values() if w["role"] == "decode"):
            break
        time.sleep(0.5)
    assert all(w["healthy"] for w in ws.values()), ws
    assert all(w["free_blocks"] == w["total_blocks"] for w in ws.values() if w["role"] == "decode"), ws


def test_internal_endpoints_refuse_calls_without_the_cluster_token(service):
    import grpc

    from colm.proto import load_proto

    kv_pb2, kv_pb2_grpc = load_proto("kv")
    launcher, addrs, _ = service
    wait_serving(addrs["grpc"], 240)  # an actor an earlier test killed has restarted and reports again
    infos = {w.worker_id: w.address for w in launcher.pool.refresh()}
    for wid, addr in infos.items():
        assert addr.startswith("127.0.0.1:")  # internal endpoints stay on loopback unless configured
        with grpc.insecure_channel(addr) as ch:
            if wid.startswith("decode"):
                call = lambda md: kv_pb2_grpc.DecodeWorkerStub(ch).Stats(kv_pb2.DecodeStatsRequest(), metadata=md,  # noqa: E731
                                                                          timeout=10)
            else:
                call = lambda md: kv_pb2_grpc.PrefillWorkerStub(ch).Stats(kv_pb2.PrefillStatsRequest(), metadata=md,  # noqa: E731
                                                                           timeout=10)
            for md in ((), (("x-colm-cluster-token", "wrong-token-0123456789"),)):
                with pytest.raises(grpc.RpcError) as e:
                    call(md)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            call((("x-colm-cluster-token", launcher.token),))  # the launcher's token works
