"""The in-process backend (``router/engine_backend.py``) when a request's reservation is gone by the time its
generation starts: it ran out (its timeout is the request's time left, so a deadline of a few ms can end it between
the reserve and the start) or an abort raced the start. The engine's UnknownRequestError went up through the router
as an unexpected error (seen once under load in the router's stress test); it is now the request's own failure
(RequestFailed, retried), as the gRPC backend reads a worker's NOT_FOUND."""

from __future__ import annotations

import asyncio

import pytest

from colm.decode_worker.config import DecodeConfig
from colm.decode_worker.engine import DecodeEngine
from colm.prefill_worker.engine import PrefillEngine
from colm.router.backend import EngineRequest, RequestFailed
from colm.router.engine_backend import EngineBackend
from colm.sampling import SamplingParams
from _engine_helpers import save_tiny_air


@pytest.mark.parametrize("colocated", [False, True])
def test_a_reservation_gone_before_the_start_fails_the_request_not_the_router(tmp_path, colocated):
    save_tiny_air(tmp_path)
    path = str(tmp_path)
    de = DecodeEngine.from_checkpoint(path, DecodeConfig(num_blocks=64, colocated_prefill=colocated)).start()
    pe = None if colocated else PrefillEngine.from_checkpoint(path).start()
    try:
        reserve = de.reserve

        def reserve_then_expire(request_id, *a, **kw):  # the reaper ends it right after it was made
            r = reserve(request_id, *a, **kw)
            de.abort(request_id)
            return r

        de.reserve = reserve_then_expire
        b = EngineBackend({} if colocated else {"prefill-0": pe}, {"decode-0": de})
        req = EngineRequest("gone-early", tuple(range(65, 80)), SamplingParams(max_new_tokens=4), 1, 30.0, None, None)

        async def run():
            async for _ in b.generate(req, "decode-0" if colocated else "prefill-0", "decode-0"):
                pass

        with pytest.raises(RequestFailed) as e:
            asyncio.run(run())
        assert e.value.worker_id == "decode-0" and "NOT_FOUND" in str(e.value)
    finally:
        de.reserve = reserve
        de.stop()
        if pe is not None:
            pe.stop()
