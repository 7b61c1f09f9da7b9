"""Worker actors on Ray: start N prefill and M decode actors, know their addresses, replace the dead.

The actor classes themselves belong to the engines (``colm.prefill_worker.actor``,
``colm.decode_worker.actor``); each builds its engine, serves its gRPC front on
``workers.host`` and answers ``address()``. Here we only decide resources (``num_gpus`` when the
cluster has GPUs, custom resources to pin a role to a node pool), ask Ray to restart a dead actor
(``max_restarts``), and map actors to the router's ``WorkerInfo``. A restarted actor gets a new
port, so ``refresh()`` re-reads every address.
"""

from __future__ import annotations

import importlib
import logging

from colm.router.backend import WorkerInfo

log = logging.getLogger("colm.serve")
ROLES = {"prefill": "colm.prefill_worker.actor", "decode": "colm.decode_worker.actor"}


def engines_available() -> bool:
    for mod in ROLES.values():
        try:
            importlib.import_module(mod)
        except ImportError:
            return False
    return True


def actor_class(role: str):
    mod = importlib.import_module(ROLES[role])
    for name in ("PrefillActor", "DecodeActor", "PrefillWorkerActor", "DecodeWorkerActor", "WorkerActor"):
        if hasattr(mod, name) and name.lower().startswith((role, "worker")):
            return getattr(mod, name)
    raise ImportError(f"{ROLES[role]} defines no actor class")


class WorkerPool:
    def __init__(self, cfg, model_path: str, token: str) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.token = token
        self.actors: dict[str, object] = {}
        self.roles: dict[str, str] = {}
        self.addresses: dict[str, str] = {}

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
                    max_restarts=w.max_restarts, max_task_retries=0)

    def start(self) -> list[WorkerInfo]:
        import ray

        w = self.cfg.workers
        for role, count in (("decode", w.num_decode), ("prefill", w.num_prefill)):
            cls = ray.remote(actor_class(role)) if not hasattr(actor_class(role), "remote") else actor_class(role)
            section = dict(self.cfg.decode if role == "decode" else self.cfg.prefill)
            for i in range(count):
                wid = f"{role}-{i}"
                self.actors[wid] = cls.options(name=f"colm-{wid}", **self._options(role)).remote(
                    self.model_path, section, self.token, w.host, self.cfg.model.dtype, self.cfg.model.device)
                self.roles[wid] = role
        return self.refresh(timeout_s=300.0)

    def refresh(self, timeout_s: float = 5.0) -> list[WorkerInfo]:
        import ray

        refs = {wid: a.address.remote() for wid, a in self.actors.items()}
        for wid, ref in refs.items():
            try:
                self.addresses[wid] = ray.get(ref, timeout=timeout_s)
            except Exception as e:  # dead or restarting: keep the last address; the router's polls fail over
                log.debug("%s has no address now: %s", wid, e)
        return [WorkerInfo(wid, self.roles[wid], addr) for wid, addr in self.addresses.items()]

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
