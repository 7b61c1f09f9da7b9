"""Run one prefill or decode worker as a plain process (no Ray): engine + internal gRPC server.

    python -m colm.deploy.worker_main --role decode --model DIR --token-env COLM_CLUSTER_TOKEN \\
        [--host 127.0.0.1] [--port 0] [--device cuda] [--dtype bfloat16] [--config '{"num_blocks": 4096}']

Prints ``READY <role> <host:port>`` on stdout once it serves (benchmarks and process managers read
it), then runs until SIGINT/SIGTERM, or exits with code 70 if its engine's loop ends with an error. Log lines (INFO
and up: graph captures at start, failed steps) go to stderr. The cluster token comes from an environment variable,
never from the command line (which other users of the machine can read).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from colm.deploy.actors import exit_after_loop_error
from colm.gc_pauses import freeze_start_heap


def build_server(role: str, model: str, token: str, address: str, device: str, dtype: str | None, section: dict):
    import torch

    torch_dtype = getattr(torch, dtype) if dtype else None
    if role == "decode":
        from colm.decode_worker.config import DecodeConfig
        from colm.decode_worker.engine import DecodeEngine
        from colm.decode_worker.service import DecodeServer

        engine = DecodeEngine.from_checkpoint(model, DecodeConfig(**section), device=device, dtype=torch_dtype)
        engine.on_loop_error(exit_after_loop_error)
        return DecodeServer(engine, token, address)
    from colm.prefill_worker.config import PrefillConfig
    from colm.prefill_worker.engine import PrefillEngine
    from colm.prefill_worker.service import PrefillServer

    engine = PrefillEngine.from_checkpoint(model, PrefillConfig(**section), device=device, dtype=torch_dtype)
    engine.on_loop_error(exit_after_loop_error)  # its supervisor starts it again
    return PrefillServer(engine, token, address)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m colm.deploy.worker_main")
    ap.add_argument("--role", choices=["prefill", "decode"], required=True)
    ap.add_argument("--model", required=True, help="colm checkpoint directory")
    ap.add_argument("--token-env", default="COLM_CLUSTER_TOKEN", help="environment variable holding the cluster token")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--config", default="{}", help="the engine's config section as JSON")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s {args.role} %(name)s %(levelname)s %(message)s")
    token = os.environ.get(args.token_env, "")
    if len(token) < 16:
        print(f"worker_main: ${args.token_env} must hold the cluster token (>= 16 characters)", file=sys.stderr)
        return 2
    server = build_server(args.role, args.model, token, f"{args.host}:{args.port}", args.device, args.dtype,
                          json.loads(args.config)).start()
    freeze_start_heap()  # before the first request: colm/gc_pauses.py
    print(f"READY {args.role} {server.address}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
