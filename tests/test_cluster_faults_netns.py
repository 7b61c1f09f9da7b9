"""A network partition on a real three-node Ray cluster: head (router), node B (prefill only), node C (decode
only), each in its own network namespace as in tests/test_cluster_netns.py, ``colm serve --address auto`` on the
head. Node B's link goes down while requests arrive, then comes back.

While it is cut off, health says not serving (gRPC and HTTP 503) and every request ends within its deadline with
UNAVAILABLE / 503 (or DEADLINE_EXCEEDED), never RESOURCE_EXHAUSTED / 429: the decode worker's KV pool is small and
empty, and the blocks of the picks a waiting request retries must not count against it. After the link is back the
service serves again by itself, token-exact, with no request left counted as running.

Skips where network namespaces cannot be made (not root, no iproute2), like the other namespace tests."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("ray")
from netns_cluster import NetnsCluster, netns_unavailable, serve_yaml  # noqa: E402
from router_helpers import get_json, post_json, wait_serving  # noqa: E402

WHY_NO_NETNS = netns_unavailable()
TOKEN = "netns-fault-cluster-token-0123456789"
PROMPT = "The import statement"
DEADLINE_MS = 6000


@pytest.fixture(scope="module")
def cluster():
    if WHY_NO_NETNS:
        pytest.skip(f"no network namespaces here ({WHY_NO_NETNS})")
    c = NetnsCluster([{}, {"prefill": 1}, {"decode": 1}], num_cpus=[1, 2, 2])
    try:
        c.start()
        cfg = c.tmp / "serve.yaml"
        # 64 KV blocks: a request of 20 + 32 tokens needs 4, so the pool looks full after 16 picks left counted
        cfg.write_text(serve_yaml(c.head.ip, TOKEN, num_blocks=64))
        proc = c.popen(c.head, [sys.executable, "-m", "colm.cli", "serve", "--config", str(cfg)], "colm-serve.log",
                       env={"RAY_ADDRESS": f"{c.head.ip}:6379"})
        log = c.tmp / "colm-serve.log"
        end = time.time() + 240
        while not re.search(r"\[colm serve\] http\s+\S+", log.read_text() if log.exists() else ""):
            assert proc.poll() is None and time.time() < end, log.read_text()[-4000:]
            time.sleep(0.1)
        yield c, f"{c.head.ip}:50051", f"http://{c.head.ip}:8000"
    finally:
        c.stop()


def _reference(n: int, scale: int) -> list[int]:
    from colm import checkpoint
    from colm.assets import demo_model_dir
    from colm.generate import generate
    from colm.sampling import SamplingParams
    from colm.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    model = checkpoint.load(str(demo_model_dir())).eval()
    return generate(model, tok.encode(PROMPT), SamplingParams(max_new_tokens=n), scale=scale,
                    eos_id=tok.eos_id).token_ids


def _link(c: NetnsCluster, i: int, up: bool) -> None:
    subprocess.run(["ip", "link", "set", f"vh{c.tag}{i}", "up" if up else "down"], check=True, timeout=30)


def test_prefill_node_partitioned_is_unavailable_not_full_then_recovers(cluster):
    import grpc

    from colm.client import Client

    c, grpc_addr, http = cluster
    wait_serving(grpc_addr, 120)
    want = _reference(32, 2)
    with Client(grpc_addr) as cl:
        assert cl.complete(PROMPT, max_new_tokens=32, scale=2)["token_ids"] == want
    results: list = []

    def one() -> None:
        t0 = time.time()
        try:
            with Client(grpc_addr, timeout_s=60) as cl:
                r = cl.complete(PROMPT, max_new_tokens=32, scale=2, deadline_ms=DEADLINE_MS)
            results.append(("OK", time.time() - t0, r["token_ids"] == want))
        except grpc.RpcError as e:
            results.append((e.code().name, time.time() - t0, e.details()))

    _link(c, 1, False)
    try:
        threads = []
        for _ in range(6):  # requests keep coming while node B is cut off
            threads.append(threading.Thread(target=one))
            threads[-1].start()
            time.sleep(0.4)
        status, body = post_json(f"{http}/v1/completions", {"prompt": PROMPT, "max_tokens": 32, "temperature": 0,
                                                            "scale": 2, "deadline_ms": DEADLINE_MS})
        health = get_json(f"{http}/health")
        for t in threads:
            t.join(60)
    finally:
        _link(c, 1, True)
    assert status == 503, (status, body)
    assert health[0] == 503 and "no healthy worker that prefills" in str(health[1]), health
    assert len(results) == 6
    for code, seconds, detail in results:
        assert code in ("OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"), results
        assert seconds < DEADLINE_MS / 1000 + 5, results
        assert code != "OK" or detail is True, results
    wait_serving(grpc_addr, 60)  # node B's worker answers again: served, token-exact, nothing left running
    with Client(grpc_addr) as cl:
        assert cl.complete(PROMPT, max_new_tokens=32, scale=2)["token_ids"] == want
    metrics = get_json(f"http://{c.head.ip}:9400/metrics")[1]
    assert re.search(r"^colm:num_requests_running\{[^}]*\} 0\.0$", metrics, re.M), metrics[:2000]
