"""Worker actors on Ray: start N prefill and M decode actors, know their addresses, replace the dead.

``WorkerActor`` wraps an engine and its gRPC server (``PrefillServer`` / ``DecodeServer`` of the
engines' service modules) listening on ``workers.host``. ``WorkerPool`` decides resources
(``num_gpus`` when the cluster has GPUs, custom resources to pin a role to a node pool), asks Ray
to restart a dead actor (``max_restarts``), and maps actors to the router's ``WorkerInfo``. A
restarted actor listens on a new port, so ``refresh()`` re-reads every address.
"""

from __future__ import annotations

import importlib
import logging

from colm.router.backend import WorkerInfo

log = logging.getLogger("colm.serve")
SERVERS = {"prefill": ("colm.prefill_worker.service", "PrefillServer"),
           "decode": ("colm.decode_worker.service", "DecodeServer")}


def engines_available() -> bool:
    """Both engines' gRPC servers are importable (then workers can run as actors)."""
    try:
        for mod, name in SERVERS.values():
            getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError):
        return False
    return True


class WorkerActor:
    """One prefill or decode worker: builds the engine, serves its internal gRPC API, tells its address.

    Ray runs this class as an actor (``ray.remote`` is applied by ``WorkerPool``, so the class stays
    importable without Ray); after a crash Ray re-runs ``__init__``, which listens on a new port."""

    def __init__(self, role: str, model_path: str, section: dict, token: str, host: str, dtype: str,
                 device: str) -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = getattr(torch, dtype)
        mod, name = SERVERS[role]
        server_cls = getattr(importlib.import_module(mod), name)
        if role == "decode":
            from colm.decode_worker.config import DecodeConfig
            from colm.decode_worker.engine import DecodeEngine

            engine = DecodeEngine.from_checkpoint(model_path, DecodeConfig(**section), device=device, dtype=torch_dtype)
        else:
            from colm.prefill_worker.config import PrefillConfig
            from colm.prefill_worker.engine import PrefillEngine

            engine = PrefillEngine.from_checkpoint(model_path, PrefillConfig(**section), device=device,
                                                   dtype=torch_dtype)
        self.server = server_cls(engine, token, f"{host}:0").start()
        from colm.router.metrics import serve_metrics, worker_registry

        self.metrics_server = serve_metrics(worker_registry(engine, role, f"{role}@{self.server.address}"), host, 0)

    def address(self) -> str:
        return self.server.address

    def metrics_address(self) -> str:
        return f"http://{self.metrics_server[0].server_address[0]}:{self.metrics_server[0].server_port}/metrics"

    def pid(self) -> int:
        import os

        return os.getpid()


class WorkerPool:
    def __init__(self, cfg, model_path: str, token: str) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.token = token
        self.actors: dict[str, object] = {}
        self.roles: dict[str, str] = {}
        self.addresses: dict[str, str] = {}
        self.dead: dict[str, str] = {}  # worker id -> why it is gone for good

    def _num_gpus(self) -> float:
        import ray

        g = self.cfg.workers.num_gpus_per_worker
        if g == "auto":
            return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        return float(g)

    def _options(self, role: str) -> dict:
        w = self.cfg.workers
        res = w.prefill_resources if role == "prefill" else w.decode_resources
        return dict(num_gpus=self._num_gpus(), num_cpus=w.num_cpus_per_worker, resources=dict(res) or None,
                    max_restarts=w.max_restarts, max_task_retries=0, max_concurrency=4)

    def start(self) -> list[WorkerInfo]:
        import ray

        w = self.cfg.workers
        actor = ray.remote(WorkerActor)
        for role, count in (("decode", w.num_decode), ("prefill", w.num_prefill)):
            section = dict(self.cfg.decode if role == "decode" else self.cfg.prefill)
            for i in range(count):
                wid = f"{role}-{i}"
                self.actors[wid] = actor.options(**self._options(role)).remote(
                    role, self.model_path, section, self.token, w.host, self.cfg.model.dtype, self.cfg.model.device)
                self.roles[wid] = role
        return self.refresh(timeout_s=120.0, require_all=True)

    def refresh(self, timeout_s: float = 5.0, require_all: bool = False) -> list[WorkerInfo]:
        import ray

        refs = {wid: a.address.remote() for wid, a in self.actors.items() if wid not in self.dead}
        for wid, ref in refs.items():
            try:
                self.addresses[wid] = ray.get(ref, timeout=timeout_s)
            except ray.exceptions.ActorDiedError as e:  # Ray will not restart it: max_restarts is exhausted
                self.dead[wid] = (f"died and Ray will not restart it (max_restarts={self.cfg.workers.max_restarts} "
                                  f"exhausted): {str(e).splitlines()[0][:200]}")
                log.error("worker %s %s", wid, self.dead[wid])
                if require_all:
                    raise RuntimeError(f"worker {wid} {self.dead[wid]}") from None
            except Exception as e:  # restarting: keep the last address; the router's polls fail over
                if require_all:
                    raise RuntimeError(
                        f"worker {wid} did not start within {timeout_s:.0f} s ({type(e).__name__}: {e}); check that the "
                        f"Ray cluster has the resources it asks for: {self._options(self.roles[wid])}") from None
                log.debug("%s has no address now: %s", wid, e)
        return [WorkerInfo(wid, self.roles[wid], self.addresses.get(wid, ""), self.dead.get(wid, ""))
                for wid in self.actors]

    def kill(self, worker_id: str, restart: bool = True) -> None:
        """Kill one actor (tests, chaos drills); Ray restarts it when ``restart`` and restarts remain."""
        import ray

        ray.kill(self.actors[worker_id], no_restart=not restart)

    def stop(self) -> None:
        import ray

        for a in self.actors.values():
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors.clear()
