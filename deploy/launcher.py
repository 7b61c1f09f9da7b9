"""The launcher behind ``colm serve``: Ray cluster, worker actors, router, until interrupted.

Path of a launch: read ``ClusterConfig`` -> resolve the model (build the bundled tiny-air demo
checkpoint into a cache directory when no path is given) -> check that the engines can serve it and
that the TLS files load (``prepare``: one clear error at once, not a worker dying inside Ray) ->
``ray.init`` (embedded local cluster, or join ``--address auto``) -> start N prefill and M decode
actors (``deploy/actors.py``; GPUs when the cluster has them, custom resources to pin pools, restart
on failure) and collect their gRPC addresses -> run the router (gRPC + HTTP + metrics) in this driver
process over those workers -> every second re-read the actors' addresses so a restarted actor comes
back into service; with ``router.replicas`` > 1, start the other routers and start again one that dies
(``deploy/replicas.py``). ``stop`` (SIGINT or SIGTERM in ``colm serve``) drains the router and its replicas together
(``router.drain_s``: ``router/drain.py``), then ends them, the actors and an embedded Ray cluster; ``end_drain`` (a
second signal) cuts that drain short.

If the engine packages are not installed, the router serves the model in-process (no
disaggregation) so the demo still answers; the log says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from pathlib import Path

from colm.config import servable
from colm.deploy.config import ClusterConfig, resolve_mode

log = logging.getLogger("colm.serve")
# The embedded cluster's workers (router replicas, engine actors) run at niceness 0, not Ray's default 15 for worker
# processes: they answer requests (``actors.serving_priority``).
# enable_metrics_collection off: the dashboard agent's Prometheus exporter (every interface, no authentication) is
# not started; colm's own metrics do not use Ray's
EMBEDDED_RAY_SYSTEM_CONFIG = {"worker_niceness": 0, "enable_metrics_collection": False}


def demo_model_dir(preset_name: str) -> Path:
    root = Path(os.environ.get("COLM_CACHE", Path.home() / ".cache" / "colm")) / "models"
    return root / f"{preset_name}-demo-seed0"


def ensure_model(cfg: ClusterConfig) -> str:
    """The checkpoint to serve: the configured path, the bundled demo, or a random-weight checkpoint of
    ``model.preset`` built once into a cache directory (atomically, so concurrent launchers agree)."""
    path = cfg.model.path
    if path is None and cfg.model.preset == "demo" or path == "demo":
        from colm.assets import demo_model_dir as bundled_demo

        return str(bundled_demo())
    if path:
        if not Path(path).is_dir():
            raise ValueError(f"model.path={path!r}: not a colm checkpoint (no such directory)")
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"model.path={path!r}: not a colm checkpoint (no config.json)")
        return path
    from colm.presets import preset

    try:
        preset_cfg = preset(cfg.model.preset)
    except (KeyError, ValueError) as e:
        raise ValueError(f"model.preset={cfg.model.preset!r}: {e}") from None
    reason = servable(preset_cfg)
    if reason is not None and engines_will_run():
        raise ValueError(f"model.preset={cfg.model.preset!r}: {reason}")
    out = demo_model_dir(cfg.model.preset)
    if (out / "config.json").is_file():
        return str(out)
    import tempfile

    from colm import checkpoint
    from colm.model import CoLM

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model = CoLM(preset_cfg).reset_parameters(std=0.02, seed=0)
    checkpoint.save(model, tmp, tokenizer={"kind": "byte"})
    try:
        os.replace(tmp, out)
    except OSError:  # another launcher won the race; its checkpoint is the same
        pass
    return str(out)


def engines_will_run() -> bool:
    """The prefill/decode engines (Ray actors, in-process or the colocated baseline) serve; without them
    the router falls back to one full model in-process, which serves any checkpoint."""
    try:
        from colm.deploy.actors import engines_available
    except ImportError:
        return False
    return engines_available()


def check_model(cfg: ClusterConfig, path: str, baseline: bool = False):
    """Everything the engines will need of the checkpoint at ``path``, checked here so a bad one fails in a
    second with one line (in a worker actor it fails only after the start-up wait). Returns its ModelConfig."""
    from colm import checkpoint
    from colm.tokenizer import load_checkpoint_tokenizer

    try:
        model_cfg = checkpoint.load_config(path)
    except (KeyError, TypeError) as e:
        raise ValueError(f"model {path}: config.json does not describe a colm model ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise ValueError(f"model {path}: cannot read config.json ({e})") from None
    weights = Path(path) / checkpoint.WEIGHTS_FILE
    if not weights.is_file() or not os.access(weights, os.R_OK):
        raise ValueError(f"model {path}: no readable {checkpoint.WEIGHTS_FILE}")
    checkpoint.check_weights(path)  # every tensor there, of its shape, in a whole file
    fixed = cfg.router.fixed_scale
    if fixed is not None and fixed > model_cfg.num_chains:  # else every request would be refused, blaming its scale
        raise ValueError(f"router.fixed_scale={fixed}: model {path} has scales 1..{model_cfg.num_chains}")
    try:
        load_checkpoint_tokenizer(path)
    except (OSError, KeyError, ImportError) as e:
        raise ValueError(f"model {path}: its tokenizer does not load ({type(e).__name__}: {e})") from None
    if baseline or engines_will_run():
        reason = servable(model_cfg)
        if reason is not None:
            raise ValueError(f"model {path}: {reason}")
        device = cfg.model.device
        if device == "auto" and not cfg.ray.address:  # an embedded cluster's workers have this machine's devices
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.decode.get("num_blocks", 0) == 0 and device == "cpu":  # 0 is also the field's default
            raise ValueError("decode.num_blocks=0 sizes the KV pool from free GPU memory; the decode workers run "
                             "on CPU here: give a block count")
    return model_cfg


def check_tls(cfg: ClusterConfig) -> None:
    """The router's certificate and key load as a pair (RouterConfig already checked that both files exist)."""
    r = cfg.router
    if not r.tls_cert:
        return
    import ssl

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(r.tls_cert, r.tls_key)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"router.tls_cert={r.tls_cert!r}, router.tls_key={r.tls_key!r}: do not load as a PEM "
                         f"certificate and its key ({e})") from None


class Launcher:
    def __init__(self, cfg: ClusterConfig, model_path: str | None = None, baseline: bool = False) -> None:
        self.cfg = cfg
        self.baseline = baseline  # the load test's: one colocated engine, full-model prefill, full scale only
        self.model_path = model_path
        self.token = cfg.token()
        self.pool = None  # deploy.actors.WorkerPool when engines run as actors
        self._start_cancelled = False
        self.server = None
        self.addresses: dict[str, str] = {}
        self._watch: asyncio.Task | None = None
        self._model_cfg = None
        self.replicas: list = []  # router.replicas - 1 RouterReplica actors (a RouterReplicas, deploy/replicas.py)
        self._infos: list = []  # the workers as last read: what a replica started again is given

    def prepare(self) -> str:
        """Resolve the checkpoint and check it and the TLS files (before Ray or any worker starts); its path."""
        if self._model_cfg is None:
            check_tls(self.cfg)
            path = self.model_path or ensure_model(self.cfg)
            self._model_cfg = check_model(self.cfg, path, self.baseline)
            self.model_path = path
        return self.model_path

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        r = self.cfg.ray
        kw = dict(namespace=r.namespace, log_to_driver=False, configure_logging=False)
        # ray.init replaces SIGTERM's handler with sys.exit (and its C++ core worker installs one that dumps a
        # stack), which aborts the process instead of taking SIGINT's clean stop: give the caller's handler back.
        main = threading.current_thread() is threading.main_thread()
        prev_sigterm = signal.getsignal(signal.SIGTERM) if main else None
        if r.address:
            ray.init(address=r.address, **kw)
        else:
            w = self.cfg.workers
            # Logical CPUs are scheduling tokens: give the embedded cluster room for every worker actor.
            need = int(-(-(w.num_prefill + w.num_decode) * w.num_cpus_per_worker // 1))
            # colm's workers bind loopback here (WorkerPool.start: workers.host auto). Ray 2.60's own GCS, raylet and
            # core-worker servers listen on every interface, and it turns a node IP of 127.0.0.1 into the machine's
            # address (both checked with ss); its token authentication, on by default, guards those ports. Its
            # autoscaler's and dashboard head's metrics exporters (44217, 44227) answer there without authentication.
            ray.init(num_cpus=r.num_cpus or max(2, os.cpu_count() or 2, need), include_dashboard=False,
                     _system_config=EMBEDDED_RAY_SYSTEM_CONFIG, **kw)
        if callable(prev_sigterm):
            signal.signal(signal.SIGTERM, prev_sigterm)

    async def start(self) -> dict[str, str]:
        from colm import checkpoint
        from colm.router.core import Router
        from colm.router.server import RouterServer
        from colm.tokenizer import load_checkpoint_tokenizer

        cfg = self.cfg
        path = self.prepare()
        model_cfg = self._model_cfg
        tokenizer = load_checkpoint_tokenizer(path)
        backend, block_size = None, int(cfg.decode.get("block_size", 16))
        try:
            from colm.deploy.actors import WorkerPool, engines_available

            if engines_available() and not self.baseline:
                self._init_ray()
                self.pool = WorkerPool(cfg, path, self.token)
                if self._start_cancelled:  # a signal came while Ray started
                    self.pool.cancel_start()
                infos = await asyncio.get_running_loop().run_in_executor(None, self.pool.start, not cfg.ray.address)
                from colm.router.grpc_backend import GrpcBackend

                scorer = checkpoint.load(path).eval() if cfg.model.score_prompts else None
                backend = GrpcBackend(infos, cluster_token=self.token, scorer=scorer, kv_path=cfg.transport,
                                      token_stream=cfg.router.token_stream, worker_calls=cfg.router.worker_calls)
        except ImportError as e:
            log.warning("engines unavailable (%s)", e)
        if backend is None:
            backend = self._baseline_backend(path) if self.baseline else self._in_process_backend(path, model_cfg)
        self.model_path = path
        router_cfg = cfg.router
        if self.baseline:
            import dataclasses

            router_cfg = dataclasses.replace(router_cfg, fixed_scale=model_cfg.num_chains)
        router = Router(router_cfg, model_cfg, tokenizer, backend, block_size=block_size)
        replicas = router_cfg.replicas > 1 and self.pool is not None
        if replicas:
            # Not serving until the replicas listen too: a client that connected now would stay on this router alone
            # (measured on an H200: 181 req/s with every connection here, 274 spread over four routers).
            router.starting = f"router replicas starting ({router_cfg.replicas - 1} more routers on these ports)"
        self.server = RouterServer(router)
        self.addresses = await self.server.start()
        if router_cfg.replicas > 1 and self.pool is None:
            log.warning("router.replicas=%d: replicas serve Ray worker actors; this service runs its engines "
                        "in-process, so one router serves it", router_cfg.replicas)
        if replicas:
            self._infos = infos
            await asyncio.get_running_loop().run_in_executor(None, self._start_replicas, router_cfg, block_size)
            router.started()
        if self.pool is not None:
            self._watch = asyncio.create_task(self._watch_workers(backend))
        return self.addresses

    def _start_replicas(self, router_cfg, block_size: int) -> None:
        """router.replicas - 1 more routers as Ray actors on this node, on the same ports (``router_replica``), watched
        and started again when one dies (``deploy/replicas.py``)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from colm.deploy.replicas import RouterReplicas
        from colm.deploy.router_replica import RouterReplica, replica_config

        # max_concurrency: a replica's end_drain runs beside its stop (a second stop signal); its other calls are
        # thread-safe (RouterReplica). No Ray restarts: RouterReplicas starts a dead one again, after a backoff
        actor = ray.remote(RouterReplica).options(
            num_cpus=0, max_concurrency=4,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False))

        def spawn(index: int):
            return actor.remote(replica_config(router_cfg, index, self.addresses), self.model_path, self._infos,
                                self.token, self.cfg.transport, self.cfg.model.score_prompts, block_size)

        self.replicas = RouterReplicas(spawn, router_cfg.replicas, router_cfg.replica_max_restarts,
                                       router_cfg.replica_restart_backoff_s, self.server.router.metrics.registry)
        if self._start_cancelled:  # a stop signal before the line above: cancel_start did not see the replicas
            self.replicas.cancel_start()
        log.info("router replicas: %s", self.replicas.start())

    def _in_process_backend(self, path: str, model_cfg):
        """No worker actors available: run the engines in this process (still prefill -> decode with a
        KV hand-off), or, for a model the chain-1 prefill engine cannot serve, one full model."""
        try:
            from colm.decode_worker.config import DecodeConfig
            from colm.decode_worker.engine import DecodeEngine
            from colm.prefill_worker.config import PrefillConfig
            from colm.prefill_worker.engine import PrefillEngine
            from colm.router.engine_backend import EngineBackend

            if servable(model_cfg) is None:
                import torch

                w, device = self.cfg.workers, self._device()
                dtype = getattr(torch, self.cfg.model.dtype)
                mode = resolve_mode(w, torch.cuda.device_count() if device == "cuda" else 0)
                section = {**self.cfg.decode, "colocated_prefill": mode == "colocated"}
                prefill = {f"prefill-{i}": PrefillEngine.from_checkpoint(path, PrefillConfig(**self.cfg.prefill),
                                                                         device=device, dtype=dtype)
                           for i in range(w.num_prefill if mode == "disaggregated" else 0)}
                decode = {f"decode-{i}": DecodeEngine.from_checkpoint(path, DecodeConfig(**section),
                                                                      device=device, dtype=dtype)
                          for i in range(w.num_decode)}
                log.warning("no Ray worker actors available: %s engines run in this process", mode)
                return EngineBackend(prefill, decode)
        except ImportError as e:
            log.warning("engines unavailable (%s)", e)
        from colm import checkpoint
        from colm.router.local_backend import LocalBackend

        log.warning("serving one full model in-process (no prefill/decode split)")
        from colm.tokenizer import load_checkpoint_tokenizer

        return LocalBackend(checkpoint.load(path).eval(), tokenizer=load_checkpoint_tokenizer(path))

    def _baseline_backend(self, path: str):
        """The load test's baseline on the same resources, served as a dense model would be by the best engine
        colm has: one process, the colocated engine (chunked prefill in the decode loop, CUDA graphs), the FULL
        model prefilling every prompt (``prefill_scale`` 0: a dense model's cost), every request at full scale."""
        import torch

        from colm.decode_worker.config import DecodeConfig
        from colm.decode_worker.engine import DecodeEngine
        from colm.router.engine_backend import EngineBackend

        section = {**self.cfg.decode, "colocated_prefill": True, "prefill_scale": 0}
        de = DecodeEngine.from_checkpoint(path, DecodeConfig(**section), device=self._device(),
                                          dtype=getattr(torch, self.cfg.model.dtype))
        log.warning("baseline: one colocated engine, full-model prefill, full scale only")
        return EngineBackend({}, {"baseline-0": de})

    def _device(self) -> str:
        import torch

        d = self.cfg.model.device
        return ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d

    async def _watch_workers(self, backend) -> None:
        """Restarted actors may listen on new ports: keep the backend's worker list current (the replicas' too), and
        look after the router replicas (a death logged, a restart started: ``RouterReplicas.check``)."""
        loop = asyncio.get_running_loop()
        last_error = None
        while True:
            await asyncio.sleep(1.0)
            if self.replicas:
                try:
                    self.replicas.check()
                except Exception:  # noqa: BLE001 - the watch goes on: the next look tries again
                    log.exception("router replicas: the look at them failed")
            try:
                infos = self._infos = await loop.run_in_executor(None, self.pool.refresh)
                backend.set_workers(infos)
                for r in self.replicas:
                    r.set_workers.remote(infos)
                last_error = None
            except Exception as e:  # keep watching; the router's polls take dead workers out meanwhile
                why = f"{type(e).__name__}: {e}"[:300]
                if why != last_error:  # once per new reason, not every second
                    log.warning("worker refresh failed: %s", why)
                last_error = why

    def _stop_replicas(self) -> None:
        """Stop the router replicas (each drains as this router does) and end their actors."""
        if not self.replicas:
            return
        import ray

        # A replica's stop takes up to router.drain_s, then the servers' own stop. Each is awaited on its own: a
        # ray.get of them all raised at the first that failed (a replica that had died), and the kills below then cut
        # the others' drains short.
        stops = [r.stop.remote() for r in self.replicas]
        done, late = [], []
        if stops:
            done, late = ray.wait(stops, num_returns=len(stops), timeout=self.cfg.router.drain_s + 30)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - it is killed below either way
                log.warning("a router replica did not stop cleanly: %s", " ".join(str(e).split())[:300])
        if late:
            log.warning("%d router replica(s) did not stop within router.drain_s + 30 s: killing them", len(late))
        for r in self.replicas:
            ray.kill(r)
        self.replicas = []

    def end_drain(self) -> None:
        """A second stop signal: the drain of every router (this one's and its replicas') ends now, cutting what is
        still in flight (``router/drain.py``); the ``stop`` under way then goes on at once."""
        if self.server is not None:
            self.server.end_drain()
        for r in self.replicas:
            r.end_drain.remote()

    def cancel_start(self) -> None:
        """A ``start`` in progress ends with ``StartError`` as soon as it next waits on the workers or the router
        replicas."""
        self._start_cancelled = True
        if self.pool is not None:
            self.pool.cancel_start()
        if self.replicas:  # set by _start_replicas, which also looks at _start_cancelled once it has set it
            self.replicas.cancel_start()

    async def stop(self) -> None:
        """Every router (this one and its replicas) drains at once, so that none takes new requests while another
        drains (``router/drain.py``); then the workers and an embedded Ray cluster stop."""
        if self._watch is not None:
            self._watch.cancel()
        replicas = asyncio.get_running_loop().run_in_executor(None, self._stop_replicas)
        try:
            if self.server is not None:
                await self.server.stop()
        finally:
            await replicas
        if self.pool is not None:
            self.pool.stop()
            if not self.cfg.ray.address:  # the embedded cluster is ours to end
                import ray

                ray.shutdown()
