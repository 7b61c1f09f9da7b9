"""A router replica: one more router process of ``colm serve`` (``router.replicas`` > 1), run as a Ray actor.

Each replica is a complete router (``RouterServer`` on its own event loop: admission, policy, token streams,
health polls, metrics) over the same workers as the launcher's own router, listening on the same gRPC and HTTP
ports with SO_REUSEPORT, so the kernel spreads client connections over the processes. Replica ``index`` serves its
metrics on ``metrics_port + index``. The launcher pins replicas to its own node (the ports are that node's), hands
them each new worker list it learns (``set_workers``) and stops them with the service.
"""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger("colm.deploy")


class RouterReplica:
    """Ray runs this class as an actor (``ray.remote`` is applied by the launcher)."""

    def __init__(self, router_cfg: dict, model_path: str, workers: list, token: str, transport: str,
                 score_prompts: bool, block_size: int) -> None:
        from colm import checkpoint
        from colm.deploy.actors import serving_priority
        from colm.router.config import RouterConfig
        from colm.router.core import Router
        from colm.router.grpc_backend import GrpcBackend
        from colm.router.server import ThreadedRouterServer
        from colm.tokenizer import load_checkpoint_tokenizer

        serving_priority()
        cfg = RouterConfig(**router_cfg)
        scorer = checkpoint.load(model_path).eval() if score_prompts else None
        self.backend = GrpcBackend(workers, cluster_token=token, scorer=scorer, kv_path=transport,
                                   token_stream=cfg.token_stream, worker_calls=cfg.worker_calls)
        router = Router(cfg, checkpoint.load_config(model_path), load_checkpoint_tokenizer(model_path), self.backend,
                        block_size=block_size)
        self.server = ThreadedRouterServer(router)
        from colm.gc_pauses import freeze_start_heap

        freeze_start_heap()  # the actor's process serves from here on (colm/gc_pauses.py)

    def addresses(self) -> dict[str, str]:
        return self.server.addresses

    def process(self) -> dict:
        """This replica's pid and niceness."""
        from colm.deploy.actors import process_info

        return process_info()

    def health(self) -> dict:
        """This replica's own view: {"serving", "why", "workers": {worker id: healthy | unhealthy | dead}} (the
        shared ports answer from whichever router the kernel picks; this asks this one)."""
        async def view() -> dict:
            serving, why = self.server.router.health()
            return {"serving": serving, "why": why, "workers": self.server.router.worker_states()}

        return self.server.call(view())

    def set_workers(self, workers: list) -> None:
        self.server.loop.call_soon_threadsafe(self.backend.set_workers, workers)

    def stop(self) -> None:
        """Drain and stop (``RouterServer.stop``); the launcher asks every replica while its own router drains."""
        self.server.stop()

    def end_drain(self) -> None:
        """End a drain in progress now (a second stop signal): the ``stop`` under way cuts what is still in flight.
        The actor runs its calls on threads (``max_concurrency``), so this one runs beside that ``stop``."""
        self.server.end_drain()


def replica_config(cfg, index: int, addresses: dict[str, str]) -> dict:
    """Replica ``index``'s RouterConfig (as a dict) from the launcher's own ``cfg`` and the ports its router got."""
    def port(url: str) -> int:
        return int(url.rstrip("/").rsplit(":", 1)[1].split("/")[0])

    d = dataclasses.asdict(cfg)
    d["grpc_port"] = port(addresses["grpc"])
    if cfg.http_port is not None:
        d["http_port"] = port(addresses["http"])
    if cfg.metrics_port:
        d["metrics_port"] = cfg.metrics_port + index
    return d
