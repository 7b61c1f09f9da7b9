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
import re
import threading
import time

from colm.router.backend import WorkerInfo

log = logging.getLogger("colm.serve")
SERVERS = {"prefill": ("colm.prefill_worker.service", "PrefillServer"),
           "decode": ("colm.decode_worker.service", "DecodeServer")}


LOOP_ERROR_EXIT_CODE = 70  # a worker process whose engine loop ended with an error exits with this (EX_SOFTWARE)
LOOP_ERROR_EXIT_DELAY_S = 1.0  # time for the failed requests' answers to leave before the process ends


def exit_after_loop_error(exc: BaseException, delay_s: float = LOOP_ERROR_EXIT_DELAY_S) -> None:
    """An engine's loop ended with an error: the engine has failed what it held and its health fails; end this worker
    process ``delay_s`` later, so that its supervisor starts it again (Ray restarts the actor up to
    ``workers.max_restarts`` times; the router's watch then finds its new address) instead of it idling as a worker
    that answers but cannot serve."""
    import os

    log.critical("the engine's loop ended (%r): this worker process exits in %.1f s", exc, delay_s)

    def _exit() -> None:
        logging.shutdown()
        os._exit(LOOP_ERROR_EXIT_CODE)

    threading.Timer(delay_s, _exit).start()


def serving_priority() -> int:
    """Run this (actor) process at niceness 0 and return the niceness it runs at. Ray starts its worker processes,
    actors included, at ``worker_niceness`` (15 by default), which suits batch tasks but not a router or an engine
    that answers requests: on a busy host every nice-0 process takes the CPU first (the kernel weighs nice 15 at
    36 against 1024). The embedded cluster is started with 0 (``Launcher``); a cluster started elsewhere should
    set ``RAY_worker_niceness=0`` where its raylets start (deploy/cluster.yaml, kuberay.yaml); this also lowers it
    where the process may (root / CAP_SYS_NICE) and says so where it may not."""
    import os

    nice = os.getpriority(os.PRIO_PROCESS, 0)
    if nice > 0:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
            nice = 0
        except OSError:
            log.warning("this actor runs at niceness %d (Ray's worker_niceness) and may not lower it: start the "
                        "cluster's raylets with RAY_worker_niceness=0", nice)
    return nice


def process_info() -> dict:
    """This process's pid and niceness (what an actor's ``process`` answers)."""
    import os

    return {"pid": os.getpid(), "niceness": os.getpriority(os.PRIO_PROCESS, 0)}


def engines_available() -> bool:
    """Both engines' gRPC servers are importable (then workers can run as actors)."""
    try:
        for mod, name in SERVERS.values():
            getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError):
        return False
    return True


class StartError(RuntimeError):
    """The workers could not be started as configured (resources, a worker failing at start): one line for the
    operator, no traceback."""


def _cause(e: BaseException) -> str:
    """The line of ``e``'s text that says why (an actor's creation error carries the worker's traceback: its last
    ``SomeError: message`` line; an actor's death, Ray's ``The actor is dead because ...`` line after the generic
    first one), at most 1,000 characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b:?", ln)]
    because = [ln for ln in lines if ln.startswith("The actor is dead because")]
    return (named[-1] if named else because[-1] if because else lines[0] if lines else type(e).__name__)[:1000]


class WorkerActor:
    """One prefill or decode worker: builds the engine, serves its internal gRPC API, tells its address.

    Ray runs this class as an actor (``ray.remote`` is applied by ``WorkerPool``, so the class stays
    importable without Ray); after a crash Ray re-runs ``__init__``, which listens on a new port."""

    def __init__(self, role: str, model_path: str, section: dict, token: str, host: str, dtype: str,
                 device: str, worker_id: str = "") -> None:
        import torch

        from colm.deploy.addresses import worker_hosts

        serving_priority()
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
        engine.on_loop_error(exit_after_loop_error)  # Ray restarts the actor (workers.max_restarts)
        bind, self.advertised_host = worker_hosts(host)
        self.server = server_cls(engine, token, f"{bind}:0")
        self.server.address = f"{self.advertised_host}:{self.server.port}"  # what the router and peers dial
        self.server.start()
        from colm.router.metrics import serve_metrics, worker_registry

        self.metrics_server = serve_metrics(worker_registry(engine, role, worker_id or f"{role}@{self.server.address}"),
                                            bind, 0)
        from colm.gc_pauses import freeze_start_heap

        freeze_start_heap()  # the actor's process serves from here on (colm/gc_pauses.py)

    def address(self) -> str:
        return self.server.address

    def endpoints(self) -> tuple[str, str]:
        """(gRPC address, metrics URL), both at the advertised host."""
        return self.server.address, self.metrics_address()

    def metrics_address(self) -> str:
        return f"http://{self.advertised_host}:{self.metrics_server[0].server_port}/metrics"

    def process(self) -> dict:
        return process_info()

    def pid(self) -> int:
        import os

        return os.getpid()


def gpus_per_worker(workers, cluster_gpus: float) -> float:
    """``workers.num_gpus_per_worker``, with ``auto`` = a whole GPU each when the cluster has one per worker, else
    1/k of a GPU with k workers per GPU (both roles on one GPU: 0.5 each), 0 without GPUs."""
    from colm.deploy.config import resolve_mode

    g = workers.num_gpus_per_worker
    if g != "auto":
        return float(g)
    n, gpus = workers.num_decode, int(cluster_gpus)
    if resolve_mode(workers, cluster_gpus) == "disaggregated":
        n += workers.num_prefill
    if gpus < 1:
        return 0.0
    return 1.0 / -(-n // gpus)


class WorkerPool:
    def __init__(self, cfg, model_path: str, token: str) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self.token = token
        self.actors: dict[str, object] = {}
        self.roles: dict[str, str] = {}
        self.addresses: dict[str, str] = {}
        self.dead: dict[str, str] = {}  # worker id -> why it is gone for good
        self.metrics_urls: dict[str, str] = {}
        self._mode: str | None = None
        self._cancel = threading.Event()  # set from another thread: a start in progress gives up (StartError)

    def cancel_start(self) -> None:
        """Make a ``start`` in progress on another thread end at once with ``StartError`` (a signal during start-up:
        the caller then stops the pool, with no Ray call left running)."""
        self._cancel.set()

    def _endpoints(self, ref, timeout_s: float):
        """``ray.get(ref)`` within ``timeout_s``, looking at ``cancel_start`` every 0.25 s."""
        import ray

        end = time.monotonic() + timeout_s
        while True:
            if self._cancel.is_set():
                raise StartError("stopped during start-up")
            ready, _ = ray.wait([ref], timeout=max(0.0, min(0.25, end - time.monotonic())))
            if ready:
                return ray.get(ready[0])
            if time.monotonic() >= end:
                raise ray.exceptions.GetTimeoutError(f"no reply within {timeout_s:.0f} s")

    @property
    def mode(self) -> str:
        """"colocated" | "disaggregated": ``workers.mode`` for this cluster's GPUs."""
        if self._mode is None:
            import ray

            from colm.deploy.config import resolve_mode

            self._mode = resolve_mode(self.cfg.workers, ray.cluster_resources().get("GPU", 0))
        return self._mode

    def counts(self) -> tuple[tuple[str, int], ...]:
        w = self.cfg.workers
        return (("decode", w.num_decode),) + ((("prefill", w.num_prefill),) if self.mode == "disaggregated" else ())

    def section(self, role: str) -> dict:
        if role == "prefill":
            return dict(self.cfg.prefill)
        return {**self.cfg.decode, "colocated_prefill": True} if self.mode == "colocated" else dict(self.cfg.decode)

    def _num_gpus(self) -> float:
        import ray

        return gpus_per_worker(self.cfg.workers, ray.cluster_resources().get("GPU", 0))

    def check_fits(self, resources: dict, embedded: bool) -> None:
        """Every worker's request against the cluster's totals, before any actor starts: on the embedded cluster a
        shortfall fails at once, naming what to set (Ray would leave the actor pending for good); a joined
        cluster may still grow (an autoscaler), so there it is a warning."""
        need: dict[str, float] = {}
        for role, count in self.counts():
            opts = self._options(role)
            for name, amount in (("CPU", opts["num_cpus"]), ("GPU", opts["num_gpus"]), *(opts["resources"] or {}).items()):
                need[name] = need.get(name, 0.0) + count * float(amount or 0)
        short = {k: (v, resources.get(k, 0.0)) for k, v in need.items() if v > resources.get(k, 0.0) + 1e-9}
        if not short:
            return
        what = ", ".join(f"{k}: workers need {v:g}, the cluster has {have:g}" for k, (v, have) in short.items())
        hint = ("lower workers.num_cpus_per_worker / num_gpus_per_worker (fractions share a device), the worker "
                "counts, or the workers' custom resources, or add nodes that have them")
        if embedded:
            raise StartError(f"the workers do not fit this cluster ({what}); {hint}")
        log.warning("the workers do not fit the cluster as it is now (%s): they wait for nodes; %s", what, hint)

    def _options(self, role: str) -> dict:
        w = self.cfg.workers
        res = w.prefill_resources if role == "prefill" else w.decode_resources
        return dict(num_gpus=self._num_gpus(), num_cpus=w.num_cpus_per_worker, resources=dict(res) or None,
                    max_restarts=w.max_restarts, max_task_retries=0, max_concurrency=4)

    def start(self, embedded: bool = False) -> list[WorkerInfo]:
        import ray

        self.check_fits(ray.cluster_resources(), embedded)
        w = self.cfg.workers
        host = "127.0.0.1" if w.host == "auto" and embedded else w.host  # the embedded cluster stays on loopback
        actor = ray.remote(WorkerActor)
        log.info("workers: %s (%s)", self.mode, ", ".join(f"{n} {role}" for role, n in self.counts()))
        for role, count in self.counts():
            section = self.section(role)
            for i in range(count):
                wid = f"{role}-{i}"
                self.actors[wid] = actor.options(**self._options(role)).remote(
                    role, self.model_path, section, self.token, host, self.cfg.model.dtype, self.cfg.model.device,
                    wid)
                self.roles[wid] = role
        return self.refresh(timeout_s=self.cfg.workers.start_timeout_s, require_all=True)

    def refresh(self, timeout_s: float = 5.0, require_all: bool = False) -> list[WorkerInfo]:
        import ray

        refs = {wid: a.endpoints.remote() for wid, a in self.actors.items() if wid not in self.dead}
        for wid, ref in refs.items():
            try:
                before = self.addresses.get(wid)
                self.addresses[wid], self.metrics_urls[wid] = self._endpoints(ref, timeout_s)
                if before is not None and before != self.addresses[wid]:  # a restarted actor, on a new port
                    log.info("worker %s now listens at %s (was %s)", wid, self.addresses[wid], before)
            except ray.exceptions.ActorDiedError as e:  # Ray will not restart it
                # its restarts exhausted, or killed for good (ray.kill with no_restart): Ray's cause says which
                self.dead[wid] = (f"died and Ray will not restart it (workers.max_restarts="
                                  f"{self.cfg.workers.max_restarts}): {_cause(e)}")
                log.error("worker %s %s", wid, self.dead[wid])
                if require_all:
                    raise StartError(f"worker {wid} {self.dead[wid]}") from None
            except StartError:
                raise
            except Exception as e:  # restarting: keep the last address; the router's polls fail over
                if require_all:
                    raise StartError(
                        f"worker {wid} did not start within {timeout_s:.0f} s ({_cause(e)}); check that the "
                        f"Ray cluster has the resources it asks for: {self._options(self.roles[wid])}") from None
                log.debug("%s has no address now: %s", wid, e)
        return [WorkerInfo(wid, self.roles[wid], self.addresses.get(wid, ""), self.dead.get(wid, ""),
                           self.metrics_urls.get(wid, "")) for wid in self.actors]

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
