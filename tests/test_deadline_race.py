"""Requests that race their own deadlines (a few ms) beside ordinary ones, through the router's gRPC backend over
real worker servers: the worker may have dropped such a request's reservation by the time its Start arrives
(NOT_FOUND). That is the request's own fate: it used to count as the decode worker failing, which took the worker
out of service (health 503) and failed every other request in flight over to a retry."""

from __future__ import annotations

import threading

import grpc

from colm import checkpoint
from colm.client import Client
from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.decode_worker.service import DecodeServer
from colm.generate import generate
from colm.prefill_worker.engine import PrefillEngine
from colm.prefill_worker.service import PrefillServer
from colm.router.backend import RequestFailed, WorkerInfo
from colm.router.config import RouterConfig
from colm.router.core import Router
from colm.router.grpc_backend import GrpcBackend
from colm.sampling import SamplingParams
from colm.tokenizer import ByteTokenizer
from router_helpers import BackgroundRouter
from _engine_helpers import save_tiny_air

TOKEN = "deadline-race-token-0123456789"


def test_not_found_is_the_request_not_the_worker():
    e = GrpcBackend([], cluster_token=TOKEN)._failure_of(grpc.StatusCode.NOT_FOUND, "not reserved", "decode-0")
    assert isinstance(e, RequestFailed) and e.worker_id == "decode-0"


def test_a_reservation_gone_before_its_start_fails_over_only_that_request(tmp_path, monkeypatch):
    """Every other request's reservation vanishes before its Start runs (as a deadline of a few ms lets it expire
    under load): the worker answers NOT_FOUND for it. Only that request is retried (once, and it completes with the
    reference tokens); the decode worker is never taken out of service and the requests beside it are not retried."""
    full = save_tiny_air(tmp_path)
    engine = DecodeEngine.from_checkpoint(tmp_path, DecodeConfig(num_blocks=256, block_size=4))
    start, seen, lock = engine.start_generation, [], threading.Lock()

    def start_after_losing_some(request_id, *args, **kw):
        with lock:  # a retried attempt's id is the first's with ".1": only first attempts lose theirs
            lose = "." not in request_id and request_id not in seen and len(seen) % 2 == 1
            if "." not in request_id and request_id not in seen:
                seen.append(request_id)
        if lose:
            engine.abort(request_id)  # the reservation is gone: start_generation raises UnknownRequestError
        return start(request_id, *args, **kw)

    monkeypatch.setattr(engine, "start_generation", start_after_losing_some)
    decode = DecodeServer(engine, TOKEN).start()
    prefill = PrefillServer(PrefillEngine.from_checkpoint(tmp_path), TOKEN).start()
    workers = [WorkerInfo("decode-0", "decode", decode.address), WorkerInfo("prefill-0", "prefill", prefill.address)]
    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05), checkpoint.load_config(tmp_path),
                    ByteTokenizer(), GrpcBackend(workers, cluster_token=TOKEN))
    taken_out = []
    mark = router.registry.mark_unhealthy
    monkeypatch.setattr(router.registry, "mark_unhealthy", lambda w: taken_out.append(w) or mark(w))
    bg = BackgroundRouter(router)
    tok = ByteTokenizer()
    prompts = [f"def f{i}(x):" for i in range(12)]
    want = {p: generate(full, tok.encode(p), SamplingParams(max_new_tokens=12, ignore_eos=True), scale=2).token_ids
            for p in prompts}
    got = {}

    def one(p):
        with Client(bg.grpc_addr) as c:
            r = c.complete(p, max_new_tokens=12, ignore_eos=True, scale=2)
        got[p] = (r["token_ids"], r["usage"]["retries"])

    try:
        threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        bg.stop()
        decode.stop()
        prefill.stop()
    assert taken_out == []  # NOT_FOUND never took the decode worker out of service
    assert all(got[p][0] == want[p] for p in prompts)
    assert all(r == 0 for _, r in got.values())  # no worker failover
    # the six that lost their reservation were retried once each, and no other request
    assert router.metrics.registry.get_sample_value("colm_retries_total", {"model_name": "colm"}) == 6
