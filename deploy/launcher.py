"""The launcher behind ``colm serve``: Ray cluster, worker actors, router, until interrupted.

Path of a launch: read ``ClusterConfig`` -> resolve the model (build the bundled tiny-air demo
checkpoint into a cache directory when no path is given) -> ``ray.init`` (embedded local cluster,
or join ``--address auto``) -> start N prefill and M decode actors (``deploy/actors.py``; GPUs when
the cluster has them, custom resources to pin pools, restart on failure) and collect their gRPC
addresses -> run the router (gRPC + HTTP + metrics) in this driver process over those workers ->
every second re-read the actors' addresses so a restarted actor comes back into service.

If the engine packages are not installed, the router serves the model in-process (no
disaggregation) so the demo still answers; the log says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from colm.deploy.config import ClusterConfig

log = logging.getLogger("colm.serve")


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
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"model.path={path!r}: not a colm checkpoint (no config.json)")
        return path
    out = demo_model_dir(cfg.model.preset)
    if (out / "config.json").is_file():
        return str(out)
    import tempfile

    from colm import checkpoint
    from colm.model import CoLM
    from colm.presets import preset

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model = CoLM(preset(cfg.model.preset)).reset_parameters(std=0.02, seed=0)
    checkpoint.save(model, tmp, tokenizer={"kind": "byte"})
    try:
        os.replace(tmp, out)
    except OSError:  # another launcher won the race; its checkpoint is the same
        pass
    return str(out)


class Launcher:
    def __init__(self, cfg: ClusterConfig, model_path: str | None = None, colocated: bool = False) -> None:
        self.cfg = cfg
        self.colocated = colocated  # the baseline: one full model prefills and decodes, full scale only
        self.model_path = model_path
        self.token = cfg.token()
        self.pool = None  # deploy.actors.WorkerPool when engines run as actors
        self.server = None
        self.addresses: dict[str, str] = {}
        self._watch: asyncio.Task | None = None

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        r = self.cfg.ray
        kw = dict(namespace=r.namespace, log_to_driver=False, configure_logging=False)
        if r.address:
            ray.init(address=r.address, **kw)
        else:
            w = self.cfg.workers
            # Logical CPUs are scheduling tokens: give the embedded cluster room for every worker actor.
            need = int(-(-(w.num_prefill + w.num_decode) * w.num_cpus_per_worker // 1))
            ray.init(num_cpus=r.num_cpus or max(2, os.cpu_count() or 2, need), include_dashboard=False, **kw)

    async def start(self) -> dict[str, str]:
        from colm import checkpoint
        from colm.router.core import Router
        from colm.router.server import RouterServer
        from colm.tokenizer import load_checkpoint_tokenizer

        cfg = self.cfg
        path = self.model_path or ensure_model(cfg)
        model_cfg = checkpoint.load_config(path)
        tokenizer = load_checkpoint_tokenizer(path)
        backend, block_size = None, int(cfg.decode.get("block_size", 16))
        try:
            from colm.deploy.actors import WorkerPool, engines_available

            if engines_available() and not self.colocated:
                self._init_ray()
                self.pool = WorkerPool(cfg, path, self.token)
                infos = await asyncio.get_running_loop().run_in_executor(None, self.pool.start)
                from colm.router.grpc_backend import GrpcBackend

                scorer = checkpoint.load(path).eval() if cfg.model.score_prompts else None
                backend = GrpcBackend(infos, cluster_token=self.token, scorer=scorer)
        except ImportError as e:
            log.warning("engines unavailable (%s)", e)
        if backend is None:
            backend = self._colocated_backend(path) if self.colocated else self._in_process_backend(path, model_cfg)
        self.model_path = path
        router_cfg = cfg.router
        if self.colocated:
            import dataclasses

            router_cfg = dataclasses.replace(router_cfg, fixed_scale=model_cfg.num_chains)
        router = Router(router_cfg, model_cfg, tokenizer, backend, block_size=block_size)
        self.server = RouterServer(router)
        self.addresses = await self.server.start()
        if self.pool is not None:
            self._watch = asyncio.create_task(self._watch_workers(backend))
        return self.addresses

    def _in_process_backend(self, path: str, model_cfg):
        """No worker actors available: run the engines in this process (still prefill -> decode with a
        KV hand-off), or, for a model the chain-1 prefill engine cannot serve, one full model."""
        try:
            from colm.decode_worker.config import DecodeConfig
            from colm.decode_worker.engine import DecodeEngine
            from colm.prefill_worker.config import PrefillConfig
            from colm.prefill_worker.engine import PrefillEngine
            from colm.router.engine_backend import EngineBackend

            if model_cfg.kv_sharing:
                w, device = self.cfg.workers, self._device()
                dtype = getattr(__import__("torch"), self.cfg.model.dtype)
                prefill = {f"prefill-{i}": PrefillEngine.from_checkpoint(path, PrefillConfig(**self.cfg.prefill),
                                                                         device=device, dtype=dtype)
                           for i in range(w.num_prefill)}
                decode = {f"decode-{i}": DecodeEngine.from_checkpoint(path, DecodeConfig(**self.cfg.decode),
                                                                      device=device, dtype=dtype)
                          for i in range(w.num_decode)}
                log.warning("no Ray worker actors available: prefill and decode engines run in this process")
                return EngineBackend(prefill, decode)
        except ImportError as e:
            log.warning("engines unavailable (%s)", e)
        from colm import checkpoint
        from colm.router.local_backend import LocalBackend

        log.warning("serving one full model in-process (no prefill/decode split)")
        return LocalBackend(checkpoint.load(path).eval())

    def _colocated_backend(self, path: str):
        """The load test's baseline on the same resources: one process, the full model prefills (all
        chains) and decodes every request at the full scale, with the same decode engine."""
        import torch

        from colm.decode_worker.config import DecodeConfig
        from colm.decode_worker.engine import DecodeEngine
        from colm.router.colocated import FullPrefillEngine
        from colm.router.engine_backend import EngineBackend

        de = DecodeEngine.from_checkpoint(path, DecodeConfig(**self.cfg.decode), device=self._device(),
                                          dtype=getattr(torch, self.cfg.model.dtype))
        log.warning("colocated baseline: full-model prefill and decode in this process, full scale only")
        return EngineBackend({"colocated-prefill": FullPrefillEngine(de.model)}, {"colocated-decode": de})

    def _device(self) -> str:
        import torch

        d = self.cfg.model.device
        return ("cuda" if torch.cuda.is_available() else "cpu") if d == "auto" else d

    async def _watch_workers(self, backend) -> None:
        """Restarted actors may listen on new ports: keep the backend's worker list current."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            try:
                infos = await loop.run_in_executor(None, self.pool.refresh)
                backend.set_workers(infos)
            except Exception as e:  # keep watching; the router's polls take dead workers out meanwhile
                log.debug("worker refresh failed: %s", e)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.server is not None:
            await self.server.stop()
        if self.pool is not None:
            self.pool.stop()
            if not self.cfg.ray.address:  # the embedded cluster is ours to end
                import ray

                ray.shutdown()
