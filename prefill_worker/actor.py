"""Ray actor wrapping the prefill engine and its gRPC server (the only prefill module importing ray)."""

from __future__ import annotations

import ray


@ray.remote
class PrefillActor:
    """Loads chain 1 of ``checkpoint_dir``, serves ``colm.v1.PrefillWorker`` on ``address``."""

    def __init__(self, checkpoint_dir: str, cluster_token: str, address: str = "127.0.0.1:0", device: str = "cpu",
                 dtype: str | None = None, config: dict | None = None) -> None:
        import torch

        from colm.prefill_worker.config import PrefillConfig
        from colm.prefill_worker.engine import PrefillEngine
        from colm.prefill_worker.service import PrefillServer

        engine = PrefillEngine.from_checkpoint(checkpoint_dir, PrefillConfig(**(config or {})), device=device,
                                               dtype=getattr(torch, dtype) if dtype else None)
        self._server = PrefillServer(engine, cluster_token, address).start()

    def address(self) -> str:
        return self._server.address

    def host_id(self) -> str:
        return self._server.engine.host_id

    def stats(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self._server.engine.stats())

    def shutdown(self) -> None:
        self._server.stop()
