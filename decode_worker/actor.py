"""Ray actor wrapping the decode engine and its gRPC server (the only decode module importing ray)."""

from __future__ import annotations

import ray


@ray.remote
class DecodeActor:
    """Loads all chains of ``checkpoint_dir``, serves ``colm.v1.DecodeWorker`` on ``address``."""

    def __init__(self, checkpoint_dir: str, cluster_token: str, address: str = "127.0.0.1:0", device: str = "cpu",
                 dtype: str | None = None, config: dict | None = None) -> None:
        import torch

        from colm.decode_worker.config import DecodeConfig
        from colm.decode_worker.engine import DecodeEngine
        from colm.decode_worker.service import DecodeServer

        engine = DecodeEngine.from_checkpoint(checkpoint_dir, DecodeConfig(**(config or {})), device=device,
                                              dtype=getattr(torch, dtype) if dtype else None)
        self._server = DecodeServer(engine, cluster_token, address).start()

    def address(self) -> str:
        return self._server.address

    def host_id(self) -> str:
        return self._server.engine.host_id

    def stats(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self._server.engine.stats())

    def shutdown(self) -> None:
        self._server.stop()
