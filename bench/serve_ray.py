"""The README's ``colm serve`` on Ray under closed-loop load, as a user runs it, in one command.

Starts ``colm serve --config`` (embedded Ray) as a child process with the given YAML and ``--set`` overrides, waits
until its health says serving with every worker healthy (the load starts only then: clients that connect to the
launcher's router before its replicas listen all land on one router), runs one ``colm loadtest`` pass per budget
mix against it, and stops it with SIGTERM. The first pass writes ``PREFIX.json`` / ``.png`` (``colm loadtest``'s
summary), the second ``PREFIX_mix``, a later one ``PREFIX_mixN``; each with ``meta``: the device, the serve
configuration, seconds to ready, and the GPU's busy percentage (``nvidia-smi`` sampled every second during the pass,
mean; None without a GPU). Where the figures in docs/results.md came from: the command below on one H200.

    python bench/serve_ray.py --set model.preset=llama-3.2-1b-16-16-air --set model.dtype=bfloat16 \\
        --set decode.num_blocks=0 --set decode.warmup_context=2200 --set decode.max_batch_size=160 \\
        --set router.replicas=auto --concurrency 160 --ramp-s 2 --num-requests 6000 --warmup-requests 64 \\
        --processes 8 --connections 8 --prompt-len 512,2048 --output-len 32,96 \\
        --slo-ttft-ms 200 --slo-tpot-ms 10 --passes 'none;none=1,tpot:4=1,ttft:100=1' --out $OUT/serve_ray_h200_1b_air_c160
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import yaml

from colm.loadtest import LoadSpec, plot, run as run_load, table


def set_key(d: dict, dotted: str, text: str) -> None:
    """``d[a][b] = value`` for ``dotted`` "a.b" (the value parsed as YAML: numbers, booleans, null, lists)."""
    *path, last = dotted.split(".")
    for key in path:
        if not isinstance(d.get(key), dict):  # absent, or null in the YAML
            d[key] = {}
        d = d[key]
    d[last] = yaml.safe_load(text)


def serve_config(base: str | None, sets: list[str]) -> dict:
    from colm.deploy.config import ClusterConfig, bundled_serve_yaml

    with open(base or bundled_serve_yaml()) as f:
        d = yaml.safe_load(f) or {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE (e.g. model.preset=tiny-air)")
        set_key(d, key.strip(), value)
    ClusterConfig.from_dict(d)  # a bad key or value stops here, with the config's own message
    return d


class Service:
    """``colm serve`` as a child process: its stderr read on a thread, the gRPC address taken from its banner."""

    def __init__(self, config_path: str) -> None:
        exe = shutil.which("colm")
        cmd = ([exe] if exe else [sys.executable, "-m", "colm.cli"]) + ["serve", "--config", config_path]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def grpc_address(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.log.append(line)
            m = re.search(r"\[colm serve\] grpc\s+(\S+)", line)
            if m:
                return m.group(1)
        raise SystemExit("colm serve did not say where it listens:\n" + "".join(self.log[-40:]))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def wait_serving(addr: str, timeout_s: float, api_key: str | None = None) -> dict:
    """Health once it says serving with every worker healthy (a busy router is asked again)."""
    from colm.client import Client

    deadline, h = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            with Client(addr, api_key=api_key) as c:
                h = c.health()
            if h["serving"] and h["workers"] and all(w["healthy"] for w in h["workers"]):
                return h
        except Exception as e:  # noqa: BLE001 - not listening yet, or busy
            h = {"error": str(e)}
        time.sleep(0.5)
    raise SystemExit(f"colm serve not serving after {timeout_s} s: {h}")


class GpuBusy:
    """``nvidia-smi``'s utilization.gpu every second while running; ``mean`` is None without a GPU."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-l", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.split(",")[0]))
            except ValueError:
                pass

    def stop(self) -> float | None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
        return sum(self.samples) / len(self.samples) if self.samples else None


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def pair(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def mix(text: str) -> tuple[tuple[str, float], ...]:
    return tuple((k.strip(), float(w or 1)) for k, _, w in (item.partition("=") for item in text.split(",")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="base serve.yaml (default: the bundled deploy/serve.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, dotted (repeatable): --set router.replicas=auto")
    ap.add_argument("--passes", default="none", help="budget mixes, one load pass each, separated by ';' "
                    "(colm loadtest --budgets syntax): 'none;none=1,tpot:4=1,ttft:100=1'")
    ap.add_argument("--concurrency", type=int, default=16, help="closed-loop clients (at least 1)")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--warmup-requests", type=int, default=0)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--ramp-s", type=float, default=0.0)
    ap.add_argument("--prompt-len", default="8,32")
    ap.add_argument("--output-len", default="4,16")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument("--timeout-s", type=float, default=120.0)
    ap.add_argument("--ready-timeout-s", type=float, default=600.0, help="for colm serve to start and serve")
    ap.add_argument("--out", default="serve_ray", help="output prefix: PREFIX.json, PREFIX_mix.json, ...")
    args = ap.parse_args()

    if args.concurrency < 1:
        raise SystemExit(f"--concurrency {args.concurrency}: a closed loop needs at least 1 client")
    cfg = serve_config(args.config, args.set)
    api_key = (cfg.get("router") or {}).get("api_key")
    if isinstance(api_key, str) and api_key.startswith("env:"):
        api_key = os.environ.get(api_key[4:])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    t0 = time.monotonic()
    service = Service(f.name)
    wrote = []
    try:
        addr = service.grpc_address(args.ready_timeout_s)
        health = wait_serving(addr, max(1.0, args.ready_timeout_s - (time.monotonic() - t0)), api_key)
        ready_s = time.monotonic() - t0
        print(f"[serve_ray] serving at {addr} after {ready_s:.0f} s: "
              f"{', '.join(w['worker_id'] for w in health['workers'])}", flush=True)
        for i, budgets in enumerate(p.strip() for p in args.passes.split(";")):
            spec = LoadSpec(num_requests=args.num_requests, concurrency=args.concurrency,
                            prompt_len=pair(args.prompt_len), output_len=pair(args.output_len), budgets=mix(budgets),
                            slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, timeout_s=args.timeout_s,
                            warmup_requests=args.warmup_requests if i == 0 else 0, processes=args.processes,
                            connections=args.connections, ramp_s=args.ramp_s)
            prefix = args.out if i == 0 else f"{args.out}_mix" if i == 1 else f"{args.out}_mix{i}"
            gpu = GpuBusy()
            summary = run_load(addr, spec, None, None, api_key=api_key, progress=False)
            busy = gpu.stop()
            summary["meta"] = {"addr": addr, "device": device_name(), "date": datetime.date.today().isoformat(),
                               "budgets": budgets, "serve_config": cfg, "ready_s": round(ready_s, 1),
                               "launched_by": "colm serve --config (embedded Ray); load started once health said "
                                              "serving with every worker healthy",
                               "gpu_busy_percent_mean": busy,
                               "gpu_busy_note": "nvidia-smi utilization.gpu sampled each second over the pass, mean"}
            with open(prefix + ".json", "w") as fh:
                json.dump(summary, fh, indent=2)
            plot(summary, prefix + ".png")
            wrote.append(prefix + ".json")
            print(f"[serve_ray] pass {i} (budgets {budgets}), GPU busy {busy if busy is not None else '-'} %",
                  flush=True)
            print(table(summary), flush=True)
    finally:
        rc = service.stop()
        os.unlink(f.name)
    print(f"[serve_ray] colm serve exited with {rc}; wrote {', '.join(wrote)}")
    return 0 if wrote else 1


if __name__ == "__main__":
    sys.exit(main())
