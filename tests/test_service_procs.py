"""Router -> prefill and decode workers as plain processes (colm.deploy.worker_main) over gRPC."""

import os
import time

import pytest

pytest.importorskip("colm.decode_worker.service")

from colm import checkpoint  # noqa: E402
from colm.assets import demo_model_dir  # noqa: E402
from colm.client import Client  # noqa: E402
from colm.generate import generate  # noqa: E402
from colm.router.backend import WorkerInfo  # noqa: E402
from colm.router.config import RouterConfig  # noqa: E402
from colm.router.core import Router  # noqa: E402
from colm.router.grpc_backend import GrpcBackend  # noqa: E402
from colm.sampling import SamplingParams  # noqa: E402
from colm.tokenizer import ByteTokenizer  # noqa: E402
from router_helpers import BackgroundRouter, start_worker_procs  # noqa: E402

TOKEN = "proc-test-token-0123456789"


def test_worker_processes_serve_reference_tokens_and_refuse_a_wrong_token():
    model_dir = str(demo_model_dir())
    env = {**os.environ, "COLM_CLUSTER_TOKEN": TOKEN}
    procs = []
    try:
        addrs = start_worker_procs(model_dir, (("decode", '{"num_blocks": 256}'), ("prefill", "{}")), env, procs)
        workers = [WorkerInfo("decode-0", "decode", addrs["decode"]), WorkerInfo("prefill-0", "prefill", addrs["prefill"])]
        model = checkpoint.load(model_dir).eval()
        tok = ByteTokenizer()
        bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=None), checkpoint.load_config(model_dir), tok,
                                     GrpcBackend(workers, cluster_token=TOKEN)))
        try:
            with Client(bg.grpc_addr) as c:
                for scale in (1, 2):
                    want = generate(model, tok.encode("The import statement"), SamplingParams(max_new_tokens=16),
                                    scale=scale, eos_id=tok.eos_id).token_ids
                    assert c.complete("The import statement", max_new_tokens=16, scale=scale)["token_ids"] == want
                bg.call(bg.router.poll_once())  # a fresh report: the blocks of finished requests are back
                h = c.health()
                assert all(w["healthy"] for w in h["workers"])
                assert [w for w in h["workers"] if w["role"] == "decode"][0]["free_blocks"] == 256
                # the KV hand-off is counted: 2 requests x 19 prompt tokens (all but the last) x layers x K,V x
                # KV heads x head dim x 4 bytes (float32)
                cfg = checkpoint.load_config(model_dir)
                m = bg.router.metrics.transfer_bytes.labels("prefill-0")._value.get()
                assert m == 2 * 19 * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 4
                # the workers' timelines crossed the wire and became phase observations (one per request)
                phases = bg.router.metrics.phases
                deadline = time.monotonic() + 5  # a Prefill reply may land after its request's last token
                while phases.labels("kv_delivery")._sum.get() == 0 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert phases.labels("kv_wait")._sum.get() > 0 and phases.labels("prefill_compute")._sum.get() > 0
                assert phases.labels("first_step")._sum.get() > 0
        finally:
            bg.stop()
        # a router holding the wrong token gets nothing from the workers: they never become healthy
        # (worker_wait_s: a worker that never becomes healthy is not waited for the default 30 s)
        bg = BackgroundRouter(Router(RouterConfig(grpc_port=0, http_port=None, worker_wait_s=1.0),
                                     checkpoint.load_config(model_dir), tok,
                                     GrpcBackend(workers, cluster_token="wrong-token-0123456789")))
        try:
            with Client(bg.grpc_addr) as c:
                assert not any(w["healthy"] for w in c.health()["workers"])
                import grpc

                with pytest.raises(grpc.RpcError) as e:
                    c.complete("The import statement", max_new_tokens=4)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            bg.stop()
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
