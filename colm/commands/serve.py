"""``colm serve``: start the service (Ray cluster, prefill/decode workers, router) and keep it up."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model: embedded local Ray cluster (or --address auto), workers, router",
                       description="Serve MODEL_OR_DIR (a colm checkpoint directory, or 'demo' for the bundled "
                                   "CoLM-Air {4,4} demo model). Everything not given as a flag comes from --config "
                                   "(default: the bundled deploy/serve.yaml, the demo model on this machine's CPU or "
                                   "GPU); flags override the YAML. Secrets may be given as env:NAME to read NAME "
                                   "from the environment. Ctrl-C or SIGTERM stops everything.")
    p.add_argument("model_or_dir", nargs="?", default=None, metavar="MODEL_OR_DIR",
                   help="checkpoint directory or 'demo' (overrides model.path)")
    p.add_argument("--config", default=None, help="serve.yaml (default: the bundled one)")
    p.add_argument("--model", default=None, metavar="MODEL_OR_DIR", help="same as the positional MODEL_OR_DIR")
    p.add_argument("--host", default=None, help="router listen address for gRPC and HTTP (router.host; default 127.0.0.1)")
    p.add_argument("--port", "--http-port", dest="http_port", type=int, default=None, metavar="PORT",
                   help="OpenAI-compatible HTTP port (router.http_port; default 8000)")
    p.add_argument("--grpc-port", type=int, default=None, metavar="PORT", help="gRPC port (router.grpc_port; default 50051)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require this key on the public endpoints (router.api_key); env:NAME reads it from NAME")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="model name in the OpenAI API's responses and /v1/models (router.served_model_name)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT", help="Prometheus metrics port (router.metrics_port)")
    p.add_argument("--address", default=None, help="Ray address: 'auto' joins a running cluster (default: embedded)")
    p.add_argument("--num-prefill", type=int, default=None, help="prefill workers (workers.num_prefill)")
    p.add_argument("--num-decode", type=int, default=None, help="decode workers (workers.num_decode)")
    p.add_argument("--mode", default=None, choices=("auto", "disaggregated", "colocated"),
                   help="workers.mode: prefill workers hand K/V to decode workers, or decode workers prefill their "
                        "own prompts (auto: colocated where workers would share GPUs)")
    p.add_argument("--baseline", action="store_true",
                   help="baseline for load tests: the dense-model cost on colm's best one-process engine (full-model "
                        "prefill, full scale only, no scale choice)")
    p.set_defaults(func=run)


# (flag's dest, YAML section, field): a flag given on the command line replaces the field's YAML value.
OVERRIDES = (
    ("address", "ray", "address"),
    ("host", "router", "host"),
    ("grpc_port", "router", "grpc_port"),
    ("http_port", "router", "http_port"),
    ("api_key", "router", "api_key"),
    ("served_model_name", "router", "served_model_name"),
    ("metrics_port", "router", "metrics_port"),
    ("num_prefill", "workers", "num_prefill"),
    ("num_decode", "workers", "num_decode"),
    ("mode", "workers", "mode"),
)


def model_arg(args) -> str | None:
    positional, flag = getattr(args, "model_or_dir", None), getattr(args, "model", None)
    if positional is not None and flag is not None and positional != flag:
        raise ValueError(f"model given twice: {positional!r} and --model {flag!r}")
    return positional if positional is not None else flag


def load_config(args):
    import yaml

    from colm.deploy.config import ClusterConfig, bundled_serve_yaml

    path = args.config or bundled_serve_yaml()
    try:
        with open(path) as f:
            d = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(d, dict):
        raise ValueError(f"--config {path}: must be a mapping of sections (model, workers, router, ...), got "
                         f"{type(d).__name__}")
    overrides = [("model", "path", model_arg(args))]
    overrides += [(section, key, getattr(args, dest, None)) for dest, section, key in OVERRIDES]
    for section, key, value in overrides:
        if value is not None:
            d.setdefault(section, {})
            d[section] = dict(d[section] or {}, **{key: value})
    return ClusterConfig.from_dict(d)


def announce(launcher, addrs: dict) -> None:
    backend = launcher.server.router.backend
    where = "Ray actors" if launcher.pool is not None else "in this process"
    workers = ", ".join(f"{w.worker_id}{'@' + w.address if w.address else ''}" for w in backend.workers())
    print(f"[colm serve] model {launcher.model_path} ready", file=sys.stderr)
    print(f"[colm serve] workers ({where}): {workers}", file=sys.stderr)
    for kind, addr in addrs.items():
        print(f"[colm serve] {kind:7s} {addr}", file=sys.stderr)
    rcfg = launcher.server.router.cfg
    # with a key or TLS the hints say where they go (KEY and CA stand for yours: the key itself is never printed)
    key = " --api-key KEY" if rcfg.api_key else ""
    ca = " --tls-ca CA.pem" if rcfg.tls_cert else ""
    print(f"[colm serve] try: colm client generate --addr {addrs['grpc']}{key}{ca} --prompt 'def read_config(path):' "
          "--stream", file=sys.stderr)
    if "http" in addrs:
        auth = " -H 'Authorization: Bearer KEY'" if rcfg.api_key else ""
        cacert = " --cacert CA.pem" if rcfg.tls_cert else ""
        print(f"[colm serve]  or: curl{cacert} {addrs['http']}/v1/completions{auth} -H 'Content-Type: application/json' "
              "-d '{\"prompt\": \"def read_config(path):\", \"max_tokens\": 16, \"tpot_ms\": 50}'", file=sys.stderr)
    sys.stderr.flush()


def run(args) -> int:
    import asyncio
    import logging
    import signal

    from colm.deploy.actors import StartError
    from colm.deploy.launcher import Launcher
    from colm.gc_pauses import freeze_start_heap

    logging.basicConfig(level=logging.INFO, format="[colm serve] %(levelname)s %(message)s")
    cfg = load_config(args)  # a bad field or an unset env: secret raises ValueError: one line, exit 2
    launcher = Launcher(cfg, baseline=args.baseline)
    launcher.prepare()  # the checkpoint and TLS files, before Ray or any worker starts

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:  # the first stops after a drain (router.drain_s); another ends the drain at once
            if not stop.is_set():
                stop.set()
                return
            print("[colm serve] stop signal again: ending the drain now (requests still running are cut)",
                  file=sys.stderr)
            launcher.end_drain()

        # Before starting: a signal during start-up stops cleanly too. SIGTERM takes the same path as Ctrl-C
        # (the launcher keeps ray.init from replacing this handler).
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        starting = asyncio.ensure_future(launcher.start())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():  # a signal while the workers load: stop now, not once they are up
                launcher.cancel_start()
                try:
                    await starting  # ends at the pool's next look (0.25 s), with no Ray call left running
                except StartError:
                    print("[colm serve] stopped during start-up", file=sys.stderr)
                    return
            addrs = starting.result()
            if not stop.is_set():
                freeze_start_heap()  # what start-up left lives as long as the service (colm/gc_pauses.py)
                announce(launcher, addrs)
                await stopped
        finally:
            stopped.cancel()
            print("[colm serve] stopping", file=sys.stderr)
            await launcher.stop()

    try:
        asyncio.run(main())
    except (OSError, StartError) as e:  # a port in use, an address we cannot bind, workers that cannot start
        print(f"colm serve: error: {e}", file=sys.stderr)
        return 2
    return 0
