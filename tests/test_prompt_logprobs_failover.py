"""A request that scores its prompt (``echo`` with ``logprobs``, gRPC ``prompt_logprobs``) has the guarantees of
a generation attempt while its prompt is scored: a decode worker that fails the call, or a health poll meanwhile,
is left out and the scoring retried on another; the request's deadline bounds the wait. Two decode engines and one
prefill engine in the router's process; the faults are injected into the backend's scoring call."""

import asyncio
import time

import pytest

pytest.importorskip("colm.decode_worker.engine")

from colm import checkpoint  # noqa: E402
from colm.decode_worker.config import DecodeConfig  # noqa: E402
from colm.decode_worker.engine import DecodeEngine  # noqa: E402
from colm.model import CoLM  # noqa: E402
from colm.prefill_worker.engine import PrefillEngine  # noqa: E402
from colm.presets import preset  # noqa: E402
from colm.router.backend import WorkerFailed  # noqa: E402
from colm.router.config import RouterConfig  # noqa: E402
from colm.router.core import Router  # noqa: E402
from colm.router.engine_backend import EngineBackend  # noqa: E402
from colm.tokenizer import ByteTokenizer  # noqa: E402
from router_helpers import BackgroundRouter, post_json  # noqa: E402


class FaultyScoring(EngineBackend):
    """``fault``: None, "fail" (the next scoring call's worker fails it, as a dead worker's call does) or "hang"
    (the next call never answers; with ``poll_fails`` its worker then also fails its health polls)."""

    def __init__(self, prefill, decode) -> None:
        super().__init__(prefill, decode)
        self.fault: str | None = None
        self.poll_fails = False
        self.scored_on: list[str] = []
        self.down: set[str] = set()

    async def prompt_logprobs(self, decode_id, prompt_ids, scale):
        self.scored_on.append(decode_id)
        fault, self.fault = self.fault, None
        if fault == "fail":
            raise WorkerFailed(decode_id, "UNAVAILABLE: injected: the worker's process is gone")
        if fault == "hang":
            if self.poll_fails:
                self.down.add(decode_id)
            await asyncio.sleep(3600)
        return await super().prompt_logprobs(decode_id, prompt_ids, scale)

    async def poll(self, worker_id):
        if worker_id in self.down:
            raise WorkerFailed(worker_id, "injected: no answer to the health poll")
        return await super().poll(worker_id)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-air"))
    checkpoint.save(CoLM(preset("tiny-air")).reset_parameters(seed=3), path, tokenizer={"kind": "byte"})
    backend = FaultyScoring({"prefill-0": PrefillEngine.from_checkpoint(path)},
                            {f"decode-{i}": DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=96))
                             for i in range(2)})
    router = Router(RouterConfig(grpc_port=0, http_port=0, poll_interval_s=0.05), checkpoint.load_config(path),
                    ByteTokenizer(), backend)
    bg = BackgroundRouter(router)
    yield bg, backend
    bg.stop()


BODY = {"prompt": "scored prompt", "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1}


def _clean(backend):
    backend.fault, backend.poll_fails = None, False
    backend.down.clear()
    backend.scored_on.clear()


def test_a_worker_failing_the_scoring_call_is_failed_over(served):
    bg, backend = served
    _clean(backend)
    status, want = post_json(f"{bg.http_url}/v1/completions", BODY)
    assert status == 200 and want["choices"][0]["logprobs"]["token_logprobs"][1] is not None
    _clean(backend)
    backend.fault = "fail"
    status, got = post_json(f"{bg.http_url}/v1/completions", BODY)
    assert status == 200, got
    assert len(backend.scored_on) == 2 and backend.scored_on[0] != backend.scored_on[1]
    assert got["choices"][0]["logprobs"] == want["choices"][0]["logprobs"]
    assert got["choices"][0]["text"] == want["choices"][0]["text"]
    deadline = time.monotonic() + 10  # the failed worker reports again (it serves on) and is back in service
    while post_json(f"{bg.http_url}/v1/completions", {"prompt": "x", "max_tokens": 1})[0] != 200:
        assert time.monotonic() < deadline


def test_a_scoring_call_that_never_answers_ends_at_the_deadline(served):
    bg, backend = served
    _clean(backend)
    backend.fault = "hang"
    t0 = time.monotonic()
    status, body = post_json(f"{bg.http_url}/v1/completions", {**BODY, "deadline_ms": 1500})
    took = time.monotonic() - t0
    assert status == 504 and "deadline" in body["error"]["message"], body
    assert 1.4 < took < 10, took


def test_a_worker_failing_its_health_poll_mid_scoring_is_failed_over(served):
    bg, backend = served
    _clean(backend)
    status, want = post_json(f"{bg.http_url}/v1/completions", BODY)
    _clean(backend)
    backend.fault, backend.poll_fails = "hang", True
    t0 = time.monotonic()
    status, got = post_json(f"{bg.http_url}/v1/completions", BODY)
    assert status == 200, got
    assert time.monotonic() - t0 < 10
    assert len(backend.scored_on) == 2 and backend.scored_on[0] in backend.down
    assert got["choices"][0]["logprobs"] == want["choices"][0]["logprobs"]
    backend.down.clear()
