"""A request whose first token is late because its prefill has not finished (a prefill worker with a long queue, or
its loop stuck) is the prefill worker's silence, not the decode worker's: the router (either token stream: batched,
the default, whose backend watches for silence itself, or per_request, whose silence the router's own watch finds)
takes the prefill worker out for it, and the decode worker, which was waiting for the K/V, stays in service.
It used to blame the decode worker ("worker decode-0 taken out of service (... no token for N s)"), so health said
"no healthy decode worker" while the decode worker was idle and the slow prefill worker kept getting every prompt."""

from __future__ import annotations

import logging
import threading
import time

import pytest

pytest.importorskip("colm.decode_worker.service")

from colm import checkpoint  # noqa: E402
from colm.assets import demo_model_dir  # noqa: E402
from colm.client import Client  # noqa: E402
from colm.decode_worker.config import DecodeConfig  # noqa: E402
from colm.decode_worker.engine import DecodeEngine  # noqa: E402
from colm.decode_worker.service import DecodeServer  # noqa: E402
from colm.generate import generate  # noqa: E402
from colm.prefill_worker.engine import PrefillEngine  # noqa: E402
from colm.prefill_worker.service import PrefillServer  # noqa: E402
from colm.router.backend import WorkerInfo  # noqa: E402
from colm.router.config import RouterConfig  # noqa: E402
from colm.router.core import Router  # noqa: E402
from colm.router.grpc_backend import GrpcBackend  # noqa: E402
from colm.sampling import SamplingParams  # noqa: E402
from colm.tokenizer import ByteTokenizer  # noqa: E402
from router_helpers import BackgroundRouter  # noqa: E402

TOKEN = "silent-prefill-token-0123456789"
PROMPT = "def read_config(path):"


def _stuck_prefill(path: str) -> tuple[PrefillEngine, threading.Event]:
    """A prefill engine whose first forward hangs until the event is set: its loop is stuck, its Stats answer."""
    engine = PrefillEngine.from_checkpoint(path)
    release = threading.Event()
    forward = engine._forward

    def stuck_once(jobs):
        if not release.is_set():
            release.wait(30)
        return forward(jobs)

    engine._forward = stuck_once
    return engine, release


def _complete_through_the_stall(caplog, addr: str, release: threading.Event, until: str) -> tuple[dict, list[str]]:
    """Ask the router at ``addr`` for 8 tokens at scale 2 while the prefill is stuck; let the prefill go once a router
    log line says ``until`` (or after 20 s): (the reply, the router's "taken out of service" lines)."""
    with caplog.at_level(logging.WARNING, logger="colm.router"), Client(addr) as c:
        got = {}
        t = threading.Thread(target=lambda: got.update(c.complete(PROMPT, max_new_tokens=8, scale=2,
                                                                   ignore_eos=True)))
        t.start()
        end = time.monotonic() + 20
        while time.monotonic() < end and not any(until in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
        release.set()
        t.join(60)
    return got, [r.getMessage() for r in caplog.records if "taken out of service" in r.getMessage()]


@pytest.mark.parametrize("token_stream", ["batched", "per_request"])
def test_a_late_first_token_with_the_prefill_unfinished_blames_the_prefill_worker(caplog, token_stream):
    path = str(demo_model_dir())
    decode = DecodeServer(DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=128)), TOKEN).start()
    prefill_engine, release = _stuck_prefill(path)
    prefill = PrefillServer(prefill_engine, TOKEN).start()
    workers = [WorkerInfo("decode-0", "decode", decode.address), WorkerInfo("prefill-0", "prefill", prefill.address)]
    tok = ByteTokenizer()
    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05, token_timeout_s=1.0,
                                 max_retries=5, token_stream=token_stream), checkpoint.load_config(path), tok,
                    GrpcBackend(workers, cluster_token=TOKEN, token_stream=token_stream))
    bg = BackgroundRouter(router)
    try:
        want = generate(checkpoint.load(path).eval(), tok.encode(PROMPT), SamplingParams(max_new_tokens=8,
                                                                                       ignore_eos=True),
                        scale=2, eos_id=tok.eos_id).token_ids
        got, lines = _complete_through_the_stall(caplog, bg.grpc_addr, release, "no token for")
        assert lines, "the silent attempt was never failed over"
        assert not any("worker decode-0 taken out" in m for m in lines), lines  # decode waited for the K/V
        assert any("worker prefill-0 taken out" in m for m in lines), lines
        assert got.get("token_ids") == want and got["usage"]["retries"] >= 1, got
    finally:
        release.set()
        bg.stop()
        prefill.stop()
        decode.stop()


def test_in_process_engines_blame_a_stuck_prefill_on_the_prefill_engine(caplog):
    """The same with the engines in the router's process (``EngineBackend``): the stuck prefill engine is taken out,
    the decode engine waiting for its K/V is not."""
    from colm.router.engine_backend import EngineBackend

    path = str(demo_model_dir())
    prefill_engine, release = _stuck_prefill(path)
    backend = EngineBackend({"prefill-0": prefill_engine},
                            {"decode-0": DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=128))})
    tok = ByteTokenizer()
    router = Router(RouterConfig(grpc_port=0, http_port=None, poll_interval_s=0.05, token_timeout_s=1.0,
                                 max_retries=5), checkpoint.load_config(path), tok, backend)
    bg = BackgroundRouter(router)
    try:
        _, lines = _complete_through_the_stall(caplog, bg.grpc_addr, release, "taken out of service")
        assert lines, "the silent attempt was never failed over"
        assert not any("worker decode-0 taken out" in m for m in lines), lines
        assert any("worker prefill-0 taken out" in m for m in lines), lines
    finally:
        release.set()
        bg.stop()
